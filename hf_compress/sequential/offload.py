"""Where the calibration activations and the finished layers live between layers: memory or a temporary folder.

`ActivationStore` holds one hidden-state tensor per calibration batch (the current layer's inputs, replaced by its
outputs as the layer is done). It keeps them in memory up to `max_bytes` and spills every batch to files in a
temporary folder beyond that (each read back whole when its batch runs; the folder is deleted on `close`).

`offload_layer` moves a finished (compressed) layer's tensors into one file and maps them back read-only
(``torch.load(mmap=True)``), its pages then dropped from the resident set: a layer costs disk space, not memory,
until something reads it again (the tail pass, saving). The file is unlinked at once (the mapping keeps its data
until the tensors are freed), so nothing is left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..quantization.mmap_pages import drop_pages, in_checkpoint_mmap, trim_heap


__all__ = ["ActivationStore", "offload_layer", "release_weights"]


class ActivationStore:
    """One tensor per calibration batch, in memory up to `max_bytes` (None: no bound), on disk beyond it.

    Args:
        max_bytes: the memory bound of the stored tensors; once the stored total would pass it, every batch moves
            to files (``0``: on disk from the start).
        directory: where the spill folder is created (default: the system temp dir).
    """

    def __init__(self, max_bytes: int | None = None, directory: str | os.PathLike | None = None) -> None:
        self.max_bytes = max_bytes
        self.directory = directory
        self.folder: Path | None = None
        self._memory: list[torch.Tensor | None] = []
        self._bytes = 0

    @property
    def on_disk(self) -> bool:
        return self.folder is not None

    def __len__(self) -> int:
        return len(self._memory)

    def _path(self, index: int) -> Path:
        assert self.folder is not None
        return self.folder / f"batch-{index:06d}.pt"

    def _spill(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="hf_compress_activations_", dir=self.directory))
        for index, tensor in enumerate(self._memory):
            torch.save(tensor, self._path(index))
            self._memory[index] = None
        self._bytes = 0
        trim_heap()

    def append(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        self._memory.append(None)
        size = tensor.numel() * tensor.element_size()
        if not self.on_disk and self.max_bytes is not None and self._bytes + size > self.max_bytes:
            self._spill()
        self[len(self._memory) - 1] = tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        if self.on_disk:
            return torch.load(self._path(index), weights_only=True)
        tensor = self._memory[index]
        assert tensor is not None
        return tensor

    def __setitem__(self, index: int, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if self.on_disk:
            torch.save(tensor.contiguous(), self._path(index))
            return
        old = self._memory[index]
        self._bytes += tensor.numel() * tensor.element_size() - (0 if old is None else old.numel() * old.element_size())
        self._memory[index] = tensor

    def close(self) -> None:
        """Free the tensors and delete the spill folder (if any)."""
        self._memory = []
        self._bytes = 0
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def release_weights(tensors: list[torch.Tensor]) -> None:
    """Drop the resident pages of float weights read zero-copy from the checkpoint once nothing uses them."""
    for tensor in tensors:
        if in_checkpoint_mmap(tensor):
            drop_pages(tensor)
    trim_heap()


@torch.no_grad()
def offload_layer(layer: nn.Module, directory: str | os.PathLike | None = None) -> None:
    """Move `layer`'s parameters and persistent buffers into a file mapped back read-only, and drop their pages."""
    tensors = {f"p:{n}": p.data for n, p in layer.named_parameters() if p.device.type == "cpu"}
    tensors.update({f"b:{n}": b for n, b in layer.named_buffers() if b is not None and b.device.type == "cpu"})
    if not tensors:
        return
    handle, name = tempfile.mkstemp(prefix="hf_compress_layer_", suffix=".pt", dir=directory)
    os.close(handle)
    try:
        torch.save({k: v.contiguous() for k, v in tensors.items()}, name)
        mapped = torch.load(name, mmap=True, weights_only=True)
    finally:
        os.unlink(name)  # the mapping keeps the data; the disk space returns when the tensors are freed
    for key, value in mapped.items():
        kind, _, path = key.partition(":")
        owner_name, _, leaf = path.rpartition(".")
        owner = layer.get_submodule(owner_name) if owner_name else layer
        if kind == "p":
            getattr(owner, leaf).data = value
        else:
            owner._buffers[leaf] = value
        _drop_file_pages(value)
    trim_heap()


def _drop_file_pages(tensor: torch.Tensor) -> None:
    # A private, never-written file mapping: dropped pages are read back from the file when touched again.
    if tensor.is_contiguous() and tensor.numel():
        drop_pages(tensor)
