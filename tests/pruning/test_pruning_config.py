"""Pruning configs: validation with helpful errors, JSON round trip, bad inputs at apply time."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_compress import CompressionConfig, apply_compression
from hf_compress.config import TechniqueConfig
from hf_compress.pruning import FFNPruningConfig, GradualPruningCallback, HeadPruningConfig, UnitGates, prune_heads


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of fraction, num_heads_to_prune or heads_to_prune"),
        ({"fraction": 0.3, "num_heads_to_prune": 3}, ValueError, "got \\['fraction', 'num_heads_to_prune'\\]"),
        ({"fraction": 1.0}, ValueError, "fraction must be a number in \\[0, 1\\)"),
        ({"fraction": -0.1}, ValueError, "fraction must be"),
        ({"num_heads_to_prune": -1}, ValueError, "non-negative integer"),
        ({"heads_to_prune": [1, 2]}, TypeError, "must be a dict"),
        ({"heads_to_prune": {0: [-1]}}, ValueError, "non-negative head indices"),
        ({"heads_to_prune": {"x": [1]}}, ValueError, "integer \\(layer index\\) keys"),
        ({"fraction": 0.3, "importance": "taylor"}, ValueError, "importance must be one of"),
        ({"fraction": 0.3, "ranking": "local"}, ValueError, "ranking must be one of"),
        ({"fraction": 0.3, "min_heads_per_layer": -1}, ValueError, "min_heads_per_layer"),
        ({"fraction": 0.3, "batch_size": 0}, ValueError, "batch_size must be a positive integer"),
    ],
)
def test_head_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        HeadPruningConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, "exactly one of fraction or intermediate_sizes"),
        ({"fraction": 0.5, "intermediate_sizes": {0: 3}}, ValueError, "exactly one"),
        ({"intermediate_sizes": {0: -3}}, ValueError, "sizes >= 0"),
        ({"intermediate_sizes": [3]}, TypeError, "must be a dict"),
        ({"fraction": 0.5, "round_to": 0}, ValueError, "round_to must be an integer >= 1"),
    ],
)
def test_ffn_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        FFNPruningConfig(**kwargs)


def test_apply_time_errors():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="names layer 5, but the model has 2 layers"):
        apply_compression(model, HeadPruningConfig(heads_to_prune={5: [0]}))
    with pytest.raises(ValueError, match=r"heads \[7\] cannot be removed"):
        apply_compression(model, HeadPruningConfig(heads_to_prune={0: [7]}))
    with pytest.raises(ValueError, match="needs calibration data"):
        apply_compression(model, HeadPruningConfig(fraction=0.5, importance="gradient"))
    with pytest.raises(ValueError, match="does not fit the model"):
        apply_compression(model, FFNPruningConfig(intermediate_sizes={0: 1000}, importance="random"))
    with pytest.raises(ValueError, match="kind must be 'heads' or 'ffn'"):
        UnitGates(model, "neurons")


def test_pruning_a_wrapped_projection_explains_the_order():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model("bert"), LoraConfig(r=2, target_modules=["query"])).base_model.model
    with pytest.raises(TypeError, match="Prune before quantizing, factorizing or attaching adapters"):
        prune_heads(model, {0: [1]})


def test_callback_errors():
    with pytest.raises(ValueError, match="Give a HeadPruningConfig, an FFNPruningConfig or both"):
        GradualPruningCallback()
    with pytest.raises(ValueError, match="ranks heads itself"):
        GradualPruningCallback(HeadPruningConfig(heads_to_prune={0: [1]}))
    with pytest.raises(ValueError, match="needs FFNPruningConfig\\(fraction=...\\)"):
        GradualPruningCallback(ffn_config=FFNPruningConfig(intermediate_sizes={0: 3}))
    with pytest.raises(ValueError, match="start_step < end_step"):
        GradualPruningCallback(HeadPruningConfig(fraction=0.5), start_step=5, end_step=5)


@settings(max_examples=40, deadline=None)
@given(
    heads=st.dictionaries(st.integers(0, 11), st.lists(st.integers(0, 15), max_size=6), max_size=6),
    importance=st.lists(st.lists(st.one_of(st.none(), st.floats(0, 1, width=32)), min_size=4, max_size=4), max_size=3),
)
def test_json_round_trip(heads, importance):
    config = HeadPruningConfig(heads_to_prune=heads, head_importance=importance or None)
    restored = TechniqueConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert restored == config
    ffn = FFNPruningConfig(intermediate_sizes={k: len(v) for k, v in heads.items()}, round_to=8)
    recipe = CompressionConfig([config, ffn])
    assert CompressionConfig(**json.loads(json.dumps(recipe.to_dict()))) == recipe
