"""The portable on-disk layout of quantized weights, and the checks that guard it.

A quantized ``[out, in]`` weight is stored as:

- ``weight_packed``: 8 bits: ``int8 [out, in]``, the centred integers ``q``. 4 bits: ``uint8 [out, in / 2]``, two
  values per byte, ``q + 8`` of the even column in the low nibble and of the odd column in the high nibble.
- ``weight_scale``: ``[out, in / group_size]`` in the compute dtype.
- ``weight_zero`` (asymmetric only): ``[out, in / group_size]``, an offset in weight units.

and dequantizes as ``w = q * scale + zero`` per group. With the nibble offset of 8 this is exactly the
``(u - 8) * scale + zero`` convention of torch's int4 CPU/CUDA kernels, so repacking for them is a pure layout change.
A `QuantLinear` that has run the CPU int4 decoding kernel holds that kernel's order in memory instead (see
`int4_layout`); its state_dict, and so every checkpoint, is always in the layout above.
"""

from __future__ import annotations

import torch


__all__ = ["qrange", "pack_int4", "unpack_int4", "unpack_int4_into", "pack", "unpack", "dequantize_groups"]


def qrange(bits: int) -> tuple[int, int]:
    """The centred integer range of `bits`: (-128, 127) or (-8, 7)."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


# Rows packed at a time: the int8 / uint8 temporaries then cover one block, not a whole LM head (a 32000 x 2048
# head would otherwise hold ~200 MB of them at once, the peak of a sequential calibration's last step).
_PACK_ROWS = 1024


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Centred int4 values ``[..., 2k]`` in [-8, 7] -> ``uint8 [..., k]`` (even column in the low nibble)."""
    if q.shape[-1] % 2:
        raise ValueError(f"4-bit packing needs an even number of columns, got {q.shape[-1]}.")
    flat = q.reshape(-1, q.shape[-1])
    out = torch.empty(flat.shape[0], q.shape[-1] // 2, dtype=torch.uint8, device=q.device)
    for start in range(0, flat.shape[0], _PACK_ROWS):
        # q + 8 is in [0, 15]: int8 arithmetic cannot overflow, and the bits are those of the uint8 nibble.
        u = (flat[start : start + _PACK_ROWS].to(torch.int8) + 8).view(torch.uint8)
        torch.bitwise_or(u[:, 0::2], u[:, 1::2] << 4, out=out[start : start + _PACK_ROWS])
    return out.reshape(*q.shape[:-1], q.shape[-1] // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: ``uint8 [..., k]`` -> centred ``int8 [..., 2k]``."""
    return unpack_int4_unsigned(packed).to(torch.int8) - 8


def unpack_int4_unsigned(packed: torch.Tensor) -> torch.Tensor:
    """``uint8 [..., k]`` -> the stored nibbles ``uint8 [..., 2k]`` in [0, 15] (no centring)."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


# Byte -> its two centred nibbles (low, high) as floats, one table per float dtype: unpacking is then one gather of
# pairs (viewed as a single wider integer) instead of mask, shift, interleave, cast and offset passes (measured 2x
# faster for a 1536 x 384 weight on CPU).
_PAIR_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}
_PAIR_INT = {2: torch.int32, 4: torch.int64}


def unpack_int4_into(packed: torch.Tensor, out: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Centred int4 values of ``uint8 [..., k]`` written into the float tensor `out` (``[..., 2k]``); returns `out`.

    `index` (``int32``, one element per byte of `packed`), when given, receives the gather indices instead of a new
    tensor (a reused buffer is not page-faulted in again on every call)."""
    pair = _PAIR_INT.get(out.dtype.itemsize)
    if pair is None or not out.is_contiguous():  # float64, or a view: the plain way
        return out.copy_(unpack_int4(packed))
    key = (out.dtype, out.device)
    table = _PAIR_TABLES.get(key)
    if table is None:
        byte = torch.arange(256, device=out.device)
        pairs = torch.stack(((byte & 15) - 8, (byte >> 4) - 8), -1).to(out.dtype).contiguous()
        table = _PAIR_TABLES[key] = pairs.view(pair).view(256)
    flat = packed.reshape(-1)
    index = flat.to(torch.int32) if index is None else index.view(-1).copy_(flat)
    torch.index_select(table, 0, index, out=out.view(pair).view(-1))
    return out


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Centred integers -> the stored ``weight_packed`` tensor."""
    return q.to(torch.int8).contiguous() if bits == 8 else pack_int4(q)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """The stored ``weight_packed`` tensor -> centred ``int8`` integers."""
    return packed if bits == 8 else unpack_int4(packed)


def dequantize_groups(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``q * scale + zero`` per group, for integers ``[..., in]`` and scales ``[..., in / group_size]``.

    `out` (same shape as `q`, in `dtype`) receives the result instead of a new tensor; `q` may be `out` itself. The multiply and the add run
    in place, one pass each: a broadcast ``addcmul`` in bf16 measured 2.5x slower than both together on CPU.
    """
    dtype = dtype or scale.dtype
    groups = scale.shape[-1]
    grouped = (*q.shape[:-1], groups, q.shape[-1] // groups)
    if out is None:
        w = q.to(dtype, copy=True).view(grouped)
    elif out is q:  # the caller already wrote the integers into `out` (e.g. `unpack_int4_into`)
        w = out.view(grouped)
    else:
        w = out.view(grouped).copy_(q.view(grouped))
    w.mul_(scale.to(dtype).unsqueeze(-1))
    if zero is not None:
        w.add_(zero.to(dtype).unsqueeze(-1))
    return w.view(q.shape)
