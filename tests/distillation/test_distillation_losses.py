"""The loss terms: exact values on hand-made tensors, masking, temperature scaling, head averaging."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_compress.distillation import (
    attention_kl_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    mean_pool,
    pooled_cosine_loss,
    soft_target_loss,
)


def test_soft_target_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(4, 5)
    assert soft_target_loss(logits, logits, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_target_loss(torch.zeros(4, 5), logits, 2.0).item() > 0


def test_soft_target_matches_the_definition():
    student, teacher, temperature = torch.randn(3, 7), torch.randn(3, 7), 3.0
    p = torch.softmax(teacher / temperature, -1)
    q = torch.softmax(student / temperature, -1)
    expected = (p * (p.log() - q.log())).sum(-1).mean() * temperature**2
    assert soft_target_loss(student, teacher, temperature).item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_target_ignores_padding_positions():
    student, teacher = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    changed = student.clone()
    changed[mask == 0] = 100.0  # garbage at pad positions must not matter
    assert soft_target_loss(changed, teacher, 2.0, mask).item() == pytest.approx(
        soft_target_loss(student, teacher, 2.0, mask).item(), rel=1e-6
    )


def test_soft_target_vocab_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="student has 5 outputs and the teacher 6"):
        soft_target_loss(torch.randn(2, 5), torch.randn(2, 6), 1.0)


@settings(max_examples=25, deadline=None)
@given(st.floats(0.5, 8.0))
def test_temperature_squared_scaling_keeps_gradients_comparable(temperature):
    # For large T the scaled KL tends to the logit-matching MSE / (2 * classes): it must stay finite and bounded.
    torch.manual_seed(0)
    student, teacher = torch.randn(8, 6), torch.randn(8, 6)
    value = soft_target_loss(student, teacher, temperature).item()
    assert math.isfinite(value) and 0 <= value < 50


def test_hidden_cosine_and_mse():
    hidden = torch.randn(2, 5, 8)
    assert hidden_cosine_loss(hidden, hidden).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_cosine_loss(hidden, -hidden).item() == pytest.approx(2.0, abs=1e-6)
    assert hidden_cosine_loss(3 * hidden, hidden).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert hidden_mse_loss(hidden + 1, hidden).item() == pytest.approx(1.0, rel=1e-6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    other = hidden.clone()
    other[mask == 0] = -hidden[mask == 0]
    assert hidden_cosine_loss(other, hidden, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_same_heads_and_head_averaging():
    teacher = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    assert attention_kl_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    student = torch.softmax(torch.randn(2, 4, 6, 6), -1)
    assert attention_kl_loss(student, teacher).item() > 0
    # A student with 2 heads whose mean equals the teacher's 4-head mean has nothing left to learn.
    mean = teacher.mean(1, keepdim=True)
    pruned = mean.expand(2, 2, 6, 6)
    assert attention_kl_loss(pruned, teacher).item() == pytest.approx(0.0, abs=1e-6)


def test_attention_kl_ignores_padded_queries():
    teacher = torch.softmax(torch.randn(1, 2, 4, 4), -1)
    student = teacher.clone()
    student[:, :, 3] = torch.softmax(torch.randn(2, 4), -1)  # differs only at the padded query row
    mask = torch.tensor([[1, 1, 1, 0]])
    assert attention_kl_loss(student, teacher, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert attention_kl_loss(student, teacher).item() > 0


def test_mean_pool_and_pooled_cosine():
    hidden = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(mean_pool(hidden, mask), hidden[:, :2].mean(1))
    assert pooled_cosine_loss(hidden, hidden * 2, mask).item() == pytest.approx(0.0, abs=1e-6)
