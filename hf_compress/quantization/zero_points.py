"""Integer zero points: asymmetric offsets stored as ``zero = -zp * scale`` exactly, ``zp`` an integer.

compressed-tensors (and vLLM) store asymmetric weights as ``w = (q - zp) * scale`` with an integer zero point; hf_compress's
free float offset ``w = q * scale + zero`` maps onto that form exactly only when the offset is an integer multiple of
the scale *in the storage dtype*. `integer_zero_points` chooses, per group, the storable (scale, zero) of least error
with that property (``WeightQuantizationConfig(zero_point="integer")``; `algorithms.storable_scales` calls it).
"""

from __future__ import annotations

import math

import torch

from .grid import grid_error, storable
from .packing import qrange


__all__ = ["integer_zero_points"]


# Scale candidates tried on each side of the nearest storable scale. A centred int4 zero point has an odd part of at
# most 3 bits (7), so a scale whose significand is a multiple of 8 makes ``zp * scale`` exact in any float dtype, and
# 8 consecutive significands always hold one.
_NEIGHBOURS = 4


def integer_zero_points(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, dtype: torch.dtype,
                        p: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Storable (scale, zero) with ``zero == -zp * scale`` exactly in `dtype`, ``zp`` an integer in `qrange(bits)`.

    Rounding ``zp = round(-zero / scale)`` alone is not enough: ``zp * scale`` of a bf16 scale needs up to 11
    significant bits, and a rounded bf16 offset would differ from the integer form by up to 1/64 of a step. So the
    scale moves to one of the storable values within `_NEIGHBOURS` steps of the float one for which ``zp * scale`` is
    exactly storable too, choosing per group the candidate of least ``l_p`` reconstruction error on `w`. For 8 bits
    the zero point may also move to a neighbour with at most 3 significant bits (so a candidate always exists).
    """
    lo, hi = qrange(bits)
    base, _ = storable(scale, None, dtype)
    ints = base.view(torch.int16 if dtype.itemsize == 2 else torch.int32)  # positive floats: +1 is the next value
    # float32 scales keep 24 - bits significant bits, so that q * scale, zp * scale and (q - zp) * scale are all
    # exact in float32 and w = q * scale + zero dequantizes bit for bit like (q - zp) * scale (bf16 and fp16 scales
    # have few enough bits already).
    digits = 1 - round(math.log2(torch.finfo(dtype).eps))  # significant bits: 8 bf16, 11 fp16, 24 fp32
    unit = 1 << max(0, digits - (24 - bits))
    ints = (ints + unit // 2) // unit * unit
    best_err = best_scale = best_zp = None
    for step in range(-_NEIGHBOURS, _NEIGHBOURS + 1):
        candidate = (ints + step * unit).view(dtype)
        c = candidate.double()
        zp = torch.round(-zero.double() / c).clamp_(lo, hi)
        for zps in (zp, *_few_bits(zp, lo, hi)) if bits > 4 else (zp,):
            exact = (zps * c).to(dtype).double() == zps * c
            valid = exact & (c > 0) & torch.isfinite(c)
            err, _ = grid_error(w, c.float(), (-zps * c).float(), bits, p)
            err = torch.where(valid, err, torch.full_like(err, float("inf")))
            if best_err is None:
                best_err, best_scale, best_zp = err, candidate, zps
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale, best_zp = torch.where(better, candidate, best_scale), torch.where(better, zps, best_zp)
    assert torch.isfinite(best_err).all(), "no storable integer zero point found"  # a multiple of 8 is always there
    return best_scale, (-best_zp * best_scale.double()).to(dtype)


def _few_bits(zp: torch.Tensor, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The integers below and above `zp` with at most 3 significant bits (e.g. 100 -> 96, 112)."""
    step = torch.exp2(torch.floor(torch.log2(zp.abs().clamp(min=1))) - 2).clamp(min=1)
    down = torch.trunc(zp / step) * step
    up = (down + torch.sign(zp) * step).clamp(lo, hi)
    return down, up
