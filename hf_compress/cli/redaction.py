"""Keeping a Hub token out of every output: the --token values of a command line (`SECRETS`, filled by the parser),
`redact` for messages and tracebacks, and `reproduce_command` for the model card (the command without --token)."""

from __future__ import annotations

import os
import re
import shlex


__all__ = ["SECRETS", "redact", "reproduce_command", "secrets_in"]

SECRETS: set[str] = set()  # --token values seen on this process's command lines
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")  # what a Hub token looks like, wherever it was typed


def _is_token_option(option: str) -> bool:
    """--token, what argparse accepts for it (--tok) and typos of it (--tokn, --hf-token)."""
    name = option[2:]
    return option.startswith("--") and bool(name) and ("tok" in name or "token".startswith(name))


def secrets_in(argv: list[str], exact: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """The --token values of `argv`; `exact` names the other options the command really has (``export --to`` is
    its own option, not an abbreviation of --token, so its value is not hidden)."""
    found = set()
    for i, arg in enumerate(argv):
        option, eq, value = arg.partition("=")
        if _is_token_option(option) and (option == "--token" or option not in exact):
            secret = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
            if len(secret) >= 4:  # shorter is no secret, and replacing it would garble the message
                found.add(secret)
    return found


def redact(text: str) -> str:
    """`text` without any --token value of the command line, HF_TOKEN, or anything that looks like a Hub token."""
    env = os.environ.get("HF_TOKEN") or ""
    for secret in sorted(SECRETS | ({env} if len(env) >= 4 else set()), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _HF_TOKEN.sub("hf_***", text)


def reproduce_command(argv: list[str]) -> str:
    """The command line for the model card, without --token and its value (a card is public)."""
    shown, i = [], 0
    while i < len(argv):
        option, eq, _ = argv[i].partition("=")
        if _is_token_option(option):
            i += 1 if eq else 2  # "--token=X" or "--token X"
            continue
        shown.append(argv[i])
        i += 1
    return shlex.join(["hf-compress", *shown])
