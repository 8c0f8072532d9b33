"""Writing and publishing a compressed model: atomic saving with a manifest (`saving`, `_commit`), the model card
(`card`) and the one-commit Hub upload (`push`)."""

from __future__ import annotations

from .push import HubPushError, PushResult, push_to_hub
from .saving import atomic_directory, save_compressed


__all__ = ["atomic_directory", "save_compressed", "push_to_hub", "HubPushError", "PushResult"]
