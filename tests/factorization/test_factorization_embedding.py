"""Factorized token embeddings on tiny models of every family: reload, tied heads, resize, `.weight`, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, tiny_inputs, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

from hf_compress import apply_compression, get_recipe
from hf_compress.factorization import EmbeddingFactorizationConfig, FactorizedEmbedding, FactorizedLMHead
from hf_compress.factorization.svd import rank_for_energy, weighted_row_svd


TEXT_FAMILIES = [f for f in FAMILIES if f != "vit"]
TIED = [
    ("gpt2", AutoModelForCausalLM, {}),
    ("llama", AutoModelForCausalLM, {"tie_word_embeddings": True}),
    ("qwen2", AutoModelForCausalLM, {"tie_word_embeddings": True}),
    ("bert", AutoModelForMaskedLM, {}),
]
TIED_IDS = [f"{f}-{c.__name__}" for f, c, _ in TIED]


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("model_type", TEXT_FAMILIES)
def test_factorize_and_reload_every_family(model_type, tmp_path):
    model = tiny_model(model_type)
    inputs = tiny_inputs(model_type)
    apply_compression(model, EmbeddingFactorizationConfig(rank=8))
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, FactorizedEmbedding)
    assert embedding.token_factor.weight.shape == (128, 8)
    expected = _out(model, inputs)
    model.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["techniques"]
    assert stored[0]["method"] == "embedding_factorization" and stored[0]["rank"] == 8
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.get_input_embeddings(), FactorizedEmbedding)
    assert torch.equal(_out(reloaded, inputs), expected)


def test_plain_svd_is_the_best_rank_r_table():
    model = tiny_model("bert")
    table = model.get_input_embeddings().weight.detach().clone()
    apply_compression(model, EmbeddingFactorizationConfig(rank=8))
    approx = model.get_input_embeddings().weight
    u, s, vh = torch.linalg.svd(table.double(), full_matrices=False)
    best = (u[:, :8] * s[:8]) @ vh[:8]
    # Eckart-Young: the truncated SVD is the optimum, and we must reach it.
    assert torch.allclose(approx.double(), best, atol=1e-5)
    assert get_recipe(model).techniques[0].init == "svd"


@pytest.mark.parametrize(("model_type", "auto_class", "overrides"), TIED, ids=TIED_IDS)
def test_tied_head_shares_factors_and_reloads(model_type, auto_class, overrides, tmp_path):
    model = tiny_model(model_type, auto_class, **overrides)
    inputs = tiny_inputs(model_type)
    apply_compression(model, EmbeddingFactorizationConfig(rank=8, center=True))
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(head, FactorizedLMHead)
    # One copy of the factors: the head owns at most the old output bias, and no stale tie names the old table.
    assert [n for n, _ in head.named_parameters()] in ([], ["bias"])
    assert not any("embed" in t or "wte" in t for t in model.all_tied_weights_keys)
    # The factorized head computes exactly hidden @ E'^T (+ bias) for the materialised table E'.
    hidden = torch.randn(3, embedding.embedding_dim)
    dense = hidden @ embedding.weight.t() + (head.bias if head.bias is not None else 0)
    assert torch.allclose(head(hidden), dense, atol=1e-5)
    expected = _out(model, inputs)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as handle:
        keys = list(handle.keys())
    assert sum(k.endswith("token_factor.weight") for k in keys) == 1
    assert not any(k.endswith(("lm_head.weight", "decoder.weight")) for k in keys)
    reloaded = auto_class.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.get_output_embeddings(), FactorizedLMHead)
    assert torch.equal(_out(reloaded, inputs), expected)
    reloaded.tie_weights()  # a user call recomputes the tied keys from the model: nothing stale may be tied
    assert torch.equal(_out(reloaded, inputs), expected)
    # Training through the head reaches the shared factor.
    reloaded(**inputs)[0].sum().backward()
    assert reloaded.get_input_embeddings().token_factor.weight.grad.abs().sum() > 0


def test_untied_head_is_left_dense(tmp_path):
    model = tiny_model("llama", AutoModelForCausalLM)  # tie_word_embeddings=False
    apply_compression(model, EmbeddingFactorizationConfig(rank=8))
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    model.save_pretrained(tmp_path)
    inputs = tiny_inputs("llama")
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(tmp_path), inputs), _out(model, inputs))


def test_weight_reads_are_materialised_and_writes_explain():
    model = tiny_model("gpt2", AutoModelForCausalLM)
    apply_compression(model, EmbeddingFactorizationConfig(rank=8))
    embedding = model.get_input_embeddings()
    weight = embedding.weight
    assert weight.shape == (128, 32)
    assert torch.allclose(weight, embedding(torch.arange(128)), atol=1e-6)
    assert model.get_output_embeddings().weight.shape == (128, 32)
    with pytest.raises(TypeError, match="token_factor.weight"):
        embedding.weight = torch.nn.Parameter(torch.zeros(128, 32))


@pytest.mark.parametrize("new_size", [133, 120])
@pytest.mark.parametrize(
    ("model_type", "auto_class"), [("gpt2", AutoModelForCausalLM), ("bert", AutoModelForMaskedLM)]
)
def test_resize_token_embeddings_tied(model_type, auto_class, new_size, tmp_path):
    model = tiny_model(model_type, auto_class)
    apply_compression(model, EmbeddingFactorizationConfig(rank=8))
    before = model.get_input_embeddings().weight[:120].clone()
    model.resize_token_embeddings(new_size)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding.num_embeddings == new_size == model.config.vocab_size
    assert head.out_features == new_size
    if head.bias is not None:  # BERT's MLM bias follows the vocabulary (padded by transformers' tie_weights)
        assert head.bias.shape == (new_size,)
    assert torch.allclose(embedding.weight[:120], before)
    inputs = {"input_ids": torch.randint(0, new_size, (2, 5))}
    logits = _out(model, inputs)
    assert logits.shape[-1] == new_size
    model.save_pretrained(tmp_path)
    assert torch.equal(_out(auto_class.from_pretrained(tmp_path), inputs), logits)


def test_resize_untied_head_and_padding():
    model = tiny_model("llama", AutoModelForCausalLM)
    apply_compression(model, EmbeddingFactorizationConfig(rank=8))
    model.resize_token_embeddings(130, pad_to_multiple_of=16)
    assert model.get_input_embeddings().num_embeddings == 144
    assert model.get_output_embeddings().weight.shape == (144, 32)
    assert _out(model, {"input_ids": torch.tensor([[143, 5]])}).shape == (1, 2, 144)


def test_generate_with_factorized_tied_head():
    model = tiny_model("gpt2", AutoModelForCausalLM)
    apply_compression(model, EmbeddingFactorizationConfig(rank=8))
    out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 7)


def test_frequency_weighting_favours_seen_tokens():
    model = tiny_model("bert")
    table = model.get_input_embeddings().weight.detach().clone()
    frequent = torch.arange(10, 14)  # as many seen tokens as the rank: without smoothing they fit exactly
    batches = [{"input_ids": frequent.repeat(4, 3)}]
    weighted = tiny_model("bert")
    apply_compression(model, EmbeddingFactorizationConfig(rank=4, init="svd"))
    apply_compression(
        weighted, EmbeddingFactorizationConfig(rank=4, init="frequency", smoothing=0.0), calibration_data=batches
    )
    assert get_recipe(weighted).techniques[0].init == "frequency"
    plain_error = (model.get_input_embeddings().weight[frequent] - table[frequent]).norm()
    weighted_error = (weighted.get_input_embeddings().weight[frequent] - table[frequent]).norm()
    assert weighted_error < 1e-4 * plain_error


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "positive integer"),
        ({}, "exactly one of"),
        ({"rank": 8, "energy": 0.9}, "exactly one of"),
        ({"energy": 1.5}, r"in \(0, 1\]"),
        ({"param_budget": 1.5}, "fraction"),
        ({"rank": 8, "init": "kmeans"}, "init must be one of"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EmbeddingFactorizationConfig(**kwargs)


@pytest.mark.parametrize("rank", [26, 32, 100])
def test_rank_that_saves_nothing_is_refused(rank):
    model = tiny_model("bert")  # 128 x 32: a rank >= 26 holds at least as many parameters as the table
    with pytest.raises(ValueError, match="at most 25"):
        apply_compression(model, EmbeddingFactorizationConfig(rank=rank))
    assert type(model.get_input_embeddings()) is torch.nn.Embedding


def test_vision_model_is_refused():
    with pytest.raises(ValueError, match="no input token embedding"):
        apply_compression(tiny_model("vit"), EmbeddingFactorizationConfig(rank=8))


def test_frequency_init_without_data_is_refused():
    with pytest.raises(ValueError, match="calibration"):
        apply_compression(tiny_model("bert"), EmbeddingFactorizationConfig(rank=8, init="frequency"))


def test_budget_and_energy_resolve_to_a_rank():
    model = tiny_model("bert")
    apply_compression(model, EmbeddingFactorizationConfig(param_budget=0.25))
    resolved = get_recipe(model).techniques[0]
    assert resolved.rank * (128 + 32) <= 0.25 * 128 * 32 < (resolved.rank + 1) * (128 + 32)
    model = tiny_model("bert")
    apply_compression(model, EmbeddingFactorizationConfig(energy=0.5))
    assert 1 <= get_recipe(model).techniques[0].rank < 25


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.01, 100.0), min_size=2, max_size=20), st.floats(0.05, 1.0))
def test_rank_for_energy_is_the_smallest_rank(values, energy):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    rank = rank_for_energy(s, energy)
    kept = s.pow(2).cumsum(0) / s.pow(2).sum()
    assert kept[rank - 1] >= energy - 1e-9
    assert rank == 1 or kept[rank - 2] < energy


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_weighted_svd_projects_every_row_optimally(seed, rank):
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(20, 8, generator=generator, dtype=torch.float64)
    weights = torch.rand(20, generator=generator, dtype=torch.float64) + 0.1
    _, basis, _, _ = weighted_row_svd(matrix, weights, center=False)
    basis = basis[:, :rank]
    ours = (weights[:, None] * (matrix - matrix @ basis @ basis.t()).pow(2)).sum()
    # The optimum of the weighted problem is the truncated SVD of diag(sqrt(w)) M, rescaled row by row.
    u, s, vh = torch.linalg.svd(weights.sqrt()[:, None] * matrix, full_matrices=False)
    optimum = s[rank:].pow(2).sum()
    assert torch.isclose(ours, optimum, rtol=1e-6, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6))
def test_metric_weighted_svd_is_optimal_in_its_metric(seed, rank):
    generator = torch.Generator().manual_seed(seed)
    matrix = torch.randn(20, 8, generator=generator, dtype=torch.float64)
    weights = torch.rand(20, generator=generator, dtype=torch.float64) + 0.1
    factor = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    metric = factor @ factor.t() + 0.1 * torch.eye(8, dtype=torch.float64)
    _, analysis, synthesis, _ = weighted_row_svd(matrix, weights, center=False, metric=metric, damping=0.0)
    error = matrix - matrix @ analysis[:, :rank] @ synthesis[:rank]
    ours = (weights[:, None] * (error @ metric * error)).sum()
    values, vectors = torch.linalg.eigh(metric)
    root = (vectors * values.sqrt()) @ vectors.t()
    s = torch.linalg.svdvals(weights.sqrt()[:, None] * matrix @ root)
    assert torch.isclose(ours, s[rank:].pow(2).sum(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(("model_type", "auto_class"), [("bert", AutoModel), ("gpt2", AutoModelForCausalLM)])
def test_sensitivity_init_is_the_default_with_data(model_type, auto_class, tmp_path):
    model = tiny_model(model_type, auto_class)
    inputs = tiny_inputs(model_type)
    batches = [
        {"input_ids": torch.randint(0, 128, (4, 12), generator=torch.Generator().manual_seed(i))} for i in range(3)
    ]
    apply_compression(model, EmbeddingFactorizationConfig(rank=8), calibration_data=batches)
    assert get_recipe(model).techniques[0].init == "sensitivity"
    assert all(p.grad is None for p in model.parameters()), "the sensitivity pass must not leave parameter gradients"
    expected = _out(model, inputs)
    model.save_pretrained(tmp_path)
    assert torch.equal(_out(auto_class.from_pretrained(tmp_path), inputs), expected)


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="torch is not built with MKL on this machine")
def test_reload_is_exact_where_blas_results_depend_on_alignment():
    """transformers loads weights at unaligned addresses, and MKL's SSE4.2 kernels (the code path of some CPUs) sum
    in an alignment-dependent order: the factors are realigned after loading, so reloads stay bit-exact there too."""
    import os
    import subprocess
    import sys

    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "tied_head or every_family"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"})  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
