"""Factorize the input token embedding (`apply`) and rebuild it on an empty skeleton (`restructure`).

Besides swapping the module, three pieces of transformers bookkeeping must follow, or a factorized model breaks
far from the cause:

* tied output heads: the head becomes a `FactorizedLMHead` that reads both factors from the embedding, and the
  ``head.weight -> table.weight`` entry leaves the model's tied-weight keys (neither tensor exists any more), so
  `save_pretrained`, `from_pretrained` and `tie_weights()` have nothing stale to tie;
* `resize_token_embeddings`: transformers only resizes `nn.Embedding`; the model gets a resize hook that resizes
  the token factor (a tied head follows by construction, a head bias is padded by `tie_weights()`);
* readers of ``.weight`` get a materialised dense matrix (`FactorizedEmbedding.weight`).
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from ..architectures import get_adapter
from ..calibration import calibration_batches
from ..integrations.transformers import all_tied_keys, drop_tied_keys
from ..utils import replace_module
from .config import EmbeddingFactorizationConfig
from .layers import FactorizedEmbedding, FactorizedLMHead
from .svd import weighted_row_svd


__all__ = [
    "apply_embedding_factorization",
    "restructure_embedding_factorization",
    "token_frequencies",
    "output_sensitivity",
]


def _locate(model: nn.Module) -> tuple[str, nn.Embedding]:
    adapter = get_adapter(model)
    if adapter.embeddings is None:
        raise ValueError(
            f"{type(model).__name__} ({model.config.model_type}) has no input token embedding to factorize (it reads "
            "pixels, not token ids). Use LowRankLinearConfig to factorize its linear layers instead."
        )
    embedding = adapter.input_embeddings(model)
    if isinstance(embedding, FactorizedEmbedding):
        raise ValueError("The input embedding is already factorized; apply EmbeddingFactorizationConfig only once.")
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"Expected the input embedding to be an nn.Embedding, got {type(embedding).__name__}.")
    name = next(n for n, m in model.named_modules() if m is embedding)
    return name, embedding


def _check_rank(rank: int, vocab: int, hidden: int, how: str) -> None:
    if rank < 1:
        raise ValueError(f"{how} gives rank {rank}; the rank must be >= 1 (raise the budget or the energy).")
    if rank >= min(vocab, hidden) or rank * (vocab + hidden) >= vocab * hidden:
        limit = (vocab * hidden - 1) // (vocab + hidden)
        raise ValueError(
            f"{how} gives rank {rank} for a {vocab}x{hidden} embedding; factors of that rank hold "
            f"{rank * (vocab + hidden):,} parameters, no fewer than the {vocab * hidden:,} of the table itself. "
            f"Use a rank of at most {limit} (e.g. rank={min(limit, hidden // 3) or 1})."
        )


def token_frequencies(
    model: nn.Module, data: Any, vocab_size: int, max_texts: int, tokenizer: Any = None
) -> torch.Tensor:
    """How often each token id occurs in the (unpadded) calibration text, as a float tensor of ``vocab_size``."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in calibration_batches(model, data, tokenizer=tokenizer, max_samples=max_texts, batch_size=64):
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        ids = ids[mask.bool()] if mask is not None else ids.reshape(-1)
        ids = ids[(ids >= 0) & (ids < vocab_size)].cpu()
        counts.index_add_(0, ids, torch.ones_like(ids, dtype=torch.float64))
    if counts.sum() == 0:
        raise ValueError("The calibration data contains no tokens; pass real text to weight the factorization.")
    return counts


@torch.enable_grad()
def output_sensitivity(
    model: PreTrainedModel, embedding: nn.Embedding, data: Any, max_texts: int, tokenizer: Any = None
) -> torch.Tensor:
    """``E[J^T J]``: how strongly the normalised, mean-pooled last hidden state reacts to each embedding direction.

    ``J`` is the Jacobian of the pooled output with respect to one token's embedding. It is estimated without
    forming ``J``: for a random Gaussian ``u``, the gradient ``g`` of ``<u, pooled>`` at the embedding output has
    ``E[g g^T] = J^T J``. One backward pass per batch, only to the embedding output (no parameter gradients).
    """
    captured: dict[str, torch.Tensor] = {}

    def capture(module, args, output):
        leaf = output.detach().requires_grad_(True)  # a fresh leaf: gradients stop here
        captured["embedding"] = leaf
        return leaf

    hidden = embedding.embedding_dim
    total = torch.zeros(hidden, hidden, dtype=torch.float64)
    tokens = 0
    generator = torch.Generator().manual_seed(0)
    handle = embedding.register_forward_hook(capture)
    try:
        for batch in calibration_batches(model, data, tokenizer=tokenizer, max_samples=max_texts, batch_size=16):
            mask = batch.get("attention_mask")
            mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
            states = model.base_model(**batch).last_hidden_state
            weights = mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1)
            pooled = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            probe = torch.randn(pooled.shape, generator=generator).to(pooled)
            (grad,) = torch.autograd.grad((pooled * probe).sum(), captured["embedding"])
            grad = grad[mask.bool()].double().cpu()
            total += grad.t() @ grad
            tokens += grad.shape[0]
    finally:
        handle.remove()
    if tokens == 0:
        raise ValueError("The calibration data contains no tokens; pass real text to weight the factorization.")
    return total / tokens


def _resolve_rank(config: EmbeddingFactorizationConfig, singular_values: torch.Tensor, vocab: int, hidden: int):
    from .svd import rank_for_energy

    if config.rank is not None:
        rank, how = config.rank, f"rank={config.rank}"
    elif config.energy is not None:
        rank, how = rank_for_energy(singular_values, config.energy), f"energy={config.energy}"
    else:
        budget = config.param_budget
        max_params = budget if isinstance(budget, int) else budget * vocab * hidden
        rank = math.floor((max_params - (hidden if config.center else 0)) / (vocab + hidden))
        how = f"param_budget={budget}"
    _check_rank(rank, vocab, hidden, how)
    return rank


@torch.no_grad()
def apply_embedding_factorization(
    model: PreTrainedModel, config: EmbeddingFactorizationConfig, calibration_data: Any = None, tokenizer: Any = None
) -> EmbeddingFactorizationConfig:
    """Factorize `model`'s input embedding in place; return the config with the chosen rank and init filled in."""
    name, embedding = _locate(model)
    table = embedding.weight
    vocab, hidden = table.shape
    if config.rank is not None:
        _check_rank(config.rank, vocab, hidden, f"rank={config.rank}")
    init = config.init
    if init == "auto":
        init = "sensitivity" if calibration_data is not None else "svd"
    weights = metric = None
    if init in ("frequency", "sensitivity"):
        if calibration_data is None:
            raise ValueError(
                f"init={init!r} weights tokens by how often they occur in calibration text, but none was given. "
                "Pass calibration_data=[...texts...] or use init='svd'."
            )
        counts = token_frequencies(model, calibration_data, vocab, config.max_calibration_texts, tokenizer)
        weights = counts + config.smoothing
    if init == "sensitivity":
        metric = output_sensitivity(model, embedding, calibration_data, config.sensitivity_texts, tokenizer)
    singular_values, analysis, synthesis, offset = weighted_row_svd(table, weights, config.center, metric)
    rank = _resolve_rank(config, singular_values, vocab, hidden)
    centered = table.double() - offset if offset is not None else table.double()
    factorized = FactorizedEmbedding(
        vocab, hidden, rank, embedding.padding_idx, bias=config.center, device=table.device, dtype=table.dtype
    )
    tokens, projection = _balanced(centered @ analysis[:, :rank], synthesis[:rank], centered)
    factorized.token_factor.weight.copy_(tokens)
    factorized.projection.weight.copy_(projection.t())
    if offset is not None:
        factorized.projection.bias.copy_(offset)
    factorized.requires_grad_(table.requires_grad)
    _install(model, name, factorized)
    return dataclasses.replace(config, rank=rank, energy=None, param_budget=None, init=init)


def _balanced(
    tokens: torch.Tensor, projection: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale the factors by one scalar (``A c``, ``P / c``) so the token factor's entries have the table's RMS.

    The product is unchanged, but the sensitivity metric's ``M^(1/2)`` leaves the token factor ~14x smaller than the
    table on MiniLM (entries ~0.003 against ~0.056). Adam moves every entry by about the learning rate per step, so
    at a usual learning rate each step rewrites the token rows: measured at r = 128, 40 recovery steps at lr 2e-3
    took the cosine from 0.967 down to 0.898 unbalanced, and up to 0.978 balanced (lr 1.5e-3). One scalar, not one
    per column: a per-channel quantization of either factor sees the same relative values as before.
    """
    scale = table.pow(2).mean().sqrt() / tokens.pow(2).mean().sqrt().clamp_min(1e-30)
    if not torch.isfinite(scale) or scale <= 0:
        return tokens, projection
    return tokens * scale, projection / scale


def restructure_embedding_factorization(model: PreTrainedModel, config: EmbeddingFactorizationConfig) -> None:
    """Rebuild the factorized embedding (and tied head) on an empty skeleton; the weights are loaded afterwards."""
    name, embedding = _locate(model)
    vocab, hidden = embedding.weight.shape
    _check_rank(config.rank, vocab, hidden, f"The stored rank={config.rank}")
    factorized = FactorizedEmbedding(
        vocab,
        hidden,
        config.rank,
        embedding.padding_idx,
        bias=config.center,
        device=embedding.weight.device,
        dtype=embedding.weight.dtype,
    )
    _install(model, name, factorized)


def _install(model: PreTrainedModel, name: str, factorized: FactorizedEmbedding) -> None:
    source = f"{name}.weight"
    tied_heads = sorted({t.rpartition(".")[0] for t, s in all_tied_keys(model).items() if s == source})
    replace_module(model, name, factorized)
    for head_name in tied_heads:
        head = model.get_submodule(head_name)
        replace_module(model, head_name, FactorizedLMHead(factorized, bias=getattr(head, "bias", None)))
    if tied_heads:
        drop_tied_keys(model, name, tied_heads)
    # transformers 5.23/5.24 (private `_resize_token_embeddings`): its own resize only knows nn.Embedding; an instance attribute takes precedence over the class
    # method for `self._resize_token_embeddings(...)` inside `resize_token_embeddings`.
    model._resize_token_embeddings = types.MethodType(_resize_factorized, model)


def _resize_factorized(
    self: PreTrainedModel, new_num_tokens: int | None, pad_to_multiple_of: int | None = None, mean_resizing=True
):
    embedding = self.get_input_embeddings()
    if not isinstance(embedding, FactorizedEmbedding):  # factorization undone by hand: transformers' own path
        return type(self)._resize_token_embeddings(self, new_num_tokens, pad_to_multiple_of, mean_resizing)
    if pad_to_multiple_of is not None:
        new_num_tokens = embedding.num_embeddings if new_num_tokens is None else new_num_tokens
        new_num_tokens = math.ceil(new_num_tokens / pad_to_multiple_of) * pad_to_multiple_of
    if new_num_tokens is None:
        return embedding
    embedding.resize(new_num_tokens, mean_resizing=mean_resizing)
    head = self.get_output_embeddings()
    if head is not None and not isinstance(head, FactorizedLMHead):  # an untied dense head is resized the usual way
        self.set_output_embeddings(self._get_resized_lm_head(head, new_num_tokens, mean_resizing=mean_resizing))
    return embedding
