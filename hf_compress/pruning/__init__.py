"""Structured pruning that really removes attention heads and FFN neurons (transformers 5 has no ``prune_heads``).

Two techniques are registered: ``"head_pruning"`` (`HeadPruningConfig`) and ``"ffn_pruning"`` (`FFNPruningConfig`).
Both rank units by importance (`compute_importance`), slice the projections (`prune_heads`, `prune_ffn`) and store
explicit per-layer results in the recipe, so `from_pretrained` rebuilds the pruned shapes. `GradualPruningCallback`
prunes on a schedule during training; `plot_head_importance` draws the layers x heads heatmap.
"""

from __future__ import annotations

import importlib
from typing import Any

from .config import FFNPruningConfig, HeadPruningConfig
from .hooks import apply_ffn_pruning, apply_head_pruning, restructure_ffn_pruning, restructure_head_pruning
from .layers import EmptyAttention
from .scoring import UnitGates, compute_importance
from .surgery import kept_heads, prune_ffn, prune_heads


# Heavier imports (transformers' Trainer, matplotlib) load on first use.
_LAZY = {"GradualPruningCallback": ".callbacks", "plot_head_importance": ".plot"}

__all__ = [
    "HeadPruningConfig",
    "FFNPruningConfig",
    "compute_importance",
    "UnitGates",
    "prune_heads",
    "prune_ffn",
    "kept_heads",
    "EmptyAttention",
    *_LAZY, "apply_ffn_pruning", "apply_head_pruning", "restructure_ffn_pruning", "restructure_head_pruning",
]

def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
