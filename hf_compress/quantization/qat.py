"""Quantization-aware training: train through fake-quantized weights, then convert to packed modules.

`prepare_qat` swaps the selected `nn.Linear` / `nn.Embedding` modules for subclasses whose forward pass uses the
weight rounded to the target grid (straight-through estimator: the rounding is skipped in the backward pass, so the
float weights keep learning). Train with any loop or `Trainer`, then `convert_qat` packs the trained weights with the
same round-to-nearest grid the training saw.

```py
>>> from hf_compress.quantization import WeightQuantizationConfig, prepare_qat, convert_qat
>>> prepare_qat(model, WeightQuantizationConfig(bits=4))
>>> Trainer(model=model, args=args, train_dataset=train).train()
>>> convert_qat(model)  # packed int4, saves and reloads like any hf_compress model
```
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .algorithms import _minmax
from .config import ModuleSpec, WeightQuantizationConfig
from .packing import qrange


__all__ = ["prepare_qat", "convert_qat", "fake_quantize"]


def fake_quantize(weight: torch.Tensor, spec: ModuleSpec) -> torch.Tensor:
    """`weight` rounded to its group-wise grid in the forward pass, identity in the backward pass."""
    rows, cols = weight.shape
    groups = weight.reshape(rows, cols // spec.group_size, spec.group_size)
    with torch.no_grad():
        scale, zero = _minmax(groups.detach().float(), spec.bits, spec.symmetric)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        lo, hi = qrange(spec.bits)
        shifted = groups.detach().float() if zero is None else groups.detach().float() - zero
        q = torch.clamp(torch.round(shifted / scale), lo, hi)
        rounded = (q * scale if zero is None else q * scale + zero).reshape(rows, cols).to(weight.dtype)
    return weight + (rounded - weight).detach()


class FakeQuantLinear(nn.Linear):
    """`nn.Linear` trained through its quantized weight (see `fake_quantize`)."""

    spec: ModuleSpec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.spec), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    """`nn.Embedding` looked up in its quantized table (see `fake_quantize`)."""

    spec: ModuleSpec

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, fake_quantize(self.weight, self.spec), self.padding_idx)


def prepare_qat(model: nn.Module, config: WeightQuantizationConfig) -> nn.Module:
    """Swap the modules `config` selects for fake-quantized ones, in place (GPT-2 ``Conv1D`` layers are skipped)."""
    from .hooks import plan

    if config.activations is not None or config.algorithm == "gptq":
        raise ValueError("QAT trains weight-only round-to-nearest grids; use activations=None and algorithm 'rtn'.")
    for name, spec in plan(model, config).items():
        module = model.get_submodule(name)
        if spec.kind == "conv1d":
            continue
        cls = FakeQuantEmbedding if spec.kind == "embedding" else FakeQuantLinear
        module.__class__ = cls  # same parameters, new forward: optimizer state and devices stay valid
        module.spec = spec
    model.hf_compress_qat_config = config
    return model


def convert_qat(model: nn.Module) -> nn.Module:
    """Pack the trained weights of a model prepared by `prepare_qat` (same grid as in training) and record it."""
    from ..pipeline.apply import apply_compression

    config = getattr(model, "hf_compress_qat_config", None)
    if config is None:
        raise ValueError("This model was not prepared with prepare_qat(model, config); nothing to convert.")
    for module in model.modules():
        if isinstance(module, FakeQuantLinear):
            module.__class__ = nn.Linear
        elif isinstance(module, FakeQuantEmbedding):
            module.__class__ = nn.Embedding
    del model.hf_compress_qat_config
    apply_compression(model, dataclasses.replace(config, algorithm="rtn", modules=None))
    return model
