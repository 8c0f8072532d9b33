"""Keep quantize-on-load's resident memory near the quantized model: drop consumed checkpoint pages, trim the heap.

transformers reads every ``.safetensors`` shard through an mmap and hands out zero-copy views, so each page of a
float weight that quantization reads stays in the process's resident set until the shard is closed at the very end:
a sharded fp32 checkpoint would peak at its full size although every weight is packed as soon as it arrives.

Once a weight has been quantized, nothing refers to its float bytes any more, and ``madvise(MADV_DONTNEED)`` drops
exactly those pages (the file is unchanged, so a page touched again is read back from it). Only whole pages inside
the consumed tensor are dropped, never the rest of the mapping: the shards are mapped private and writable, so
other views into them (norms and other float leftovers that become model parameters, or another model loaded in the
same process) may hold written pages that ``MADV_DONTNEED`` would silently revert to the file's contents.
Linux only; elsewhere these functions do nothing.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

import torch


__all__ = ["in_checkpoint_mmap", "drop_pages", "trim_heap"]

_MADV_DONTNEED = 4


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def in_checkpoint_mmap(tensor: torch.Tensor) -> bool:
    """Whether `tensor`'s data lies in an mmapped ``.safetensors`` file (a zero-copy view of a checkpoint)."""
    if _libc() is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    address = tensor.data_ptr()
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                if len(fields) >= 6 and fields[5].endswith(".safetensors"):
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    if start <= address < end:
                        return True
    except OSError:
        pass
    return False


def drop_pages(tensor: torch.Tensor) -> None:
    """Drop the whole pages inside a contiguous, consumed checkpoint `tensor` from the resident set.

    Call it only for a tensor for which `in_checkpoint_mmap` holds and whose bytes nothing will write or need again
    (on anonymous memory ``MADV_DONTNEED`` would zero them). The up to two partial pages at its ends stay: they may
    belong to a neighbouring tensor.
    """
    libc = _libc()
    if libc is None or not tensor.is_contiguous():
        return
    page = mmap.PAGESIZE
    lo = -(-tensor.data_ptr() // page) * page
    hi = (tensor.data_ptr() + tensor.numel() * tensor.element_size()) // page * page
    if hi > lo:
        libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def trim_heap() -> None:
    """Return glibc's free heap memory to the system.

    glibc keeps freed multi-MB temporaries in its heap (its mmap threshold grows after the first large free), so
    without a trim the resident set would keep the high-water mark of every weight's temporaries.
    """
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)
