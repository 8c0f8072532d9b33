"""The two ways `hf_compress.hub.saving.atomic_directory` puts a finished save in place, and the manifest they keep.

*swap* (`commit_swap`): for a folder holding only files hf_compress owns, or a missing or empty one. The new folder,
built in a temporary sibling, is exchanged with it by one ``renameat2(RENAME_EXCHANGE)``, so the path always names a
complete folder (without renameat2, two renames leave a window of microseconds with no folder). The replaced folder
is then emptied by `dispose`, which deletes only the files its manifest lists and moves anything else (a file that
arrived during the save) into the new folder: a swap never deletes a file hf_compress did not write.

*in place* (`commit_in_place`): for a folder holding other files, or one that must keep its identity (`must_stay`).
The new files, staged in a temporary sibling (or a hidden folder inside it where a sibling is impossible, e.g. at a
mount point: the same filesystem either way), are moved over one by one with ``os.replace``.
User files are never moved, copied or relinked, which is why this way is used whenever there are some: every file
is at every moment its complete old or complete new version, Ctrl-C waits until the moves are done
(`sigint_deferred`), and an exception moves the old versions back. Only a kill -9 or power cut during those
milliseconds can leave a mix of old and new files (each complete); the manifest, written first, lists both, so the
next save replaces them all.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path


logger = logging.getLogger("hf_compress.hub.saving")

MANIFEST = ".hf_compress_manifest.json"
INSIDE = ".hf_compress-tmp-"  # prefix of the in-place staging folder inside the target
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def commit_swap(tmp: Path, real: Path, files: list[str]) -> None:
    """Exchange the finished folder `tmp` with `real` (which holds only files hf_compress owns, or nothing)."""
    write_manifest(tmp, files)
    if not real.exists():
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a saved model is an ordinary folder
        os.replace(tmp, real)
        return
    shutil.copymode(real, tmp)
    old = real.parent / f".{real.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if exchange(tmp, real):
        os.replace(tmp, old)
    else:
        os.replace(real, old)
        try:
            os.replace(tmp, real)
        except BaseException:
            os.replace(old, real)
            raise
    fsync_dir(real.parent)
    try:
        dispose(old, read_manifest(old) or set(), real)
    except OSError as err:  # the new folder is in place; the next save retries removing the old one
        logger.warning("Saved %s, but could not remove the previous version in %s: %s", real, old, err)


def commit_in_place(staging: Path, real: Path, files: list[str]) -> None:
    """Move the staged `files` into `real` one by one; remove what an earlier save wrote and this one did not."""
    old = read_manifest(real)
    for name in files:  # every conflict is found before anything changes
        for parent in Path(name).parents:
            if (
                parent != Path(".")
                and os.path.lexists(real / parent)
                and ((real / parent).is_symlink() or not (real / parent).is_dir())
            ):
                raise FileExistsError(
                    f"Cannot save into {real}: {parent} is a file or a symlink, hf_compress needs a folder there "
                    f"(to write {name}). Move it away or choose another output folder."
                )
        if (real / name).is_dir() and not (real / name).is_symlink():
            raise FileExistsError(
                f"Cannot save into {real}: {name} is a folder, hf_compress needs to write a file there. Move it "
                f"away or choose another output folder."
            )
    write_manifest(real, sorted(set(files) | (old or set())), via=staging)  # owns the mix if killed midway
    backup, moved = Path(tempfile.mkdtemp(prefix="previous-", dir=staging)), []
    try:
        for name in files:
            (real / name).parent.mkdir(parents=True, exist_ok=True)
            if os.path.lexists(real / name):
                (backup / name).parent.mkdir(parents=True, exist_ok=True)
                try:  # the old version stays in place until os.replace swaps the new one in
                    os.link(real / name, backup / name, follow_symlinks=False)
                except (OSError, NotImplementedError):  # no hard links here (some network filesystems)
                    shutil.copy2(real / name, backup / name, follow_symlinks=False)
            os.replace(staging / name, real / name)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            if os.path.lexists(backup / name):
                os.replace(backup / name, real / name)
            else:
                os.unlink(real / name)
        if old is None:
            os.unlink(real / MANIFEST)
        else:
            write_manifest(real, sorted(old), via=staging)
        raise
    for name in sorted((old or set()) - set(files)):  # what a previous save wrote and this one does not
        path = real / name
        if os.path.lexists(path) and not path.is_dir():
            os.unlink(path)
            for parent in path.parents:
                if parent == real or any(parent.iterdir()):
                    break
                parent.rmdir()
    write_manifest(real, files, via=staging)
    fsync_dir(real)


def dispose(old: Path, owned: set[str], real: Path) -> None:
    """Empty a replaced folder: delete what hf_compress owns, move anything else (a file that arrived during the
    save) into `real`, and keep the folder under a visible name if something could not be moved."""
    dirs, files = walk(old)
    for name in sorted(files):
        if name in owned or name == MANIFEST:
            os.unlink(old / name)
        elif not os.path.lexists(real / name):
            (real / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(old / name, real / name)
    for name in sorted(dirs, reverse=True):  # children before parents
        with contextlib.suppress(OSError):
            (old / name).rmdir()
    with contextlib.suppress(OSError):
        old.rmdir()
    if old.exists():
        kept = real.parent / f"{real.name}.kept-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
        os.replace(old, kept)
        logger.warning("Files that appeared in %s during the save were kept in %s.", real, kept)


def remove_stale(real: Path) -> None:
    """Remove the temporary folders of saves to `real` by processes that were killed outright."""
    name = glob.escape(real.name)
    staging = [*real.parent.glob(f".{name}.tmp-*"), *(real.glob(f"{INSIDE}*") if real.is_dir() else [])]
    for path in [*staging, *real.parent.glob(f".{name}.old-*")]:
        pid = path.name.split("-")[-2]
        if not pid.isdigit() or pid_alive(int(pid)):
            continue
        owned = read_manifest(path)
        if path in staging and (owned is None or path.parent == real):
            shutil.rmtree(path, ignore_errors=True)  # a save that never reached its renames: only files it wrote
        else:  # a replaced folder (or one exchanged a moment before the kill): it may hold a file that arrived
            dispose(path, owned or set(), real)


def sibling_ok(real: Path) -> bool:
    """Whether a temporary folder next to `real` is on its filesystem and may be created (else it goes inside)."""
    return not (os.path.ismount(real) or real.parent == real or not os.access(real.parent, os.W_OK))


def must_stay(real: Path) -> bool:
    """A folder that must keep its identity: renaming it would fail or strand programs working inside it."""
    if not sibling_ok(real):
        return True
    for home in (Path.cwd, Path.home):
        with contextlib.suppress(OSError, RuntimeError):
            if real == home().resolve() or real in home().resolve().parents:
                return True
    return False


def has_foreign(real: Path) -> bool:
    """Whether `real` holds a file or folder that its manifest does not list (everything, without a manifest)."""
    owned = read_manifest(real) or set()
    dirs, files = walk(real, skip=owned_paths(owned) | {MANIFEST})
    return bool(files - owned - {MANIFEST} or dirs - owned_paths(owned))


def owned_paths(owned: set[str]) -> set[str]:
    """The owned files and every folder that holds one."""
    return owned | {p.as_posix() for name in owned for p in Path(name).parents if p != Path(".")}


def walk(folder: Path, skip: set[str] | None = None) -> tuple[set[str], set[str]]:
    """(folders, non-folders) under `folder` as relative paths; symlinks are not followed, and with `skip` the walk
    stops at the first folder not in it (that folder is already foreign)."""
    dirs, files = set(), set()
    for root, dirnames, filenames in os.walk(folder):
        rel = Path(root).relative_to(folder)
        keep = []
        for d in dirnames:
            name = (rel / d).as_posix()
            (dirs if (folder / name).is_dir() and not (folder / name).is_symlink() else files).add(name)
            if (skip is None or name in skip) and not name.startswith(INSIDE):
                keep.append(d)
        dirnames[:] = keep
        files.update((rel / f).as_posix() for f in filenames)
    return {d for d in dirs if not d.startswith(INSIDE)}, files


def read_manifest(folder: Path) -> set[str] | None:
    """The files a previous save wrote, or None when `folder` has no (valid) manifest; unsafe names are dropped."""
    try:
        names = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(names, list):
        return None
    return {n for n in names if isinstance(n, str) and n and not n.startswith("/") and ".." not in n.split("/")}


def write_manifest(folder: Path, files: list[str], via: Path | None = None) -> None:
    from ..config import __version__

    text = json.dumps({"written_by": f"hf_compress {__version__}", "files": sorted(files)}, indent=1) + "\n"
    scratch = (via or folder) / f"{MANIFEST}.{uuid.uuid4().hex[:8]}"
    scratch.write_text(text, encoding="utf-8")
    os.replace(scratch, folder / MANIFEST)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C until the renames of a commit are done, then deliver it (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list = []
    previous = signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
        if received and previous == signal.SIG_DFL:
            raise KeyboardInterrupt
        if received and callable(previous):
            previous(*received[0])


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    return renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
