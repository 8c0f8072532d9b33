"""The speed side of budget mode: the `latency` target, speed probes of each weight format, and the latency estimate
that decides which candidates are worth building.

Latency is always *measured* on this machine, in the same run, on the model's own shapes (32 texts x 128 tokens,
or fewer tokens for a model with fewer positions; see `hf_compress.evaluation.measure.latency_batch`), timed
alternately against the original: what a weight format buys depends on the CPU (native bf16 or not), the thread
count and the kernels torch has. The estimate only orders and filters the grid; the choice rests on measurements.
"""

from __future__ import annotations

import copy
import numbers
import re
from typing import Any

from torch import nn

from ...validation import WrongTypeError, describe
from .space import Candidate


__all__ = ["parse_latency", "speed_probes", "estimate_latency", "compute_share"]

# A latency target of at most the original's: a slower model is never the goal of a speed target.
_MAX_TARGET = 1.0


def parse_latency(latency: Any) -> float:
    """A latency target as a ratio to the original's: ``"0.5x"``, ``"0.5"`` or ``0.5`` (in (0, 1])."""
    if isinstance(latency, bool) or not isinstance(latency, (numbers.Real, str)):
        raise WrongTypeError(
            f"latency must be a ratio to the original's latency such as '0.5x' (str) or 0.5 (float); got "
            f"{describe(latency)}."
        )
    text = str(latency).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?|\.\d+)x?", text)
    if not match:
        raise ValueError(
            f"latency must be a ratio to the original's latency such as '0.5x' or 0.5; got {latency!r}. "
            "'0.5x' asks for half the original's time per batch."
        )
    value = float(match.group(1))
    if not 0 < value <= _MAX_TARGET:
        raise ValueError(
            f"latency must be in (0, {_MAX_TARGET:g}] (a fraction of the original's time per batch, e.g. '0.5x'); "
            f"got {latency!r}. Without a speed target, leave latency=None."
        )
    return value


def compute_share(candidate: Candidate, hidden: int, intermediate: int, length: int) -> float:
    """Share of the transformer layers' multiply-adds this candidate keeps (1.0 = all), per token.

    Attention costs ``4 h^2`` (q, k, v, o) plus ``2 L h`` (scores and mixing over `length` positions), the FFN
    ``2 h f``; pruned heads remove their share of the first, pruned neurons of the second, dropped layers all.
    """
    attention = 4 * hidden * hidden + 2 * length * hidden
    ffn = 2 * hidden * intermediate
    kept = (attention * (1 - candidate.head_fraction) + ffn * (1 - candidate.ffn_fraction)) / (attention + ffn)
    depth = candidate.depth / candidate.total_layers if candidate.depth else 1.0
    return kept * depth


def speed_probes(original: nn.Module, formats: list[tuple[str, bool]], batch: dict, rounds: int,
                 quantize: Any) -> dict[tuple[str, bool], dict[str, Any]]:  # fmt: skip
    """Measured latency ratio of the whole (unpruned) model in each ``(layer format, int8 activations)``.

    `quantize(model, layers_format, dynamic)` quantizes a copy in place (round-to-nearest: the format, not the
    scales, sets the speed). Each probe is timed alternately against the original on `batch`.
    """
    from ...evaluation.measure import latency_ratio

    probes = {}
    for fmt, dynamic in formats:
        trial = copy.deepcopy(original)
        quantize(trial, fmt, dynamic)
        timing = latency_ratio(original, trial, batch, rounds=rounds)
        probes[(fmt, dynamic)] = {"ratio": timing["ratio"], "after_ms": timing["after_ms"],
                                  "before_ms": timing["before_ms"]}  # fmt: skip
        del trial
    return probes


def estimate_latency(candidate: Candidate, probes: dict, share: float, fixed: float = 0.08) -> float | None:
    """Latency ratio estimate: the probe of its format, scaled by the compute it keeps; `fixed` is the part of a
    forward pass that does not shrink with pruning (embeddings, norms, the pooling and the framework's overhead)."""
    probe = probes.get((candidate.layers, candidate.dynamic))
    if probe is None:
        return None
    return probe["ratio"] * (fixed + (1 - fixed) * share)
