"""Physical removal of attention heads and FFN neurons: the projections are replaced by smaller ones.

The same functions serve `apply` (real weights, sliced) and `restructure` (the empty *meta* skeleton inside
`from_pretrained`): slicing a meta tensor computes nothing, so both paths build identical module shapes.

Head numbering: every recipe names heads by their index in the *original* model. Each pruned attention module
remembers its kept original heads in ``hf_compress_heads``, so pruning can be repeated (gradual pruning, or several
configs in one recipe) and replayed in the same order on load.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..architectures import get_adapter, head_dim, num_heads, num_kv_heads
from ..utils import replace_module
from .layers import ConstantProjection, EmptyAttention


__all__ = ["kept_heads", "prune_heads", "prune_ffn", "EmptyAttention", "ConstantProjection", "ffn_size", "gqa_layout"]

# Attention-module attributes that hold a head count or a width derived from it. transformers 5 reshapes with
# ``view(..., -1, head_dim)``, so shapes mostly follow the projections; these attributes are still read by some
# forwards (GPT-2 ``split_size``, Llama/Mistral/Qwen2 ``num_key_value_groups`` in ``repeat_kv`` and SDPA) and by
# user code, so they are kept true. Hidden-size attributes (GPT-2 ``embed_dim``, DistilBERT ``dim``) stay as they
# are: the input width of attention does not change.
_HEAD_COUNT_ATTRS = ("num_attention_heads", "num_heads", "n_heads")
_HEAD_WIDTH_ATTRS = ("all_head_size", "split_size")


def _check_prunable(module: nn.Module, name: str) -> None:
    if type(module) not in (nn.Linear, Conv1D):
        raise TypeError(
            f"Cannot prune {name}: it is a {type(module).__name__}, not a plain nn.Linear or Conv1D. Prune before "
            "quantizing, factorizing or attaching adapters (apply_compression orders techniques for you)."
        )


def _new_like(old: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A module of `old`'s type holding `weight`/`bias` (meta construction: no wasted random init)."""
    with torch.device("meta"):
        if isinstance(old, Conv1D):
            new = Conv1D(weight.shape[1], weight.shape[0])
        else:
            new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    new.weight = nn.Parameter(weight.contiguous(), requires_grad=old.weight.requires_grad)
    if bias is not None:
        new.bias = nn.Parameter(bias.contiguous(), requires_grad=old.bias.requires_grad)
    return new


def slice_outputs(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """Keep output features `index` (rows of a Linear, columns of a Conv1D, and the bias)."""
    weight = module.weight.data
    index = index.to(weight.device)
    weight = weight[:, index] if isinstance(module, Conv1D) else weight[index]
    bias = module.bias.data[index] if module.bias is not None else None
    return _new_like(module, weight, bias)


def slice_inputs(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """Keep input features `index`; the bias is unchanged."""
    weight = module.weight.data
    index = index.to(weight.device)
    weight = weight[index] if isinstance(module, Conv1D) else weight[:, index]
    return _new_like(module, weight, module.bias.data if module.bias is not None else None)


def _units(positions: Sequence[int], width: int) -> torch.Tensor:
    """Feature indices of the units at `positions`, each `width` features wide."""
    if not positions:
        return torch.zeros(0, dtype=torch.long)
    return (torch.tensor(positions)[:, None] * width + torch.arange(width)).reshape(-1)


# -- heads -----------------------------------------------------------------------------------------------------------
def kept_heads(model: nn.Module) -> list[list[int]]:
    """Original indices of the query heads each layer still has."""
    adapter = get_adapter(model)
    full = list(range(num_heads(model)))
    return [
        list(getattr(adapter.sub(layer, adapter.attention), "hf_compress_heads", full))
        for layer in adapter.layer_modules(model)
    ]


def gqa_layout(heads: Sequence[int], model: nn.Module) -> list[int]:
    """The key/value groups that `heads` (original query indices) use; raises if groups keep unequal head counts."""
    group_size = num_heads(model) // num_kv_heads(model)
    per_group: dict[int, int] = {}
    for head in heads:
        per_group[head // group_size] = per_group.get(head // group_size, 0) + 1
    if len(set(per_group.values())) > 1:
        raise ValueError(
            f"Grouped-query attention needs the same number of query heads in every kept key/value group; keeping "
            f"heads {sorted(heads)} leaves {dict(sorted(per_group.items()))} query heads per group (group size "
            f"{group_size}). Remove heads so the kept groups stay equal, or remove whole groups."
        )
    return sorted(per_group)


def prune_heads(model: nn.Module, heads_to_prune: dict[int, Sequence[int]]) -> None:
    """Remove `heads_to_prune` (``{layer: [original head indices]}``) from `model` in place, weights or meta."""
    adapter = get_adapter(model)
    layers = adapter.layer_modules(model)
    total, dim = num_heads(model), head_dim(model)
    for index, removed in sorted(heads_to_prune.items()):
        if not removed:
            continue
        if not 0 <= index < len(layers):
            raise ValueError(f"heads_to_prune names layer {index}, but the model has {len(layers)} layers.")
        layer = layers[index]
        attention = adapter.sub(layer, adapter.attention)
        current = list(getattr(attention, "hf_compress_heads", range(total)))
        unknown = sorted(set(removed) - set(current))
        if unknown:
            raise ValueError(
                f"Layer {index}: heads {unknown} cannot be removed; the layer still has heads {current} (original "
                f"numbering, 0..{total - 1}; heads removed before are gone)."
            )
        kept = [h for h in current if h not in set(removed)]
        old_groups, new_groups = gqa_layout(current, model), gqa_layout(kept, model)
        if not kept:
            _empty_attention(layer, adapter, attention)
            continue
        q_index = _units([current.index(h) for h in kept], dim)
        kv_index = _units([old_groups.index(g) for g in new_groups], dim)
        if adapter.fused_qkv:
            fused = adapter.sub(layer, adapter.fused_qkv)
            _check_prunable(fused, adapter.fused_qkv)
            width = len(current) * dim  # q, k and v are each `width` wide, side by side
            replace_module(layer, adapter.fused_qkv, slice_outputs(fused, torch.cat([q_index + p * width for p in range(3)])))
        else:
            for path, rows in ((adapter.query, q_index), (adapter.key, kv_index), (adapter.value, kv_index)):
                _check_prunable(adapter.sub(layer, path), path)
                replace_module(layer, path, slice_outputs(adapter.sub(layer, path), rows))
        output = adapter.sub(layer, adapter.output)
        _check_prunable(output, adapter.output)
        replace_module(layer, adapter.output, slice_inputs(output, q_index))
        _patch_attention(attention, len(kept), len(new_groups), dim)
        attention.hf_compress_heads = kept


def _patch_attention(attention: nn.Module, heads: int, kv_heads: int, dim: int) -> None:
    for name in _HEAD_COUNT_ATTRS:
        if hasattr(attention, name):
            setattr(attention, name, heads)
    for name in _HEAD_WIDTH_ATTRS:
        if hasattr(attention, name):
            setattr(attention, name, heads * dim)
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = kv_heads
    if hasattr(attention, "num_key_value_groups"):
        attention.num_key_value_groups = heads // kv_heads


def _empty_attention(layer: nn.Module, adapter, attention: nn.Module) -> None:
    output = adapter.sub(layer, adapter.output)
    out_features = output.weight.shape[1] if isinstance(output, Conv1D) else output.weight.shape[0]
    constant = ConstantProjection(out_features, output.bias.data if output.bias is not None else None)
    prefix = adapter.attention + "."
    if adapter.output.startswith(prefix):  # o-proj inside the attention module (Llama, GPT-2, DistilBERT, ViT)
        out_name = adapter.output[len(prefix) :]
        if "." in out_name:
            raise NotImplementedError(f"Nested output projection {adapter.output!r} is not supported.")
        replace_module(layer, adapter.attention, EmptyAttention(getattr(attention, "layer_idx", None), out_name, constant))
    else:  # BERT-like: attention.self returns the heads, attention.output.dense projects them
        replace_module(layer, adapter.attention, EmptyAttention(getattr(attention, "layer_idx", None), None, None))
        replace_module(layer, adapter.output, constant)


# -- FFN ---------------------------------------------------------------------------------------------------------------
def ffn_size(model: nn.Module, layer: nn.Module) -> int:
    """Current FFN intermediate size of `layer`."""
    adapter = get_adapter(model)
    out = adapter.sub(layer, adapter.ffn_out)
    if isinstance(out, ConstantProjection):
        return 0
    return out.weight.shape[0] if isinstance(out, Conv1D) else out.weight.shape[1]


def prune_ffn(model: nn.Module, keep: dict[int, torch.Tensor | int]) -> None:
    """Keep FFN neurons `keep[layer]` (an index tensor into the current neurons, or a count: the first ones)."""
    adapter = get_adapter(model)
    layers = adapter.layer_modules(model)
    for index, kept in sorted(keep.items()):
        if not 0 <= index < len(layers):
            raise ValueError(f"intermediate_sizes names layer {index}, but the model has {len(layers)} layers.")
        layer = layers[index]
        size = ffn_size(model, layer)
        kept = torch.arange(kept) if isinstance(kept, int) else kept
        if len(kept) > size:
            raise ValueError(f"Layer {index} has {size} FFN neurons; cannot keep {len(kept)}.")
        if len(kept) == size:
            continue
        for path in adapter.ffn_in:
            _check_prunable(adapter.sub(layer, path), path)
            replace_module(layer, path, slice_outputs(adapter.sub(layer, path), kept))
        out = adapter.sub(layer, adapter.ffn_out)
        _check_prunable(out, adapter.ffn_out)
        if len(kept) == 0:
            width = out.weight.shape[1] if isinstance(out, Conv1D) else out.weight.shape[0]
            replace_module(layer, adapter.ffn_out, ConstantProjection(width, out.bias.data if out.bias is not None else None))
        else:
            replace_module(layer, adapter.ffn_out, slice_inputs(out, kept))
        parent = layer.get_submodule(adapter.ffn_in[0].rpartition(".")[0])
        if hasattr(parent, "intermediate_size"):
            parent.intermediate_size = len(kept)
