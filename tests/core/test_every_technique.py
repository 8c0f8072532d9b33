"""Every registered technique x every supported family (tests/conftest.py FAMILIES): its config survives JSON (alone
and inside a `CompressionConfig`), and apply -> save_pretrained -> plain `AutoModel.from_pretrained` gives the
outputs the compressed model gave, bit for bit (`torch.equal`). A new technique or family is picked up here; a
technique without a sample config below fails until one is added."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, tiny_inputs, tiny_model
from transformers import AutoModel

import hf_compress
from hf_compress import CompressionConfig, TechniqueConfig, apply_compression, get_adapter, registered_techniques
from hf_compress.factorization import EmbeddingFactorizationConfig, LowRankLinearConfig
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig


# One data-free config per shipped technique (calibration-driven choices have their own tests).
SAMPLES = {
    "head_pruning": lambda: HeadPruningConfig(fraction=0.25, importance="magnitude"),
    "ffn_pruning": lambda: FFNPruningConfig(fraction=0.25, importance="magnitude"),
    "embedding_factorization": lambda: EmbeddingFactorizationConfig(rank=8, init="svd"),
    "low_rank_linear": lambda: LowRankLinearConfig(rank=4, whiten="none"),
    "weight_quantization": lambda: WeightQuantizationConfig(bits=8, algorithm="rtn"),
}
SHIPPED = sorted(n for n, t in registered_techniques().items() if t.config_cls.__module__.startswith("hf_compress."))


def _unsupported(method: str, family: str) -> str | None:
    """Why the architecture table rules this combination out, or None."""
    adapter = get_adapter(tiny_model(family))
    if method == "embedding_factorization" and adapter.embeddings is None:
        return f"{family} has no token embedding (ArchitectureAdapter.embeddings is None)"
    return None


def test_every_shipped_technique_has_a_sample():
    assert set(SHIPPED) <= set(SAMPLES), f"add a sample config for {sorted(set(SHIPPED) - set(SAMPLES))}"


@pytest.mark.parametrize("method", SHIPPED)
def test_config_json_round_trip(method):
    config = SAMPLES[method]()
    data = json.loads(json.dumps(config.to_dict()))
    assert TechniqueConfig.from_dict(data) == config
    recipe = CompressionConfig(techniques=[config])
    again = CompressionConfig.from_dict(json.loads(json.dumps(recipe.to_dict())))
    assert again.techniques == [config]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", SHIPPED)
def test_apply_save_reload_gives_the_same_outputs(method, family, tmp_path):
    reason = _unsupported(method, family)
    if reason:
        pytest.skip(reason)
    model = apply_compression(tiny_model(family), SAMPLES[method]())
    inputs = tiny_inputs(family)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert hf_compress.get_recipe(reloaded) == hf_compress.get_recipe(model)
    with torch.no_grad():
        expected, actual = model(**inputs).last_hidden_state, reloaded(**inputs).last_hidden_state
    assert torch.equal(actual, expected)
