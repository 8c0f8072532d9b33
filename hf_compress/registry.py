"""The table of compression techniques.

Each technique subpackage (``hf_compress/pruning``, ``hf_compress/quantization``, ...) registers itself on import
with `register_technique`. Everything else (the recipe, the quantizer plugin, `compress`, the CLI) looks techniques
up here, so adding one is one folder and one `register_technique` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .config import TechniqueConfig


__all__ = ["Technique", "register_technique", "get_technique", "registered_techniques", "STAGES"]

# Canonical order: structure first (pruning, then factorization), quantization last.
STAGES = {"prune": 0, "factorize": 1, "quantize": 2}


@dataclass(frozen=True)
class Technique:
    """What hf_compress needs to know about one technique.

    Attributes:
        name: the ``method`` tag stored in the recipe (e.g. ``"head_pruning"``).
        config_cls: its `TechniqueConfig` subclass.
        stage: ``"prune"``, ``"factorize"`` or ``"quantize"``: fixes the canonical order of a recipe.
        apply: ``apply(model, config, calibration_data=None) -> resolved_config`` compresses a model that holds real
            weights, in place, and returns the config with every data-dependent choice made explicit (the heads it
            removed, the ranks it chose, the modules it quantized). The resolved config is what the recipe stores.
        restructure: ``restructure(model, resolved_config)`` changes only the structure (module types and shapes) of
            an empty (meta) skeleton so that the saved weights fit; it must not compute anything from weights.
        after_load: optional ``after_load(model, resolved_config)``, run once the weights are in (e.g. re-align or
            repack quantized tensors for a kernel).
        quantize_on_load: optional ``quantize_on_load(quantizer) -> list`` of ops for
            ``from_pretrained(fp_checkpoint, quantization_config=...)``; techniques without it cannot run on load.
    """

    name: str
    config_cls: type[TechniqueConfig]
    stage: str
    apply: Callable[..., TechniqueConfig]
    restructure: Callable[[PreTrainedModel, TechniqueConfig], None]
    after_load: Callable[[PreTrainedModel, TechniqueConfig], None] | None = None
    quantize_on_load: Callable[..., Any] | None = None

    @property
    def order(self) -> int:
        return STAGES[self.stage]


_TECHNIQUES: dict[str, Technique] = {}


def register_technique(technique: Technique) -> Technique:
    """Add a technique to the table; its `config_cls.method` must equal its name and be new."""
    if technique.stage not in STAGES:
        raise ValueError(f"stage must be one of {sorted(STAGES)}, got {technique.stage!r}.")
    if technique.config_cls.method != technique.name:
        raise ValueError(
            f"{technique.config_cls.__name__}.method is {technique.config_cls.method!r} but the technique is "
            f"registered as {technique.name!r}; make them equal."
        )
    if technique.name in _TECHNIQUES and _TECHNIQUES[technique.name] != technique:
        raise KeyError(f"A technique called {technique.name!r} is already registered; choose a unique name.")
    _TECHNIQUES[technique.name] = technique
    return technique


def get_technique(name: str | None) -> Technique:
    """The registered technique called `name`, or a `ValueError` naming the ones that exist."""
    if name not in _TECHNIQUES:
        raise ValueError(
            f"Unknown compression technique {name!r}. Registered techniques: {sorted(_TECHNIQUES)}. "
            "If the checkpoint was made by a newer hf_compress, upgrade it with `pip install -U hf-compress`."
        )
    return _TECHNIQUES[name]


def registered_techniques() -> dict[str, Technique]:
    """A copy of the technique table, by name."""
    return dict(_TECHNIQUES)
