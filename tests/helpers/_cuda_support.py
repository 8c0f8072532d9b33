"""Helpers of tests/quantization/test_cuda.py: tolerances derived from the compute dtype, kernel spies and torch's kernel contracts.

Kept apart so each can be read (and dry-run on CPU, ``HF_COMPRESS_TEST_DEVICE=cpu``) without the tests around it.
The contracts, from torch's sources (aten/src/ATen/native/cuda/int4mm.cu, int8mm.cu, Blas.cpp):

- ``_weight_int8pack_mm``: CUDA takes any K and float dtype (it widens to float32); the CPU kernel needs K % 16.
- ``_weight_int4pack_mm`` (CUDA tinygemm): bf16 activations, groups of 32/64/128/256, K % (innerKTiles * 16) = K %
  128 with the innerKTiles=8 hf_compress converts with, N % 8 (the scale table must have N rows rounded up to 8).
- ``_weight_int4pack_mm_for_cpu``: N % 16 (hf_compress checks it up front).
- ``_int_mm`` (CUDA cuBLASLt): M > 16, K % 8, N % 8.
"""

from __future__ import annotations

import functools
import math
import os
from collections import Counter

import torch

from hf_compress.quantization.kernels import SMALL_M


DEVICE = os.environ.get("HF_COMPRESS_TEST_DEVICE", "cuda")
KERNELS = ("_weight_int8pack_mm", "_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu", "_int_mm")
OPS = 16  # rounding steps along a 2-layer model's path: ~8 per layer (q/k/v, scores, softmax, context, o, FFN, norms)


# -- tolerances -----------------------------------------------------------------------------------------------------
U32, K_MAX = 2.0**-24, 256  # every kernel here accumulates in float32; the widest reduction of these tests


def unit_roundoff(dtype: torch.dtype) -> float:
    """Unit roundoff of `dtype`; float32 matmuls on CUDA keep TF32's 11 bits when allowed (precision != highest)."""
    if dtype == torch.float32 and DEVICE == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return 2.0**-11
    return torch.finfo(dtype).eps / 2


def coarsest(*dtypes: torch.dtype, rows: int) -> float:
    """The coarsest rounding of the compared runs; up to SMALL_M rows the CPU packed kernels take bf16 activations."""
    return max(unit_roundoff(d) for d in (*dtypes, *((torch.bfloat16,) if rows <= SMALL_M else ())))


def rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


def assert_matmul_close(out, ref, x, w, u: float) -> None:
    """One layer, outputs y = sum_k x_k w_k. Rounding an input to unit roundoff u moves each term by up to
    u |x_k w_k| in a random direction: over K terms a random walk of ~u sqrt(K) rms(x) rms(w). Each side rounds its
    activations and its dequantized weight, 4 sources for two devices. The float32 accumulators add u32 |partial sum|
    per step, partial sums being ~|y| ~ sqrt(K) rms(x) rms(w): ~u32 K rms(x) rms(w) per side. 6 sigmas bound the
    largest of a few thousand outputs; the output's own rounding is relative (rtol 2u, one per side). Measured on CPU
    against float64: at most 0.3 of this tolerance, for one side."""
    k, scale = x.shape[-1], rms(x) * rms(w)
    atol = 6 * (math.sqrt(4) * u * math.sqrt(k) + math.sqrt(2) * U32 * k) * scale
    torch.testing.assert_close(out.float().cpu(), ref.float().cpu(), atol=atol, rtol=2 * u)


def assert_model_close(out, ref, u: float, ops: int = OPS) -> None:
    """A whole model: relative RMS error. Each of `ops` steps adds a relative error of ~u per side (plus ~u32
    sqrt(K) from float32 accumulation), so the difference grows like sqrt(2 ops); 6x margin (an RMS over many outputs
    has no tail; layers amplify a little). Measured on CPU against float64: 0.05 of it in bf16, 0.01 in float32. A
    real bug (wrong nibble order, swapped scale/zero, a missing correction) gives errors of order 1."""
    out, ref = out.double().cpu(), ref.double().cpu()
    error = float((out - ref).norm() / ref.norm().clamp(min=1e-30))
    tol = 6 * math.sqrt(2 * ops) * (u + U32 * math.sqrt(K_MAX))
    assert error <= tol, f"relative error {error:.3g} > {tol:.3g}"


# -- kernel spies and contracts -------------------------------------------------------------------------------------
def spy(monkeypatch) -> Counter:
    """Count the successful calls of the packed/int8 kernels, per (name, device type)."""
    calls: Counter = Counter()
    for name in KERNELS:
        original = getattr(torch, name, None)
        if original is None:
            continue

        def wrapper(*args, _original=original, _name=name, **kwargs):
            out = _original(*args, **kwargs)
            calls[_name, args[0].device.type] += 1
            return out

        monkeypatch.setattr(torch, name, wrapper)
    return calls


def used(calls: Counter, device: torch.device) -> set[str]:
    return {name for (name, where), count in calls.items() if where == device.type and count}


@functools.cache
def cuda_int8pack() -> bool:
    """Whether this torch build has a CUDA `_weight_int8pack_mm` (aten/src/ATen/native/cuda/int8mm.cu)."""
    try:
        x, w = torch.ones(1, 16, device="cuda"), torch.ones(8, 16, dtype=torch.int8, device="cuda")
        torch._weight_int8pack_mm(x, w, torch.ones(8, device="cuda"))
        return True
    except (RuntimeError, NotImplementedError):
        return False


def expected_kernel(device, layer, rows) -> str | None:
    """The kernel hf_compress must pick by torch's contracts (module docstring), or None: dequantize + dense GEMM."""
    k, n, group, cpu = layer.in_features, layer.out_features, layer.group_size, device.type == "cpu"
    if rows > SMALL_M:
        return "_int_mm" if layer.activations and (cpu or (k % 8 == 0 and n % 8 == 0)) else None
    if layer.bits == 8:
        return "_weight_int8pack_mm" if group == k and (k % 16 == 0 if cpu else cuda_int8pack()) else None
    if group not in (32, 64, 128, 256):
        return None
    if cpu:
        return "_weight_int4pack_mm_for_cpu" if n % 16 == 0 else None
    bf16 = layer.compute_dtype == torch.bfloat16
    return "_weight_int4pack_mm" if bf16 and k % 128 == 0 and n % 8 == 0 else None
