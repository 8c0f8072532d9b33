"""The int4 layout of torch's CPU decoding kernel, learned from torch itself, and the switch between layouts.

``torch._weight_int4pack_mm_for_cpu`` reads weights prepared by ``torch._convert_weight_to_int4pack_for_cpu``: the
same nibbles as the portable layout (`packing.py`), in an undocumented tiled order that depends on the CPU build
torch dispatches to. Probed with torch 2.13: rows are cut into blocks (64 rows with AVX512, 32 with AVX2 and the
generic build); a block of ``L`` rows is stored as ``[K, L / 2]`` bytes, byte ``(k, d)`` holding rows ``d`` and
``d + L / 2`` (AVX512, AVX2) or rows ``2d`` and ``2d + 1`` (generic build, and every build's last, partial block).

Since it is a pure permutation of nibbles, a decoding model need not keep both layouts: `to_cpu_kernel_` replaces a
layer's portable ``weight_packed`` by the kernel's tensor (same bytes, half the memory of keeping both) and makes its
scales views of the kernel's ``[groups, out, 2]`` scale/zero table. The order is not hard-coded: `_block_layout`
probes torch once per row count, and the first converted chunk of each shape is checked to unpack back to its
portable bytes exactly before any portable tensor is dropped; if a future torch changes the layout beyond what the
probe models, the layer keeps a cached kernel copy next to the portable one instead (the memory of before, never a
wrong weight). Many-row inputs (prefill) multiply straight from the kernel layout (`int4_matmul`); the state dict,
pickles and device moves go back to the portable layout (`portable_state`, `to_portable_`).

Conversion happens when the CPU kernel first runs, not at load time: encoders and other models that never decode
keep the portable layout, in which `dequantize()` and saving are cheapest (~1.7x faster unpacking).
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

import torch

from .mmap_pages import trim_heap
from .packing import unpack_int4_unsigned


__all__ = ["PORTABLE", "CPU_INT4PACK", "to_cpu_kernel", "from_cpu_kernel", "matrix_layouts", "kernel_nibbles",
           "layout_of", "kernel_table", "layer_nibbles", "to_cpu_kernel_", "to_portable_",
           "portable_state"]  # fmt: skip

PORTABLE, CPU_INT4PACK = "portable", "cpu_int4pack"
# Rows converted at once: torch's converter needs int32 nibbles (8 bytes per stored byte), so a whole 32000 x 2048 LM
# head would take 262 MB of temporaries; its blocks are row-independent, so chunks change nothing.
CHUNK_ROWS = 4096
_TRIM_BYTES = 2**20  # return freed memory to the system after converting a layer of at least this many packed bytes
_INNER_K_TILES = 2


class _Blocks(NamedTuple):
    """`count` consecutive blocks of `rows` rows each, starting at row `start`, stored with the same `order`."""

    start: int
    count: int
    rows: int
    order: str | torch.Tensor  # "halves": byte d = rows (d, d + rows/2); "pairs": rows (2d, 2d + 1); else slots


def _torch_convert(nibbles: torch.Tensor) -> torch.Tensor:
    return torch._convert_weight_to_int4pack_for_cpu(nibbles.to(torch.int32), _INNER_K_TILES)


def _probe_positions(rows: int, cols: int) -> torch.Tensor:
    """For each element ``(n, k)`` of a ``[rows, cols]`` matrix, where torch puts its nibble (``2 * byte + high``).

    Each element's flat index is written in base 16, one digit per conversion; reading the digits back out of the
    converted bytes tells which element every output nibble came from.
    """
    index = torch.arange(rows * cols).view(rows, cols)
    source = torch.zeros(rows * cols, dtype=torch.long)
    for digit in range((max(rows * cols - 1, 1).bit_length() + 3) // 4):
        packed = _torch_convert((index >> (4 * digit)) & 15).reshape(-1)
        source += unpack_int4_unsigned(packed).long() << (4 * digit)
    if not torch.equal(source.sort().values, torch.arange(rows * cols)):
        raise NotImplementedError("the CPU int4 layout is not a permutation of the nibbles")
    positions = torch.empty_like(source)
    positions[source] = torch.arange(rows * cols)
    return positions.view(rows, cols)


@functools.cache
def _block_layout(rows: int) -> tuple[_Blocks, ...] | None:
    """The block structure torch uses for `rows` rows (any number of columns), or None if it does not fit the model.

    Model: byte of ``(n, k)`` = ``base(n) * K + k * width(n) + slot(n) // 2``, nibble ``slot(n) % 2``; probing with
    K = 2 and K = 4 determines ``base``, ``width`` and ``slot`` per row, and K = 6 checks the model's prediction.
    """
    try:
        p2, p4, p6 = (_probe_positions(rows, cols) for cols in (2, 4, 6))
    except (RuntimeError, NotImplementedError):
        return None
    byte2, high = p2 // 2, p2[:, 0] % 2
    width = byte2[:, 1] - byte2[:, 0]
    base = torch.div(p4[:, 0] // 2 - byte2[:, 0], 2, rounding_mode="floor")
    slot = 2 * (byte2[:, 0] - 2 * base) + high
    for cols, positions in ((2, p2), (4, p4), (6, p6)):
        k = torch.arange(cols)
        predicted = 2 * (base[:, None] * cols + k * width[:, None]) + slot[:, None]
        if not torch.equal(predicted, positions):
            return None
    groups: list[_Blocks] = []
    start = 0
    while start < rows:
        size = int(width[start]) * 2
        block = slice(start, start + size)
        if size <= 0 or int(base[start]) * 2 != start or not bool((base[block] == base[start]).all()):
            return None
        local = slot[block]
        if not torch.equal(local.sort().values, torch.arange(size)):
            return None
        r = torch.arange(size)
        order = (
            "halves"
            if torch.equal(local, 2 * (r % (size // 2)) + r // (size // 2))
            else "pairs"
            if torch.equal(local, r)
            else local
        )
        if groups and groups[-1].rows == size and _same_order(groups[-1].order, order):
            groups[-1] = groups[-1]._replace(count=groups[-1].count + 1)
        else:
            groups.append(_Blocks(start, 1, size, order))
        start += size
    return tuple(groups)


def _same_order(a: str | torch.Tensor, b: str | torch.Tensor) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b if isinstance(a, str) and isinstance(b, str) else False
    return torch.equal(a, b)


def _block_bytes(flat: torch.Tensor, blocks: _Blocks, cols: int) -> torch.Tensor:
    """The bytes of a run of equal blocks inside one converted chunk (`flat`): ``[count, K, L / 2]``."""
    first = blocks.start * cols // 2
    return flat[first : first + blocks.count * blocks.rows * cols // 2].view(blocks.count, cols, blocks.rows // 2)


def _nibbles_along_rows(data: torch.Tensor, order: str | torch.Tensor) -> torch.Tensor:
    """Block bytes ``[..., L / 2]`` (last axis along the block's rows) -> nibbles ``[..., L]`` in row order.

    halves: row = high * L/2 + d; pairs: row = 2d + high. Both are a stack on the right axis, no gather.
    """
    if isinstance(order, str):
        return torch.stack((data & 15, data >> 4), -2 if order == "halves" else -1).flatten(-2)
    return torch.stack((data & 15, data >> 4), -1).flatten(-2).index_select(-1, order)


def _unpack_chunk(chunk: torch.Tensor, layout: tuple[_Blocks, ...]) -> torch.Tensor:
    """Kernel bytes ``[rows, K / 2]`` of one converted chunk -> unsigned nibbles ``[rows, K]`` in row order."""
    rows, cols = chunk.shape[0], chunk.shape[1] * 2
    flat = chunk.reshape(-1)
    out = torch.empty(rows, cols, dtype=torch.uint8, device=chunk.device)
    for blocks in layout:
        nibbles = _nibbles_along_rows(_block_bytes(flat, blocks, cols), blocks.order)  # [count, K, L]
        out[blocks.start : blocks.start + blocks.count * blocks.rows] = nibbles.transpose(1, 2).reshape(-1, cols)
    return out


def _chunks(rows: int):
    for start in range(0, rows, CHUNK_ROWS):
        yield slice(start, min(start + CHUNK_ROWS, rows))


Layouts = tuple  # ((start, stop, blocks), ...) for each converted chunk of rows: see `matrix_layouts`


def matrix_layouts(rows: int) -> Layouts:
    """The block structure of each chunk of a ``rows``-row matrix converted by `to_cpu_kernel`.

    A converted layer keeps it as plain data, so compiled graphs read it instead of tracing the probe."""
    layouts = []
    for chunk in _chunks(rows):
        layout = _block_layout(chunk.stop - chunk.start)
        if layout is None:  # only reachable for a tensor built while the layout was known: same process, same torch
            raise RuntimeError("the CPU int4 kernel layout of this torch build is not understood")
        layouts.append((chunk.start, chunk.stop, layout))
    return tuple(layouts)


def kernel_nibbles(kernel: torch.Tensor, layouts: Layouts | None = None) -> torch.Tensor:
    """A `to_cpu_kernel` tensor ``uint8 [N, K / 2]`` -> the stored nibbles ``uint8 [N, K]`` in [0, 15], row order."""
    out = torch.empty(kernel.shape[0], kernel.shape[1] * 2, dtype=torch.uint8, device=kernel.device)
    for start, stop, layout in layouts or matrix_layouts(kernel.shape[0]):
        out[start:stop] = _unpack_chunk(kernel[start:stop], layout)
    return out


def from_cpu_kernel(kernel: torch.Tensor, layouts: Layouts | None = None) -> torch.Tensor:
    """Inverse of `to_cpu_kernel`: the portable ``uint8 [N, K / 2]`` nibble pairs (see `packing.pack_int4`)."""
    out = torch.empty_like(kernel, memory_format=torch.contiguous_format)
    for start, stop, layout in layouts or matrix_layouts(kernel.shape[0]):
        nibbles = _unpack_chunk(kernel[start:stop], layout)
        out[start:stop] = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return out


# (rows, cols) shapes whose conversion was checked to invert exactly in this process: the layout depends on the
# shape only, so one check per shape is a check of every chunk of that shape.
_VERIFIED: set[tuple[int, int]] = set()


def to_cpu_kernel(packed: torch.Tensor, verify: bool = True) -> torch.Tensor | None:
    """Portable int4 ``uint8 [N, K / 2]`` -> the CPU kernel's tensor of the same shape, built chunk by chunk.

    With `verify`, the first chunk of each shape must unpack back to its portable bytes exactly
    (`kernel_nibbles`), else None is returned: the caller then must keep the portable tensor.
    """
    kernel = torch.empty_like(packed, memory_format=torch.contiguous_format)
    for rows in _chunks(packed.shape[0]):
        part = packed[rows]
        kernel[rows] = _torch_convert(unpack_int4_unsigned(part))
        shape = tuple(part.shape)
        if verify and shape not in _VERIFIED:
            layout = _block_layout(shape[0])
            if layout is None:
                return None
            nibbles = _unpack_chunk(kernel[rows], layout)
            if not torch.equal(nibbles[:, 0::2] | (nibbles[:, 1::2] << 4), part):
                return None
            _VERIFIED.add(shape)
    return kernel


class _Converted(NamedTuple):
    """What a layer in the kernel layout holds besides its buffers: the kernel's scale table, and weak references
    to the buffers it converted, so a buffer replaced from outside (an offloading hook, a plain assignment) is seen."""

    table: torch.Tensor
    buffers: tuple
    layouts: Layouts


def layout_of(layer) -> str:
    """`CPU_INT4PACK` if `layer`'s buffers are the ones `to_cpu_kernel_` made, else `PORTABLE`."""
    converted = layer._int4_converted
    if converted is None:
        return PORTABLE
    current = (layer.weight_packed, layer.weight_scale, layer.weight_zero)
    if all((ref() if ref is not None else None) is tensor for ref, tensor in zip(converted.buffers, current)):
        return CPU_INT4PACK
    # Replaced behind our back by portable tensors (nothing else creates them): forget the stale table.
    layer._int4_converted = None
    return PORTABLE


def kernel_table(layer) -> torch.Tensor:
    """The ``bf16 [groups, out, 2]`` scale/zero table of a layer in the kernel layout."""
    return layer._int4_converted.table


def layer_nibbles(layer) -> torch.Tensor:
    """The unsigned nibbles ``uint8 [out, in]`` of a layer in the kernel layout."""
    return kernel_nibbles(layer.weight_packed, layer._int4_converted.layouts)


@torch.no_grad()
def to_cpu_kernel_(layer) -> bool:
    """Switch a CPU int4 `QuantLinear` to the kernel layout in place, dropping the portable tensor; False if the
    layout could not be verified (the layer is left unchanged)."""
    if layout_of(layer) == CPU_INT4PACK:
        return True
    if torch.compiler.is_compiling():
        # The checks below depend on the data; a graph compiled before any eager decoding step keeps the cached
        # copy of the kernel layout instead (`kernels._int4_kernel_layout`), as torch.compile(fullgraph=True) needs.
        return False
    # Built inside the model's `inference_mode` forward, these become the layer's own tensors for good: inference
    # tensors could not be updated in place later (load_state_dict) nor take part in training (LoRA).
    with torch.inference_mode(False):
        kernel = to_cpu_kernel(layer.weight_packed)
        if kernel is None:
            return False
        scale, zero = layer.weight_scale, layer.weight_zero
        table = torch.stack((scale, zero if zero is not None else torch.zeros_like(scale)), -1)
        table = table.transpose(0, 1).contiguous().to(torch.bfloat16)  # [groups, out, 2]: the kernel's scales
        layer.weight_packed = kernel
        if scale.dtype == torch.bfloat16:  # the table holds the same values: share it instead of keeping both
            layer.weight_scale = table[..., 0].t()
            if zero is not None:
                layer.weight_zero = table[..., 1].t()
    buffers = (layer.weight_packed, layer.weight_scale, layer.weight_zero)
    refs = tuple(weakref.ref(t) if t is not None else None for t in buffers)
    layer._int4_converted = _Converted(table, refs, matrix_layouts(kernel.shape[0]))
    if kernel.numel() >= _TRIM_BYTES:
        # The int32 temporaries (8x the packed bytes per chunk) and the dropped portable tensor are freed into
        # glibc's heap, which keeps them resident unless trimmed. Measured on a 1.1B Llama after its first decoding
        # forward: 1.44 GB resident without trimming, 1.15 GB with it, for ~1 s more once.
        trim_heap()
    return True


@torch.no_grad()
def portable_state(layer) -> dict[str, torch.Tensor]:
    """The portable ``weight_packed`` / ``weight_scale`` / ``weight_zero`` of a converted layer (new tensors)."""
    with torch.inference_mode(False):
        state = {
            "weight_packed": from_cpu_kernel(layer.weight_packed, layer._int4_converted.layouts),
            "weight_scale": layer.weight_scale.contiguous(),
        }
        if layer.weight_zero is not None:
            state["weight_zero"] = layer.weight_zero.contiguous()
    return state


def to_portable_(layer) -> None:
    """Switch a converted layer back to the portable layout in place (before a device move or a state load)."""
    if layout_of(layer) == PORTABLE:
        return
    for name, tensor in portable_state(layer).items():
        setattr(layer, name, tensor)
    layer._int4_converted = None
