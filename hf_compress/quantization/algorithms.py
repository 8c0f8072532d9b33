"""Calibration-free choice of scales and zero offsets: round-to-nearest, HQQ-style and least-squares.

Every function takes a float weight ``[rows, in]`` and returns centred integers ``q`` (int8), ``scale`` and ``zero``
(``None`` when symmetric) with ``w ~ q * scale + zero`` per group of `group_size` columns. Scales and offsets are
rounded to the storage dtype *before* the final rounding of ``q``, so the integers are the best ones for the scales
that are actually stored.

``zero_point="integer"`` constrains every offset to ``zero = -zp * scale`` with an integer ``zp`` in the centred
range, exactly in the storage dtype (`zero_points.integer_zero_points`): the ``w = (q - zp) * scale`` form that
compressed-tensors and vLLM store.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

from .grid import grid_error as _error
from .grid import storable as _storable
from .packing import qrange
from .zero_points import integer_zero_points


__all__ = [
    "QuantizedWeight",
    "quantize_weight",
    "join_row_blocks",
    "quantize_blocks",
    "check_weight",
    "block_rows",
    "storable_scales",
    "group_scales",
    "ZERO_POINTS",
]

ZERO_POINTS = ("float", "integer")

# Row blocks of about 512K weights (2 MB in float32): the search temporaries of one block stay small whatever the
# matrix size (8 MB blocks measured 4x the transient memory and were no faster), and quantize-on-load releases the
# checkpoint pages of a block as soon as it is done.
_BLOCK_ELEMENTS = 1 << 19


class QuantizedWeight(NamedTuple):
    q: torch.Tensor  # int8 [rows, in], centred
    scale: torch.Tensor  # [rows, in / group_size]
    zero: torch.Tensor | None  # same shape, None when symmetric


def block_rows(cols: int) -> int:
    """Rows per block for a weight with `cols` input features (row blocks are quantized independently)."""
    return max(1, _BLOCK_ELEMENTS // max(cols, 1))


def check_weight(weight: torch.Tensor, name: str) -> None:
    """Reject NaN/inf weights with an error that names the module (quantizing them would spread garbage silently).

    Checked block by block: ``isfinite`` of a whole matrix costs ~2x its size in temporaries (``abs`` + masks).
    """
    rows = weight.reshape(-1, weight.shape[-1]) if weight.dim() > 1 else weight.reshape(1, -1)
    step, bad = block_rows(rows.shape[1]), 0
    for start in range(0, rows.shape[0], step):
        finite = torch.isfinite(rows[start : start + step])
        if not finite.all():
            bad += int((~finite).sum())
    if bad:
        raise ValueError(
            f"{name!r} has {bad} NaN/inf weight values; they cannot be quantized. Fix the checkpoint (or exclude the "
            f"module with exclude_modules=[{name!r}])."
        )


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    algorithm: str = "mse",
    dtype: torch.dtype = torch.bfloat16,
    name: str = "weight",
    zero_point: str = "float",
) -> QuantizedWeight:
    """Quantize `weight` group-wise with the chosen calibration-free `algorithm` (``"rtn"``, ``"hqq"``, ``"mse"``).

    All-zero groups get a zero weight back exactly (scale 1, offset 0). `zero_point` (``"float"`` or
    ``"integer"``) is how asymmetric offsets are stored (see the module docstring).
    """
    rows, cols = weight.shape
    if rows <= block_rows(cols):
        return _quantize_block(weight, bits, group_size, symmetric, algorithm, dtype, name, zero_point)
    return join_row_blocks(rows, quantize_blocks(weight, bits, group_size, symmetric, algorithm, dtype, name,
                                                 zero_point))  # fmt: skip


def join_row_blocks(rows: int, blocks: Iterable[tuple[slice, QuantizedWeight]]) -> QuantizedWeight:
    """One `QuantizedWeight` of `rows` rows from ``(row slice, part)`` blocks, each written into outputs allocated
    at the first block: a list of parts joined by ``torch.cat`` would hold every integer twice at the end."""
    out = None
    for block_slice, part in blocks:
        if out is None:
            out = QuantizedWeight(*(None if t is None else t.new_empty(rows, *t.shape[1:]) for t in part))
        for whole, piece in zip(out, part):
            if piece is not None:
                whole[block_slice] = piece
        del part  # before the next block is computed: one part alive at a time
    return out


def quantize_blocks(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    algorithm: str = "mse",
    dtype: torch.dtype = torch.bfloat16,
    name: str = "weight",
    zero_point: str = "float",
) -> Iterator[tuple[slice, QuantizedWeight]]:
    """`quantize_weight` one row block at a time (`block_rows`): yields each block's row slice and its result.

    Row blocks are independent, so the results equal the whole-matrix ones while only one block's temporaries exist.
    A NaN/inf error counts the bad values of the whole weight.
    """
    step = block_rows(weight.shape[1])
    for start in range(0, weight.shape[0], step):
        block = weight[start : start + step]
        try:
            part = _quantize_block(block, bits, group_size, symmetric, algorithm, dtype, name, zero_point)
        except ValueError:
            check_weight(weight, name)
            raise
        yield slice(start, start + block.shape[0]), part


def _quantize_block(weight, bits, group_size, symmetric, algorithm, dtype, name, zero_point) -> QuantizedWeight:
    if zero_point not in ZERO_POINTS:
        raise ValueError(f"zero_point must be one of {ZERO_POINTS}, got {zero_point!r}.")
    check_weight(weight, name)
    rows, cols = weight.shape
    w = weight.detach().float().reshape(rows, cols // group_size, group_size)
    if algorithm == "rtn":
        scale, zero = _minmax(w, bits, symmetric)
    elif algorithm == "hqq":
        scale, zero = _hqq(w, bits, symmetric)
    elif algorithm in ("auto", "mse", "gptq"):  # GPTQ only calls this for embeddings
        scale, zero = _least_squares(w, bits, symmetric, integer=zero_point == "integer")
    else:
        raise ValueError(f"Unknown algorithm {algorithm!r}; use 'rtn', 'hqq', 'mse' or 'gptq'.")
    scale, zero = storable_scales(w, scale, zero, bits, dtype, zero_point, p=0.7 if algorithm == "hqq" else 2.0)
    q = _round(w, scale.float(), None if zero is None else zero.float(), bits)
    return QuantizedWeight(q.reshape(rows, cols), scale.squeeze(-1), None if zero is None else zero.squeeze(-1))


def _round(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    lo, hi = qrange(bits)
    shifted = w if zero is None else w - zero
    return torch.clamp(torch.round(shifted / scale), lo, hi).to(torch.int8)


def group_scales(w: torch.Tensor, spec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Storable least-squares (scale, zero) for groups ``w [rows, groups, size]`` quantized as `spec` (a
    `ModuleSpec`: bits, symmetric, zero_point); GPTQ's choice for each group when it reaches the group."""
    integer = getattr(spec, "zero_point", "float")
    scale, zero = _least_squares(w, spec.bits, spec.symmetric, integer=integer == "integer")
    return storable_scales(w, scale, zero, spec.bits, dtype, integer)


def storable_scales(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, dtype: torch.dtype,
                    zero_point: str = "float", p: float = 2.0):  # fmt: skip
    """The (scale, zero) to store for groups ``w [rows, groups, size]``: rounded to `dtype`, and with
    ``zero_point="integer"`` (asymmetric only) constrained by `integer_zero_points`."""
    if zero is None or zero_point == "float":
        return _storable(scale, zero, dtype)
    return integer_zero_points(w, scale, zero, bits, dtype, p)


def _minmax(w: torch.Tensor, bits: int, symmetric: bool, ratio: torch.Tensor | float = 1.0):
    """Round-to-nearest grid over the (optionally shrunk by `ratio`) range of each group."""
    lo, hi = qrange(bits)
    if symmetric:
        amax = w.abs().amax(-1, keepdim=True) * ratio
        return amax / hi, None
    wmin = w.amin(-1, keepdim=True).clamp(max=0) * ratio
    wmax = w.amax(-1, keepdim=True).clamp(min=0) * ratio
    scale = (wmax - wmin) / (hi - lo)
    return scale, wmin - lo * scale


def _least_squares(w: torch.Tensor, bits: int, symmetric: bool, grid: int = 10, iters: int = 4,
                   integer: bool = False):  # fmt: skip
    """Clip search, then alternate: integers for fixed (scale, zero) / least-squares (scale, zero) for fixed integers.

    Both steps never increase the squared error of a group (the rounding step is exact for a fixed grid; the fit is
    the optimum of a linear regression of the weights on the integers), so this converges to a local minimum of the
    reconstruction error, well below plain min/max rounding for 4 bits.

    `integer` (asymmetric only) searches within ``zero = -zp * scale``: the clip candidates get their zero point
    rounded, and the fit step tries the rounded zero point of the free fit and its two neighbours, each with the scale
    that is least-squares optimal for it (``w ~ (q - zp) * scale``), after a sweep over every zero point
    (`_zero_point_sweep`). For int4 g32 on Gaussian weights, constraining only the final result measured 1.19x the
    squared error of float offsets; this, 1.12x (g128: 1.05x). A free offset is simply worth that much.
    """
    lo, hi = qrange(bits)
    constrain = integer and not symmetric

    def candidate(scale, zero):
        return (scale, _integer_offset(scale, zero, lo, hi)) if constrain else (scale, zero)

    best_scale, best_zero = candidate(*_minmax(w, bits, symmetric))
    best_err, _ = _error(w, best_scale, best_zero, bits)
    for ratio in torch.linspace(0.95, 0.55, grid - 1).tolist():
        scale, zero = candidate(*_minmax(w, bits, symmetric, ratio))
        best_err, best_scale, best_zero = _keep_better(w, bits, (scale, zero), (best_err, best_scale, best_zero))
    if constrain:
        best_err, best_scale, best_zero = _zero_point_sweep(w, bits, (best_err, best_scale, best_zero))
    scale, zero = best_scale, best_zero
    for _ in range(iters):
        _, q = _error(w, scale, zero, bits)
        if symmetric:
            qq = (q * q).sum(-1, keepdim=True)
            new_scale = (q * w).sum(-1, keepdim=True) / qq.clamp(min=1)
            new_zero = None
            ok = qq > 0
        else:
            qm, wm = q.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
            var = ((q - qm) ** 2).sum(-1, keepdim=True)
            new_scale = ((q - qm) * (w - wm)).sum(-1, keepdim=True) / var.clamp(min=1e-12)
            ok = (var > 0) & (new_scale > 0)
            new_scale = torch.where(ok, new_scale, scale)
            new_zero = torch.where(ok, wm - new_scale * qm, zero)
        new_scale = torch.where(ok, new_scale, scale)
        if not constrain:
            best_err, scale, zero = _keep_better(w, bits, (new_scale, new_zero), (best_err, scale, zero))
            continue
        rounded = torch.round(-new_zero / new_scale)
        for shift in (0, -1, 1):
            zp = (rounded + shift).clamp_(lo, hi)
            u = q - zp
            uu = (u * u).sum(-1, keepdim=True)
            fit = (u * w).sum(-1, keepdim=True) / uu.clamp(min=1e-12)
            fit = torch.where((uu > 0) & (fit > 0), fit, scale)
            zp = torch.where((uu > 0) & (fit > 0), zp, torch.round(-zero / scale))
            best_err, scale, zero = _keep_better(w, bits, (fit, -zp * fit), (best_err, scale, zero))
    return scale, zero


def _zero_point_sweep(w, bits, best, ratios=(1.0, 0.9, 0.8)):
    """Integer zero points: try every zp with the scale that makes its grid span the group's (shrunk) range.

    The min/max candidates fix the zero point by the range; the best over every zp starts the alternation closer to
    the optimum (int4 g32, Gaussian weights: 1.15x -> 1.12x the float-offset squared error).
    """
    lo, hi = qrange(bits)
    wmin = w.amin(-1, keepdim=True).clamp(max=0)
    wmax = w.amax(-1, keepdim=True).clamp(min=0)
    for zp in range(lo, hi + 1):
        # zp = hi leaves no positive integers and zp = lo no negative ones: that side has no range to cover
        cover = torch.maximum(wmax / (hi - zp) if zp < hi else wmax * 0, wmin / (lo - zp) if zp > lo else wmin * 0)
        for ratio in ratios:
            scale = torch.where(cover > 0, cover * ratio, torch.ones_like(cover))
            best = _keep_better(w, bits, (scale, -zp * scale), best)
    return best


def _integer_offset(scale: torch.Tensor, zero: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """`zero` moved to the nearest ``-zp * scale`` with an integer ``zp`` in ``[lo, hi]`` (float scales)."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return -torch.round(-zero / safe).clamp_(lo, hi) * safe


def _keep_better(w, bits, candidate, best):
    """Per row/group, keep whichever of `candidate` (scale, zero) and `best` (err, scale, zero) has less error."""
    scale, zero = candidate
    best_err, best_scale, best_zero = best
    err, _ = _error(w, scale, zero, bits)
    better = err < best_err
    best_zero = torch.where(better, zero, best_zero) if zero is not None else best_zero
    return torch.where(better, err, best_err), torch.where(better, scale, best_scale), best_zero


def _hqq(w: torch.Tensor, bits: int, symmetric: bool, iters: int = 20, p: float = 0.7, beta: float = 10.0):
    """Half-quadratic optimisation of the zero offset (Badri & Shaji, 2023) for a fixed min/max scale.

    The error is measured with an l_p norm (p < 1), which tolerates a few large outliers in exchange for many small
    errors; the split variable gets a closed-form generalised soft-threshold and the offset a closed-form mean.
    Symmetric grids have no offset to optimise, so they fall back to the least-squares search.
    """
    if symmetric:
        return _least_squares(w, bits, symmetric)
    scale, zero = _minmax(w, bits, symmetric)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    best_err, _ = _error(w, scale, zero, bits, p)
    best_zero = zero
    for _ in range(iters):
        q = _round(w, scale, zero, bits).float()
        residual = w - (q * scale + zero)
        magnitude = residual.abs().clamp(min=1e-12)
        split = torch.sign(residual) * torch.relu(magnitude - magnitude.pow(p - 1) / beta)
        zero = (w - split - q * scale).mean(-1, keepdim=True)
        beta *= 1.01
        err, _ = _error(w, scale, zero, bits, p)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, zero, best_zero)
    return scale, best_zero
