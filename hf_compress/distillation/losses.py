"""The terms of the distillation loss, as plain functions of student and teacher tensors.

Each returns a scalar float32 tensor averaged over the *real* positions only (``attention_mask``), so padding never
pulls the student towards the teacher's states at pad tokens. Teacher tensors are treated as constants.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


__all__ = [
    "soft_target_loss",
    "hidden_cosine_loss",
    "hidden_mse_loss",
    "attention_kl_loss",
    "pooled_cosine_loss",
    "mean_pool",
    "HiddenProjections",
]


def _select(tensor: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Rows of a ``[batch, seq, dim]`` tensor at real tokens, as ``[n, dim]``; ``[batch, dim]`` passes through."""
    if tensor.dim() == 2:
        return tensor
    if mask is None or mask.shape != tensor.shape[:2]:
        return tensor.reshape(-1, tensor.shape[-1])
    return tensor[mask.bool()]


def soft_target_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) between the softened output distributions, times ``temperature**2``.

    Works for sequence classification (``[batch, labels]``) and token-level heads such as masked or causal LM
    (``[batch, seq, vocab]``, averaged over real tokens). The ``T**2`` factor keeps the gradient scale independent of
    the temperature (Hinton et al., 2015), so the weight of this term means the same at every ``T``.
    """
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            f"The soft-target loss compares output distributions, but the student has {student_logits.shape[-1]} "
            f"outputs and the teacher {teacher_logits.shape[-1]}. Use a student with the teacher's vocabulary / "
            "labels, or set alpha_kl=0 and distil on hidden states only."
        )
    student = _select(student_logits.float(), attention_mask) / temperature
    teacher = _select(teacher_logits.float(), attention_mask) / temperature
    kl = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def hidden_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``1 - cos`` between student and teacher hidden vectors at real tokens (DistilBERT's cosine loss)."""
    student = _select(student_hidden.float(), attention_mask)
    teacher = _select(teacher_hidden.float(), attention_mask)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def hidden_mse_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared error between hidden vectors at real tokens (TinyBERT's hidden-state loss)."""
    return F.mse_loss(_select(student_hidden.float(), attention_mask), _select(teacher_hidden.float(), attention_mask))


def attention_kl_loss(
    student_attn: torch.Tensor, teacher_attn: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(teacher || student) between attention distributions ``[batch, heads, query, key]``, per real query row.

    When the head counts differ (a head-pruned student, or a teacher with more heads) both maps are averaged over
    heads first: the head-mean of softmax rows is still a distribution, and it is what the layer mixes on average.
    """
    student, teacher = student_attn.float(), teacher_attn.float()
    if student.shape[1] != teacher.shape[1]:
        student, teacher = student.mean(1, keepdim=True), teacher.mean(1, keepdim=True)
    if student.shape[-1] != teacher.shape[-1]:
        raise ValueError(f"Attention maps cover {student.shape[-1]} and {teacher.shape[-1]} keys; inputs differ?")
    eps = torch.finfo(torch.float32).tiny
    # Sum over keys; positions the teacher gives 0 weight (masked keys, future tokens) contribute nothing.
    kl = (teacher * (torch.log(teacher + eps) - torch.log(student + eps))).sum(-1)  # [batch, heads, query]
    if attention_mask is not None and attention_mask.shape == kl.shape[::2]:
        weights = attention_mask[:, None, :].to(kl.dtype).expand_as(kl)
        return (kl * weights).sum() / weights.sum().clamp(min=1)
    return kl.mean()


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of the hidden states over real tokens: the sentence embedding sentence-transformers computes."""
    if attention_mask is None:
        return hidden.float().mean(1)
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)


def pooled_cosine_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over sentences of ``1 - cos`` between mean-pooled student and teacher embeddings."""
    student, teacher = mean_pool(student_hidden, attention_mask), mean_pool(teacher_hidden, attention_mask)
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


class HiddenProjections(nn.Module):
    """Learned linear maps from the student's hidden width to the teacher's, one per mapped student state.

    Only created when the widths differ. They belong to the training run, not to the student: the trainer keeps
    them outside the model (so `save_pretrained` of the student never contains them) and saves them with the
    optimizer state in each checkpoint.
    """

    def __init__(self, student_layers: list[int], student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.maps = nn.ModuleDict({str(i): nn.Linear(student_dim, teacher_dim, bias=False) for i in student_layers})
        for linear in self.maps.values():
            # Start from a scaled identity-like map (orthogonal rows) so early steps compare meaningful directions.
            nn.init.orthogonal_(linear.weight)

    def forward(self, student_index: int, hidden: torch.Tensor) -> torch.Tensor:
        return self.maps[str(student_index)](hidden.to(self.maps[str(student_index)].weight.dtype))
