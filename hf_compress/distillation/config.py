"""`DistillationArguments`: `TrainingArguments` plus the weights and settings of the distillation loss."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments


__all__ = ["DistillationArguments", "LAYER_MAP_PRESETS", "TEACHER_DTYPES"]

# Named layer maps; anything else is an explicit {student hidden state: teacher hidden state} mapping.
LAYER_MAP_PRESETS = ("uniform", "last")
TEACHER_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
_WEIGHTS = ("alpha_kl", "alpha_task", "alpha_cos", "alpha_mse", "alpha_attn", "alpha_pooled")


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments of a `DistillationTrainer`: every `TrainingArguments` field plus the distillation loss.

    The loss is DistilBERT's weighted sum (Sanh et al., 2019), extended with the intermediate-layer terms of TinyBERT
    and MiniLM. Every weight can be set on its own and ``0`` switches its term off (the teacher and student are then
    not asked for the outputs that term needs, which saves time).

    Hidden states are numbered as transformers returns them: ``0`` is the embedding output and ``i`` the output of
    layer ``i``. Attention maps of a mapped pair ``(s, t)`` are those of student layer ``s`` and teacher layer ``t``.

    Args:
        alpha_kl (`float`, *optional*, defaults to `1.0`):
            Weight of the soft-target loss: KL divergence between the teacher's and the student's output
            distributions at temperature `temperature`, scaled by ``temperature**2`` (Hinton et al.) so its
            gradients keep their size when the temperature changes. Needs logits from both models, over the same
            vocabulary or label set.
        temperature (`float`, *optional*, defaults to `2.0`):
            Softmax temperature of the soft-target loss; must be > 0.
        alpha_task (`float`, *optional*, defaults to `1.0`):
            Weight of the student's own task loss (classification cross-entropy, masked-LM or causal-LM), as the
            model computes it from the ``labels`` in the batch. Set it to ``0`` for unlabeled data.
        alpha_cos (`float`, *optional*, defaults to `1.0`):
            Weight of the cosine loss ``1 - cos(student, teacher)`` between mapped hidden states, per real token.
        alpha_mse (`float`, *optional*, defaults to `0.0`):
            Weight of the mean squared error between mapped hidden states (after the learned projection when the
            widths differ).
        alpha_attn (`float`, *optional*, defaults to `0.0`):
            Weight of the KL divergence between mapped attention maps. Switches both models to eager attention
            (sdpa does not return attention maps). A student with fewer heads than its teacher (head pruning) is
            compared on head-averaged maps.
        alpha_pooled (`float`, *optional*, defaults to `0.0`):
            Weight of ``1 - cos`` between mean-pooled last hidden states: the sentence embedding of
            sentence-transformers models such as MiniLM, for students without logits.
        layer_map (`dict[int, int]` or `str`, *optional*, defaults to `"uniform"`):
            Which student hidden state is compared with which teacher hidden state in the cosine, MSE and attention
            terms. ``"uniform"`` pairs student state ``k`` with teacher state ``round(k * T / S)`` for ``k = 1..S``
            (identity for students as deep as the teacher, TinyBERT's mapping otherwise), ``"last"`` only the last
            states (DistilBERT). A dict (or its JSON, ``'{"1": 2, "2": 4}'``, or ``"1:2,2:4"`` on the command line)
            gives the pairs explicitly.
        teacher_dtype (`str`, *optional*):
            Run the teacher in this dtype (``"bf16"``, ``"fp16"``, ``"fp32"``). bf16 roughly halves the teacher's
            time and memory; the losses are still computed in float32. ``None`` keeps the teacher's dtype.
        projection_lr (`float`, *optional*):
            Learning rate of the learned projections that map student hidden states to the teacher's width when
            they differ; defaults to `learning_rate`.
    """

    alpha_kl: float = field(
        default=1.0, metadata={"help": "Weight of the soft-target KL loss at `temperature` (scaled by T^2); 0 = off."}
    )
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the soft-target loss (> 0)."})
    alpha_task: float = field(
        default=1.0,
        metadata={"help": "Weight of the student's own task loss from `labels`; 0 = off (unlabeled data)."},
    )
    alpha_cos: float = field(
        default=1.0, metadata={"help": "Weight of the cosine loss between mapped hidden states; 0 = off."}
    )
    alpha_mse: float = field(
        default=0.0, metadata={"help": "Weight of the MSE between mapped hidden states; 0 = off."}
    )
    alpha_attn: float = field(
        default=0.0, metadata={"help": "Weight of the KL between mapped attention maps (needs eager attention)."}
    )
    alpha_pooled: float = field(
        default=0.0,
        metadata={"help": "Weight of 1 - cos between mean-pooled last hidden states (sentence embeddings); 0 = off."},
    )
    layer_map: dict | str | None = field(
        default="uniform",
        metadata={
            "help": "Student -> teacher hidden-state pairs: 'uniform', 'last', JSON '{\"1\": 2}' or '1:2,2:4,3:6'."
        },
    )
    teacher_dtype: str | None = field(
        default=None, metadata={"help": "Run the teacher in this dtype: bf16, fp16 or fp32 (default: as loaded)."}
    )
    projection_lr: float | None = field(
        default=None, metadata={"help": "Learning rate of the width projections (default: learning_rate)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (*_WEIGHTS, "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}.")
            setattr(self, name, float(value))
        negative = {name: getattr(self, name) for name in _WEIGHTS if getattr(self, name) < 0}
        if negative:
            raise ValueError(f"Loss weights must be >= 0 (0 switches a term off), got {negative}.")
        if not any(getattr(self, name) > 0 for name in _WEIGHTS):
            raise ValueError(
                f"All loss weights are zero ({', '.join(_WEIGHTS)}), so there is nothing to train. Set at least one "
                "> 0, e.g. alpha_kl=1.0 for a classifier or alpha_cos=1.0 for a sentence-embedding model."
            )
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0, got {self.temperature}. 1.0 is the plain softmax; 2.0-4.0 softens the "
                "teacher's distribution (DistilBERT used 2.0)."
            )
        if self.teacher_dtype is not None and self.teacher_dtype not in TEACHER_DTYPES:
            raise ValueError(
                f"teacher_dtype must be one of {sorted(TEACHER_DTYPES)} or None, got {self.teacher_dtype!r}."
            )
        if self.projection_lr is not None and (isinstance(self.projection_lr, bool)
                                               or not isinstance(self.projection_lr, (int, float))):  # fmt: skip
            raise TypeError(f"projection_lr must be a number > 0 or None (learning_rate), got {self.projection_lr!r}.")
        if self.projection_lr is not None and not self.projection_lr > 0:
            raise ValueError(f"projection_lr must be > 0 (or None for learning_rate), got {self.projection_lr}.")
        self.layer_map = parse_layer_map(self.layer_map)

    @property
    def teacher_torch_dtype(self) -> torch.dtype | None:
        return TEACHER_DTYPES[self.teacher_dtype] if self.teacher_dtype is not None else None

    @property
    def needs_hidden_states(self) -> bool:
        return self.alpha_cos > 0 or self.alpha_mse > 0 or self.alpha_pooled > 0


def parse_layer_map(value: dict | str | list | None) -> dict[int, int] | str:
    """Normalise a layer map to a preset name or a ``{student: teacher}`` dict of non-negative ints.

    Accepts a dict (JSON turns its int keys into strings), a list of pairs, its JSON text or ``"s:t,s:t"``.
    """
    if value is None:
        return "uniform"
    if isinstance(value, str):
        text = value.strip()
        if text in LAYER_MAP_PRESETS:
            return text
        if text.startswith("{") or text.startswith("["):
            value = json.loads(text)
        elif ":" in text:
            value = [part.split(":") for part in text.split(",") if part.strip()]
        elif not text:
            value = {}
        else:
            raise ValueError(
                f"layer_map {value!r} is not understood. Use one of {LAYER_MAP_PRESETS}, a dict {{student: teacher}}, "
                "its JSON ('{\"1\": 2, \"2\": 4}') or 's:t' pairs ('1:2,2:4')."
            )
    pairs = value.items() if isinstance(value, dict) else value
    try:
        mapping = {int(s): int(t) for s, t in pairs}
    except (TypeError, ValueError) as err:
        raise ValueError(f"layer_map must pair integer hidden-state indices, got {value!r}.") from err
    if not mapping:
        raise ValueError(
            "layer_map is empty, so the cosine/MSE/attention terms have no layer pairs. Give at least one pair, e.g. "
            "{3: 6}, or use 'uniform' (the default) or 'last'."
        )
    negative = {s: t for s, t in mapping.items() if s < 0 or t < 0}
    if negative:
        raise ValueError(f"layer_map indices must be >= 0 (0 is the embedding output), got {negative}.")
    return mapping


def resolve_layer_map(layer_map: dict[int, int] | str, student_layers: int, teacher_layers: int) -> dict[int, int]:
    """The explicit ``{student hidden state: teacher hidden state}`` pairs for models of the given depths.

    Raises a `ValueError` naming the valid range when a pair points past either model's last layer.
    """
    if layer_map == "last":
        return {student_layers: teacher_layers}
    if layer_map == "uniform":
        return {k: round(k * teacher_layers / student_layers) for k in range(1, student_layers + 1)}
    bad = {s: t for s, t in layer_map.items() if s > student_layers or t > teacher_layers}
    if bad:
        raise ValueError(
            f"layer_map pairs {bad} are out of range: the student has hidden states 0..{student_layers} and the "
            f"teacher 0..{teacher_layers} (0 is the embedding output)."
        )
    return dict(sorted(layer_map.items()))
