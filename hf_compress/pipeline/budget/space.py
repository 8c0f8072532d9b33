"""The search space of budget mode: the grid of settings (`Candidate`), what the model allows (`Space`) and the
size estimate of each setting from measured bytes per parameter. The search itself is in `.search`."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ...evaluation.measure import size_breakdown
from ..presets import build_config


__all__ = ["parse_budget", "Candidate", "Space", "estimate", "RANKS", "HEAD_FRACTIONS", "FFN_FRACTIONS", "DEPTHS"]

RANKS = (None, 256, 192, 128, 96, 64)
HEAD_FRACTIONS = (0.0, 1 / 6, 1 / 3)
FFN_FRACTIONS = (0.0, 0.25, 0.5)
# Share of the transformer layers kept (`make_student`: evenly spread, first and last kept); 1.0 = all of them.
DEPTHS = (1.0, 2 / 3, 1 / 2)
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
    depth: int | None = None  # transformer layers kept (make_student); None = all
    dynamic: bool = False  # int8 activations at run time (int8 layers only)
    estimated_bytes: int = 0
    estimated_latency: float | None = None
    measured_bytes: int | None = None
    cosine: float | None = None
    latency: float | None = None  # measured, as a ratio to the original
    task: dict[str, float] | None = None  # task loss / accuracy on labeled rows, when given
    space: Space = field(default_factory=Space, repr=False, compare=False)
    total_layers: int = field(default=0, repr=False, compare=False)

    @property
    def structure(self) -> tuple:
        return (self.depth, self.rank, self.head_fraction, self.ffn_fraction)

    @property
    def name(self) -> str:
        parts = [f"{self.depth} of {self.total_layers} layers"] if self.depth else []
        parts.append(f"rank {self.rank}" if self.rank else "full embeddings")
        if self.head_fraction:
            parts.append(f"{self.head_fraction:.0%} heads pruned")
        if self.ffn_fraction:
            parts.append(f"{self.ffn_fraction:.0%} FFN pruned")
        parts.append(f"{self.layers}{' + int8 activations' if self.dynamic else ''} layers / {self.embeddings} "
                     "embeddings")  # fmt: skip
        return ", ".join(parts)

    def settings(self) -> dict[str, Any]:
        return {"layers_kept": self.depth, "rank": self.rank, "head_fraction": self.head_fraction,
                "ffn_fraction": self.ffn_fraction, "layers": self.layers, "embeddings": self.embeddings,
                "int8_activations": self.dynamic}  # fmt: skip

    @property
    def damage(self) -> float:
        dropped = 1 - self.depth / self.total_layers if self.depth else 0.0
        return (self.head_fraction + 0.8 * self.ffn_fraction + _RANK_DAMAGE.get(self.rank, 0.3) + 1.5 * dropped
                + (0.05 if self.dynamic else 0.0)
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
        if self.dynamic:  # int8 x int8 matmuls: symmetric 8-bit weights with one scale per row
            kwargs.update(activations="int8_dynamic", symmetric=True)
        return build_config("weight_quantization", **kwargs)


def _bytes_per_param(model: nn.Module, space: Space) -> dict[str, dict[str, float]]:
    """Measured bytes per parameter of each category after quantizing a copy in each format (round-to-nearest)."""
    from ..apply import apply_compression

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
    from ...architectures import get_adapter, num_heads
    from ...pruning.surgery import ffn_size

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
    kept = candidate.depth / candidate.total_layers if candidate.depth else 1.0
    attention = parts["attention"]["params"] * (1 - candidate.head_fraction) * kept
    ffn = parts["ffn"]["params"] * (1 - candidate.ffn_fraction) * kept
    layer_rates, emb_rates = rates[candidate.layers], rates[candidate.embeddings]
    total = emb * emb_rates["embeddings"] + attention * layer_rates["attention"] + ffn * layer_rates["ffn"]
    return int(total + parts["other"]["params"] * layer_rates["other"])
