"""GPTQ (Frantar et al., 2022): quantize columns one at a time and push each rounding error onto later columns.

The error that matters is the layer's *output* error on real inputs, ``||X W^T - X Q^T||``, whose curvature is the
input second-moment matrix ``H = X^T X``. Quantizing column ``i`` and updating the not-yet-quantized columns by
``-err_i * Hinv[i, i+1:] / Hinv[i, i]`` keeps that output error minimal; working through the upper Cholesky factor of
``H^-1`` makes each step one rank-1 update. Scales are chosen per group (by the least-squares search of
`algorithms`) when the group's first column is reached, on the already-updated weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..calibration import calibration_batches, input_moments
from ..utils import replace_module
from .algorithms import QuantizedWeight, check_weight, group_scales
from .convert import new_module, quantize_into
from .packing import qrange


if TYPE_CHECKING:
    from .config import ModuleSpec, WeightQuantizationConfig


__all__ = ["gptq_quantize", "collect_hessians", "gptq_weight"]

_BLOCK = 128


def collect_hessians(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of the inputs of each named linear module over the real (unpadded) tokens of the calibration
    batches (one forward each; `hf_compress.calibration.input_moments`)."""
    hessians = input_moments(model, {name: model.get_submodule(name) for name in names}, batches)
    missing = [n for n in names if n not in hessians]
    if missing:
        raise ValueError(f"The calibration forward passes never reached {missing[:4]}; GPTQ cannot quantize them.")
    return hessians


def gptq_weight(
    weight: torch.Tensor, hessian: torch.Tensor, spec: ModuleSpec, damp: float, dtype: torch.dtype, name: str
) -> QuantizedWeight:
    """GPTQ for one ``[out, in]`` weight with its input Hessian; returns centred integers, scales and offsets."""
    check_weight(weight, name)
    w = weight.detach().float().clone()
    rows, cols = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    h.diagonal().add_(damp * torch.diag(h).mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    lo, hi = qrange(spec.bits)
    g = spec.group_size
    # On the weight's device: a CPU result buffer would cost a device-to-host copy per column on CUDA.
    scales = torch.empty(rows, cols // g, device=w.device)
    zeros = None if spec.symmetric else torch.empty(rows, cols // g, device=w.device)
    q_all = torch.empty(rows, cols, dtype=torch.int8, device=w.device)
    scale = zero = None
    for start in range(0, cols, _BLOCK):
        end = min(start + _BLOCK, cols)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        for j in range(end - start):
            col = start + j
            if col % g == 0:
                group = torch.cat((block[:, j:], w[:, end:]), 1)[:, :g] if col + g > end else block[:, j : j + g]
                s, z = group_scales(group.reshape(rows, 1, g), spec, dtype)  # honours spec.zero_point
                scale, zero = s.float().reshape(rows), None if z is None else z.float().reshape(rows)
                scales[:, col // g] = scale
                if zeros is not None:
                    zeros[:, col // g] = zero
            x = block[:, j]
            q = torch.clamp(torch.round((x if zero is None else x - zero) / scale), lo, hi)
            q_all[:, col] = q.to(torch.int8)
            rec = q * scale if zero is None else q * scale + zero
            err = (x - rec) / hinv[col, col]
            block[:, j:] -= err.unsqueeze(1) * hinv[col, col:end].unsqueeze(0)
            errors[:, j] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return QuantizedWeight(q_all, scales.to(dtype), None if zeros is None else zeros.to(dtype))


def gptq_quantize(
    model: nn.Module, specs: dict[str, ModuleSpec], config: WeightQuantizationConfig, calibration_data: Any
) -> None:
    """Quantize the linear modules of `specs` with GPTQ (embeddings use the least-squares method), in place."""
    if calibration_data is None:
        raise ValueError(
            "algorithm='gptq' needs calibration data: apply_compression(model, config, calibration_data=texts) with "
            "a list of texts or a datasets.Dataset. Use algorithm='mse' for calibration-free quantization."
        )
    linear = [name for name, spec in specs.items() if spec.kind != "embedding"]
    batches = calibration_batches(model, calibration_data, max_samples=config.calibration_samples)
    hessians = collect_hessians(model, linear, batches)
    mse_config = type(config)(**{**config.__dict__, "algorithm": "mse", "modules": None})
    for name, spec in specs.items():
        module = model.get_submodule(name)
        new = new_module(module, spec, config, module.weight.device, module.weight.dtype)
        if spec.kind == "embedding":
            quantize_into(new, module.weight, None, spec, mse_config, name)
        else:
            weight = module.weight.t() if spec.kind == "conv1d" else module.weight
            new.load_quantized(gptq_weight(weight, hessians.pop(name), spec, config.damp, config.scale_dtype, name))
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().to(new.bias.dtype))
        replace_module(model, name, new)
