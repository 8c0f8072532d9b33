"""The interface of a technique in the sequential pipeline (`LayerStep`): its own module, so that the steps
(`steps.GPTQStep`, `low_rank.LowRankStep`) and `steps.step_for`, which picks one, import it without a cycle."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn


if TYPE_CHECKING:
    from ..config import TechniqueConfig


__all__ = ["LayerStep", "target_strength"]


class LayerStep:
    """One technique in the sequential pipeline (subclass it; every method has the model with real weights).

    Attributes:
        float64: whether the moments are summed in float64 on the CPU (low-rank whitening) instead of float32 on the
            layer's device (GPTQ's Hessians).
        float_target: whether the step also needs the cross moments ``E[(x_f - x) x^T]`` of each module's input
            ``x`` (the compressed model's stream) with the float model's input ``x_f``: the pipeline then carries
            the float model's activations beside the compressed ones (twice the activation memory, one more float
            forward per layer) and hands them to `compress_layer` / `finish` as ``cross``.
        channels: whether the step needs only each input feature's ``E[x]`` and ``E[x^2]`` (structured pruning's
            fluctuation scores): each moment is then a ``[2, features]`` tensor instead of ``E[x x^T]``
            (`MomentCollector`'s ``channels=True``), without float target.
    """

    float64: bool = False
    float_target: bool = False
    channels: bool = False

    def prepare(self, model: nn.Module) -> None:
        """Plan the work on the whole (still uncompressed) model, before the first layer."""

    def layer_modules(self, model: nn.Module, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        """Full name -> module, inside the layer named `prefix`, whose input moments `compress_layer` needs."""
        raise NotImplementedError

    def compress_layer(self, model: nn.Module, prefix: str, moments: dict[str, torch.Tensor],
                       cross: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
        """Compress the layer `prefix` in place from its modules' input moments (and cross moments, with
        `float_target`; empty for the first layer, whose streams are the same), which it may consume; return the
        float tensors that nothing uses any more (their checkpoint pages are dropped)."""
        raise NotImplementedError

    def compress_modules(self, model: nn.Module, names: list[str], moments: dict[str, torch.Tensor],
                         cross: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
        """Compress the named modules of one layer (a stage: modules fed the same input) in place from their moments;
        return the float tensors that nothing uses any more. With `float_target` the pipeline calls this once per
        stage, in execution order, so that each stage's moments are taken with the earlier stages compressed."""
        raise NotImplementedError

    def cross_weights(self, stage: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        """Modules of a stage whose cross moment the pipeline should collect as ``W D`` (``[out, in]``, see
        `MomentCollector`'s ``project``) instead of ``D``, name -> ``W``; only for a step that needs no more of
        ``D`` than ``W D``. None by default."""
        return {}

    def tail_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules after the layers (LM head, pooler, classifier) whose input moments `finish` needs."""
        return {}

    def finish(self, model: nn.Module, moments: dict[str, torch.Tensor],
               cross: dict[str, torch.Tensor] | None = None) -> TechniqueConfig:  # fmt: skip
        """Compress what lies outside the layers and return the resolved config (what ``config.json`` stores)."""
        raise NotImplementedError


def target_strength(float_target: bool | float, default: float, what: str) -> float:
    """The strength of a step's float target: `default` for True, 0 for False, else a number in ``(0, 1]``;
    `what` says what the strength does, for the error."""
    number = isinstance(float_target, (int, float)) and not isinstance(float_target, bool)
    if not (isinstance(float_target, bool) or (number and 0 < float_target <= 1)):
        raise ValueError(
            f"float_target must be True ({what}, strength {default}), a strength in (0, 1] or False (the float "
            f"weights on the compressed model's inputs); got {float_target!r}."
        )
    return float(default if float_target is True else float_target)
