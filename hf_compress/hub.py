"""Saving that never leaves a half-written folder, and pushing a compressed model to the Hub in one commit.

`atomic_directory` writes into a temporary folder next to the target and swaps it in with a rename only once
everything is on disk, so Ctrl-C, an exception or a crash during `save_pretrained` leaves the previous good folder
(or nothing) where the output goes. `push_to_hub` uploads a saved folder (model, config, tokenizer, card, plots)
with `huggingface_hub` in a single commit; the token comes from the usual places (argument, ``HF_TOKEN``,
``hf auth login``) and is never printed or written anywhere.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


__all__ = ["atomic_directory", "save_compressed", "push_to_hub", "HubPushError", "PushResult"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


class HubPushError(RuntimeError):
    """A push to the Hub failed; the message says why and what to do. The local folder is left as it was."""


@dataclass
class PushResult:
    """What `push_to_hub` uploaded: the repo, the commit and every file with its size in bytes."""

    repo_id: str
    commit_url: str
    commit_oid: str
    files: dict[str, int]
    private: bool

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


# -- atomic save ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder that replaces `target` atomically when the block exits without error.

    The temporary folder lives in the same parent (so the final rename never crosses a filesystem). On Linux the
    old and new folders are swapped with one ``renameat2(RENAME_EXCHANGE)`` call, so `target` always names a
    complete folder; elsewhere two renames leave a window of microseconds in which `target` is missing. On any
    exception, ``KeyboardInterrupt`` included, the temporary folder is deleted and `target` is untouched. Leftover
    temporary folders of processes that were killed outright are cleaned up by the next save to the same target.

    ```py
    >>> with atomic_directory("minilm-int8") as tmp:
    ...     model.save_pretrained(tmp)
    ...     tokenizer.save_pretrained(tmp)
    ```
    """
    target = Path(target).absolute()
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"Cannot save into {target}: it exists and is a file, not a folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if target.exists():
            if not _exchange(tmp, target):
                backup = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.replace(target, backup)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(backup, target)
                    raise
                tmp = backup
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous version
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where that is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0


def _fsync_tree(folder: Path) -> None:
    """Flush file contents to disk before the rename, so a power cut cannot publish empty files."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _remove_stale_temporaries(target: Path) -> None:
    for path in target.parent.glob(f".{target.name}.tmp-*"):
        pid = path.name[len(f".{target.name}.tmp-") :].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_compressed(
    model: Any,
    output_dir: str | os.PathLike,
    tokenizer: Any = None,
    extra_files: dict[str, bytes | str] | Callable[[Path], dict[str, bytes | str]] | None = None,
) -> Path:
    """Save `model` (and its tokenizer and extra files such as README.md or plots) into `output_dir` atomically.

    Args:
        model (`PreTrainedModel`): a model compressed by hf_compress (or any model).
        output_dir (`str` or `os.PathLike`): the folder to create or replace.
        tokenizer (*optional*): saved next to the model so the folder is self-contained.
        extra_files (`dict[str, bytes | str]` or callable, *optional*): relative path -> content, written in the same
            swap; a callable gets the folder holding the saved model (to measure it) and returns that dict.

    Returns:
        The absolute path of the saved folder.
    """
    target = Path(output_dir).absolute()
    with atomic_directory(target) as tmp:
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


# -- push ----------------------------------------------------------------------------------------------------------
def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    endpoint: str | None = None,
) -> PushResult:
    """Create `repo_id` if needed and upload every file of a saved folder in one commit.

    Args:
        folder (`str` or `os.PathLike`): a folder written by `hf_compress.compress` or `save_pretrained`.
        repo_id (`str`): ``"user/name"`` or ``"org/name"``.
        private (`bool`, *optional*, defaults to `False`): create the repo as private (an existing repo keeps its
            visibility).
        token (`str`, *optional*): a write token; by default the one from ``HF_TOKEN`` or ``hf auth login``.
        commit_message (`str`, *optional*): defaults to "Upload model compressed with hf_compress".
        revision (`str`, *optional*): the branch to commit to (default ``main``).
        endpoint (`str`, *optional*): the Hub URL; by default ``HF_ENDPOINT`` or https://huggingface.co.

    Returns:
        A `PushResult` with the commit URL and the bytes of each uploaded file.

    Raises:
        `HubPushError`: no token, a rejected token, missing rights or an unreachable Hub; the message says which and
            how to fix it. The local folder is never modified.
    """
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json: push a folder written by hf_compress.compress or save_pretrained."
        )
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"repo_id must look like 'user/name', got {repo_id!r}.")
    api = HfApi(endpoint=endpoint, token=token)
    source = _token_source(token)
    if source is None:
        raise HubPushError(
            "No Hugging Face token found: run `hf auth login`, set the HF_TOKEN environment variable, or pass "
            "token=... (a token with write access)."
        )
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    files = {name: path for name, path in files.items() if not name.startswith(".")}
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.create_commit(
            repo_id,
            [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()],
            commit_message=commit_message or "Upload model compressed with hf_compress",
            revision=revision,
        )
    except OfflineModeIsEnabled:
        raise HubPushError(
            f"HF_HUB_OFFLINE is set, so nothing can be pushed: unset it and run `hf-compress push {folder} {repo_id}`. "
            f"The compressed model is still saved in {folder}."
        ) from None
    except HfHubHTTPError as err:
        raise HubPushError(_explain_http_error(err, repo_id, api.endpoint, source, folder)) from None
    except (OSError, ConnectionError) as err:
        raise HubPushError(_unreachable(api.endpoint, err, folder)) from None
    except Exception as err:
        if type(err).__module__.startswith(("httpx", "httpcore")):
            raise HubPushError(_unreachable(api.endpoint, err, folder)) from None
        raise
    return PushResult(
        repo_id=repo_id,
        commit_url=info.commit_url,
        commit_oid=info.oid,
        files={name: path.stat().st_size for name, path in files.items()},
        private=private,
    )


def _token_source(token: str | None) -> str | None:
    """Where the token comes from (never the token itself), or None when there is none."""
    if token:
        return "the token argument"
    from huggingface_hub import get_token

    if os.environ.get("HF_TOKEN"):
        return "the HF_TOKEN environment variable"
    return "the token saved by `hf auth login`" if get_token() else None


def _explain_http_error(err: Any, repo_id: str, endpoint: str, source: str, folder: Path) -> str:
    status = getattr(getattr(err, "response", None), "status_code", None)
    kept = f"The compressed model is still saved in {folder}."
    if status == 401:
        return (
            f"The Hub at {endpoint} rejected the token from {source} (HTTP 401): it is invalid, expired or revoked. "
            f"Create a write token at https://huggingface.co/settings/tokens and run `hf auth login`. {kept}"
        )
    if status == 403:
        return (
            f"The token from {source} may not write to {repo_id!r} (HTTP 403): use a token with write access to that "
            f"namespace, or push to your own user name. {kept}"
        )
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"Pushing to {repo_id!r} on {endpoint} failed (HTTP {status}): {first_line}. {kept}"


def _unreachable(endpoint: str, err: BaseException, folder: Path) -> str:
    return (
        f"Could not reach the Hub at {endpoint} ({type(err).__name__}: {err}). Check the network connection, a proxy, "
        f"or the HF_ENDPOINT variable, then push again with `hf-compress push {folder} <user/name>`. "
        f"The compressed model is still saved in {folder}."
    )
