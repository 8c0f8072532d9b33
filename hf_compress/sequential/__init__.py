"""Layer-by-layer (sequential) calibration: compress models larger than memory, one transformer layer at a time.

`sequential_compress(model_or_path, config, calibration_data)` is the entry point (``compress(...,
sequential=True)`` and ``hf-compress compress --sequential`` use it, and `compress` picks it by itself when one-pass
calibration would not fit in memory). A technique joins the pipeline through a `LayerStep` (`steps.py`); GPTQ is
`GPTQStep`.
"""

from __future__ import annotations

from .offload import ActivationStore
from .pipeline import available_memory, choose_sequential, needs_sequential, run_sequential, sequential_compress
from .steps import GPTQStep, LayerStep, step_for


__all__ = [
    "sequential_compress",
    "run_sequential",
    "needs_sequential",
    "choose_sequential",
    "available_memory",
    "LayerStep",
    "GPTQStep",
    "step_for",
    "ActivationStore",
]
