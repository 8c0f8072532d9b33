"""Modules of factorized models: `FactorizedEmbedding`, `FactorizedLMHead` and `LowRankLinear`.

Every factor is a plain `nn.Embedding` or `nn.Linear`, so other techniques (weight quantization, PEFT's LoRA) can
target the factors like any other layer, and the state dict holds nothing but ordinary ``weight``/``bias`` tensors.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


__all__ = ["FactorizedEmbedding", "FactorizedLMHead", "LowRankLinear", "dense_weight"]


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The floating-point weight of a factor, also when another technique replaced it by a packed (quantized) module.

    A quantized module is expected to offer ``dequantize()`` (or a float ``weight``); anything else gets a
    `TypeError` that names the module type instead of an `AttributeError` deep inside a forward pass.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        return weight
    if callable(getattr(module, "dequantize", None)):
        return module.dequantize()
    raise TypeError(
        f"Cannot read a floating-point weight from {type(module).__name__}: it has no float `weight` and no "
        "`dequantize()` method. Factorized modules need one of them to rebuild the dense matrix."
    )


class FactorizedEmbedding(nn.Module):
    """A token embedding stored as two factors: ``(num_embeddings x rank)`` then ``(rank x embedding_dim)``.

    It is a drop-in replacement for `nn.Embedding` (ALBERT's factorized embedding): it takes token ids and returns
    ``embedding_dim`` vectors, and keeps `nn.Embedding`'s attributes (`num_embeddings`, `embedding_dim`,
    `padding_idx`). Reading `weight` materialises the dense ``num_embeddings x embedding_dim`` matrix (a fresh tensor:
    writing to it changes nothing; assigning it raises a `TypeError` that explains what to do instead).

    Args:
        num_embeddings (`int`): vocabulary size.
        embedding_dim (`int`): hidden size the model expects.
        rank (`int`): inner dimension of the factorization.
        padding_idx (`int`, *optional*): kept for compatibility (the padding row is whatever the factors give).
        bias (`bool`, *optional*, defaults to `True`): learn a shared offset (the mean embedding) in the projection,
            so the rank is spent on how tokens differ rather than on what they share.
        device, dtype: where and how to create the factors (``"meta"`` for an empty skeleton).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        rank: int,
        padding_idx: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.rank = rank
        self.padding_idx = padding_idx
        # nn.Embedding attributes that some model code reads.
        self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse = None, 2.0, False, False
        self.token_factor = nn.Embedding(num_embeddings, rank, device=device, dtype=dtype)
        self.projection = nn.Linear(rank, embedding_dim, bias=bias, device=device, dtype=dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.projection(self.token_factor(input_ids))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(num_embeddings, embedding_dim)`` embedding matrix, computed from the factors."""
        projection = dense_weight(self.projection)
        dense = dense_weight(self.token_factor) @ projection.t()
        if self.projection.bias is not None:
            dense = dense + self.projection.bias
        if torch.is_grad_enabled() and projection.requires_grad:
            return dense  # differentiable: a loss on it trains the factors
        return dense.detach()

    def __setattr__(self, name: str, value) -> None:
        # nn.Module routes Parameters to `register_parameter`, which would bypass a property setter.
        if name == "weight":
            raise TypeError(
                "FactorizedEmbedding has no dense `weight` to assign: it stores `token_factor.weight` "
                f"({self.num_embeddings}x{self.rank}) and `projection.weight` ({self.embedding_dim}x{self.rank}). "
                "Assign those instead, or use `model.resize_token_embeddings(n)` to change the vocabulary."
            )
        super().__setattr__(name, value)

    def resize(self, new_num_tokens: int, mean_resizing: bool = True) -> None:
        """Grow or shrink the vocabulary in place; new tokens start at the mean (or a random) factor row."""
        old = self.token_factor.weight
        if new_num_tokens == old.shape[0]:
            return
        new = torch.empty(new_num_tokens, self.rank, device=old.device, dtype=old.dtype)
        keep = min(new_num_tokens, old.shape[0])
        with torch.no_grad():
            new[:keep] = old[:keep]
            if new_num_tokens > keep:
                if mean_resizing:  # a linear map sends the mean factor row to the mean embedding
                    new[keep:] = old.mean(0)
                else:
                    new[keep:].normal_(0.0, float(old.std()))
        # A new Parameter on the same module: hooks and the module's identity survive; the tied head is re-tied by
        # `tie_weights()`, which `resize_token_embeddings` runs afterwards.
        self.token_factor.weight = nn.Parameter(new, requires_grad=old.requires_grad)
        self.token_factor.num_embeddings = self.num_embeddings = new_num_tokens
        if self.padding_idx is not None and self.padding_idx >= new_num_tokens:
            self.padding_idx = None

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class FactorizedLMHead(nn.Module):
    """The output head of a model whose tied input embedding is a `FactorizedEmbedding`; it shares both factors.

    ``logits = (hidden @ P) @ A.T + <hidden, b> (+ bias)`` with ``A`` the token factor, ``P`` the projection and
    ``b`` its optional offset: exactly ``hidden @ E'.T`` for the materialised table ``E'``, at the cost of a
    ``hidden -> rank -> vocab`` product. The head owns no copy of the factors: it reads them from the embedding at
    every call, so there is one tensor to save, train or quantize (a quantized token factor is dequantized here),
    and transformers has no tied weight to track for it. Reading `weight` gives the dense ``(vocab, hidden)`` matrix.

    Args:
        embedding (`FactorizedEmbedding`): the model's input embedding.
        bias (`nn.Parameter`, *optional*): the old head's output bias (e.g. BERT's MLM decoder bias), kept as is.
    """

    def __init__(self, embedding: FactorizedEmbedding, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        # Not a submodule: the embedding is registered where the model keeps it; registering it here too would save
        # its tensors twice, under two names.
        self.__dict__["_embedding"] = embedding
        self.bias = bias

    @property
    def embedding(self) -> FactorizedEmbedding:
        return self.__dict__["_embedding"]

    @property
    def in_features(self) -> int:
        return self.embedding.embedding_dim

    @property
    def out_features(self) -> int:
        return self.embedding.num_embeddings

    @out_features.setter
    def out_features(self, value: int) -> None:  # set by transformers' `_adjust_bias`; the embedding is the truth
        pass

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        projection, dtype = self.embedding.projection, hidden_states.dtype
        reduced = hidden_states @ dense_weight(projection).to(dtype)
        logits = F.linear(reduced, dense_weight(self.embedding.token_factor).to(dtype))
        if projection.bias is not None:
            # Every embedding row carries the shared offset b, so every logit gets <hidden, b>: one scalar per
            # position (softmax ignores it, but the logits then equal those of the dense tied head exactly).
            logits = logits + (hidden_states @ projection.bias.to(dtype)).unsqueeze(-1)
        if self.bias is not None:
            logits = logits + self.bias.to(dtype)
        return logits

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(vocab, hidden)`` head matrix: the tied embedding's `weight`."""
        return self.embedding.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.embedding.rank}"


class LowRankLinear(nn.Module):
    """``out = up(down(x))``: an ``in -> out`` linear layer stored as two thin `nn.Linear` layers of rank `rank`.

    Args:
        in_features (`int`), out_features (`int`): the shape of the layer it replaces.
        rank (`int`): inner dimension.
        bias (`bool`, *optional*, defaults to `True`): bias of the output (`up`) layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` matrix the two factors represent (a computed copy)."""
        return F.linear(dense_weight(self.down).t(), dense_weight(self.up)).t()

    @property
    def bias(self) -> torch.Tensor | None:
        return self.up.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"
