"""Configs of the two factorization techniques: `EmbeddingFactorizationConfig` and `LowRankLinearConfig`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..config import TechniqueConfig
from ..validation import WrongTypeError, check_bool, check_number, check_patterns, describe


__all__ = ["EmbeddingFactorizationConfig", "LowRankLinearConfig", "INIT_METHODS"]

INIT_METHODS = ("auto", "sensitivity", "frequency", "svd")


def _check_choice(rank, energy, param_budget, owner: str, allow_none: bool = False) -> None:
    given = [
        name
        for name, value in (("rank", rank), ("energy", energy), ("param_budget", param_budget))
        if value is not None
    ]
    if len(given) > 1 or (not given and not allow_none):
        raise ValueError(
            f"{owner} takes exactly one of rank, energy or param_budget, got {given or 'none'}. Example: "
            f"{owner}(rank=128), {owner}(energy=0.9) or {owner}(param_budget=0.35)."
        )
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        error = ValueError if isinstance(rank, int) and not isinstance(rank, bool) else WrongTypeError
        raise error(f"rank must be a positive integer, got {describe(rank)}.")
    energy_rule = "energy is the fraction of the spectrum's energy to keep, a number in (0, 1] such as 0.9"
    if energy is not None and (isinstance(energy, bool) or not isinstance(energy, (int, float))):
        raise WrongTypeError(f"{energy_rule}; got {describe(energy)}.")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"{energy_rule}; got {energy!r} (not in (0, 1]).")
    if param_budget is not None:
        if isinstance(param_budget, bool) or not isinstance(param_budget, (int, float)):
            raise WrongTypeError(f"param_budget must be a positive number, got {describe(param_budget)}.")
        if not param_budget > 0 or param_budget != param_budget:
            raise ValueError(f"param_budget must be a positive number, got {param_budget!r}.")
        if isinstance(param_budget, float) and param_budget >= 1.0:
            raise ValueError(
                f"A float param_budget is a fraction of the original parameters and must be in (0, 1), got "
                f"{param_budget}. Pass an int for an absolute number of parameters."
            )


@dataclass
class EmbeddingFactorizationConfig(TechniqueConfig):
    """Replace the input token embedding ``V x H`` by two factors ``V x r`` and ``r x H`` (ALBERT-style).

    Give exactly one of `rank`, `energy` or `param_budget`. With calibration text the factors come from a
    data-aware SVD: rows weighted by token frequency (tokens that occur often are reproduced best) and errors measured
    by how much the model's pooled output reacts to each embedding direction. On MiniLM at r = 128 the mean
    sentence-embedding cosine to the original goes from 0.76 (plain SVD) to 0.96 (frequency) and 0.97 (frequency +
    sensitivity). Without data: plain truncated SVD. A tied output head (GPT-2,
    Llama with ``tie_word_embeddings``, BERT's MLM head) shares both factors.

    Args:
        rank (`int`, *optional*): inner dimension r; must save parameters: ``r * (V + H) < V * H``.
        energy (`float`, *optional*): keep the smallest rank whose (weighted) spectrum retains this fraction.
        param_budget (`int | float`, *optional*): at most this many embedding parameters (int) or this fraction of
            them (float in (0, 1)).
        init (`str`, *optional*, defaults to `"auto"`): ``"sensitivity"`` (frequency-weighted rows, errors measured
            by the output's sensitivity: one forward/backward pass over `sensitivity_texts`), ``"frequency"``
            (frequency-weighted rows only), ``"svd"`` (plain truncated SVD) or ``"auto"`` (sensitivity when
            calibration data is given, else svd).
        smoothing (`float`, *optional*, defaults to `1.0`): count added to every token before weighting, so tokens
            unseen in the calibration text still count a little (measured best of 0, 0.1 and 1 on MiniLM).
        center (`bool`, *optional*, defaults to `False`): subtract the mean embedding and keep it as a bias of the
            projection (made no measurable difference on MiniLM; useful for tables with a large shared offset).
        max_calibration_texts (`int`, *optional*, defaults to `20000`): texts read to count tokens.
        sensitivity_texts (`int`, *optional*, defaults to `256`): texts run forward and backward for the metric.
    """

    method: ClassVar[str] = "embedding_factorization"

    rank: int | None = field(default=None, metadata={"help": "Inner dimension r of the V x r and r x H factors."})
    energy: float | None = field(default=None, metadata={"help": "Choose r to keep this fraction of the energy."})
    param_budget: float | None = field(
        default=None, metadata={"help": "Max embedding parameters (int) or fraction of them (float in (0, 1))."}
    )
    init: str = field(default="auto", metadata={"help": "auto | sensitivity | frequency (need data) | svd."})
    smoothing: float = field(default=1.0, metadata={"help": "Count added to every token's frequency weight."})
    center: bool = field(default=False, metadata={"help": "Keep the mean embedding as a projection bias."})
    max_calibration_texts: int = field(default=20000, metadata={"help": "Calibration texts read to count tokens."})
    sensitivity_texts: int = field(default=256, metadata={"help": "Texts run forward/backward for the metric."})

    def __post_init__(self) -> None:
        _check_choice(self.rank, self.energy, self.param_budget, type(self).__name__)
        if not isinstance(self.init, str) or self.init not in INIT_METHODS:
            raise ValueError(f"init must be one of {INIT_METHODS}, got {self.init!r}.")
        check_number("smoothing", self.smoothing, low=0, hint=" It is the count added to every token (default 1.0).")
        check_bool("center", self.center)
        for name in ("max_calibration_texts", "sensitivity_texts"):
            check_number(name, getattr(self, name), low=1, integer=True)


@dataclass
class LowRankLinearConfig(TechniqueConfig):
    """Factorize chosen linear layers ``W (out x in)`` into ``up (out x r) @ down (r x in)``.

    Give one of `rank`, `energy` (per layer) or `param_budget` (a fraction of the targeted layers' parameters,
    spread over the layers where the spectrum is cheapest to cut). With calibration data the cut minimises the
    error on the layer's real inputs (activation-whitened SVD); otherwise plain truncated SVD. A layer is left
    dense, with a warning, when its factorization would not save at least `min_saving` of its parameters: two
    thin matrix products are slower than one dense product of nearly the same size.

    Args:
        target_modules (`list[str] | str`, *optional*): module names (suffixes, relative to the base model) or a
            full-match regex; defaults to every FFN projection of every layer.
        exclude_modules (`list[str] | str`, *optional*): names to leave dense.
        rank (`int`, *optional*): the same rank for every targeted layer.
        energy (`float`, *optional*): per layer, the smallest rank keeping this fraction of the (whitened) spectrum.
            With activation whitening a few outlier hidden dimensions hold most of the energy (MiniLM: 75 % of it
            in ranks 1-17), so useful levels are 0.95-0.999.
        param_budget (`float`, *optional*): keep this fraction of the targeted layers' parameters in total.
        min_saving (`float`, *optional*, defaults to `0.2`): minimum fraction of a layer's parameters saved.
        whiten (`str`, *optional*, defaults to `"auto"`): ``"activation"`` (needs calibration data), ``"none"``,
            or ``"auto"``.
        max_calibration_texts (`int`, *optional*, defaults to `256`): texts run through the model for activations.
        ranks (`dict[str, int]`, *optional*): filled in by compression: the rank chosen for each module (names
            relative to the base model). Give it yourself to fix every rank.
    """

    method: ClassVar[str] = "low_rank_linear"

    target_modules: list[str] | str | None = field(default=None, metadata={"help": "Layers to factorize."})
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Layers to keep dense."})
    rank: int | None = field(default=None, metadata={"help": "The same rank for every targeted layer."})
    energy: float | None = field(default=None, metadata={"help": "Per-layer fraction of the spectrum to keep."})
    param_budget: float | None = field(default=None, metadata={"help": "Fraction of targeted params to keep."})
    min_saving: float = field(default=0.2, metadata={"help": "Skip layers saving less than this fraction."})
    whiten: str = field(default="auto", metadata={"help": "auto | activation (needs calibration data) | none."})
    max_calibration_texts: int = field(default=256, metadata={"help": "Calibration texts for activation statistics."})
    ranks: dict[str, int] | None = field(default=None, metadata={"help": "Resolved rank per module (set by apply)."})

    def __post_init__(self) -> None:
        _check_choice(self.rank, self.energy, self.param_budget, type(self).__name__, allow_none=bool(self.ranks))
        if isinstance(self.param_budget, int):
            raise ValueError(
                f"LowRankLinearConfig.param_budget is a fraction in (0, 1) of the targeted layers' parameters, "
                f"got the int {self.param_budget}."
            )
        check_number("min_saving", self.min_saving, low=0, high=1, high_open=True)
        if not isinstance(self.whiten, str) or self.whiten not in ("auto", "activation", "none"):
            raise ValueError(f"whiten must be 'auto', 'activation' or 'none', got {self.whiten!r}.")
        check_number("max_calibration_texts", self.max_calibration_texts, low=1, integer=True)
        check_patterns("target_modules", self.target_modules)
        check_patterns("exclude_modules", self.exclude_modules)
        if self.ranks is not None and not isinstance(self.ranks, dict):
            raise WrongTypeError(f"ranks must be a dict {{module name: rank}}, got {describe(self.ranks)}.")
        if self.ranks is not None:
            bad = {k: v for k, v in self.ranks.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
            if bad:
                raise ValueError(f"ranks must map module names to positive integers, got {bad}.")
