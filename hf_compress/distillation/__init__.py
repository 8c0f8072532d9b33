"""Knowledge distillation (DistilBERT-style): a `Trainer` that distils a frozen teacher into a student.

- `DistillationArguments`: `TrainingArguments` plus the loss weights, temperature, layer map and teacher dtype.
- `DistillationTrainer`: the `Trainer` whose loss is the weighted distillation loss.
- `make_student`: a shallower copy of a teacher that keeps some of its layers (DistilBERT's initialisation).

Distillation is not a compression stage of a recipe: it trains a model (a shallower student, or a compressed copy
of the teacher to recover its quality), so it registers no technique.
"""

from .config import DistillationArguments
from .losses import (
    attention_kl_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    mean_pool,
    pooled_cosine_loss,
    soft_target_loss,
)
from .student import default_student_layers, make_student
from .trainer import DistillationTrainer


__all__ = [
    "DistillationArguments",
    "DistillationTrainer",
    "make_student",
    "default_student_layers",
    "soft_target_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "attention_kl_loss",
    "pooled_cosine_loss",
    "mean_pool",
]
