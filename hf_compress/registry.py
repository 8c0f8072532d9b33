"""The table of compression techniques.

Each technique subpackage (``hf_compress/pruning``, ``hf_compress/quantization``, ...) registers itself on import
with `register_technique`. Everything else (the recipe, the quantizer plugin, `compress`, the CLI) looks techniques
up here, so adding one is one folder whose ``hooks.py`` makes one `register_technique` call (see CONTRIBUTING.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol


if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .config import TechniqueConfig


__all__ = ["Technique", "TechniqueHooks", "OnLoadHandler", "register_technique", "get_technique", "registered_techniques", "STAGES"]

# Canonical order: structure first (pruning, then factorization), quantization last.
STAGES = {"prune": 0, "factorize": 1, "quantize": 2}


class OnLoadHandler(Protocol):
    """What a technique's ``quantize_on_load(config)`` returns: the plugin drives it while
    ``from_pretrained(float_checkpoint, quantization_config=...)`` loads the weights."""

    def prepare(self, model: PreTrainedModel, device: Any = None) -> None:
        """On the empty skeleton, before any weight: choose the modules and swap in their empty layers; `device` is
        where the model will run (``"cpu"`` or ``"cuda"``)."""

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str) -> bool:
        """Whether the checkpoint tensor `param_name` goes through `quantize_ops` instead of loading as is."""

    def quantize_ops(self, quantizer: Any) -> Any:
        """The transformers ``ConversionOps`` that quantize one such tensor as it is read."""

    def resolved_config(self, model: PreTrainedModel) -> TechniqueConfig:
        """After loading: the config with every choice explicit, stored in the recipe."""


class TechniqueHooks(Protocol):
    """The hooks one technique's ``hooks.py`` defines and registers (see `Technique` for when each runs)."""

    def apply(self, model: PreTrainedModel, config: TechniqueConfig, calibration_data: Any = None) -> TechniqueConfig:
        ...

    def restructure(self, model: PreTrainedModel, config: TechniqueConfig) -> None:
        ...

    def after_load(self, model: PreTrainedModel, config: TechniqueConfig) -> None:  # optional
        ...

    def quantize_on_load(self, config: TechniqueConfig) -> OnLoadHandler:  # optional
        ...


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
        quantize_on_load: optional ``quantize_on_load(config) -> OnLoadHandler`` for
            ``from_pretrained(fp_checkpoint, quantization_config=...)``: an object with ``prepare(model, device)``,
            ``param_needs_quantization(model, name)``, ``quantize_ops(quantizer)`` and ``resolved_config(model)`` (see
            `OnLoadHandler`); techniques without it cannot run on load.

    The hooks of a technique live in its ``hooks.py``, which also makes the `register_technique` call (the
    `TechniqueHooks` protocol writes their signatures once).
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
