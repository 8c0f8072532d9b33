"""Matmul kernels for packed weights, chosen per call by device and number of rows.

The compute dtype follows the machine (`preferred_compute_dtype`): bf16 where bf16 matmuls are native (CUDA, CPUs
with AVX512-BF16 / AMX), float32 on other CPUs, where bf16 GEMMs are emulated and measured ~4x slower than fp32.

- Many rows (encoders, prefill): dequantize to the compute dtype and run one dense GEMM. For 8-bit per-channel
  weights and fewer rows than input features the scale is applied to the (smaller) GEMM output instead.
- Few rows (decoding): torch's packed kernels read 1 or 0.5 byte per weight: ``_weight_int8pack_mm`` and
  ``_weight_int4pack_mm_for_cpu`` (``_weight_int4pack_mm`` on CUDA), several times faster than dequantizing. They
  run on bf16 activations (float32 inputs are cast: the CPU int8 kernel is ~14x slower on float32 ones). On CPU an
  int4 layer then keeps its weights in that kernel's layout only (`int4_layout`), not in both.
- Opt-in dynamic int8 activations: per-token int8 quantization of the input and an int8 x int8 -> int32 GEMM
  (``torch._int_mm``, ~4x faster than an fp32 GEMM on the measured CPU); the fastest choice for many rows.

Every specialised path falls back to dequantize + dense GEMM when the kernel is missing or rejects the shapes, so a
layer always runs. The CUDA branches follow torch's documented kernel contracts but were not run on a GPU here.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .int4_layout import CPU_INT4PACK, kernel_table, layer_nibbles, layout_of, to_cpu_kernel, to_cpu_kernel_
from .int4_matmul import kernel_linear, kernel_weight_t
from .packing import dequantize_groups, unpack, unpack_int4_into, unpack_int4_unsigned


if TYPE_CHECKING:
    from .layers import QuantLinear


__all__ = ["quantized_matmul", "dequantized_weight", "preferred_compute_dtype", "SMALL_M"]

# At or below this many rows the packed kernels beat dequantize + GEMM on the measured CPU (crossover ~32-64).
SMALL_M = 32
_INT4_GROUPS = (32, 64, 128, 256)


def preferred_compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 where bf16 matmuls are native and fast, else float32 (what ``compute_dtype="auto"`` resolves to).

    Checked on the machine that runs the model: CUDA (bf16 if the GPU supports it, else float16) or the CPU's
    AVX512-BF16 / AMX flags. Without them (older x86, most ARM builds of torch) bf16 is emulated and slower than fp32.
    """
    device_type = torch.device(device).type if device is not None else "cpu"
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    cpu = getattr(torch, "cpu", None)
    native = any(
        getattr(cpu, flag, lambda: False)() for flag in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )
    return torch.bfloat16 if native else torch.float32


def dequantized_weight(
    layer: QuantLinear, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The ``[out, in]`` float weight that `layer` represents, in `dtype` (default: its compute dtype), written into
    `out` when given."""
    dtype = dtype or layer.compute_dtype
    if layout_of(layer) == CPU_INT4PACK:
        weight_t = kernel_weight_t(layer, dtype) if dtype.is_floating_point else None
        if weight_t is not None:
            return weight_t.t().contiguous() if out is None else out.copy_(weight_t.t())
        q = layer_nibbles(layer).view(torch.int8) - 8
    elif layer.bits == 4 and dtype.is_floating_point:
        packed = layer.weight_packed
        shape = (packed.shape[0], layer.in_features)
        out = out if out is not None else torch.empty(shape, dtype=dtype, device=packed.device)
        q = out = unpack_int4_into(packed, out, _scratch(packed.shape, torch.int32, packed.device))
    else:
        q = unpack(layer.weight_packed, layer.bits)
    return dequantize_groups(q, layer.weight_scale, layer.weight_zero, dtype, out=out)


# Dequantize + GEMM writes each layer's float weight into a fresh tensor, and CPU allocations of that size come
# straight from the kernel (mmap), so every forward page-faults them in again: measured +14 % on a bf16
# 4096 x 384 -> 1536 GEMM, against +0-5 % with the weight written into a reused buffer (which then also sits in cache
# for the GEMM). One buffer per shape and dtype, per thread, for inference only (autograd would keep a reference to
# a buffer the next layer overwrites); buffers above the cap are not kept.
_SCRATCH = threading.local()
_SCRATCH_MAX_BYTES = 256 << 20


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or device.type != "cpu":
        return None
    pool = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (tuple(shape), dtype, torch.is_inference_mode_enabled())  # inference tensors only change inside it
    buffer = pool.get(key)
    if buffer is None:
        if shape.numel() * dtype.itemsize > _SCRATCH_MAX_BYTES:
            return None
        buffer = pool[key] = torch.empty(shape, dtype=dtype, device=device)
    return buffer


def quantized_matmul(
    layer: QuantLinear, x2: torch.Tensor, bias: torch.Tensor | None = None, fake_quantized: bool = False
) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` for a 2-D input already in the compute dtype (for ``activations="int8_static"``: the
    raw input, or with `fake_quantized` one already on its grid, `QuantLinear.quantize_input`'s, as training uses)."""
    rows = x2.shape[0]
    if layer.activations == "int8_static":
        out = None if fake_quantized else _try(_static_int8, layer, x2, bias)
        # without the int8 matmul (training, or a device or shape it refuses): the same grid, fake-quantized
        return out if out is not None else _dense(layer, x2 if fake_quantized else layer.quantize_input(x2), bias)
    if layer.activations == "int8_dynamic" and rows > SMALL_M:
        out = _try(_dynamic_int8, layer, x2, bias)
        if out is not None:
            return out
    if rows <= SMALL_M and _packed_kernel_traceable(layer, x2.device):
        kernel = _int8_packed if layer.bits == 8 else _int4_packed
        # The packed CPU kernels are fast on bf16 activations only; a few rows lose nothing by the round trip.
        xk = x2.to(torch.bfloat16) if x2.dtype == torch.float32 and x2.device.type == "cpu" else x2
        out = _try(kernel, layer, xk)
        if out is not None:
            out = out.to(x2.dtype)
            return out if bias is None else out + bias
    return _dense(layer, x2, bias)


def _packed_kernel_traceable(layer: QuantLinear, device: torch.device) -> bool:
    """Whether the few-row packed kernel may run here: always eagerly; in a graph being compiled only when safe.

    torch 2.13 on CPU (reproduced with torch alone in scripts/repro/inductor_int8pack_mm.py):
    - ``_weight_int8pack_mm`` in a compiled graph failed to lower on AVX512-BF16/AMX CPUs when its scale is cast in
      the graph, and corrupted the heap of a repeatedly called int8 encoder on an AVX-512 CPU without BF16;
    - inductor lowers the int4 repacking (``_convert_weight_to_int4pack_for_cpu``) with the block layout of the ISA
      *it* detects, while the ATen kernel uses the one ``ATEN_CPU_CAPABILITY`` selects: NaNs when they differ.
    So compiled graphs multiply int8 layers densely, and int4 layers with the packed kernel only once an eager
    decoding step converted them (the layout is then runtime data, not traced code). Slower there, never wrong.
    """
    if not torch.compiler.is_compiling():
        return True
    if layer.bits == 8 or device.type != "cpu":
        return layer.bits == 4 and ("int4", device) in layer._kernel_cache
    return layout_of(layer) == CPU_INT4PACK


def _try(kernel, layer: QuantLinear, *args: torch.Tensor | None) -> torch.Tensor | None:
    """Run a specialised kernel; remember per layer and device when it is unavailable, and fall back."""
    x2 = args[0]
    key = (kernel.__name__, x2.device.type, x2.dtype)
    if key in layer._unsupported:
        return None
    try:
        return kernel(layer, *args)
    except (RuntimeError, NotImplementedError, AttributeError):
        layer._unsupported.add(key)
        return None


def _dense(layer: QuantLinear, x2: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if layer.bits == 8 and layer.group_size == layer.in_features and x2.shape[0] < layer.in_features:
        # Per-channel 8-bit: x @ (q * s)^T == (x @ q^T) * s, so only the int8 -> float cast touches the weight. With
        # more rows than input features the output is larger than the weight, and scaling the weight is cheaper.
        weight = _scratch(layer.weight_packed.shape, x2.dtype, x2.device)
        weight = layer.weight_packed.to(x2.dtype) if weight is None else weight.copy_(layer.weight_packed)
        out = F.linear(x2, weight)
        scale = layer.weight_scale[:, 0].to(x2.dtype)
        out = out * scale if bias is None else torch.addcmul(bias, out, scale)
        if layer.weight_zero is not None:
            out = out + x2.sum(-1, keepdim=True) * layer.weight_zero[:, 0].to(x2.dtype)
        return out
    if layout_of(layer) == CPU_INT4PACK and x2.dtype == torch.float32 and x2.shape[0] <= 256:
        # Blockwise GEMMs straight from the kernel layout: measured as fast or faster in float32 for short prefills;
        # in bf16 (batched bf16 GEMMs are slow on CPU) and for many rows dequantize + one GEMM won by 2-10x.
        return kernel_linear(layer, x2, bias)
    if layout_of(layer) == CPU_INT4PACK:  # the weight comes out transposed from that layout: x @ W^T directly
        shape = torch.Size((layer.in_features, layer.out_features))
        nibbles = _scratch(torch.Size((shape.numel(),)), torch.uint8, x2.device)
        weight_t = kernel_weight_t(layer, x2.dtype, _scratch(shape, x2.dtype, x2.device), nibbles)
        if weight_t is not None:
            return torch.mm(x2, weight_t) if bias is None else torch.addmm(bias, x2, weight_t)
    scratch = _scratch(torch.Size((layer.out_features, layer.in_features)), x2.dtype, x2.device)
    return F.linear(x2, dequantized_weight(layer, x2.dtype, out=scratch), bias)


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
    if x2.device.type == "cpu" and layer.out_features % 16:
        # Checked here, not left to torch: its converter's shape check only runs on real tensors, so a compiled
        # graph would trace the repacking and fail at run time instead of falling back.
        raise NotImplementedError("the CPU int4 kernel needs out_features divisible by 16")
    weight, scales_and_zeros = _int4_kernel_layout(layer, x2.device)
    if x2.device.type == "cpu":
        return torch._weight_int4pack_mm_for_cpu(x2, weight, layer.group_size, scales_and_zeros)
    return torch._weight_int4pack_mm(x2, weight, layer.group_size, scales_and_zeros)


def _int4_kernel_layout(layer: QuantLinear, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The int4 weight and ``[groups, out, 2]`` scale/zero table in the kernel's layout for `device`.

    On CPU the layer switches to the kernel layout once (`int4_layout.to_cpu_kernel_`): the portable nibbles are
    dropped, not duplicated. CUDA (and a CPU layout the probe does not understand) keep a cached copy per device.
    """
    cached = layer._kernel_cache.get(("int4", device))
    if cached is not None:
        return cached
    if device.type == "cpu" and to_cpu_kernel_(layer):
        return layer.weight_packed, kernel_table(layer)
    if device.type == "cpu":
        weight = to_cpu_kernel(layer.weight_packed, verify=False)
    else:  # CUDA wants the nibbles re-paired as (even << 4) | odd in uint8
        nibbles = unpack_int4_unsigned(layer.weight_packed)
        weight = torch._convert_weight_to_int4pack((nibbles[:, 0::2] << 4 | nibbles[:, 1::2]).contiguous(), 8)
    zero = layer.weight_zero if layer.weight_zero is not None else torch.zeros_like(layer.weight_scale)
    scales_and_zeros = torch.stack((layer.weight_scale, zero), -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    layer._kernel_cache[("int4", device)] = (weight, scales_and_zeros)
    return weight, scales_and_zeros


def _check_int_mm(layer: QuantLinear, x2: torch.Tensor) -> None:
    """Refuse (so `_try` falls back) what ``torch._int_mm`` with a per-output-channel rescale cannot compute."""
    if layer.bits != 8 or layer.group_size != layer.in_features or layer.weight_zero is not None:
        raise NotImplementedError("int8 x int8 matmuls take symmetric int8 weights with one scale per output channel")
    if x2.device.type == "cuda" and (x2.shape[0] <= 16 or x2.shape[1] % 8 or layer.out_features % 8):
        raise NotImplementedError("torch._int_mm on CUDA needs rows > 16 and features divisible by 8")


def _dynamic_int8(layer: QuantLinear, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    _check_int_mm(layer, x2)
    return _fused_or_eager("dynamic", _dynamic_int8_eager, x2, layer.weight_packed.t(), layer.weight_scale[:, 0], bias)


def _dynamic_int8_eager(x2, weight_t, weight_scale, bias):
    # Per-token scales keep one outlier token from flattening everyone else's resolution.
    x_scale = x2.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    xq = torch.round(x2.float() / x_scale).to(torch.int8)
    out = torch._int_mm(xq, weight_t).float() * x_scale * weight_scale.float()
    out = out.to(x2.dtype)
    return out if bias is None else out + bias


def _static_int8(layer: QuantLinear, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``activations="int8_static"`` as a real int8 x int8 matmul: the calibrated uint8 grid of the input
    (`QuantLinear.quantize_input`'s), shifted by 128 into int8 for ``torch._int_mm``, and the shift and the zero point
    folded back through the weight's per-channel integer sums. Integer arithmetic up to the final scaling, as in the
    QuantizeLinear -> int8 MatMul the ONNX / OpenVINO exports run."""
    _check_int_mm(layer, x2)
    sums = layer._kernel_cache.get(("int8_static_sums", x2.device))
    if sums is None:  # constant per layer: computed once (out_features int32, negligible next to the weight)
        sums = layer._kernel_cache[("int8_static_sums", x2.device)] = layer.weight_packed.sum(1, dtype=torch.int32)
    return _fused_or_eager("static", _static_int8_eager, x2, layer.input_multiplier, layer.input_scale,
                           layer.input_zero_point, layer.weight_packed.t(), layer.weight_scale[:, 0], sums, bias)  # fmt: skip


def _static_int8_eager(x2, multiplier, x_scale, x_zero, weight_t, weight_scale, weight_sums, bias):
    # The same float32 formula as torch.fake_quantize_per_tensor_affine (x * (1 / scale), round half to even).
    x_scale, x_zero = x_scale.float(), x_zero.float().round()
    u = torch.clamp(torch.round(x2.float() * multiplier.float() * (1.0 / x_scale) + x_zero), 0, 255)
    acc = torch._int_mm((u - 128).to(torch.int8), weight_t)
    # (u - zp) @ W^T == (u - 128) @ W^T + (128 - zp) * W.sum(1)
    out = (acc.float() + (128 - x_zero) * weight_sums.float()) * (x_scale * weight_scale.float())
    out = out.to(x2.dtype)
    return out if bias is None else out + bias


# Eagerly, quantizing the activations and scaling the int32 result take 6-8 passes over memory, more time than the
# int8 matmul itself (measured 60 % of a MiniLM forward). torch.compile fuses each side into a single loop; it needs a
# C++ compiler, so it is tried once per process and the eager version is used wherever it is unavailable.
_FUSED: dict = {}


def _fused_or_eager(name: str, eager, x2: torch.Tensor, *args):
    """`eager(x2, *args)`, through its torch.compile'd version on CPU at inference (compiled once per process; any
    compiler failure is remembered and the eager version runs from then on)."""
    if x2.device.type == "cpu" and not torch.is_grad_enabled():
        if name not in _FUSED:
            try:
                _FUSED[name] = torch.compile(eager, dynamic=True)
            except Exception:  # noqa: BLE001
                _FUSED[name] = None
        if _FUSED[name] is not None:
            try:
                return _FUSED[name](x2, *args)
            except Exception:  # noqa: BLE001
                _FUSED[name] = None
    return eager(x2, *args)
