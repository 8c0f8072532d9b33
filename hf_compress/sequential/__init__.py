"""Layer-by-layer (sequential) calibration: compress models larger than memory, one transformer layer at a time.

`sequential_compress(model_or_path, config, calibration_data)` is the entry point (``compress(...,
sequential=True)`` and ``hf-compress compress --sequential`` use it, and `compress` picks it by itself when one-pass
calibration would not fit in memory). A technique joins the pipeline through a `LayerStep` (`layer_step.py`); GPTQ is
`GPTQStep` (`steps.py`), activation-whitened low-rank factorization of linear layers `LowRankStep` (`low_rank.py`),
head / FFN pruning scored by FLAP's fluctuation `PruningStep` (`pruning.py`).
"""

from __future__ import annotations

from .layer_step import LayerStep
from .low_rank import LowRankStep
from .offload import ActivationStore
from .pipeline import (
    available_memory,
    choose_sequential,
    has_step,
    needs_sequential,
    run_sequential,
    sequential_compress,
)
from .pruning import PruningStep
from .steps import GPTQStep, step_for


__all__ = [
    "sequential_compress",
    "run_sequential",
    "needs_sequential",
    "choose_sequential",
    "has_step",
    "available_memory",
    "LayerStep",
    "GPTQStep",
    "LowRankStep",
    "PruningStep",
    "step_for",
    "ActivationStore",
]
