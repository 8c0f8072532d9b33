"""Budget mode inside `compress`: search, build the chosen setting (fewer layers, structure), recover, quantize."""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from ...registry import get_technique
from .search import search_budget


__all__ = ["run_budget"]

logger = logging.getLogger(__name__)


def run_budget(model: nn.Module, original: nn.Module, budget: Any, *, latency: Any, distill: Any,
               calibration_data: Any, eval_texts: list[str] | None, task_rows: list[dict] | None, tokenizer: Any,
               latency_rounds: int) -> tuple[nn.Module, list, dict, dict | None]:  # fmt: skip
    """Search the settings, then build them on `model`: ``(model, configs, choice, recovery stats or None)``.

    When the choice keeps fewer layers, the returned model is a new object (``make_student`` of `model`); the
    structural techniques, recovery distillation from `original` and quantization then run on it in that order.
    Recovery is on by default (`DEFAULT_RECOVERY`, a wall-clock budget) whenever a structural step ran and the
    calibration data are texts; ``distill=False`` turns it off, a dict sets its options.
    """
    from ...validation import data_form
    from ..apply import apply_compression
    from ..recovery import DEFAULT_RECOVERY, recover

    configs, choice = search_budget(model, budget, calibration_data=calibration_data, eval_texts=eval_texts,
                                    tokenizer=tokenizer, original=original, latency=latency,
                                    latency_rounds=latency_rounds, max_measured=8 if latency is not None else 6,
                                    task_rows=task_rows)  # fmt: skip
    depth = choice["chosen_settings"]["layers_kept"]
    if depth:
        from ...distillation.student import make_student

        model = make_student(model, num_layers=depth)
    structural = [c for c in configs if get_technique(c.method).stage != "quantize"]
    quantize = [c for c in configs if get_technique(c.method).stage == "quantize"]
    if structural:
        apply_compression(model, *structural, calibration_data=calibration_data, tokenizer=tokenizer)
    stats = None
    texts = data_form("calibration_data", calibration_data) not in (None, "batches")
    if distill is None:
        distill = dict(DEFAULT_RECOVERY) if (structural or depth) and texts and tokenizer is not None else False
        if (structural or depth) and not distill:
            logger.warning("Recovery distillation skipped: it trains on calibration texts with the tokenizer.")
    if distill and (structural or depth):
        options = dict(distill) if isinstance(distill, dict) else {}
        if depth:  # dropped layers are not in the recipe: every weight must learn, not the factors only
            options.setdefault("train", "all")
        stats = {}
        recover(model, original, calibration_data, tokenizer=tokenizer, labeled_rows=task_rows, stats=stats,
                **options)  # fmt: skip
    if quantize:
        apply_compression(model, *quantize, calibration_data=calibration_data, tokenizer=tokenizer)
    return model, configs, choice, stats
