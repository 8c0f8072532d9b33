"""Matmul kernels for packed weights, chosen per call by device and number of rows.

Measured on a 2-core AVX-512 CPU (see ``shared/TRANSFORMERS5.md`` and ``bench/quantization.py``): bf16 dense GEMMs
are ~4.5x faster than fp32 ones, so everything computes in the compute dtype (bf16 by default).

- Many rows (encoders, prefill): dequantize to the compute dtype and run one dense GEMM. For 8-bit per-channel
  weights the scale is applied to the GEMM *output* instead (``(x @ q^T) * s``), which saves one pass over the weight.
- Few rows (decoding): torch's packed kernels read 1 or 0.5 byte per weight: ``_weight_int8pack_mm`` and
  ``_weight_int4pack_mm_for_cpu`` (``_weight_int4pack_mm`` on CUDA), several times faster than dequantizing.
- Opt-in dynamic int8 activations: per-token int8 quantization of the input and an int8 x int8 -> int32 GEMM
  (``torch._int_mm``); the fastest choice for many rows.

Every specialised path falls back to dequantize + dense GEMM when the kernel is missing or rejects the shapes, so a
layer always runs. The CUDA branches follow torch's documented kernel contracts but were not run on a GPU here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .packing import dequantize_groups, unpack, unpack_int4_unsigned


if TYPE_CHECKING:
    from .layer import QuantLinear


__all__ = ["quantized_matmul", "dequantized_weight", "SMALL_M"]

# At or below this many rows the packed kernels beat dequantize + GEMM on the measured CPU (crossover ~32-64).
SMALL_M = 32
_INT4_GROUPS = (32, 64, 128, 256)


def dequantized_weight(layer: QuantLinear, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``[out, in]`` float weight that `layer` represents, in `dtype` (default: its compute dtype)."""
    dtype = dtype or layer.weight_scale.dtype
    q = unpack(layer.weight_packed, layer.bits)
    return dequantize_groups(q, layer.weight_scale, layer.weight_zero, dtype)


def quantized_matmul(layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    """``x2 @ W^T`` for a 2-D input already in the compute dtype (no bias)."""
    rows = x2.shape[0]
    if layer.activations == "int8_dynamic" and rows > SMALL_M:
        out = _try(_dynamic_int8, layer, x2)
        if out is not None:
            return out
    if rows <= SMALL_M:
        kernel = _int8_packed if layer.bits == 8 else _int4_packed
        out = _try(kernel, layer, x2)
        if out is not None:
            return out
    return _dense(layer, x2)


def _try(kernel, layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor | None:
    """Run a specialised kernel; remember per layer and device when it is unavailable, and fall back."""
    key = (kernel.__name__, x2.device.type, x2.dtype)
    if key in layer._unsupported:
        return None
    try:
        return kernel(layer, x2)
    except (RuntimeError, NotImplementedError, AttributeError):
        layer._unsupported.add(key)
        return None


def _dense(layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    if layer.bits == 8 and layer.group_size == layer.in_features:
        # Per-channel 8-bit: x @ (q * s)^T == (x @ q^T) * s, so only the int8 -> float cast touches the weight.
        out = F.linear(x2, layer.weight_packed.to(x2.dtype)) * layer.weight_scale[:, 0].to(x2.dtype)
        if layer.weight_zero is not None:
            out = out + x2.sum(-1, keepdim=True) * layer.weight_zero[:, 0].to(x2.dtype)
        return out
    return F.linear(x2, dequantized_weight(layer, x2.dtype))


def _int8_packed(layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    if layer.group_size != layer.in_features:
        raise NotImplementedError("int8 packed kernel takes one scale per output channel")
    if x2.device.type == "cpu" and layer.in_features % 16:
        # The CPU kernel reads 16 columns at a time and segfaults (uncatchable) otherwise, e.g. on pruned head dims.
        raise NotImplementedError("int8 packed CPU kernel needs in_features divisible by 16")
    scale = layer.weight_scale[:, 0].to(x2.dtype)
    out = torch._weight_int8pack_mm(x2, layer.weight_packed, scale)
    if layer.weight_zero is not None:
        out = out + x2.sum(-1, keepdim=True) * layer.weight_zero[:, 0].to(x2.dtype)
    return out


def _int4_packed(layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    if layer.group_size not in _INT4_GROUPS or x2.dtype != torch.bfloat16:
        raise NotImplementedError("int4 packed kernels take bf16 inputs and groups of 32/64/128/256")
    weight, scales_and_zeros = _int4_kernel_layout(layer, x2.device)
    if x2.device.type == "cpu":
        return torch._weight_int4pack_mm_for_cpu(x2, weight, layer.group_size, scales_and_zeros)
    return torch._weight_int4pack_mm(x2, weight, layer.group_size, scales_and_zeros)


def _int4_kernel_layout(layer: QuantLinear, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Repack the portable nibbles into the kernel's opaque tiled layout, once per device (kept in memory)."""
    cached = layer._kernel_cache.get(("int4", device))
    if cached is not None:
        return cached
    nibbles = unpack_int4_unsigned(layer.weight_packed)
    if device.type == "cpu":
        weight = torch._convert_weight_to_int4pack_for_cpu(nibbles.to(torch.int32), 2)
    else:  # CUDA wants the nibbles re-paired as (even << 4) | odd in uint8
        weight = torch._convert_weight_to_int4pack((nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).contiguous(), 8)
    zero = layer.weight_zero if layer.weight_zero is not None else torch.zeros_like(layer.weight_scale)
    scales_and_zeros = torch.stack((layer.weight_scale, zero), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    layer._kernel_cache[("int4", device)] = (weight, scales_and_zeros)
    return weight, scales_and_zeros


def _dynamic_int8(layer: QuantLinear, x2: torch.Tensor) -> torch.Tensor:
    if x2.device.type == "cuda" and (x2.shape[0] <= 16 or x2.shape[1] % 8 or layer.out_features % 8):
        raise NotImplementedError("torch._int_mm on CUDA needs rows > 16 and features divisible by 8")
    # Per-token scales keep one outlier token from flattening everyone else's resolution.
    x_scale = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    xq = torch.round(x2.float() / x_scale).to(torch.int8)
    acc = torch._int_mm(xq, layer.weight_packed.t())
    return (acc.float() * x_scale * layer.weight_scale[:, 0].float()).to(x2.dtype)
