"""Pushing a compressed model to the Hub in one commit (saving lives in `hf_compress.hub.saving`, re-exported here).

`push_to_hub` uploads a saved folder (model, config, tokenizer, card, plots) with `huggingface_hub` in a single
commit; the token comes from the usual places (argument or ``--token``, ``HF_TOKEN``, ``hf auth login``) and is never
printed or written anywhere. `atomic_directory` and `save_compressed` (see `hf_compress.hub.saving`) write a folder so
that a failure never leaves it half-written and files hf_compress did not write are never deleted.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .saving import atomic_directory, save_compressed


__all__ = ["atomic_directory", "save_compressed", "push_to_hub", "HubPushError", "PushResult"]


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
        return "the token argument (--token)"
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
