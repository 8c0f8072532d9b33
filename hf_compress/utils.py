"""Small helpers shared by the techniques: module selection in PEFT's vocabulary, module replacement, sizes."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn


__all__ = [
    "matches",
    "select_modules",
    "check_pattern_matches",
    "replace_module",
    "model_bytes",
    "count_parameters",
    "aligned",
    "realign_parameters_",
]


def matches(name: str, patterns: list[str] | str | None) -> bool:
    """PEFT's rule: a string is a full-match regex; a list matches a name equal to, or ending in ``.`` + , an item."""
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def select_modules(
    model: nn.Module,
    types: tuple[type, ...],
    target_modules: list[str] | str | None = None,
    exclude_modules: list[str] | str | None = None,
) -> Iterator[tuple[str, nn.Module]]:
    """Modules of the given types chosen by `target_modules` (all when ``None``) minus `exclude_modules`.

    Raises a `ValueError` that repeats the patterns when `target_modules` is given and matches nothing, so a typo
    never silently compresses nothing.
    """
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, types)
        and (target_modules is None or matches(name, target_modules))
        and not matches(name, exclude_modules)
    ]
    if target_modules is not None and not chosen:
        candidates = [n for n, m in model.named_modules() if isinstance(m, types)][:8]
        raise ValueError(
            f"target_modules {target_modules!r} matched no {'/'.join(t.__name__ for t in types)} module of "
            f"{type(model).__name__}. Names look like {candidates}; pass suffixes of those (e.g. ['query', 'value']) "
            "or a full-match regex."
        )
    return iter(chosen)


def check_pattern_matches(what: str, patterns: list[str] | str | None, names: list[str], regex: str | None = None,
                          kind: str = "module") -> None:  # fmt: skip
    """Raise when `patterns` (a suffix list or a full-match regex; or `regex`) match none of `names`.

    `select_modules` raises for a `target_modules` typo; this gives exclude and override patterns the same check,
    since a misspelt one would otherwise be silently ignored. As for targets, a list passes when any item matches
    (so one list can serve several families).
    """
    if patterns is None or any(matches(n, patterns) or (regex is not None and matches(n, regex)) for n in names):
        return
    shown = what if " pattern" in what else f"{what} pattern {patterns!r}"
    raise ValueError(
        f"{shown} matches no {kind}; {kind}s look like {names[:6]}. Use suffixes of those names (e.g. "
        "['attention.output.dense']) or a full-match regex."
    )


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `model`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def count_parameters(model: nn.Module) -> int:
    """Number of model parameters, as the uncompressed equivalent would count them.

    A quantized module stores packed integers and scales; it reports the weights it represents through a
    ``logical_numel()`` method, so an int4 layer counts its ``out x in`` weights, not half of them.
    """
    total, seen = 0, set()
    for module in model.modules():
        own = [t for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)) if id(t) not in seen]
        seen.update(id(t) for t in own)
        if hasattr(module, "logical_numel"):
            total += module.logical_numel()
        else:
            total += sum(t.numel() for t in own if t.is_floating_point() or t.dtype == torch.bool)
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes held by parameters and persistent buffers, each shared tensor counted once."""
    return sum(t.numel() * t.element_size() for t in _unique_tensors(model))


def _unique_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    seen: set[int] = set()
    for tensor in model.state_dict(keep_vars=True).values():
        if not torch.is_tensor(tensor):  # torch.ao dynamic modules keep dtypes and packed params in state_dict
            continue
        key = tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        yield tensor


def aligned(tensor: torch.Tensor, alignment: int = 64) -> torch.Tensor:
    """`tensor` itself if its data starts on an `alignment`-byte boundary, else an aligned copy.

    transformers loads safetensors weights at any 8-byte offset. ``torch._weight_int8pack_mm`` reads out of bounds
    (a segfault) on a weight that is not 16-byte aligned, and MKL's float kernels may sum in another order on
    unaligned data (its documented "conditional numerical reproducibility" caveat; seen with
    ``MKL_ENABLE_INSTRUCTIONS=SSE4_2``), so a reloaded model would not reproduce the saved one bit for bit.
    """
    if tensor.device.type == "meta" or tensor.data_ptr() % alignment == 0:
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def realign_parameters_(module: nn.Module) -> None:
    """Give every parameter of `module` (recursively) aligned memory, in place, after a zero-copy load."""
    for param in module.parameters():
        param.data = aligned(param.data)
