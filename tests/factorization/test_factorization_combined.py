"""Factorization combined with head pruning and 8/4-bit weight quantization (the factors quantized too)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from transformers import AutoModel, AutoModelForCausalLM

from hf_compress import apply_compression
from hf_compress.factorization import (
    EmbeddingFactorizationConfig,
    FactorizedEmbedding,
    LowRankLinear,
    LowRankLinearConfig,
)
from hf_compress.pruning import HeadPruningConfig
from hf_compress.utils import model_bytes


# Built in parallel by another engineer: skip (do not fail) while the package is not in the tree.
quantization = pytest.importorskip("hf_compress.quantization")
QuantEmbedding, QuantLinear = quantization.QuantEmbedding, quantization.QuantLinear
WeightQuantizationConfig = quantization.WeightQuantizationConfig


def _out(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


INT8, INT4 = dict(bits=8), dict(bits=4, group_size=16)
CASES = [
    pytest.param("bert", INT8, id="bert-int8"),
    pytest.param("bert", INT4, id="bert-int4"),
    pytest.param("llama", INT8, id="llama-int8"),
    pytest.param("llama", INT4, id="llama-int4"),
]


@pytest.mark.parametrize(("model_type", "quant"), CASES)
def test_pruned_factorized_quantized_reloads_identically(model_type, quant, tmp_path):
    model = tiny_model(model_type)
    inputs = tiny_inputs(model_type)
    fp32_bytes = model_bytes(model)
    apply_compression(
        model,
        HeadPruningConfig(fraction=0.5, ranking="per_layer", importance="magnitude"),
        EmbeddingFactorizationConfig(rank=16),
        LowRankLinearConfig(rank=16, target_modules=["intermediate.dense", "up_proj"]),
        WeightQuantizationConfig(**quant),
    )
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, FactorizedEmbedding)
    # The factors themselves are quantized: the big V x r table and both thin layers.
    assert isinstance(embedding.token_factor, QuantEmbedding) and isinstance(embedding.projection, QuantLinear)
    low_rank = [m for m in model.modules() if isinstance(m, LowRankLinear)]
    assert low_rank and all(isinstance(m.down, QuantLinear) and isinstance(m.up, QuantLinear) for m in low_rank)
    assert model_bytes(model) < 0.5 * fp32_bytes
    # `.weight` of a quantized factorized embedding still materialises (dequantized) instead of failing.
    assert embedding.weight.shape == (128, 32)
    expected = _out(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.get_input_embeddings().token_factor, QuantEmbedding)
    assert torch.equal(_out(reloaded, inputs), expected)


def test_tied_factorized_head_with_quantization_reloads(tmp_path):
    model = tiny_model("gpt2", AutoModelForCausalLM)
    inputs = tiny_inputs("gpt2")
    apply_compression(model, EmbeddingFactorizationConfig(rank=16), WeightQuantizationConfig(bits=8))
    expected = _out(model, inputs)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(_out(reloaded, inputs), expected)
