"""Low-rank linear layers on tiny models of every family: reload, data-aware cut, budgets, skips and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, tiny_inputs, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModel, AutoModelForCausalLM

from hf_compress import apply_compression, get_recipe
from hf_compress.factorization import EmbeddingFactorizationConfig, LowRankLinear, LowRankLinearConfig
from hf_compress.factorization.svd import whitened_svd
from hf_compress.utils import count_parameters


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_ffn_factorized_and_reloaded_every_family(model_type, tmp_path):
    model = tiny_model(model_type)
    inputs = tiny_inputs(model_type)
    before = count_parameters(model)
    apply_compression(model, LowRankLinearConfig(rank=4))
    ranks = get_recipe(model).techniques[0].ranks
    layers = 2 * (3 if model_type in ("llama", "mistral", "qwen2") else 2)
    assert len(ranks) == layers and set(ranks.values()) == {4}
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == layers
    assert count_parameters(model) < before
    expected = _out(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, LowRankLinear) for m in reloaded.modules()) == layers
    assert torch.equal(_out(reloaded, inputs), expected)


def test_names_survive_another_auto_class(tmp_path):
    model = tiny_model("gpt2", AutoModelForCausalLM)
    inputs = tiny_inputs("gpt2")
    apply_compression(model, LowRankLinearConfig(rank=4, target_modules=["c_fc", "c_attn"]))
    assert all(not name.startswith("transformer.") for name in get_recipe(model).techniques[0].ranks)
    model.save_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path).eval()
    assert torch.equal(_out(base, inputs), _out(model.transformer, inputs))


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_cut_is_exact_on_low_rank_weights(model_type):
    model = tiny_model(model_type)
    inputs = tiny_inputs(model_type)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # make every FFN weight exactly rank 4 (Conv1D stores it transposed: same rank)
        for name, module in model.named_modules():
            if name.endswith(("mlp.c_fc", "mlp.c_proj", "intermediate.dense", "output.dense")):
                rows, cols = module.weight.shape
                left, right = torch.randn(rows, 4, generator=generator), torch.randn(4, cols, generator=generator)
                module.weight.copy_(left @ right / 4)
    expected = _out(model, inputs)
    apply_compression(model, LowRankLinearConfig(rank=4))
    assert torch.allclose(_out(model, inputs), expected, atol=1e-4)


def test_activation_whitening_beats_plain_svd_on_real_inputs():
    calibration = [
        {"input_ids": torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(i))} for i in range(4)
    ]
    inputs = {"input_ids": torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(99))}
    reference = _out(tiny_model("bert"), inputs)
    errors = {}
    for whiten in ("none", "activation"):
        model = tiny_model("bert")
        apply_compression(model, LowRankLinearConfig(rank=6, whiten=whiten), calibration_data=calibration)
        errors[whiten] = (_out(model, inputs) - reference).pow(2).mean()
    assert errors["activation"] < errors["none"]


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 7))
def test_whitened_cut_minimises_error_on_the_inputs(seed, rank):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    x = torch.randn(200, 8, generator=generator, dtype=torch.float64) * torch.linspace(0.1, 3, 8, dtype=torch.float64)
    u, s, vh, inverse = whitened_svd(weight, x.t() @ x / 200, damping=0.0)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank] @ inverse
    plain_u, plain_s, plain_vh, _ = whitened_svd(weight)
    plain = (plain_u[:, :rank] * plain_s[:rank]) @ plain_vh[:rank]
    error = ((weight - approx) @ x.t()).pow(2).sum()
    assert torch.isclose(error, 200 * s[rank:].pow(2).sum(), rtol=1e-6)  # the whitened spectrum is the error
    assert error <= ((weight - plain) @ x.t()).pow(2).sum() * (1 + 1e-9)


def test_energy_and_budget():
    model = tiny_model("bert")
    apply_compression(model, LowRankLinearConfig(energy=0.5, min_saving=0.0))
    ranks = get_recipe(model).techniques[0].ranks
    assert all(1 <= r < 32 for r in ranks.values())
    model = tiny_model("bert")
    apply_compression(model, LowRankLinearConfig(param_budget=0.4, min_saving=0.0))
    ranks = get_recipe(model).techniques[0].ranks
    assert sum(r * (32 + 64) for r in ranks.values()) <= 0.4 * len(ranks) * 32 * 64


def test_layers_that_save_too_little_are_skipped_with_a_warning():
    model = tiny_model("bert")
    with pytest.warns(UserWarning, match="Left 2 layer"):
        # rank 14 saves 34% of the 64 x 32 FFN input layers (kept) but only 12.5% of the 32 x 32 queries (skipped).
        apply_compression(model, LowRankLinearConfig(rank=14, target_modules=["intermediate.dense", "query"]))
    assert set(get_recipe(model).techniques[0].ranks) == {
        "encoder.layer.0.intermediate.dense",
        "encoder.layer.1.intermediate.dense",
    }


def test_nothing_saved_is_an_error():
    with pytest.raises(ValueError, match="No layer was factorized.*at most"):
        apply_compression(tiny_model("bert"), LowRankLinearConfig(rank=30))


def test_target_typo_is_an_error():
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_compression(tiny_model("bert"), LowRankLinearConfig(rank=4, target_modules=["intermediat"]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rank": 0}, "positive integer"), ({}, "exactly one of"), ({"param_budget": 3}, "fraction"),
     ({"rank": 4, "whiten": "yes"}, "whiten"), ({"ranks": {"a": 0}}, "positive integers")],
)  # fmt: skip
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LowRankLinearConfig(**kwargs)


def test_combined_with_embedding_factorization(tmp_path):
    model = tiny_model("llama", AutoModelForCausalLM, tie_word_embeddings=True)
    inputs = tiny_inputs("llama")
    apply_compression(model, EmbeddingFactorizationConfig(rank=8), LowRankLinearConfig(rank=8))
    expected = _out(model, inputs)
    model.save_pretrained(tmp_path)
    assert torch.equal(_out(AutoModelForCausalLM.from_pretrained(tmp_path), inputs), expected)
