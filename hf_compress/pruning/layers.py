"""The modules pruning leaves in a model: `EmptyAttention` (a layer whose heads were all removed) and
`ConstantProjection` (a projection whose inputs were all removed: it adds its bias only)."""

from __future__ import annotations

import torch
from torch import nn


__all__ = ["ConstantProjection", "EmptyAttention"]


class ConstantProjection(nn.Module):
    """What is left of a projection whose inputs were all removed: its bias (or zeros), broadcast over tokens.

    Keeps the parameter name ``bias`` so checkpoints stay key-compatible, and needs no zero-sized tensor.
    """

    def __init__(self, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features = out_features
        self.bias = nn.Parameter(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(*x.shape[:-1], self.out_features)
        return out + self.bias if self.bias is not None else out


class EmptyAttention(nn.Module):
    """Stands in for an attention module whose heads were all removed: attention is skipped.

    Returns the output projection's bias (or, when the projection lives outside the attention module as in BERT,
    a zero-width tensor that the outer `ConstantProjection` turns into that bias), exactly what the full module
    returns with every head masked. For decoders it still advances the KV cache by a placeholder, so the cache's
    sequence length (read from layer 0 to build positions and masks) stays right.
    """

    def __init__(self, layer_idx: int | None, out_name: str | None, out_module: nn.Module | None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.out_name = out_name
        self.hf_compress_heads: list[int] = []
        if out_name is not None:
            self.add_module(out_name, out_module)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("cache", kwargs.get("past_key_values"))  # "cache" since transformers 5.24
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            # One 1-wide placeholder head: a zero-element cache would report sequence length 0.
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        if self.out_name is not None:
            out = getattr(self, self.out_name)(out)
        return out, None


# -- slicing ---------------------------------------------------------------------------------------------------------
