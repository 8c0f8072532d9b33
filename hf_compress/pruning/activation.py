"""Data-driven importance of heads and FFN neurons from the inputs of the output projections (FLAP's fluctuation).

FLAP (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models"): removing
input channel ``j`` of an output projection ``W`` (the attention output projection for heads, the FFN down
projection for neurons) takes ``W[:, j] x_j`` out of the layer's output. Its mean ``W[:, j] E[x_j]`` is a constant,
which a bias can absorb; what is lost is the fluctuation ``W[:, j] (x_j - E[x_j])``, whose expected squared norm is

    score_j = Var(x_j) * ||W[:, j]||^2

over the real (non-padding) tokens. A head's score is the sum over its ``head_dim`` channels, an FFN neuron's is its
own channel's. The statistics, ``E[x]`` and ``E[x^2]`` of each channel, are summed by the shared padding-aware
`MomentCollector` (``channels=True``): over whole-model forwards here (`channel_statistics`, the one-pass path), or
over one layer's forwards in the sequential pipeline (`hf_compress.sequential.pruning.PruningStep`), which only
needs what this module computes from them (`unit_scores`, `compensate_heads`, `compensate_ffn`).

Bias compensation (FLAP's): where the output projection has a bias (BERT, RoBERTa, DistilBERT, GPT-2, ViT), the
removed channels' mean contribution ``W[:, removed] E[x_removed]`` is added to it, so the pruned layer's output is
unchanged in expectation. Where it has none (Llama, Mistral, Qwen2) nothing is compensated: adding a bias there
would change the checkpoint format (those model classes build the projection without one).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..architectures import get_adapter, head_dim
from ..calibration import MomentCollector, calibration_batches, unwrap
from .layers import ConstantProjection, EmptyAttention
from .surgery import _units, kept_heads


__all__ = [
    "output_projections",
    "channel_statistics",
    "unit_scores",
    "activation_importance",
    "activation_batches",
    "compensate_heads",
    "compensate_ffn",
]


def output_projections(model: nn.Module, kind: str) -> dict[int, str]:
    """Layer index -> full name of the projection whose input channels are `kind`'s units (``"heads"``: the
    attention output projection; ``"ffn"``: the FFN down projection). Layers with none of those units left (an
    emptied attention or FFN) are missing."""
    if kind not in ("heads", "ffn"):
        raise ValueError(f"kind must be 'heads' or 'ffn', got {kind!r}.")
    adapter = get_adapter(model)
    path = adapter.output if kind == "heads" else adapter.ffn_out
    names = {}
    for index, layer in enumerate(adapter.layer_modules(model)):
        if kind == "heads" and isinstance(adapter.sub(layer, adapter.attention), EmptyAttention):
            continue
        if not isinstance(adapter.sub(layer, path), ConstantProjection):
            names[index] = f"{adapter.layer_prefix(model, index)}.{path}"
    return names


def activation_batches(model: nn.Module, calibration_data: Any, *, tokenizer: Any = None, max_samples: int = 256,
                       batch_size: int = 16, max_length: int = 128) -> Iterable[dict[str, torch.Tensor]]:  # fmt: skip
    """Model batches of `calibration_data` for `channel_statistics`, or a `ValueError` naming the fix without data."""
    calibration_data, tokenizer = unwrap(calibration_data, tokenizer)
    if calibration_data is None:
        raise ValueError(
            "importance='activation' needs calibration data (a list of texts, a datasets.Dataset or token batches): "
            "pass calibration_data=..., or use importance='magnitude' for data-free pruning."
        )
    return calibration_batches(model, calibration_data, tokenizer=tokenizer, batch_size=batch_size,
                               max_length=max_length, max_samples=max_samples)  # fmt: skip


@torch.no_grad()
def channel_statistics(model: nn.Module, kind: str,
                       batches: Iterable[dict[str, torch.Tensor]]) -> dict[int, torch.Tensor]:  # fmt: skip
    """Per layer, ``[E[x], E[x^2]]`` (a float64 ``[2, channels]`` tensor) of the input ``x`` of its `kind` output
    projection (see `output_projections`) over the real tokens of `batches`, one whole-model forward each."""
    names = output_projections(model, kind)
    modules = {name: model.get_submodule(name) for name in names.values()}
    was_training = model.training
    model.eval()  # dropout off: the statistics must not depend on a random mask
    try:
        with MomentCollector(modules, channels=True) as collector:
            for batch in batches:
                collector.set_mask(batch.get("attention_mask"))
                model(**batch)
    finally:
        model.train(was_training)
    moments = collector.moments()
    if not moments:
        raise ValueError("The calibration data gave no batch; pass at least one text.")
    missing = [name for name in modules if name not in moments]
    if missing:
        raise ValueError(f"The calibration forward passes never reached {missing[:4]}; they cannot be scored.")
    return {index: moments[name] for index, name in names.items()}


def _columns(module: nn.Module) -> torch.Tensor:
    """The weight as ``[in_features, out_features]`` (row ``j``: what input channel ``j`` writes), float64."""
    weight = module.weight.detach().double()
    return weight if isinstance(module, Conv1D) else weight.t()


def unit_scores(module: nn.Module, stats: torch.Tensor, width: int) -> torch.Tensor:
    """Fluctuation score ``sum_j Var(x_j) ||W[:, j]||^2`` of each unit of `width` consecutive input channels of the
    output projection `module`, from its input's ``[E[x], E[x^2]]`` (`stats`)."""
    mean, square = stats[0].double(), stats[1].double()
    variance = (square - mean * mean).clamp_min(0)  # rounding can leave a constant channel slightly negative
    norms = _columns(module).pow(2).sum(1).cpu()
    return (variance * norms).reshape(-1, width).sum(1).float()


def activation_importance(model: nn.Module, kind: str, stats: dict[int, torch.Tensor]) -> list[torch.Tensor]:
    """Unnormalised fluctuation scores of every layer's current units (an empty tensor where none are left)."""
    adapter = get_adapter(model)
    width = head_dim(model) if kind == "heads" else 1
    path = adapter.output if kind == "heads" else adapter.ffn_out
    layers = adapter.layer_modules(model)
    return [unit_scores(adapter.sub(layers[i], path), stats[i], width) if i in stats else torch.zeros(0)
            for i in range(len(layers))]  # fmt: skip


@torch.no_grad()
def _add_mean(module: nn.Module, mean: torch.Tensor, removed: torch.Tensor) -> bool:
    """``bias += W[:, removed] E[x_removed]`` on the output projection `module` (before its inputs are sliced);
    False, and nothing changed, when it has no bias. The bias is replaced rather than written in place: a model
    loaded by ``from_pretrained`` may hold read-only views of its checkpoint file."""
    if module.bias is None or removed.numel() == 0:
        return False
    columns = _columns(module)
    removed = removed.to(columns.device)
    shift = mean.to(columns.device, torch.float64)[removed] @ columns[removed]
    bias = module.bias
    module.bias = nn.Parameter((bias.detach().double() + shift).to(bias.dtype), requires_grad=bias.requires_grad)
    return True


def compensate_heads(model: nn.Module, layer: int, removed: list[int], mean: torch.Tensor) -> bool:
    """Before `layer` loses the heads `removed` (original numbering): add their mean output (from the attention
    output projection's input means `mean`) to that projection's bias, if it has one (returns whether it had)."""
    adapter = get_adapter(model)
    current = kept_heads(model)[layer]
    channels = _units([current.index(h) for h in removed], head_dim(model))
    return _add_mean(adapter.sub(adapter.layer_modules(model)[layer], adapter.output), mean, channels)


def compensate_ffn(model: nn.Module, layer: int, keep: torch.Tensor, mean: torch.Tensor) -> bool:
    """Before `layer` keeps only FFN neurons `keep`: add the others' mean output (from the down projection's input
    means `mean`) to the down projection's bias, if it has one (returns whether it had)."""
    adapter = get_adapter(model)
    kept = torch.zeros(len(mean), dtype=torch.bool)
    kept[keep.cpu()] = True
    return _add_mean(adapter.sub(adapter.layer_modules(model)[layer], adapter.ffn_out), mean, (~kept).nonzero()[:, 0])
