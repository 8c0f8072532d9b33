"""Configs of structured pruning: attention heads (`HeadPruningConfig`) and FFN neurons (`FFNPruningConfig`).

They are two techniques (``"head_pruning"`` and ``"ffn_pruning"``) because a user often wants only one, and the
resolved recipe of each stays small and readable; both share the scoring and slicing machinery of this package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from ..config import TechniqueConfig, int_keys
from ..validation import WrongTypeError, describe


__all__ = ["HeadPruningConfig", "FFNPruningConfig", "IMPORTANCE_METHODS", "RANKINGS"]

IMPORTANCE_METHODS = ("auto", "gradient", "activation", "magnitude", "random")
RANKINGS = ("global", "per_layer")


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def _check_fraction(name: str, value: float | None) -> None:
    allowed = f"{name} must be a number in [0, 1) (the share of units to remove)"
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise WrongTypeError(f"{allowed}, got {describe(value)}.")
    if value is not None and not 0.0 <= value < 1.0:  # NaN fails too
        raise ValueError(f"{allowed}, got {value!r}.")


def _check_int(name: str, value: object, minimum: int, allowed: str) -> None:
    """`value` must be an int (not a bool) >= `minimum`; `allowed` words the rule, e.g. 'a positive integer'."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise WrongTypeError(f"{name} must be {allowed}, got {describe(value)}.")
    if value < minimum:
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")


@dataclass
class _ScoringFields:
    """Fields shared by both configs: how importance is measured."""

    importance: str = field(
        default="auto",
        metadata={
            "help": "How units are ranked: 'gradient' (Michel et al. 2019 mask-gradient sensitivity on calibration "
            "data), 'activation' (FLAP, An et al. 2024: the variance of each output-projection input channel over "
            "the calibration tokens times its weight column's squared norm; forward passes only, and the one that "
            "sequential=True computes layer by layer), 'magnitude' (weight norms, no data), 'random' (a baseline), "
            "or 'auto' (gradient when calibration data is given, else magnitude)."
        },
    )
    ranking: str = field(
        default="global",
        metadata={"help": "'global' ranks units of all layers together (scores normalised per layer); 'per_layer' "
                  "removes the same share from every layer."},
    )  # fmt: skip
    compensate_bias: bool = field(
        default=True,
        metadata={"help": "With calibration data (any importance): add the removed units' mean output to the output "
                  "projection's bias (FLAP's compensation), where it has one (not Llama, Mistral, Qwen2)."},
    )  # fmt: skip
    max_samples: int = field(default=256, metadata={"help": "Calibration texts used for scoring, at most."})
    batch_size: int = field(default=16, metadata={"help": "Batch size of the scoring passes."})
    max_length: int = field(default=128, metadata={"help": "Tokens per calibration text, at most."})
    seed: int = field(default=0, metadata={"help": "Seed of the random baseline and of the output probes."})

    def _check_scoring(self) -> None:
        _check_choice("importance", self.importance, IMPORTANCE_METHODS)
        _check_choice("ranking", self.ranking, RANKINGS)
        for name in ("max_samples", "batch_size", "max_length"):
            _check_int(name, getattr(self, name), 1, "a positive integer")
        _check_int("seed", self.seed, 0, "an integer >= 0")
        if not isinstance(self.compensate_bias, bool):
            raise WrongTypeError(f"compensate_bias must be True or False, got {describe(self.compensate_bias)}.")


@dataclass
class HeadPruningConfig(_ScoringFields, TechniqueConfig):
    """Remove whole attention heads: the q/k/v rows and output-projection columns of each head are sliced away.

    Give exactly one of `fraction`, `num_heads_to_prune` or `heads_to_prune`. The config returned by `apply` (and
    stored in ``config.json``) always holds the explicit `heads_to_prune` map, in the model's *original* head
    numbering, so reloading needs no data.

    Grouped-query attention (Llama, Mistral, Qwen2): a query head can only be removed if every kept key/value group
    keeps the same number of query heads (the attention kernels repeat each key/value head a fixed number of
    times). Ranked pruning therefore rounds each layer to the best layout of ``groups x heads-per-group`` that keeps
    at most the requested number of heads (so at least the requested number is removed); a key/value head whose
    query heads are all removed is removed too. An explicit map that breaks this rule raises a `ValueError`.

    Limitations: a model with an attention layer emptied entirely returns no attention map for that layer with
    ``output_attentions=True``, and generation needs the default dynamic KV cache (a static cache preallocates the
    unpruned head count).

    Args:
        fraction (`float`, *optional*):
            Share of the query heads the model has now to remove, in [0, 1) (``round(fraction * heads)``).
        num_heads_to_prune (`int`, *optional*):
            Number of query heads to remove in total, over all layers.
        heads_to_prune (`dict[int, list[int]]`, *optional*):
            Explicit ``{layer index: [head indices]}`` (original numbering). Layers may lose all their heads: such a
            layer skips its attention (the residual path and the output bias remain).
        min_heads_per_layer (`int`, *optional*, defaults to `1`):
            Ranked pruning never leaves fewer heads in a layer; `0` lets whole attention layers go.
        head_importance (`list[list[float]]`, *optional*):
            Filled by `apply`: the ``layers x heads`` scores used for ranking (``None`` for already removed heads),
            kept for the heatmap of `hf_compress.pruning.plot_head_importance`.

    Example:

    ```py
    >>> from hf_compress import apply_compression
    >>> from hf_compress.pruning import HeadPruningConfig
    >>> apply_compression(model, HeadPruningConfig(fraction=1 / 3), calibration_data=texts)
    >>> model.config.quantization_config.techniques[0].heads_to_prune
    {0: [3, 7], 1: [0], ...}
    ```
    """

    method: ClassVar[str] = "head_pruning"

    fraction: float | None = field(default=None, metadata={"help": "Share of all attention heads to remove."})
    num_heads_to_prune: int | None = field(default=None, metadata={"help": "Number of attention heads to remove."})
    heads_to_prune: dict[int, list[int]] | None = field(
        default=None, metadata={"help": "Explicit {layer: [heads]} map of heads to remove (original numbering)."}
    )
    min_heads_per_layer: int = field(default=1, metadata={"help": "Heads always kept per layer by ranked pruning."})
    head_importance: list[list[float | None]] | None = field(
        default=None, metadata={"help": "Resolved: layers x heads importance scores (filled by apply)."}
    )

    def __post_init__(self) -> None:
        given = [n for n in ("fraction", "num_heads_to_prune", "heads_to_prune") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(
                f"Give exactly one of fraction, num_heads_to_prune or heads_to_prune; got {given or 'none'}. "
                "Example: HeadPruningConfig(fraction=0.33) or HeadPruningConfig(heads_to_prune={0: [1, 2]})."
            )
        _check_fraction("fraction", self.fraction)
        if self.num_heads_to_prune is not None:
            _check_int("num_heads_to_prune", self.num_heads_to_prune, 0, "a non-negative integer")
        if self.heads_to_prune is not None:
            if not isinstance(self.heads_to_prune, dict):
                raise TypeError(
                    f"heads_to_prune must be a dict {{layer: [heads]}}, got {type(self.heads_to_prune).__name__}."
                )
            mapping = int_keys(self.heads_to_prune)
            for layer, heads in mapping.items():
                if (
                    layer < 0
                    or not isinstance(heads, (list, tuple))
                    or not all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in heads)
                ):
                    raise ValueError(
                        f"heads_to_prune[{layer}] must be a list of non-negative head indices for a layer index >= 0, "
                        f"got {heads!r}."
                    )
            self.heads_to_prune = {k: sorted(set(v)) for k, v in sorted(mapping.items())}
        _check_int("min_heads_per_layer", self.min_heads_per_layer, 0, "an integer >= 0")
        self._check_scoring()


@dataclass
class FFNPruningConfig(_ScoringFields, TechniqueConfig):
    """Remove FFN intermediate neurons: rows of the FFN input projection(s) and columns of its output projection.

    Most of a transformer's FLOPs are in the FFN (two ``hidden x 4*hidden`` matrices per layer), so this is where
    structured pruning buys the most speed. Give `fraction` (ranked by importance) or explicit `intermediate_sizes`;
    the resolved config stores the size kept per layer (which neurons were kept does not matter once sliced).

    Args:
        fraction (`float`, *optional*):
            Share of FFN neurons to remove, in [0, 1).
        intermediate_sizes (`dict[int, int]`, *optional*):
            Neurons to keep per layer, ``{layer index: size}``; layers not listed are left alone.
        round_to (`int`, *optional*, defaults to `1`):
            Round each kept size up to a multiple of this (e.g. 8 or 64 keeps GEMMs efficient).
        min_neurons_per_layer (`int`, *optional*, defaults to `1`):
            Ranked pruning never keeps fewer neurons in a layer.
    """

    method: ClassVar[str] = "ffn_pruning"

    fraction: float | None = field(default=None, metadata={"help": "Share of FFN neurons to remove."})
    intermediate_sizes: dict[int, int] | None = field(
        default=None,
        metadata={"help": "Explicit {layer: FFN neurons kept}, instead of fraction (the recipe stores this map)."},
    )
    round_to: int = field(default=1, metadata={"help": "Round kept sizes up to a multiple of this."})
    min_neurons_per_layer: int = field(default=1, metadata={"help": "Neurons always kept per layer."})

    def __post_init__(self) -> None:
        if (self.fraction is None) == (self.intermediate_sizes is None):
            raise ValueError(
                "Give exactly one of fraction or intermediate_sizes, e.g. FFNPruningConfig(fraction=0.25) or "
                f"FFNPruningConfig(intermediate_sizes={{0: 1024}}); got fraction={self.fraction!r}, "
                f"intermediate_sizes={self.intermediate_sizes!r}."
            )
        _check_fraction("fraction", self.fraction)
        if self.intermediate_sizes is not None:
            if not isinstance(self.intermediate_sizes, dict):
                raise TypeError(
                    f"intermediate_sizes must be a dict {{layer: size}}, got {type(self.intermediate_sizes).__name__}."
                )
            sizes = int_keys(self.intermediate_sizes)
            bad = {k: v for k, v in sizes.items() if k < 0 or isinstance(v, bool) or not isinstance(v, int) or v < 0}
            if bad:
                raise ValueError(f"intermediate_sizes needs layer indices >= 0 and sizes >= 0, got {bad}.")
            self.intermediate_sizes = dict(sorted(sizes.items()))
        _check_int("round_to", self.round_to, 1, "an integer >= 1 (e.g. 8 or 64)")
        _check_int("min_neurons_per_layer", self.min_neurons_per_layer, 0, "an integer >= 0")
        self._check_scoring()

    def kept_size(self, requested: int, full: int) -> int:
        """`requested` rounded up to `round_to` and clipped to ``[min_neurons_per_layer, full]``."""
        size = math.ceil(requested / self.round_to) * self.round_to
        return max(min(size, full), min(self.min_neurons_per_layer, full))
