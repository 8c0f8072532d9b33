"""Budget mode: find the compression settings that fit a target size with the best measured fidelity.

The search has three steps, so that it stays minutes on a CPU while every decision rests on a measurement:

1. **Estimate** the size of every point of a grid (embedding rank, fraction of heads and of FFN neurons removed,
   weight format of the layers and, separately, of the embeddings: int8, int4 in groups of 32 or 64, so mixed
   precision is part of the search). Bytes per parameter of each format are *measured* once by quantizing a copy of the model with fast round-to-nearest, so the estimate follows
   the real storage format (packed integers, scales, offsets), not a formula.
2. **Measure** the candidates that fit (with a 3 % margin), in order of least structural damage: each is built for
   real (pruning and factorization with the calibration data, round-to-nearest quantization) and scored by the
   cosine of its sentence embeddings to the original's on the evaluation texts. Structures are built once and
   reused across bit widths.
3. **Choose** the best-scoring candidate whose measured size fits. `compress` then builds it with the default
   (error-minimising) quantizer, whose output has the same size and equal or better fidelity.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..evaluation.measure import size_breakdown
from .presets import build_config


__all__ = ["parse_budget", "search_budget", "Candidate"]

logger = logging.getLogger(__name__)

RANKS = (None, 256, 192, 128, 96, 64)
HEAD_FRACTIONS = (0.0, 1 / 6, 1 / 3)
FFN_FRACTIONS = (0.0, 0.25, 0.5)
# Weight formats: (bits, group size); None = one scale per row. Layers and embeddings choose independently.
# These are the nominal groups; `Space.for_model` replaces a group that does not divide the model's widths.
FORMATS = {"int8": (8, None), "int4-g64": (4, 64), "int4-g32": (4, 32)}
MARGIN = 0.97
# Prior damage of each choice, used only to order which fitting candidates get measured first.
_RANK_DAMAGE = {None: 0.0, 256: 0.05, 192: 0.08, 128: 0.15, 96: 0.22, 64: 0.3}


def _format_damage(bits: int, group: int | None) -> float:
    return 0.0 if bits == 8 else (0.12 if (group or 0) <= 32 else 0.15)


@dataclass(frozen=True)
class Space:
    """What the model allows: weight formats whose groups divide its widths, the FFN rounding that keeps pruned
    sizes divisible by them, and the pattern naming its embeddings (for their separate format)."""

    formats: tuple[tuple[str, int, int | None], ...] = tuple((k, *v) for k, v in FORMATS.items())
    round_to: int = 64
    embeddings: str = r".*embeddings.*"

    @classmethod
    def for_model(cls, model: nn.Module) -> Space:
        """Group sizes that divide every quantized input width of `model` (312 wide TinyBERT: 24, not 32/64).

        A nominal group that does not divide them becomes the largest even divisor of their gcd below it; with an
        odd gcd there is no 4-bit format (two values per byte need even groups). Kept FFN sizes are rounded to a
        multiple of every group (64 with the nominal ones), so pruning never breaks the divisibility.
        """
        from transformers.pytorch_utils import Conv1D

        widths = {
            m.in_features if isinstance(m, nn.Linear) else m.weight.shape[0] if isinstance(m, Conv1D)
            else m.embedding_dim
            for m in model.modules() if isinstance(m, (nn.Linear, Conv1D, nn.Embedding))
        }  # fmt: skip
        common = math.gcd(*widths) if widths else 64
        formats: dict[str, tuple[int, int | None]] = {}
        for bits, group in FORMATS.values():
            if group is not None and common % group:
                group = next((g for g in range(group, 1, -1) if common % g == 0 and g % 2 == 0), None)
                if group is None:
                    continue
            formats.setdefault(f"int{bits}" + (f"-g{group}" if group else ""), (bits, group))
        groups = [g for _, g in formats.values() if g]
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]
        linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
        pattern = cls.embeddings  # BERT-like names; GPT-2's wte/wpe get an explicit pattern
        if not all(re.fullmatch(pattern, n) for n in names) or any(re.fullmatch(pattern, n) for n in linears):
            pattern = "(" + "|".join(re.escape(n) for n in names) + r")(\..*)?"
        return cls(tuple((k, *v) for k, v in formats.items()), math.lcm(*groups) if groups else 64, pattern)

    def format(self, name: str) -> tuple[int, int | None]:
        return next((bits, group) for key, bits, group in self.formats if key == name)


def parse_budget(budget: float | str, original_bytes: int) -> int:
    """Target size in bytes from megabytes (``12``, ``"12MB"``) or a reduction factor (``"10x"``)."""
    text = str(budget).strip().lower().replace(" ", "")
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(mb|x)?", text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"budget must be megabytes ('12', '12MB') or a reduction factor ('10x'), got {budget!r}.")
    value = float(match.group(1))
    if match.group(2) == "x":
        if value <= 1:
            raise ValueError(f"A reduction factor must be above 1 (e.g. '10x'), got {budget!r}.")
        return int(original_bytes / value)
    return int(value * 1e6)


@dataclass
class Candidate:
    rank: int | None
    head_fraction: float
    ffn_fraction: float
    layers: str  # a FORMATS key
    embeddings: str
    estimated_bytes: int = 0
    measured_bytes: int | None = None
    cosine: float | None = None
    space: Space = field(default_factory=Space, repr=False, compare=False)

    @property
    def name(self) -> str:
        parts = [f"rank {self.rank}" if self.rank else "full embeddings"]
        if self.head_fraction:
            parts.append(f"{self.head_fraction:.0%} heads pruned")
        if self.ffn_fraction:
            parts.append(f"{self.ffn_fraction:.0%} FFN pruned")
        parts.append(f"{self.layers} layers / {self.embeddings} embeddings")
        return ", ".join(parts)

    @property
    def damage(self) -> float:
        return (self.head_fraction + 0.8 * self.ffn_fraction + _RANK_DAMAGE.get(self.rank, 0.3)
                + _format_damage(*self.space.format(self.layers))
                + _format_damage(*self.space.format(self.embeddings)) / 3)  # fmt: skip

    def valid(self) -> bool:
        """Group sizes must divide the factor rank (the input features of the projection and the token factor)."""
        groups = [self.space.format(f)[1] or 1 for f in (self.layers, self.embeddings)]
        return not self.rank or all(self.rank % g == 0 for g in groups)

    def structure_configs(self) -> list:
        configs = []
        if self.head_fraction:
            configs.append(build_config("head_pruning", fraction=self.head_fraction, max_samples=64))
        if self.ffn_fraction:  # kept sizes stay multiples of every group size (64 for groups of 32 and 64)
            configs.append(build_config("ffn_pruning", fraction=self.ffn_fraction, round_to=self.space.round_to,
                                        max_samples=64))  # fmt: skip
        if self.rank:
            configs.append(build_config("embedding_factorization", rank=self.rank))
        return configs

    def quant_config(self, algorithm: str | None = None):
        bits, group = self.space.format(self.layers)
        kwargs: dict[str, Any] = {"bits": bits, "group_size": group}
        if self.embeddings != self.layers:
            e_bits, e_group = self.space.format(self.embeddings)
            kwargs["overrides"] = {self.space.embeddings: {"bits": e_bits, "group_size": e_group, "symmetric": None}}
        if algorithm:
            kwargs["algorithm"] = algorithm
        return build_config("weight_quantization", **kwargs)


def _bytes_per_param(model: nn.Module, space: Space) -> dict[str, dict[str, float]]:
    """Measured bytes per parameter of each category after quantizing a copy in each format (round-to-nearest)."""
    from .apply import apply_compression

    rates = {}
    for name, bits, group in space.formats:
        trial = copy.deepcopy(model)
        apply_compression(trial, build_config("weight_quantization", bits=bits, group_size=group, algorithm="rtn"))
        sizes = size_breakdown(trial)["breakdown"]
        rates[name] = {cat: v["bytes"] / max(v["params"], 1) for cat, v in sizes.items()}
        del trial
    return rates


def _removing(fractions: tuple[float, ...], model: nn.Module, kind: str, round_to: int = 1) -> list[float]:
    """The fractions that remove something from this model (0 always stays): a share of heads must round to at
    least one head, and a share of FFN neurons to at least `round_to` per layer, so that rounding the kept sizes up
    to multiples of `round_to` cannot give every layer back its full size."""
    from ..architectures import get_adapter, num_heads
    from ..pruning.surgery import ffn_size

    layers = get_adapter(model).layer_modules(model)
    if kind == "heads":
        total, least = num_heads(model) * len(layers), 1
    else:
        total, least = sum(ffn_size(model, layer) for layer in layers), round_to * len(layers)
    return [f for f in fractions if not f or round(f * total) >= least]


def estimate(candidate: Candidate, sizes: dict[str, Any], rates: dict[str, dict[str, float]], vocab: int,
             hidden: int) -> int:  # fmt: skip
    """Estimated bytes of `candidate` from the original's parameter breakdown and measured bytes per parameter."""
    parts = sizes["breakdown"]
    emb = parts["embeddings"]["params"]
    if candidate.rank:
        emb = emb - vocab * hidden + vocab * candidate.rank + candidate.rank * hidden + hidden
    attention = parts["attention"]["params"] * (1 - candidate.head_fraction)
    ffn = parts["ffn"]["params"] * (1 - candidate.ffn_fraction)
    layer_rates, emb_rates = rates[candidate.layers], rates[candidate.embeddings]
    total = emb * emb_rates["embeddings"] + attention * layer_rates["attention"] + ffn * layer_rates["ffn"]
    return int(total + parts["other"]["params"] * layer_rates["other"])


def _measure_order(fitting: list[Candidate], count: int) -> list[Candidate]:
    """The least-damaging weight format of each of the first structures, then the next formats, by prior damage.

    Measuring different structures first keeps the search from spending all its measurements on one structure.
    """
    firsts: dict[tuple, Candidate] = {}
    for cand in fitting:
        firsts.setdefault((cand.rank, cand.head_fraction, cand.ffn_fraction), cand)
    order = list(firsts.values())[: count // 2 + 1]
    order += [c for c in fitting if c not in order]
    return order[:count]


def search_budget(model: nn.Module, budget: float | str, *, calibration_data: Any, eval_texts: list[str] | None,
                  tokenizer: Any, original: nn.Module | None = None, max_measured: int = 6) -> tuple[list, dict]:  # fmt: skip
    """Choose technique configs that fit `budget` with the best measured fidelity.

    Args:
        model: the model to compress (not modified here).
        budget: megabytes or a reduction factor, see `parse_budget`.
        calibration_data: texts for pruning and factorization (required: the choice is data-driven).
        eval_texts: texts for the fidelity measurement (the calibration texts when omitted).
        max_measured: how many fitting candidates are built and measured.

    Returns:
        ``(configs, choice)``: the technique configs to apply, and a JSON-ready record of the decision (target,
        the chosen candidate, every measured candidate with size and cosine, and a one-line summary).
    """
    from ..calibration import calibration_batches
    from ..evaluation.measure import sentence_embeddings
    from .apply import apply_compression

    if calibration_data is None:
        raise ValueError("Budget mode measures candidates on data: pass calibration_data=[texts] (or --calibration).")
    if isinstance(max_measured, bool) or not isinstance(max_measured, int) or max_measured < 1:
        raise ValueError(f"max_measured must be an integer >= 1, got {max_measured!r}.")
    eval_texts = eval_texts or list(calibration_data)[:64]
    original = original if original is not None else model
    sizes = size_breakdown(original)
    target = parse_budget(budget, sizes["bytes"])
    config = original.config.get_text_config()
    vocab, hidden = int(config.vocab_size), int(config.hidden_size)
    space = Space.for_model(original)
    rates = _bytes_per_param(original, space)
    names = [name for name, _, _ in space.formats]
    heads = _removing(HEAD_FRACTIONS, original, "heads")
    ffns = _removing(FFN_FRACTIONS, original, "ffn", space.round_to)
    grid = [Candidate(r, h, f, lay, emb, space=space) for r in RANKS for h in heads for f in ffns
            for lay in names for emb in names]  # fmt: skip
    # A factorization must hold fewer parameters than the table it replaces.
    grid = [c for c in grid if c.valid() and (not c.rank or c.rank * (vocab + hidden) < vocab * hidden)]
    for cand in grid:
        cand.estimated_bytes = estimate(cand, sizes, rates, vocab, hidden)
    fitting = sorted(
        (c for c in grid if c.estimated_bytes <= MARGIN * target), key=lambda c: (c.damage, -c.estimated_bytes)
    )
    if not fitting:
        smallest = min(grid, key=lambda c: c.estimated_bytes)
        raise ValueError(
            f"No setting reaches {target / 1e6:.2f} MB: the smallest in the search space ({smallest.name}) is about "
            f"{smallest.estimated_bytes / 1e6:.2f} MB. Raise the budget or combine with distillation to fewer layers."
        )

    batches = list(calibration_batches(original, eval_texts, tokenizer=tokenizer, batch_size=32))
    reference = sentence_embeddings(original, batches)
    structures: dict[tuple, nn.Module] = {}
    measured: list[Candidate] = []
    for cand in _measure_order(fitting, max_measured):
        key = (cand.rank, cand.head_fraction, cand.ffn_fraction)
        if key not in structures:
            structured = copy.deepcopy(original)
            if cand.structure_configs():
                apply_compression(structured, *cand.structure_configs(), calibration_data=calibration_data,
                                  tokenizer=tokenizer)
            structures[key] = structured
        trial = copy.deepcopy(structures[key])
        apply_compression(trial, cand.quant_config(algorithm="rtn"), calibration_data=calibration_data,
                          tokenizer=tokenizer)
        cand.measured_bytes = size_breakdown(trial)["bytes"]
        new = sentence_embeddings(trial, batches)
        cand.cosine = float(nn.functional.cosine_similarity(new, reference, dim=-1).mean())
        measured.append(cand)
        logger.info("budget candidate %s: %.2f MB, cosine %.4f", cand.name, cand.measured_bytes / 1e6, cand.cosine)
        del trial
    structures.clear()
    fits = [c for c in measured if c.measured_bytes <= target]
    if not fits:
        raise ValueError(f"None of the measured candidates fit {target / 1e6:.2f} MB; raise the budget.")
    best = max(fits, key=lambda c: c.cosine)
    choice = {
        "target_bytes": target,
        "original_bytes": sizes["bytes"],
        "chosen": best.name,
        "chosen_settings": {
            "rank": best.rank,
            "head_fraction": best.head_fraction,
            "ffn_fraction": best.ffn_fraction,
            "layers": best.layers,
            "embeddings": best.embeddings,
        },  # fmt: skip
        "candidates": [
            {
                "name": c.name,
                "bytes": c.measured_bytes,
                "estimated_bytes": c.estimated_bytes,
                "fits": c.measured_bytes <= target,
                "cosine": c.cosine,
            }
            for c in measured
        ],  # fmt: skip
        "grid_size": len(grid),
        "grid_fitting": len(fitting),
        "summary": (
            f"target {target / 1e6:.2f} MB ({sizes['bytes'] / target:.1f}x smaller); {len(fitting)} of {len(grid)} "
            f"settings fit by estimate, {len(measured)} measured; chose {best.name}: {best.measured_bytes / 1e6:.2f} "
            f"MB, mean cosine {best.cosine:.4f} with round-to-nearest during the search (the final model uses the "
            "default error-minimising quantizer)."
        ),
    }
    return [*best.structure_configs(), best.quant_config()], choice
