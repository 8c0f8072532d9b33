"""GPTQ (Frantar et al., 2022): quantize columns one at a time and push each rounding error onto later columns.

The error that matters is the layer's *output* error on real inputs, ``||X W^T - X Q^T||``, whose curvature is the
input second-moment matrix ``H = X^T X``. Quantizing column ``i`` and updating the not-yet-quantized columns by
``-err_i * Hinv[i, i+1:] / Hinv[i, i]`` keeps that output error minimal; working through the upper Cholesky factor of
``H^-1`` makes each step one rank-1 update. Scales are chosen per group (by the least-squares search of
`algorithms`) when the group's first column is reached, on the already-updated weights.

The factor of ``H^-1`` is computed once per Hessian (`hessian_factor`, in the Hessian's own storage) and shared by
the modules fed the same input. With a cross moment (`gptq_weight`'s ``cross``, used by sequential calibration) the
target becomes another model's outputs on other inputs, ``||X_f W^T - X_q Q^T||``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
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


__all__ = [
    "gptq_quantize",
    "collect_hessians",
    "gptq_weight",
    "float_target_weight",
    "HessianFactor",
    "hessian_factor",
    "shared_factors",
]

_BLOCK = 128


def collect_hessians(model: nn.Module, names: list[str], batches) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of the inputs of each named linear module over the real (unpadded) tokens of the calibration
    batches (one forward each; `hf_compress.calibration.input_moments`)."""
    hessians = input_moments(model, {name: model.get_submodule(name) for name in names}, batches)
    missing = [n for n in names if n not in hessians]
    if missing:
        raise ValueError(f"The calibration forward passes never reached {missing[:4]}; GPTQ cannot quantize them.")
    return hessians


@dataclass
class HessianFactor:
    """What GPTQ needs of a module's input Hessian ``H``: the upper Cholesky factor ``U`` of ``(H + damp I)^-1``
    (``U^T U`` is that inverse; row-major) and the inputs that never fire (``diag(H) == 0``)."""

    upper: torch.Tensor
    dead: torch.Tensor


def _transpose_square_(m: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Transpose a square matrix in its own storage, one block pair at a time (temporaries of ``block^2``)."""
    n = m.shape[0]
    for i in range(0, n, block):
        m[i : i + block, i : i + block] = m[i : i + block, i : i + block].t().clone()
        for j in range(i + block, n, block):
            upper = m[i : i + block, j : j + block].clone()
            m[i : i + block, j : j + block] = m[j : j + block, i : i + block].t()
            m[j : j + block, i : i + block] = upper.t()
    return m


def hessian_factor(hessian: torch.Tensor, damp: float, *, overwrite: bool = False) -> HessianFactor:
    """The `HessianFactor` of `hessian` (``[in, in]``, symmetric): dead inputs get a unit diagonal, every diagonal
    entry gets ``damp x mean(diag)`` added, then ``U = cholesky((H + damp I)^-1, upper)``.

    The whole chain runs in one ``in x in`` buffer: ``hessian`` itself with ``overwrite=True`` (it is consumed:
    for a caller that holds the only reference), else one copy. Each LAPACK call writes through the transposed,
    column-major view of the buffer (the symmetric H is its own transpose), which is what LAPACK works on, so
    torch needs no column-major temporary; the factor is turned back row-major in place at the end. (At 8192
    inputs each full-size copy is 268 MB; the plain ``cholesky(cholesky_inverse(cholesky(H)))`` held about three.)
    The values are those of that plain chain, bit for bit.
    """
    h = hessian if overwrite else hessian.clone()
    dead = torch.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead] = 1
    h.diagonal().add_(damp * torch.diag(h).mean())
    column_major = h.mT
    torch.linalg.cholesky(column_major, out=column_major)
    torch.cholesky_inverse(column_major, out=column_major)
    torch.linalg.cholesky(column_major, upper=True, out=column_major)
    return HessianFactor(_transpose_square_(h), dead)


def shared_factors(names: list[str], hessians: dict[str, torch.Tensor], damp: float
                   ) -> Iterator[tuple[str, HessianFactor]]:  # fmt: skip
    """``(name, factor)`` for each of `names` in order, popping their Hessians from `hessians` (which must hold the
    only references): modules fed the same input (q/k/v, gate/up) share one Hessian tensor and so one factor,
    computed once in that tensor's storage and dropped after its last module."""
    last = {id(hessians[name]): index for index, name in enumerate(names)}
    factors: dict[int, HessianFactor] = {}
    for index, name in enumerate(names):
        hessian = hessians.pop(name)
        key = id(hessian)
        if key not in factors:
            factors[key] = hessian_factor(hessian, damp, overwrite=True)
        del hessian
        yield name, factors.pop(key) if last[key] == index else factors[key]


def gptq_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | HessianFactor,
    spec: ModuleSpec,
    damp: float,
    dtype: torch.dtype,
    name: str,
    *,
    cross: torch.Tensor | None = None,
    strength: float = 1.0,
    overwrite: bool = False,
) -> QuantizedWeight:
    """GPTQ for one ``[out, in]`` weight with its input Hessian (or its `HessianFactor`, reused across calls);
    returns centred integers, scales and offsets.

    `cross` (``[in, in]``, optional) asks for the float model's outputs as the target: with ``X_q`` the inputs the
    quantized model feeds this module (whose moment is `hessian`) and ``X_f`` the float model's, it is
    ``D = E[(x_f - x_q) x_q^T]``. The weight minimising ``||X_f W^T - X_q V^T||^2 + damp ||V - W||^2`` is then
    ``W* = W + W D (H + damp I)^-1``, and since the least-squares residual is orthogonal to ``X_q``, GPTQ of ``W*``
    with ``H`` minimises the error to the float outputs, ``||X_f W^T - X_q Q^T||`` (the asymmetric calibration of
    GPTAQ, Li et al. 2025). ``D = 0`` (identical inputs) is plain GPTQ. `strength` scales the correction
    ``W D (H + damp I)^-1`` (a shrinkage of a least-squares fit on few calibration tokens; 1: the full fit).

    `overwrite` lets the column loop work in `weight`'s own memory when it is a contiguous float32 tensor the caller
    no longer needs (e.g. a float-target weight it computed): one ``[out, in]`` float copy fewer at the peak.
    """
    check_weight(weight, name)
    factor = hessian if isinstance(hessian, HessianFactor) else hessian_factor(hessian, damp)
    if cross is None:
        own = overwrite and weight.dtype == torch.float32 and weight.is_contiguous()
        w = weight.detach() if own else weight.detach().float().clone()
    else:
        w = float_target_weight(weight, factor, cross, name, strength)
    return _quantize_columns(w, factor, spec, dtype)


def float_target_weight(weight: torch.Tensor, factor: HessianFactor, cross: torch.Tensor | dict[str, torch.Tensor],
                        name: str, strength: float = 1.0, *, projected: bool = False) -> torch.Tensor:  # fmt: skip
    """``W + strength W D (H + damp I)^-1`` in float32 (a new tensor): the float weight that, on the quantized
    model's inputs, best reproduces the float model's outputs (`gptq_weight`'s ``cross``).

    `cross` is ``D``, or a dict of them from which ``D`` is popped under `name`: ``D`` (``in x in``, a down_proj's
    largest tensor) is then freed as soon as ``W D`` exists, before the temporaries that follow. `projected`: it is
    ``W D`` itself (``[out, in]``, `MomentCollector`'s ``project``)."""
    d = cross.pop(name) if isinstance(cross, dict) else cross
    expected = tuple(weight.shape) if projected else (weight.shape[1], weight.shape[1])
    if tuple(d.shape) != expected:
        raise ValueError(f"{name}: the cross moment is {tuple(d.shape)}, expected {expected}.")
    w = weight.detach().float()
    product = d.to(w.device, torch.float32) if projected else w @ d.to(w.device, torch.float32)
    del d
    upper = factor.upper
    # (H + damp)^-1 = U^T U. The float weights of dead inputs count here: the float model's inputs may fire. Two
    # [out, in] temporaries at most (W D U^T, then the result): a down_proj's are the size of its weight each.
    half = product @ upper.t()
    del product
    return torch.addmm(w, half, upper, alpha=strength)


def _quantize_columns(w: torch.Tensor, factor: HessianFactor, spec: ModuleSpec, dtype: torch.dtype
                      ) -> QuantizedWeight:  # fmt: skip
    """The GPTQ column loop on the float copy `w` (overwritten)."""
    hinv = factor.upper
    rows, cols = w.shape
    w[:, factor.dead] = 0
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
    factors = shared_factors(linear, hessians, config.damp)  # lazily: each Hessian is consumed by its factor
    for name, spec in specs.items():
        module = model.get_submodule(name)
        new = new_module(module, spec, config, module.weight.device, module.weight.dtype)
        if spec.kind == "embedding":
            quantize_into(new, module.weight, None, spec, mse_config, name)
        else:
            factor_name, factor = next(factors)
            assert factor_name == name
            weight = module.weight.t() if spec.kind == "conv1d" else module.weight
            new.load_quantized(gptq_weight(weight, factor, spec, config.damp, config.scale_dtype, name))
            del factor
            if module.bias is not None:
                new.bias = nn.Parameter(module.bias.detach().to(new.bias.dtype))
        replace_module(model, name, new)
