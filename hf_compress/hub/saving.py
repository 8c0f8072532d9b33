"""Saving into a folder atomically, without ever deleting a file that hf_compress did not write.

Every folder hf_compress writes holds a manifest, ``.hf_compress_manifest.json``, listing the files it wrote (a dot
file: `push_to_hub` does not upload it). What may be written where:

- a missing or empty folder: always;
- a previous hf_compress output that holds nothing else (every file is in its manifest): always, replaced as a whole
  (running the same command twice works);
- any other folder (also a previous output to which other files were added): only with ``overwrite=True``, and even
  then only the files hf_compress owns (those in its manifest and those it is about to write) are replaced or
  removed, all others kept;
- the checkpoint the model was loaded from (also when reached through a symlink): only with ``overwrite="source"``;
- an output path that is a symlink is followed: the real folder is written, the link stays a link.

How: a folder holding only files hf_compress owns (or a missing or empty one) is rebuilt in a temporary sibling and
exchanged with it in one atomic rename; a folder holding other files, or one that must keep its identity (the
working directory, the home folder, a mount point), gets its files replaced one by one with ``os.replace`` so that
user files are never moved. `hf_compress.hub._commit` explains both and what each guarantees.

Either way an exception, Ctrl-C or kill -9 while the files are written (``save_pretrained``, the long part) leaves
the folder as it was; leftovers of killed processes are cleaned up by the next save to the same folder.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import _commit as commit
from ._commit import MANIFEST


__all__ = ["MANIFEST", "atomic_directory", "check_output_dir", "save_compressed", "source_folders"]


def save_compressed(
    model: Any,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    extra_files: dict[str, bytes | str] | Callable[[Path], dict[str, bytes | str]] | None = None,
    *,
    overwrite: bool | str = False,
) -> Path:
    """Save `model` (and its tokenizer and extra files such as README.md or plots) into `output_dir` atomically.

    Args:
        model (`PreTrainedModel`): a model compressed by hf_compress (or any model).
        output_dir (`str` or `os.PathLike`): the folder to write; created when missing (``~`` is expanded, a symlink
            is followed). It must be missing or empty unless `overwrite` allows more.
        tokenizer (*optional*): saved next to the model so the folder is self-contained.
        extra_files (`dict[str, bytes | str]` or callable, *optional*): relative path -> content, written in the same
            save; a callable gets the folder holding the saved model (to measure it) and returns that dict.
        overwrite (`bool` or `"source"`, *optional*, defaults to `False`): `True` allows a non-empty folder (a
            previous output, or one holding other files): the files hf_compress writes or wrote there are replaced,
            every other file is kept. ``"source"`` also allows the checkpoint the model or tokenizer was loaded
            from (its model files are replaced, files such as ``training_args.bin`` kept).

    Returns:
        The absolute path of the saved folder (as given, a symlink staying a symlink).

    Raises:
        `FileExistsError`: the folder is not empty, or is the source checkpoint, and `overwrite` does not allow it;
            the message names the folder, some of its files and the fix.
    """
    target = Path(output_dir).expanduser().absolute()
    with atomic_directory(target, overwrite=overwrite, sources=source_folders(model, tokenizer)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if callable(extra_files):
            extra_files = extra_files(tmp)
        for name, content in (extra_files or {}).items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, str):
                path.write_text(content, encoding="utf-8")
            else:
                path.write_bytes(content)
    return target


def source_folders(*objects: Any) -> list[Path]:
    """The local folders (symlinks resolved) that models, tokenizers or paths among `objects` were loaded from."""
    found = []
    for obj in objects:
        if isinstance(obj, (str, os.PathLike)):
            names = [obj]
        else:
            names = [getattr(obj, "name_or_path", None), getattr(getattr(obj, "config", None), "_name_or_path", None)]
        for name in names:
            if isinstance(name, (str, os.PathLike)) and str(name) and os.path.isdir(name):
                found.append(Path(os.path.realpath(name)))
    return found


def check_output_dir(output_dir: str | os.PathLike, overwrite: bool | str = False,
                     sources: Iterable[Path] = ()) -> Path:  # fmt: skip
    """Raise unless saving into `output_dir` is allowed (see the module docstring); return the real folder.

    `compress` calls it before compressing, so a refused folder costs seconds, not a finished compression.
    """
    if not (isinstance(overwrite, bool) or overwrite == "source"):
        raise ValueError(
            f"overwrite must be False, True (replace a previous output; other files are kept) or 'source' (also "
            f"the checkpoint the model was loaded from); got {overwrite!r}."
        )
    shown = Path(output_dir).expanduser().absolute()
    real = Path(os.path.realpath(shown))
    if real.exists() and not real.is_dir():
        raise FileExistsError(f"Cannot save into {shown}: it exists and is a file, not a folder. Give a folder path.")
    if not real.is_dir():
        return real
    for source in sources:
        if os.path.isdir(source) and os.path.samefile(real, source) and overwrite != "source":
            raise FileExistsError(
                f"output_dir {shown} is the checkpoint the model was loaded from ({source}): saving there would "
                f"replace the original's config and weights. Save to another folder, or pass overwrite='source' "
                f"(CLI: --overwrite-source) to replace its model files in place (other files, such as "
                f"training_args.bin, are kept)."
            )
    names = sorted(n for n in os.listdir(real) if not n.startswith(commit.INSIDE))
    if names and not overwrite:
        owned = commit.read_manifest(real)
        foreign = [n for n in names if n != MANIFEST and n not in commit.owned_paths(owned or set())]
        if owned is not None and not foreign:
            return real  # a previous hf_compress output and nothing else: replaced as a whole, atomically
        raise FileExistsError(
            f"output_dir {shown} is not empty and holds files hf_compress did not write ({_some(foreign)}). Choose "
            f"a new or empty output folder, or pass overwrite=True (CLI: --overwrite) to save next to them: only the "
            f"files hf_compress writes are replaced, the others are kept."
        )
    return real


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike, *, overwrite: bool | str = False,
                     sources: Iterable[Path] = ()) -> Iterator[Path]:  # fmt: skip
    """Yield an empty temporary folder whose files replace those of `target` when the block exits without error.

    `overwrite` and `sources` (folders that need ``overwrite="source"``) decide whether `target` may be written, as
    in `save_compressed`. The temporary folder is on the same filesystem as `target`, so nothing is copied; on any
    exception, ``KeyboardInterrupt`` included, it is deleted and `target` is untouched. Writing the file
    ``.hf_compress_manifest.json`` is left to this function (it lists the files the block wrote).

    ```py
    >>> with atomic_directory("minilm-int8") as tmp:
    ...     model.save_pretrained(tmp)
    ...     tokenizer.save_pretrained(tmp)
    ```
    """
    real = check_output_dir(target, overwrite, sources)
    in_place = real.is_dir() and (commit.must_stay(real) or commit.has_foreign(real))
    if not in_place:
        real.parent.mkdir(parents=True, exist_ok=True)
    commit.remove_stale(real)
    inside = in_place and not commit.sibling_ok(real)
    where, prefix = (real, commit.INSIDE) if inside else (real.parent, f".{real.name}.tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=where))
    try:
        yield tmp
        files = sorted(commit.walk(tmp)[1] - {MANIFEST})
        for name in files:
            if not os.path.islink(tmp / name):  # on disk before any rename: a power cut never publishes empty files
                with open(tmp / name, "rb") as handle:
                    os.fsync(handle.fileno())
        with commit.sigint_deferred():
            if in_place or (real.is_dir() and commit.has_foreign(real)):  # a foreign file may have appeared meanwhile
                commit.commit_in_place(tmp, real, files)
            else:
                commit.commit_swap(tmp, real, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the staging folder; after a swap this path no longer exists


def _some(names: list[str], shown: int = 4, skip: str = "") -> str:
    names = [n for n in names if n != skip]
    more = f", ... {len(names)} in all" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more
