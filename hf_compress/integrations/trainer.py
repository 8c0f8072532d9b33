"""The `transformers.Trainer` private methods hf_compress relies on, in one place.

Checked on transformers 5.23 and 5.24 (torch 2.13): `Trainer._save_optimizer_and_scheduler(output_dir)` runs when a
checkpoint is written and `Trainer._load_optimizer_and_scheduler(checkpoint)` when training resumes from one; both
are private and may change. Subclasses get two public hooks instead.
"""

from __future__ import annotations

from transformers import Trainer


__all__ = ["CheckpointExtrasTrainer"]


class CheckpointExtrasTrainer(Trainer):
    """A Trainer whose checkpoints can hold extra state: override `save_extra_state` / `load_extra_state`."""

    def save_extra_state(self, output_dir: str) -> None:
        """Write extra state into the checkpoint folder `output_dir` (after the optimizer and scheduler)."""

    def load_extra_state(self, checkpoint: str | None) -> None:
        """Read it back when resuming from `checkpoint` (before the optimizer and scheduler; None: a fresh run)."""

    # transformers 5.23/5.24: private; called from `_save_checkpoint`.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        self.save_extra_state(output_dir)

    # transformers 5.23/5.24: private; called from `train(resume_from_checkpoint=...)`.
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        self.load_extra_state(checkpoint)
        super()._load_optimizer_and_scheduler(checkpoint)
