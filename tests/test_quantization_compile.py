"""Quantized models compile as one graph with `torch.compile(model, fullgraph=True)` and give the eager results.

Whole-model compilation is how the fastest dynamic-int8 figures are reached (inductor fuses the activation
quantization, the int32 epilogue, GELU, LayerNorm and residual adds), so a graph break in `QuantLinear` /
`QuantEmbedding` would silently cost that speed: `fullgraph=True` turns any break into an error here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

import hf_compress
from hf_compress.quantization import WeightQuantizationConfig


VARIANTS = [
    pytest.param(dict(bits=8, activations="int8_dynamic"), id="int8-dynamic"),
    pytest.param(dict(bits=8), id="int8"),
    pytest.param(dict(bits=4, group_size=32, symmetric=False), id="int4-g32"),
]


def _quantized(base: torch.nn.Module, **kwargs) -> torch.nn.Module:
    model = copy.deepcopy(base)
    hf_compress.apply_compression(model, WeightQuantizationConfig(algorithm="rtn", **kwargs))
    return model.eval()


# Wider than the default tiny models so the 4-bit groups of 32 split rows, and a 500-token vocabulary whose LM head
# (500 % 16 != 0) the CPU int4 kernel refuses: the fallback must trace too.
_SHAPE = dict(hidden_size=64, intermediate_size=128, vocab_size=500)


@pytest.fixture(scope="module")
def tiny_bert():
    return tiny_model("bert", **_SHAPE)


@pytest.fixture(scope="module")
def tiny_llama():
    return tiny_model("llama", AutoModelForCausalLM, **_SHAPE)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_encoder_compiles_in_one_graph(tiny_bert, kwargs):
    model = _quantized(tiny_bert, **kwargs)
    compiled = torch.compile(model, fullgraph=True)
    # 64 rows take the dense / int8 x int8 path, 8 rows the packed few-row kernels.
    for shape in ((4, 16), (1, 8)):
        ids = torch.randint(0, 500, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            eager = model(input_ids=ids).last_hidden_state
            fused = compiled(input_ids=ids).last_hidden_state
        torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)
        assert not torch.equal(eager, torch.zeros_like(eager))


@pytest.mark.parametrize("kwargs", VARIANTS[1:])
def test_decoder_decoding_step_compiles_in_one_graph(tiny_llama, kwargs):
    """One-token decoding steps run the packed int8 / int4 kernels; they must trace too."""
    model = _quantized(tiny_llama, **kwargs)
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 500, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for _ in range(2):  # the second call runs on whatever the first one cached (kernel layouts)
            eager = model(input_ids=ids, use_cache=False).logits
            fused = compiled(input_ids=ids, use_cache=False).logits
            torch.testing.assert_close(fused, eager, atol=2e-3, rtol=2e-3)
