"""What a technique does inside the sequential pipeline: the per-layer "technique step" interface, and GPTQ.

A step names the modules of each layer whose input statistics it needs (`layer_modules`), compresses the layer
from them (`compress_layer`), and finishes with what lies outside the layers (`tail_modules`, `finish`: LM head,
pooler, embeddings). The pipeline (`hf_compress.sequential.pipeline`) does the rest: it feeds each layer the
outputs of the layers before it *as compressed*, collects the padding-aware input moments ``E[x x^T]`` of the named
modules (`hf_compress.calibration.MomentCollector`, the helper GPTQ's one-pass path and the low-rank whitening
share), and releases the float weights each step hands back. Data-aware low-rank factorization (whitened by the
same moments) or FFN importance from input norms fit the same shape: a new step only writes these methods.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..quantization.algorithms import QuantizedWeight
from ..quantization.config import WeightQuantizationConfig
from ..quantization.convert import new_module, quantize_into
from ..quantization.gptq import gptq_weight
from ..quantization.hooks import cast_floats, plan, stored_name
from ..quantization.mmap_pages import drop_pages, in_checkpoint_mmap, trim_heap
from ..utils import replace_module


if TYPE_CHECKING:
    from ..config import TechniqueConfig
    from ..quantization.config import ModuleSpec


__all__ = ["LayerStep", "GPTQStep", "step_for"]


class LayerStep:
    """One technique in the sequential pipeline (subclass it; every method has the model with real weights).

    Attributes:
        float64: whether the moments are summed in float64 on the CPU (low-rank whitening) instead of float32 on the
            layer's device (GPTQ's Hessians).
    """

    float64: bool = False

    def prepare(self, model: nn.Module) -> None:
        """Plan the work on the whole (still uncompressed) model, before the first layer."""

    def layer_modules(self, model: nn.Module, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        """Full name -> module, inside the layer named `prefix`, whose input moments `compress_layer` needs."""
        raise NotImplementedError

    def compress_layer(self, model: nn.Module, prefix: str, moments: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Compress the layer `prefix` in place from its modules' input moments; return the float tensors that
        nothing uses any more (their checkpoint pages are dropped)."""
        raise NotImplementedError

    def tail_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        """Modules after the layers (LM head, pooler, classifier) whose input moments `finish` needs."""
        return {}

    def finish(self, model: nn.Module, moments: dict[str, torch.Tensor]) -> TechniqueConfig:
        """Compress what lies outside the layers and return the resolved config (what ``config.json`` stores)."""
        raise NotImplementedError


class GPTQStep(LayerStep):
    """GPTQ weight quantization, layer by layer: each linear module gets the Hessian of its *actual* inputs (those
    produced by the already-quantized layers before it), as in the GPTQ paper; embeddings use the least-squares
    scales of the one-pass path."""

    def __init__(self, config: WeightQuantizationConfig) -> None:
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
        self.config = dataclasses.replace(config, algorithm="gptq")
        self.specs: dict[str, ModuleSpec] = {}
        self.stored: dict[str, list] = {}
        self.compute_dtype = torch.float32

    def prepare(self, model: nn.Module) -> None:
        self.specs = plan(model, self.config)
        self.stored = {stored_name(model, name): spec.to_list() for name, spec in self.specs.items()}
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        self.compute_dtype = self.config.compute_dtype_for(device)

    def layer_modules(self, model: nn.Module, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        names = [n for n, s in self.specs.items() if n.startswith(prefix + ".") and s.kind != "embedding"]
        return {name: model.get_submodule(name) for name in names}

    def _quantize(self, model: nn.Module, name: str, hessian: torch.Tensor) -> torch.Tensor:
        spec = self.specs.pop(name)
        module = model.get_submodule(name)
        # Propagation runs in the float model's dtype (only the rounding differs from the float layer); the compute
        # dtype of deployment is set for the whole model at the end, as in the one-pass path.
        new = new_module(module, spec, self.config, module.weight.device, module.weight.dtype)
        weight = module.weight.t() if spec.kind == "conv1d" else module.weight
        hessian = hessian.to(weight.device)
        new.load_quantized(_gptq_by_rows(weight, hessian, spec, self.config, name))
        if module.bias is not None:
            new.bias = nn.Parameter(module.bias.detach().to(new.bias.dtype))
        replace_module(model, name, new)
        return module.weight

    def compress_layer(self, model: nn.Module, prefix: str, moments: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        names = [n for n, s in self.specs.items() if n.startswith(prefix + ".") and s.kind != "embedding"]
        missing = [n for n in names if n not in moments]
        if missing:
            raise ValueError(f"The calibration forward passes never reached {missing[:4]}; GPTQ cannot quantize them.")
        return [self._quantize(model, name, moments[name]) for name in names]

    def tail_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {n: model.get_submodule(n) for n, s in self.specs.items() if s.kind != "embedding"}

    def finish(self, model: nn.Module, moments: dict[str, torch.Tensor]) -> WeightQuantizationConfig:
        linear = [n for n, s in self.specs.items() if s.kind != "embedding"]
        missing = [n for n in linear if n not in moments]
        if missing:
            raise ValueError(f"The calibration forward passes never reached {missing[:4]}; GPTQ cannot quantize them.")
        released = [self._quantize(model, name, moments[name]) for name in linear]
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


def _gptq_by_rows(weight: torch.Tensor, hessian: torch.Tensor, spec: ModuleSpec, config: WeightQuantizationConfig,
                  name: str) -> QuantizedWeight:  # fmt: skip
    """`gptq_weight` over blocks of rows (the same result), dropping each block's checkpoint pages once done."""
    rows = weight.shape[0]
    if rows <= _GPTQ_ROWS:
        return gptq_weight(weight, hessian, spec, config.damp, config.scale_dtype, name)
    mapped = weight.is_contiguous() and in_checkpoint_mmap(weight)
    parts = []
    for start in range(0, rows, _GPTQ_ROWS):
        block = weight[start : start + _GPTQ_ROWS]
        parts.append(gptq_weight(block, hessian, spec, config.damp, config.scale_dtype, name))
        if mapped:
            drop_pages(block)
    zero = None if parts[0].zero is None else torch.cat([p.zero for p in parts])
    return QuantizedWeight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero)


def step_for(config: TechniqueConfig) -> LayerStep:
    """The sequential step of a technique config, or a `ValueError` naming the techniques that have one."""
    if isinstance(config, WeightQuantizationConfig):
        return GPTQStep(config)
    raise ValueError(
        f"{type(config).__name__} has no sequential (layer-by-layer) calibration step; only weight quantization "
        "with GPTQ (WeightQuantizationConfig(algorithm='gptq')) does. Run it without sequential=True."
    )
