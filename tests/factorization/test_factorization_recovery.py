"""Recovery distillation of factorized models (`hf_compress.pipeline.recovery.recover`) and the balanced factor init."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import pooled_embeddings, tiny_model

from hf_compress import apply_compression
from hf_compress.data import load_debian
from hf_compress.factorization import EmbeddingFactorizationConfig, FactorizedEmbedding
from hf_compress.factorization.svd import weighted_row_svd
from hf_compress.pipeline.recovery import recover, trainable_parameters
from hf_compress.pruning import HeadPruningConfig


def _cosine(model, teacher, tokenizer, texts) -> float:
    pooled = pooled_embeddings(model, tokenizer, texts, max_length=48)
    reference = pooled_embeddings(teacher, tokenizer, texts, max_length=48)
    return float(torch.nn.functional.cosine_similarity(pooled, reference).mean())


def test_recovery_of_factors_brings_the_student_closer_and_leaves_the_rest_untouched(minilm, minilm_tokenizer):
    teacher = minilm
    student = apply_compression(_copy(teacher), EmbeddingFactorizationConfig(rank=48, init="svd"))
    train = [row["text"] for row in load_debian("train", per_section=4)]
    held_out = [row["text"] for row in load_debian("test", per_section=2)]
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if "word_embeddings" not in n}
    before = _cosine(student, teacher, minilm_tokenizer, held_out)
    recover(student, teacher, train, tokenizer=minilm_tokenizer, max_steps=12, batch_size=8, max_length=48)
    after = _cosine(student, teacher, minilm_tokenizer, held_out)
    assert after > before + 0.01, f"recovery moved the held-out cosine from {before:.4f} to {after:.4f}"
    # train="auto" on a factorization-only recipe: only the two factors learned, everything else is bit-identical.
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)
    assert all(p.requires_grad for p in student.parameters())  # trainability restored afterwards
    assert not student.training
    assert all(m.p > 0 for m in student.modules() if isinstance(m, torch.nn.Dropout))  # dropout restored


def _copy(model):
    import copy

    return copy.deepcopy(model)


def test_trainable_parameters_choices(minilm):
    factorized = apply_compression(_copy(minilm), EmbeddingFactorizationConfig(rank=16, init="svd"))
    names = [n for n, _ in trainable_parameters(factorized, "auto")]
    assert names == ["embeddings.word_embeddings.token_factor.weight", "embeddings.word_embeddings.projection.weight"]
    assert len(trainable_parameters(factorized, "all")) == len(list(factorized.parameters()))
    pruned = apply_compression(
        _copy(minilm), HeadPruningConfig(heads_to_prune={0: [0]}), EmbeddingFactorizationConfig(rank=16, init="svd")
    )
    assert len(trainable_parameters(pruned, "auto")) == len(list(pruned.parameters()))  # pruning: all compensate
    assert len(trainable_parameters(pruned, "factors")) == 2
    with pytest.raises(ValueError, match="has none"):
        trainable_parameters(minilm, "factors")
    with pytest.raises(ValueError, match="train must be one of"):
        trainable_parameters(factorized, "embeddings")


def test_recover_rejects_bad_budgets(minilm, minilm_tokenizer):
    student = apply_compression(_copy(minilm), EmbeddingFactorizationConfig(rank=16, init="svd"))
    with pytest.raises(ValueError, match="max_steps must be > 0"):
        recover(student, minilm, ["a text"], tokenizer=minilm_tokenizer, max_steps=0)
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        recover(student, minilm, ["a text"], tokenizer=minilm_tokenizer, max_seconds=-1.0)
    with pytest.raises(ValueError, match="warmup"):
        recover(student, minilm, ["a text"], tokenizer=minilm_tokenizer, warmup=1.0)
    with pytest.raises(ValueError, match="calibration texts"):
        recover(student, minilm, None, tokenizer=minilm_tokenizer)


def test_recover_stops_on_its_wall_clock_budget(minilm, minilm_tokenizer):
    student = apply_compression(_copy(minilm), EmbeddingFactorizationConfig(rank=16, init="svd"))
    texts = [row["text"] for row in load_debian("train", per_section=2)]
    start = time.perf_counter()
    recover(student, minilm, texts, tokenizer=minilm_tokenizer, max_seconds=1.5, batch_size=2, max_length=16)
    # 10**9 steps without the budget; with it, the run ends a step or two after 1.5 s (plus Trainer set-up).
    assert time.perf_counter() - start < 30


def test_data_aware_factors_are_balanced():
    """The token factor gets the table's scale (sane Adam steps); the product stays the weighted-SVD optimum."""
    model = tiny_model("bert")
    table = model.get_input_embeddings().weight.detach().clone()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    calibration = [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}]
    apply_compression(model, EmbeddingFactorizationConfig(rank=8, init="frequency"), calibration_data=calibration)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, FactorizedEmbedding)
    tokens = embedding.token_factor.weight
    assert torch.allclose(tokens.pow(2).mean().sqrt(), table.pow(2).mean().sqrt(), rtol=1e-4)
    weights = torch.bincount(ids.reshape(-1), minlength=128).double() + 1.0  # smoothing=1 (the default)
    _, analysis, synthesis, _ = weighted_row_svd(table, weights, center=False)
    optimum = table.double() @ analysis[:, :8] @ synthesis[:8]
    assert torch.allclose(embedding.weight.double(), optimum, atol=1e-5)


def test_recovery_that_makes_things_worse_is_undone(minilm, minilm_tokenizer):
    teacher = minilm
    student = apply_compression(_copy(teacher), EmbeddingFactorizationConfig(rank=48, init="svd"))
    texts = [row["text"] for row in load_debian("train", per_section=3)]
    factors = {n: p.detach().clone() for n, p in student.named_parameters() if "word_embeddings" in n}
    # An absurd learning rate wrecks the factors; the held-out check must notice and put them back.
    with pytest.warns(UserWarning, match="put back as they were"):
        recover(student, teacher, texts, tokenizer=minilm_tokenizer, max_steps=3, batch_size=8, max_length=32,
                learning_rate=5.0)  # fmt: skip
    assert all(torch.equal(p, factors[n]) for n, p in student.named_parameters() if n in factors)
    # Without the check, the damage stays.
    recover(student, teacher, texts, tokenizer=minilm_tokenizer, max_steps=3, batch_size=8, max_length=32,
            learning_rate=5.0, keep_better=False)  # fmt: skip
    assert not all(torch.equal(p, factors[n]) for n, p in student.named_parameters() if n in factors)
