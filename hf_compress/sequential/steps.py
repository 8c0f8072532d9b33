"""What a technique does inside the sequential pipeline: GPTQ's step, and `step_for`, which picks a config's step.

A step (`layer_step.LayerStep`) names the modules of each layer whose input statistics it needs (`layer_modules`),
compresses the layer from them (`compress_layer`), and finishes with what lies outside the layers (`tail_modules`,
`finish`: LM head, pooler, embeddings). The pipeline (`hf_compress.sequential.pipeline`) does the rest: it feeds each
layer the outputs of the layers before it *as compressed*, collects the padding-aware input moments ``E[x x^T]`` of
the named modules (`hf_compress.calibration.MomentCollector`, the helper GPTQ's one-pass path and the low-rank
whitening share; with `float_target`, also the cross moments with the float model's own activations), and releases
the float weights each step hands back. Three techniques have a step: GPTQ (`GPTQStep`, here), data-aware low-rank
factorization of linear layers (`low_rank.LowRankStep`, whitened by the same moments, in float64) and head / FFN
pruning scored by FLAP's fluctuation (`pruning.PruningStep`, from per-feature means and second moments only).
Others fit the same shape: a new step only writes these methods.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..factorization.config import LowRankLinearConfig
from ..pruning.config import FFNPruningConfig, HeadPruningConfig
from ..quantization.algorithms import QuantizedWeight, join_row_blocks
from ..quantization.config import WeightQuantizationConfig
from ..quantization.convert import new_module, quantize_into
from ..quantization.gptq import HessianFactor, float_target_weight, gptq_weight, shared_factors
from ..quantization.hooks import cast_floats, plan, stored_name
from ..quantization.mmap_pages import drop_pages, in_checkpoint_mmap, trim_heap
from ..utils import replace_module
from .layer_step import LayerStep, target_strength
from .low_rank import LowRankStep
from .pruning import PruningStep


if TYPE_CHECKING:
    from ..config import TechniqueConfig
    from ..quantization.config import ModuleSpec


__all__ = ["LayerStep", "GPTQStep", "step_for", "DEFAULT_FLOAT_TARGET"]


# How much of the least-squares correction towards the float model's outputs GPTQ applies by default: on MiniLM int4
# g32 (Debian texts), 0.5 left the least embedding error both with 32 and with 128 calibration texts (1 - cos 0.0107
# and 0.0072, against 0.0127 and 0.0080 for the full correction and 0.0132 and 0.0109 for one-pass GPTQ): a shrinkage
# of a fit made on a few thousand tokens. GPTAQ (Li et al. 2025) scales its asymmetric term by 0.25 by default.
DEFAULT_FLOAT_TARGET = 0.5


class GPTQStep(LayerStep):
    """GPTQ weight quantization, layer by layer; embeddings use the least-squares scales of the one-pass path.

    Each linear module gets the Hessian ``H`` of its *actual* inputs ``X_q`` (those produced by the
    already-quantized layers and stages before it), as in the GPTQ paper. With `float_target` (the default) its
    target is the float model's output ``X_f W^T`` rather than the float weight on the quantized inputs ``X_q W^T``:
    GPTQ quantizes ``W + s W D (H + damp I)^-1`` with ``D = E[(x_f - x_q) x_q^T]`` (`gptq_weight`'s ``cross``), so
    that each layer also corrects the error the layers before it left (GPTAQ, Li et al. 2025); the layer's stages
    (q/k/v, o_proj, ...) are then calibrated one after the other. The first stage of the first layer, whose inputs are
    the float model's, gets exactly one-pass GPTQ.

    Args:
        config: the weight quantization (``algorithm="gptq"`` or ``"auto"``).
        float_target: True (the default strength ``s`` = `DEFAULT_FLOAT_TARGET`), a strength in ``(0, 1]`` (1: the
            full least-squares correction), or False: the GPTQ paper's target, the whole layer in one pass.
    """

    def __init__(self, config: WeightQuantizationConfig, *, float_target: bool | float = True) -> None:
        if config.algorithm not in ("gptq", "auto"):
            raise ValueError(
                f"Sequential calibration runs GPTQ; got algorithm={config.algorithm!r}, which needs no calibration "
                "data. Drop sequential=True (quantize-on-load already bounds memory for it) or use algorithm='gptq'."
            )
        if config.activations not in (None, "int8_dynamic"):
            raise ValueError(
                f"Sequential calibration quantizes weights only; activations={config.activations!r} is calibrated on "
                "the whole float model. Use activations=None or 'int8_dynamic', or run it without sequential=True."
            )
        self.strength = target_strength(float_target, DEFAULT_FLOAT_TARGET, "GPTQ targets the float model's outputs")
        self.float_target = self.strength > 0
        self.config = dataclasses.replace(config, algorithm="gptq")
        self.specs: dict[str, ModuleSpec] = {}
        self.stored: dict[str, list] = {}
        self.projected: set[str] = set()  # modules whose cross moment is collected as W D (`cross_weights`)
        self.compute_dtype = torch.float32

    def prepare(self, model: nn.Module) -> None:
        self.specs = plan(model, self.config)
        self.stored = {stored_name(model, name): spec.to_list() for name, spec in self.specs.items()}
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        self.compute_dtype = self.config.compute_dtype_for(device)

    def layer_modules(self, model: nn.Module, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        names = [n for n, s in self.specs.items() if n.startswith(prefix + ".") and s.kind != "embedding"]
        return {name: model.get_submodule(name) for name in names}

    def cross_weights(self, stage: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
        # The float target needs only W D. A lone module with fewer outputs than inputs (down_proj) collects that
        # directly; modules sharing an input (q/k/v, gate/up) share one D, smaller than their W D together.
        if len(stage) != 1:
            return {}
        (name, module), = stage.items()
        spec = self.specs.get(name)
        weight = getattr(module, "weight", None)
        if spec is None or spec.kind != "linear" or weight is None or weight.shape[0] >= weight.shape[1]:
            return {}
        self.projected.add(name)
        return {name: weight}

    def _quantize_all(self, model: nn.Module, names: list[str], moments: dict[str, torch.Tensor],
                      cross: dict[str, torch.Tensor] | None) -> list[torch.Tensor]:  # fmt: skip
        """Quantize `names`, consuming their moments: one Hessian factor per distinct input (q/k/v share one)."""
        missing = [n for n in names if n not in moments]
        if missing:
            raise ValueError(f"The calibration forward passes never reached {missing[:4]}; GPTQ cannot quantize them.")
        cross = cross if cross is not None else {}  # popped: each cross moment is freed after its last module
        released = []
        for name, factor in shared_factors(names, moments, self.config.damp):
            released.append(self._quantize(model, name, factor, cross))
            del factor
            trim_heap()  # each module's float temporaries, before the next one's (the peak is one module's)
        return released

    def _quantize(self, model: nn.Module, name: str, factor: HessianFactor,
                  cross: dict[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        spec = self.specs.pop(name)
        module = model.get_submodule(name)
        # Propagation runs in the float model's dtype (only the rounding differs from the float layer); the compute
        # dtype of deployment is set for the whole model at the end, as in the one-pass path.
        new = new_module(module, spec, self.config, module.weight.device, module.weight.dtype)
        weight = module.weight.t() if spec.kind == "conv1d" else module.weight
        factor = HessianFactor(factor.upper.to(weight.device), factor.dead.to(weight.device))
        projected = name in self.projected and name in cross
        owned = name in cross and (projected or weight.shape[0] <= _GPTQ_ROWS)
        if owned:  # the target weight first (popping D, in^2, as soon as it is used); GPTQ then rounds it in place
            weight = float_target_weight(weight, factor, cross, name, self.strength, projected=projected)
        d = cross.pop(name, None)
        new.load_quantized(_gptq_by_rows(weight, factor, spec, self.config, name, d, self.strength, owned))
        del d, weight
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().to(new.bias.dtype))
        replace_module(model, name, new)
        return module.weight

    def compress_layer(self, model: nn.Module, prefix: str, moments: dict[str, torch.Tensor],
                       cross: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
        names = [n for n, s in self.specs.items() if n.startswith(prefix + ".") and s.kind != "embedding"]
        return self._quantize_all(model, names, moments, cross)

    def compress_modules(self, model: nn.Module, names: list[str], moments: dict[str, torch.Tensor],
                         cross: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
        unknown = [n for n in names if n not in self.specs]
        if unknown:
            raise ValueError(f"{unknown[:4]} are not modules this GPTQ step quantizes (or were quantized already).")
        return self._quantize_all(model, names, moments, cross)

    def tail_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: model.get_submodule(n) for n, s in self.specs.items() if s.kind != "embedding"}

    def finish(self, model: nn.Module, moments: dict[str, torch.Tensor],
               cross: dict[str, torch.Tensor] | None = None) -> WeightQuantizationConfig:  # fmt: skip
        linear = [n for n, s in self.specs.items() if s.kind != "embedding"]
        released = self._quantize_all(model, linear, moments, cross)
        mse = dataclasses.replace(self.config, algorithm="mse", modules=None)
        for name, spec in list(self.specs.items()):  # embeddings: calibration-free, one block of rows at a time
            module = model.get_submodule(name)
            new = new_module(module, spec, self.config, module.weight.device, module.weight.dtype)
            release = drop_pages if in_checkpoint_mmap(module.weight) else None
            quantize_into(new, module.weight, None, spec, mse, name, release)
            replace_module(model, name, new)
            released.append(module.weight)
            del self.specs[name]
        for tensor in released:
            if in_checkpoint_mmap(tensor):
                drop_pages(tensor)
        cast_floats(model, self.compute_dtype)
        trim_heap()
        return dataclasses.replace(self.config, modules=self.stored)


# GPTQ's updates never mix rows: a tall weight (LM head, FFN input) is quantized this many rows at a time, which
# bounds its float copies and update temporaries (three [rows, in] float32 matrices at once) whatever its height.
_GPTQ_ROWS = 4096


def _gptq_by_rows(weight: torch.Tensor, factor: HessianFactor, spec: ModuleSpec, config: WeightQuantizationConfig,
                  name: str, cross: torch.Tensor | None = None, strength: float = 1.0,
                  overwrite: bool = False) -> QuantizedWeight:  # fmt: skip
    """`gptq_weight` over blocks of rows (the same result: one Hessian factor for them all), dropping each block's
    checkpoint pages once done; `overwrite`: `weight` is the caller's float copy, rounded in place."""
    rows = weight.shape[0]
    if rows <= _GPTQ_ROWS:
        return gptq_weight(weight, factor, spec, config.damp, config.scale_dtype, name, cross=cross,
                           strength=strength, overwrite=overwrite)  # fmt: skip
    mapped = weight.is_contiguous() and in_checkpoint_mmap(weight)

    def blocks():
        for start in range(0, rows, _GPTQ_ROWS):
            block = weight[start : start + _GPTQ_ROWS]
            yield slice(start, start + len(block)), gptq_weight(
                block, factor, spec, config.damp, config.scale_dtype, name, cross=cross, strength=strength,
                overwrite=overwrite,
            )  # fmt: skip
            if mapped:  # runs once the block's codes are written
                drop_pages(block)

    return join_row_blocks(rows, blocks())


def step_for(config: TechniqueConfig, *, float_target: bool | float = True) -> LayerStep:
    """The sequential step of a technique config, or a `ValueError` naming the techniques that have one;
    `float_target` goes to the step (True: each step's own default strength)."""
    if isinstance(config, WeightQuantizationConfig):
        return GPTQStep(config, float_target=float_target)
    if isinstance(config, LowRankLinearConfig):
        return LowRankStep(config, float_target=float_target)
    if isinstance(config, (HeadPruningConfig, FFNPruningConfig)):
        return PruningStep(config, float_target=float_target)
    raise ValueError(
        f"{type(config).__name__} has no sequential (layer-by-layer) calibration step; only weight quantization "
        "with GPTQ (WeightQuantizationConfig(algorithm='gptq')), low-rank factorization of linear layers "
        "(LowRankLinearConfig) and head / FFN pruning (HeadPruningConfig, FFNPruningConfig with "
        "importance='activation') do. Run it without sequential=True."
    )
