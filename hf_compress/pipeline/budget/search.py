"""Budget mode: find the compression settings that fit a target size (and, optionally, a latency target) with the
best measured fidelity.

The search has three steps, so that it stays minutes on a CPU while every decision rests on a measurement:

1. **Estimate** the size of every point of a grid (embedding rank, fraction of heads and of FFN neurons removed,
   weight format of the layers and, separately, of the embeddings: int8, int4 in groups of 32 or 64, so mixed
   precision is part of the search). Bytes per parameter of each format are *measured* once by quantizing a copy
   of the model with fast round-to-nearest, so the estimate follows the real storage format. With a `latency`
   target the grid also holds what buys speed: fewer transformer layers (`make_student`, the DistilBERT
   initialisation) and dynamic int8 activations (int8 x int8 matmuls, fused by torch.compile where a compiler
   is available); each weight format's speed is *measured* once on the whole model (a speed probe), and a
   candidate's latency is estimated from its probe and the compute it keeps.
2. **Measure** the candidates that fit (size with a 3 % margin, latency with a 10 % one), in order of least
   structural damage: each is built for real (pruning and factorization with the calibration data,
   round-to-nearest quantization) and scored by the cosine of its sentence embeddings to the original's on the
   evaluation texts, its size, and its latency timed alternately against the original on the model's own shapes.
   With labeled task data and a task head, each is also scored by its task loss and accuracy.
3. **Choose** the best-scoring candidate whose measured size (and latency) meet the targets: the best task
   accuracy when task data is given, else the best cosine. `compress` then builds it with the default
   (error-minimising) quantizer and runs recovery distillation from the original after the structural steps.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from ...evaluation.measure import size_breakdown
from .space import (
    DEPTHS,
    FFN_FRACTIONS,
    HEAD_FRACTIONS,
    MARGIN,
    RANKS,
    Candidate,
    Space,
    _bytes_per_param,
    _removing,
    estimate,
    parse_budget,
)
from .speed import compute_share, estimate_latency, parse_latency, speed_probes


__all__ = ["search_budget", "candidates_table"]

logger = logging.getLogger(__name__)
LATENCY_MARGIN = 1.1  # estimates within 10 % of the target are measured: the estimate is rough, the choice is not


def _depths(layers: int, latency: float | None) -> list[int | None]:
    """Layer counts to try (None = all): with a speed target only, as dropping layers is a speed lever first."""
    if latency is None:
        return [None]
    counts = {max(1, round(layers * share)) for share in DEPTHS}
    return [None] + sorted((c for c in counts if c < layers), reverse=True)


def _build_structure(original: nn.Module, cand: Candidate, calibration_data: Any, tokenizer: Any) -> nn.Module:
    from ...distillation.student import make_student
    from ..apply import apply_compression

    structured = make_student(original, num_layers=cand.depth) if cand.depth else copy.deepcopy(original)
    if cand.structure_configs():
        apply_compression(structured, *cand.structure_configs(), calibration_data=calibration_data,
                          tokenizer=tokenizer)  # fmt: skip
    return structured


def _measure_order(fitting: list[Candidate], count: int) -> list[Candidate]:
    """The least-damaging weight format of each of the first structures, then the next formats, by prior damage.

    Measuring different structures first keeps the search from spending all its measurements on one structure.
    """
    firsts: dict[tuple, Candidate] = {}
    for cand in fitting:
        firsts.setdefault(cand.structure, cand)
    order = list(firsts.values())[: count // 2 + 1]
    order += [c for c in fitting if c not in order]
    return order[:count]


@torch.inference_mode()
def _task_scores(model: nn.Module, batches: list[dict], labels: list[int]) -> dict[str, float] | None:
    """Cross-entropy and accuracy of a model with a classification head on labeled batches (None without one)."""
    losses, correct, seen = [], 0, 0
    for batch in batches:
        logits = getattr(model(**batch), "logits", None)
        if logits is None or logits.dim() != 2:
            return None
        target = torch.tensor(labels[seen : seen + logits.shape[0]])
        losses.append(nn.functional.cross_entropy(logits.float(), target, reduction="sum").item())
        correct += int((logits.argmax(-1) == target).sum())
        seen += logits.shape[0]
    return {"loss": sum(losses) / max(seen, 1), "accuracy": correct / max(seen, 1)}


def search_budget(model: nn.Module, budget: float | str, *, calibration_data: Any, eval_texts: list[str] | None,
                  tokenizer: Any, original: nn.Module | None = None, max_measured: int = 6,
                  latency: float | str | None = None, latency_rounds: int = 3,
                  task_rows: list[dict] | None = None) -> tuple[list, dict]:  # fmt: skip
    """Choose technique configs that fit `budget` (and `latency`) with the best measured fidelity.

    Args:
        model: the model to compress (not modified here).
        budget: megabytes or a reduction factor, see `parse_budget`.
        calibration_data: texts for pruning and factorization (required: the choice is data-driven).
        eval_texts: texts for the fidelity measurement (the calibration texts when omitted).
        max_measured: how many fitting candidates are built and measured (8 with a latency target by default
            in `compress`).
        latency: a speed target as a ratio to the original's latency (``"0.5x"``), see `parse_latency`.
        latency_rounds: timed rounds per latency measurement (0: no timing; not allowed with `latency`).
        task_rows: labeled rows (``text``, ``label``) to score candidates by task loss and accuracy.

    Returns:
        ``(configs, choice)``: the technique configs to apply (after ``make_student`` when
        ``choice["chosen_settings"]["layers_kept"]`` is set), and a JSON-ready record of the decision (targets, the
        chosen candidate, every measured candidate with size, latency and cosine, the speed probes, a summary).
    """
    from ...calibration import calibration_batches
    from ...evaluation.measure import latency_batch, latency_ratio, sentence_embeddings
    from ...validation import check_number
    from ..apply import apply_compression

    if calibration_data is None:
        raise ValueError("Budget mode measures candidates on data: pass calibration_data=[texts] (or --calibration).")
    if isinstance(max_measured, bool) or not isinstance(max_measured, int) or max_measured < 1:
        raise ValueError(f"max_measured must be an integer >= 1, got {max_measured!r}.")
    check_number("latency_rounds", latency_rounds, low=0, integer=True)
    target_latency = parse_latency(latency) if latency is not None else None
    if target_latency is not None and latency_rounds == 0:
        raise ValueError("A latency target is measured: latency_rounds must be >= 1 with latency=..., got 0.")
    eval_texts = eval_texts or list(calibration_data)[:64]
    original = original if original is not None else model
    sizes = size_breakdown(original)
    target = parse_budget(budget, sizes["bytes"])
    config = original.config.get_text_config()
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden)
    from ...architectures import get_adapter

    total_layers = len(get_adapter(original).layer_modules(original))
    space = Space.for_model(original)
    rates = _bytes_per_param(original, space)
    names = [name for name, _, _ in space.formats]
    layer_formats = [(n, False) for n in names]
    if target_latency is not None and "int8" in names:
        layer_formats.append(("int8", True))
    heads = _removing(HEAD_FRACTIONS, original, "heads")
    ffns = _removing(FFN_FRACTIONS, original, "ffn", space.round_to)
    grid = [Candidate(r, h, f, lay, emb, depth=d, dynamic=dyn, space=space, total_layers=total_layers)
            for d in _depths(total_layers, target_latency) for r in RANKS for h in heads for f in ffns
            for lay, dyn in layer_formats for emb in names]  # fmt: skip
    # A factorization must hold fewer parameters than the table it replaces.
    grid = [c for c in grid if c.valid() and (not c.rank or c.rank * (vocab + hidden) < vocab * hidden)]
    for cand in grid:
        cand.estimated_bytes = estimate(cand, sizes, rates, vocab, hidden)
    fitting = [c for c in grid if c.estimated_bytes <= MARGIN * target]
    if not fitting:
        smallest = min(grid, key=lambda c: c.estimated_bytes)
        raise ValueError(
            f"No setting reaches {target / 1e6:.2f} MB: the smallest in the search space ({smallest.name}) is about "
            f"{smallest.estimated_bytes / 1e6:.2f} MB. Raise the budget or combine with distillation to fewer layers."
        )
    texts = eval_texts if eval_texts and isinstance(eval_texts[0], str) else None
    timing_batch = latency_batch(original, tokenizer if texts else None, texts) if latency_rounds else None
    probes: dict = {}
    if target_latency is not None:
        if timing_batch is None:
            raise ValueError("A latency target needs input shapes: the model's config has no vocab_size to time with.")
        length = int(timing_batch["input_ids"].shape[1])

        def quantize(trial, fmt, dynamic):
            probe = Candidate(None, 0.0, 0.0, fmt, fmt, dynamic=dynamic, space=space, total_layers=total_layers)
            apply_compression(trial, probe.quant_config(algorithm="rtn"))

        probes = speed_probes(original, layer_formats, timing_batch, max(1, min(latency_rounds, 3)), quantize)
        for cand in fitting:
            share = compute_share(cand, hidden, intermediate, length)
            cand.estimated_latency = estimate_latency(cand, probes, share)
        fast = [c for c in fitting if c.estimated_latency <= LATENCY_MARGIN * target_latency]
        if not fast:
            quickest = min(fitting, key=lambda c: c.estimated_latency)
            raise ValueError(
                f"No setting that fits {target / 1e6:.2f} MB reaches latency {target_latency:g}x by estimate: the "
                f"fastest is {quickest.name}, about {quickest.estimated_latency:.2f}x (speed probes of the whole "
                f"model: {_probe_text(probes)}). Relax latency=, or raise the budget."
            )
        fitting = fast
    fitting.sort(key=lambda c: (c.damage, -c.estimated_bytes))

    batches = list(calibration_batches(original, eval_texts, tokenizer=tokenizer, batch_size=32))
    reference = sentence_embeddings(original, batches)
    task_batches, labels = None, None
    if task_rows:
        rows = task_rows[:128]
        labels = [int(r["label"]) for r in rows]
        task_batches = list(calibration_batches(original, [r["text"] for r in rows], tokenizer=tokenizer,
                                                batch_size=32, name="task_data"))  # fmt: skip
    task_before = _task_scores(original, task_batches, labels) if task_batches else None
    structures: dict[tuple, nn.Module] = {}
    measured: list[Candidate] = []
    queue = _measure_order(fitting, len(fitting))
    while queue and len(measured) < max_measured:
        cand = queue.pop(0)
        if target_latency is not None and cand.estimated_latency * _correction(measured) > (
                LATENCY_MARGIN * target_latency):  # fmt: skip
            continue  # the measurements so far say this one would be too slow
        if cand.structure not in structures:
            structures[cand.structure] = _build_structure(original, cand, calibration_data, tokenizer)
        trial = copy.deepcopy(structures[cand.structure])
        apply_compression(trial, cand.quant_config(algorithm="rtn"), calibration_data=calibration_data,
                          tokenizer=tokenizer)  # fmt: skip
        cand.measured_bytes = size_breakdown(trial)["bytes"]
        new = sentence_embeddings(trial, batches)
        cand.cosine = float(nn.functional.cosine_similarity(new, reference, dim=-1).mean())
        if timing_batch is not None:
            cand.latency = latency_ratio(original, trial, timing_batch, rounds=max(1, min(latency_rounds, 3)))["ratio"]
        if task_before is not None:
            cand.task = _task_scores(trial, task_batches, labels)
        measured.append(cand)
        logger.info("budget candidate %s: %.2f MB, latency %s, cosine %.4f", cand.name, cand.measured_bytes / 1e6,
                    cand.latency, cand.cosine)  # fmt: skip
        del trial
    structures.clear()

    def meets(c: Candidate) -> bool:
        return c.measured_bytes <= target and (target_latency is None or c.latency <= target_latency)

    fits = [c for c in measured if meets(c)]
    wanted = f"{target / 1e6:.2f} MB" + (f" and latency {target_latency:g}x" if target_latency is not None else "")
    if not fits:
        best = sorted(measured, key=lambda c: -c.cosine)[:3]
        raise ValueError(
            f"None of the {len(measured)} measured candidates meets {wanted}. Best found: "
            + "; ".join(f"{c.name}: {c.measured_bytes / 1e6:.2f} MB, latency {_x(c.latency)}, cosine {c.cosine:.4f}"
                        for c in best)
            + ". Raise the budget, relax latency=, or measure more candidates (max_measured)."
        )  # fmt: skip
    by_task = task_before is not None and all(c.task for c in fits)
    best = max(fits, key=lambda c: (c.task["accuracy"], -c.task["loss"], c.cosine) if by_task else c.cosine)
    choice = {
        "target_bytes": target,
        "original_bytes": sizes["bytes"],
        "target_latency": target_latency,
        "chosen": best.name,
        "chosen_settings": best.settings(),
        "chosen_by": "task accuracy on task_data (then task loss)" if by_task else "mean cosine to the original",
        "candidates": [
            {"name": c.name, "bytes": c.measured_bytes, "estimated_bytes": c.estimated_bytes,
             "latency": c.latency, "estimated_latency": c.estimated_latency, "cosine": c.cosine,
             "task": c.task, "fits": meets(c), **c.settings()}
            for c in measured
        ],  # fmt: skip
        "speed_probes": {f"{fmt}{' + int8 activations' if dyn else ''}": p for (fmt, dyn), p in probes.items()},
        "task_before": task_before,
        "grid_size": len(grid),
        "grid_fitting": len(fitting),
        "latency_correction": _correction(measured) if target_latency is not None else None,
        "summary": (
            f"target {wanted} ({sizes['bytes'] / target:.1f}x smaller); {len(fitting)} of {len(grid)} settings fit "
            f"by estimate, {len(measured)} measured; chose {best.name}: {best.measured_bytes / 1e6:.2f} MB, latency "
            f"{_x(best.latency)}, mean cosine {best.cosine:.4f} with round-to-nearest during the search (the final "
            "model uses the default error-minimising quantizer, after recovery distillation)."
        ),
    }
    return [*best.structure_configs(), best.quant_config()], choice


def _correction(measured: list[Candidate]) -> float:
    """Measured / estimated latency of the candidates timed so far (median; 1 before any): the estimate counts
    multiply-adds, and what pruning buys in time on this machine is learnt from the first measurements."""
    import statistics

    ratios = [c.latency / c.estimated_latency for c in measured if c.latency and c.estimated_latency]
    return statistics.median(ratios) if ratios else 1.0


def _x(value: float | None) -> str:
    return "not timed" if value is None else f"{value:.2f}x"


def _probe_text(probes: dict) -> str:
    return ", ".join(f"{fmt}{' + int8 activations' if dyn else ''} {p['ratio']:.2f}x" for (fmt, dyn), p in
                     probes.items())  # fmt: skip


def candidates_table(choice: dict) -> str:
    """The measured candidates of a budget search as a markdown table (size, latency, fidelity, task accuracy)."""
    lines = ["| candidate | size (MB) | latency vs original | mean cosine | task accuracy | meets targets |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for c in choice["candidates"]:
        task = f"{c['task']['accuracy']:.4f}" if c.get("task") else ""
        mark = "chosen" if c["name"] == choice["chosen"] else ("yes" if c["fits"] else "no")
        lines.append(f"| {c['name']} | {c['bytes'] / 1e6:.2f} | {_x(c['latency'])} | {c['cosine']:.4f} | {task} | "
                     f"{mark} |")  # fmt: skip
    return "\n".join(lines)
