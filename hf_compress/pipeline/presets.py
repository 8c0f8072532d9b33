"""Named recipes for the common cases, built from the technique registry.

A preset is a list of ``(method, kwargs)`` pairs plus whether recovery distillation runs after the structural
techniques. Configs are built through the registry at call time, so a preset only needs the techniques it names
to be installed, and the error for a missing one names it.

| preset | what it does | typical use |
|---|---|---|
| ``int8`` (default) | 8-bit weights everywhere, embeddings included, calibration-free scales | near-lossless, about 4x smaller |
| ``int4`` | 4-bit weights in groups of 32, with zero points | about 6x smaller, small quality loss |
| ``distil`` | 1/3 of heads pruned, embeddings factorized to 34 % of their parameters (rank 128 on MiniLM), recovery distillation, then int8 | smaller and faster, recovered |
| ``max`` | 1/2 of heads and FFN neurons pruned, embeddings as in ``distil``, recovery distillation (180 s), int4 | the smallest model |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import TechniqueConfig
from ..registry import get_technique, registered_techniques


__all__ = ["PRESETS", "DEFAULT_PRESET", "Preset", "preset_configs"]


@dataclass(frozen=True)
class Preset:
    description: str
    techniques: tuple[tuple[str, dict[str, Any]], ...]
    distill: bool | dict[str, Any] = False  # True: recover()'s defaults; a dict: its options


PRESETS: dict[str, Preset] = {
    # int8 is near-lossless with the calibration-free error-minimising scales; GPTQ adds minutes for no gain there.
    "int8": Preset("8-bit weights everywhere (embeddings included), calibration-free scales: near-lossless, ~4x "
                   "smaller, fast to make.", (("weight_quantization", {"bits": 8, "algorithm": "mse"}),)),
    "int4": Preset("4-bit weights in groups of 32 with zero points: ~6x smaller, small quality loss.",
                   (("weight_quantization", {"bits": 4}),)),
    "distil": Preset(
        "1/3 of attention heads pruned, embeddings factorized to 34 % of their parameters (rank 128 on MiniLM), recovery distillation from the original, "
        "then 8-bit weights.",
        (("head_pruning", {"fraction": 1 / 3}), ("embedding_factorization", {"param_budget": 0.34}),
         ("weight_quantization", {"bits": 8})),
        distill=True,
    ),
    "max": Preset(
        "1/2 of attention heads and FFN neurons pruned, embeddings factorized as in distil, recovery distillation "
        "from the original (180 s wall clock), 4-bit weights: the smallest model.",
        (("head_pruning", {"fraction": 0.5}), ("ffn_pruning", {"fraction": 0.5, "round_to": 64}),
         ("embedding_factorization", {"param_budget": 0.34}), ("weight_quantization", {"bits": 4})),
        distill={"max_seconds": 180.0},
    ),
}  # fmt: skip
DEFAULT_PRESET = "int8"
# FFN sizes are rounded to multiples of 64 in `max` so that every 4-bit group size (32, 64) divides them.


def build_config(method: str, **kwargs: Any) -> TechniqueConfig:
    """A technique config built through the registry, with an error naming the installed techniques."""
    if method not in registered_techniques():
        raise ValueError(
            f"This recipe needs the {method!r} technique, which is not installed. Installed techniques: "
            f"{sorted(registered_techniques())}. Upgrade hf_compress or choose another preset."
        )
    return get_technique(method).config_cls(**kwargs)


def preset_configs(name: str) -> tuple[list[TechniqueConfig], bool | dict[str, Any]]:
    """The technique configs of preset `name` and whether it asks for recovery distillation."""
    if not isinstance(name, str):
        from ..validation import WrongTypeError

        raise WrongTypeError(f"preset must be a preset name (str), one of {sorted(PRESETS)}; got {name!r}.")
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}. Choose one of {sorted(PRESETS)} (default {DEFAULT_PRESET!r}).")
    preset = PRESETS[name]
    return [build_config(method, **kwargs) for method, kwargs in preset.techniques], preset.distill
