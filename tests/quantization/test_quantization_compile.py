"""Quantized models compile as one graph with `torch.compile(model, fullgraph=True)` and give the eager results.

Whole-model compilation is how the fastest dynamic-int8 figures are reached (inductor fuses the activation
quantization, the int32 epilogue, GELU, LayerNorm and residual adds), so a graph break in `QuantLinear` /
`QuantEmbedding` would silently cost that speed: `fullgraph=True` turns any break into an error here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import COMPUTE_DTYPES, assert_same_model_outputs, tiny_model
from transformers import AutoModelForCausalLM

import hf_compress
from hf_compress.quantization import WeightQuantizationConfig
from hf_compress.quantization.kernels import SMALL_M


VARIANTS = [
    pytest.param(dict(bits=8, activations="int8_dynamic"), id="int8-dynamic"),
    pytest.param(dict(bits=8), id="int8"),
    pytest.param(dict(bits=4, group_size=32, symmetric=False), id="int4-g32"),
]


def _quantized(base: torch.nn.Module, **kwargs) -> torch.nn.Module:
    model = copy.deepcopy(base)
    hf_compress.apply_compression(model, WeightQuantizationConfig(algorithm="rtn", **kwargs))
    return model.eval()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    # Every test compiles the same transformers forward functions again: without a reset their compiled variants
    # pile up across tests and reach dynamo's recompile limit (8), which fullgraph=True turns into an error.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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
def test_encoder_compiles_in_one_graph(tiny_bert, kwargs, machine_compute_dtype):
    model = _quantized(tiny_bert, **kwargs)
    compiled = torch.compile(model, fullgraph=True)
    # 64 rows take the dense / int8 x int8 path, 8 rows the packed few-row kernels.
    for shape in ((4, 16), (1, 8)):
        ids = torch.randint(0, 500, shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.inference_mode():
            eager = model(input_ids=ids).last_hidden_state
            fused = compiled(input_ids=ids).last_hidden_state
        assert eager.dtype == machine_compute_dtype
        # Few rows run the packed kernels on bf16 activations whatever the compute dtype (and never in a compiled
        # int8 graph): there the two paths agree to bf16 rounding; 64 rows stay in the compute dtype throughout.
        few_rows = shape[0] * shape[1] <= SMALL_M
        assert_same_model_outputs(fused, eager, torch.bfloat16 if few_rows else machine_compute_dtype)
        assert not torch.equal(eager, torch.zeros_like(eager))


@pytest.mark.parametrize("kwargs", VARIANTS[1:])
def test_decoder_decoding_step_compiles_in_one_graph(tiny_llama, kwargs, machine_compute_dtype):
    """One-token decoding steps run the packed int8 / int4 kernels; they must trace too."""
    model = _quantized(tiny_llama, **kwargs)
    compiled = torch.compile(model, fullgraph=True)
    ids = torch.randint(0, 500, (1, 1), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        for _ in range(2):  # the second call runs on whatever the first one cached (kernel layouts)
            eager = model(input_ids=ids, use_cache=False).logits
            fused = compiled(input_ids=ids, use_cache=False).logits
            assert_same_model_outputs(fused, eager, torch.bfloat16)  # one row: bf16 activations (see above)


_REPEATED_CALLS = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from conftest import tiny_model
import hf_compress
from hf_compress.quantization import WeightQuantizationConfig
torch.manual_seed(0)
model = tiny_model("bert", hidden_size=64, intermediate_size=128, vocab_size=500)
config = WeightQuantizationConfig(bits=8, algorithm="rtn", quantize_embeddings=False, compute_dtype={dtype!r})
hf_compress.apply_compression(model, config)
compiled = torch.compile(model, fullgraph=True)
worst = 0.0
with torch.inference_mode():
    for call in range(50):
        batch = (1, 2, 4, 8)[call % 4]  # the pooler multiplies `batch` rows, the other layers 4 x batch: 1 to 32
        ids = torch.randint(0, 500, (batch, 4), generator=torch.Generator().manual_seed(call))
        fused, eager = compiled(input_ids=ids).pooler_output, model(input_ids=ids).pooler_output
        worst = max(worst, (fused.float() - eager.float()).abs().max().item())
print("WORST", worst)
"""


@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
def test_compiled_int8_encoder_survives_fifty_calls_at_few_rows(compute_dtype, tmp_path):
    """A compiled int8 encoder called 50 times at 1-32 rows (the pooler takes the few-row path) neither corrupts
    the heap nor drifts from eager. In a subprocess: a corrupted heap aborts the process, not just the test."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "repeated_calls.py"
    dtype = str(compute_dtype).removeprefix("torch.")
    script.write_text(_REPEATED_CALLS.format(tests=str(Path(__file__).resolve().parents[1]), dtype=dtype))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "MALLOC_CHECK_": "3", "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-2000:]}"
    worst = float(done.stdout.split("WORST")[-1])
    # Eagerly, the few-row pooler runs the packed kernel on bf16 activations whatever the compute dtype; compiled, it
    # runs dense. Its outputs are tanh(...) in [-1, 1], so both paths agree to a few bf16 ulps of 1.
    assert worst <= 4 * torch.finfo(torch.bfloat16).eps
