"""Recovery distillation inside `compress`: the pruned/factorized model learns back the original's outputs.

A thin wrapper over `hf_compress.distillation.DistillationTrainer` with settings that suit recovery on unlabeled
calibration text: the original is the frozen teacher, the compressed model the student with the same depth (so
hidden states pair one to one), losses on hidden states and on mean-pooled sentence embeddings, plus the
soft-target loss when the model has a task head.
"""

from __future__ import annotations

import tempfile
from typing import Any

from torch import nn


__all__ = ["recover"]


def recover(student: nn.Module, teacher: nn.Module, texts: Any, *, tokenizer: Any, max_steps: int = 200,
            learning_rate: float = 5e-5, batch_size: int = 16, max_length: int = 128, **kwargs: Any) -> nn.Module:  # fmt: skip
    """Distil `teacher` into `student` (in place) on unlabeled `texts`; returns `student` in eval mode.

    Args:
        student: the compressed model (pruned and/or factorized, not yet quantized).
        teacher: the original model.
        texts (`list[str]` or `datasets.Dataset` with a ``text`` column): recovery data (the calibration texts).
        tokenizer: the model's tokenizer.
        max_steps, learning_rate, batch_size, max_length: training budget; `**kwargs` go to
            `DistillationArguments` (e.g. ``alpha_mse=1.0``, ``num_train_epochs``).
    """
    import datasets
    from transformers import DataCollatorWithPadding

    from .distillation import DistillationArguments, DistillationTrainer

    if texts is None:
        raise ValueError(
            "Recovery distillation needs calibration texts: pass calibration_data=[...] (unlabeled text)."
        )
    if tokenizer is None:
        raise ValueError("Recovery distillation needs the model's tokenizer: pass tokenizer=... to compress().")
    rows = list(texts) if isinstance(texts, (list, tuple)) else list(texts["text"])
    encoded = datasets.Dataset.from_dict({"text": rows}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )
    has_logits = hasattr(student, "classifier") or hasattr(student, "lm_head")
    settings = dict(alpha_kl=1.0 if has_logits else 0.0, alpha_task=0.0, alpha_cos=1.0, alpha_pooled=1.0)
    settings.update(kwargs)
    with tempfile.TemporaryDirectory(prefix="hf_compress-recovery-") as scratch:
        args = DistillationArguments(
            output_dir=scratch, max_steps=max_steps, learning_rate=learning_rate,
            per_device_train_batch_size=batch_size, save_strategy="no", report_to=[], logging_steps=max(max_steps // 10, 1),
            dataloader_pin_memory=False,
            disable_tqdm=False, **settings,
        )  # fmt: skip
        trainer = DistillationTrainer(model=student, args=args, teacher=teacher, train_dataset=encoded,
                                      data_collator=DataCollatorWithPadding(tokenizer))  # fmt: skip
        trainer.train()
    return student.eval()
