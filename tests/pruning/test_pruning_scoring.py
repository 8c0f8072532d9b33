"""Importance scoring and ranked pruning: Michel gradients (task loss, LM loss, encoder proxy), magnitude, random."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from datasets import Dataset
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from hf_compress import apply_compression, get_recipe
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig, UnitGates, compute_importance, kept_heads
from hf_compress.pruning.hooks import removal_counts


def _token_batches(family="bert", n=3):
    return [tiny_inputs(family, batch=4, seq=9, seed=s) | {} for s in range(n)]


def test_gradient_scores_match_finite_differences_for_the_task_loss():
    """The gate gradient must equal d loss / d gate: check against a finite difference on one head."""
    model = tiny_model("bert", auto_class=AutoModelForSequenceClassification, num_labels=2).double()
    batch = tiny_inputs("bert", batch=1, seq=9) | {"labels": torch.tensor([1])}
    scores = compute_importance(model, "heads", "gradient", [batch], progress=False)
    # Un-normalise: per-layer L2 normalisation keeps ratios, so compare ratios inside layer 1.
    losses = []
    for eps in (1e-4, -1e-4):
        with UnitGates(model, "heads") as gates, torch.no_grad():
            gates.masks[1] = torch.tensor([1.0 + eps, 1.0, 1.0, 1.0], dtype=torch.float64)
            losses.append(model(**batch).loss.item())
    with UnitGates(model, "heads") as gates, torch.no_grad():
        gates.masks[1] = torch.tensor([1.0, 1.0 + 1e-4, 1.0, 1.0], dtype=torch.float64)
        plus = model(**batch).loss.item()
        gates.masks[1] = torch.tensor([1.0, 1.0 - 1e-4, 1.0, 1.0], dtype=torch.float64)
        minus = model(**batch).loss.item()
    grad0, grad1 = abs(losses[0] - losses[1]) / 2e-4, abs(plus - minus) / 2e-4
    assert scores[1][0] / scores[1][1] == pytest.approx(grad0 / grad1, rel=1e-3)
    assert all(torch.isclose(s.norm(), torch.tensor(1.0)) for s in scores)


def test_labels_from_a_dataset_drive_the_task_loss(minilm_tokenizer):
    model = tiny_model("bert", auto_class=AutoModelForSequenceClassification, num_labels=2, vocab_size=30522)
    texts = ["a package for math", "an editor for text", "a game with sound", "a mail client"] * 2
    with_labels = Dataset.from_dict({"text": texts, "label": [0, 1, 0, 1] * 2})
    flipped = Dataset.from_dict({"text": texts, "label": [1, 0, 1, 0] * 2})
    a = compute_importance(model, "heads", "gradient", with_labels, tokenizer=minilm_tokenizer, progress=False)
    b = compute_importance(model, "heads", "gradient", flipped, tokenizer=minilm_tokenizer, progress=False)
    assert not torch.allclose(torch.stack(a), torch.stack(b))  # the labels were really used


def test_causal_lm_uses_its_own_loss_and_encoder_uses_the_proxy():
    lm = tiny_model("gpt2", auto_class=AutoModelForCausalLM)
    scores = compute_importance(lm, "heads", "gradient", _token_batches("gpt2"), progress=False)
    assert all(s.shape == (4,) and (s > 0).all() for s in scores)
    encoder = tiny_model("bert")
    proxy = compute_importance(encoder, "ffn", "gradient", _token_batches(), progress=False)
    assert [s.shape for s in proxy] == [(64,), (64,)] and all((s > 0).all() for s in proxy)
    again = compute_importance(encoder, "ffn", "gradient", _token_batches(), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(proxy, again))  # seeded probes: deterministic


def test_proxy_ranks_a_dead_head_last():
    """A head whose output projection is zeroed changes nothing: the proxy must score it (near) zero."""
    model = tiny_model("bert")
    with torch.no_grad():
        model.encoder.layer[0].attention.output.dense.weight[:, 8:16] = 0  # head 1 of layer 0
    scores = compute_importance(model, "heads", "gradient", _token_batches(), progress=False)
    assert scores[0].argmin().item() == 1 and scores[0][1] < 1e-6


def test_scoring_leaves_the_model_as_it_was():
    model = tiny_model("bert").train()
    model.embeddings.word_embeddings.weight.requires_grad_(False)
    compute_importance(model, "heads", "gradient", _token_batches(), progress=False)
    assert model.training and not model.embeddings.word_embeddings.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_gradient_pruning_on_minilm_records_scores(minilm, debian_texts):
    apply_compression(minilm, HeadPruningConfig(fraction=1 / 3, max_samples=16), calibration_data=debian_texts)
    resolved = get_recipe(minilm).find("head_pruning")[0]
    assert resolved.importance == "gradient"
    assert sum(len(v) for v in resolved.heads_to_prune.values()) == 24  # 72 heads x 1/3
    assert len(resolved.head_importance) == 6 and len(resolved.head_importance[0]) == 12
    assert all(len(h) >= 1 for h in kept_heads(minilm))


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_data_free_methods(method):
    model = tiny_model("bert")
    with pytest.warns(UserWarning, match="magnitude") if method == "magnitude" else nullcontext():
        config = HeadPruningConfig(num_heads_to_prune=3, importance="auto" if method == "magnitude" else method)
        apply_compression(model, config)
    resolved = get_recipe(model).find("head_pruning")[0]
    assert resolved.importance == method and sum(map(len, resolved.heads_to_prune.values())) == 3


def test_per_layer_ranking_and_minimum():
    model = tiny_model("bert")
    apply_compression(model, HeadPruningConfig(fraction=0.5, ranking="per_layer", importance="random"))
    assert [len(h) for h in kept_heads(model)] == [2, 2]
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="only 6 can go"):
        apply_compression(model, HeadPruningConfig(num_heads_to_prune=7, min_heads_per_layer=1, importance="random"))


def test_gqa_ranked_pruning_keeps_groups_consistent():
    model = tiny_model("llama", num_hidden_layers=3)
    apply_compression(model, HeadPruningConfig(fraction=0.5, importance="magnitude"))
    for heads in kept_heads(model):
        groups = {}
        for h in heads:
            groups[h // 2] = groups.get(h // 2, 0) + 1
        assert len(set(groups.values())) <= 1
    assert sum(map(len, kept_heads(model))) <= 6  # at least half of 12 heads removed


def test_ffn_fraction_with_rounding():
    model = tiny_model("llama")
    apply_compression(model, FFNPruningConfig(fraction=0.5, round_to=8, ranking="per_layer", importance="magnitude"))
    sizes = get_recipe(model).find("ffn_pruning")[0].intermediate_sizes
    assert sizes == {0: 32, 1: 32}
    assert model.layers[0].mlp.gate_proj.out_features == 32 and model.layers[0].mlp.down_proj.in_features == 32


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    share=st.floats(0, 1),
    minimum=st.integers(0, 3),
    ranking=st.sampled_from(["global", "per_layer"]),
)
def test_removal_counts_properties(sizes, share, minimum, ranking):
    scores = [torch.rand(n, generator=torch.Generator().manual_seed(n)) for n in sizes]
    room = sum(max(n - minimum, 0) for n in sizes)
    target = int(share * room)
    counts = removal_counts(scores, target, ranking, minimum)
    assert sum(counts) == target
    assert all(0 <= c <= max(n - minimum, 0) for c, n in zip(counts, sizes))
