"""The integer grid of a weight group: scales rounded to their storage dtype, and a group's reconstruction error.

Shared by the calibration-free searches (`algorithms`) and the integer zero-point constraint (`zero_points`).
"""

from __future__ import annotations

import torch

from .packing import qrange


__all__ = ["storable", "grid_error"]


def storable(scale: torch.Tensor, zero: torch.Tensor | None, dtype: torch.dtype):
    """Round to the storage dtype; a zero or subnormal scale (all-zero group) becomes 1 so nothing divides by 0."""
    tiny = torch.finfo(dtype).tiny
    scale = torch.where(scale.abs() > tiny * 16, scale, torch.ones_like(scale)).to(dtype)
    return scale, None if zero is None else zero.to(dtype)


def grid_error(w, scale, zero, bits, p: float = 2.0):
    """Per group of ``w [..., size]``, the summed ``|w - rec|^p`` of its rounding onto the grid of (scale, zero), and
    the integers ``q``."""
    lo, hi = qrange(bits)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = (w / safe if zero is None else (w - zero).div_(safe)).round_().clamp_(lo, hi)
    rec = q * safe if zero is None else torch.addcmul(zero, q, safe)
    diff = rec.sub_(w).abs_()
    err = diff.square_() if p == 2.0 else diff.pow_(p)
    return err.sum(-1, keepdim=True), q
