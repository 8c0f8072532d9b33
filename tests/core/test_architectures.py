"""Architecture adapters: every supported family's paths resolve on a real (tiny) model."""

from __future__ import annotations

import pytest
from conftest import tiny_model
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.pytorch_utils import Conv1D

from hf_compress.architectures import (
    ADAPTERS,
    UnsupportedArchitectureError,
    get_adapter,
    head_dim,
    num_heads,
    num_kv_heads,
)


def test_every_family_resolves(family):
    model = tiny_model(family)
    adapter = get_adapter(model)
    layers = adapter.layer_modules(model)
    assert len(layers) == 2
    heads, kv_heads, dim = num_heads(model), num_kv_heads(model), head_dim(model)
    assert heads == 4 and dim == 8
    assert kv_heads == (2 if family in ("llama", "mistral", "qwen2") else 4)
    for layer in layers:
        for path in (*adapter.attention_projections(), *adapter.ffn_projections(), adapter.attention):
            assert isinstance(adapter.sub(layer, path), nn.Module), path
        if adapter.fused_qkv:
            fused = adapter.sub(layer, adapter.fused_qkv)
            assert isinstance(fused, Conv1D) and fused.weight.shape[1] == 3 * heads * dim
        else:
            assert adapter.sub(layer, adapter.query).out_features == heads * dim
            assert adapter.sub(layer, adapter.key).out_features == kv_heads * dim
    if adapter.embeddings is None:
        with pytest.raises(ValueError, match="no input token embedding"):
            adapter.input_embeddings(model)
    else:
        assert adapter.input_embeddings(model) is model.get_input_embeddings()


@pytest.mark.parametrize(
    ("family", "auto_class"),
    [("bert", AutoModelForSequenceClassification), ("gpt2", AutoModelForCausalLM), ("llama", AutoModelForCausalLM)],
)
def test_head_classes_share_the_adapter(family, auto_class):
    model = tiny_model(family, auto_class)
    adapter = get_adapter(model)
    assert len(adapter.layer_modules(model)) == 2
    prefix = adapter.layer_prefix(model, 1)
    assert model.get_submodule(prefix) is adapter.layer_modules(model)[1]
    assert prefix.split(".")[0] == model.base_model_prefix


def test_unsupported_family_names_the_supported_ones():
    model = AutoModel.from_config(AutoConfig.for_model("t5", d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                                       d_kv=8, vocab_size=64))  # fmt: skip
    with pytest.raises(UnsupportedArchitectureError, match=r"model_type 't5'.*Supported families.*bert.*ADAPTERS"):
        get_adapter(model)
    assert "gpt2" in ADAPTERS and "qwen2" in ADAPTERS
