"""The recipe: JSON round trip, forward compatibility, unknown techniques, canonical order."""

from __future__ import annotations

import json
import warnings

import pytest
from _toy_technique import ToyFFNSliceConfig

from hf_compress.config import FORMAT_VERSION, CompressionConfig, TechniqueConfig
from hf_compress.registry import Technique, get_technique, register_technique


def test_recipe_json_round_trip():
    recipe = CompressionConfig([ToyFFNSliceConfig(keep=5)])
    data = json.loads(json.dumps(recipe.to_dict()))
    again = CompressionConfig.from_dict(data)
    assert again == recipe
    assert again.techniques[0] == ToyFFNSliceConfig(keep=5)
    assert data["quant_method"] == "hf_compress"
    assert data["format_version"] == FORMAT_VERSION
    assert data["hf_compress_version"]


def test_unknown_keys_from_newer_version_warn_and_are_dropped():
    data = CompressionConfig([ToyFFNSliceConfig(keep=3)]).to_dict()
    data["techniques"][0]["from_the_future"] = 1
    data["new_recipe_key"] = True
    with pytest.warns(UserWarning) as record:
        recipe = CompressionConfig.from_dict(data)
    messages = " ".join(str(w.message) for w in record)
    assert "from_the_future" in messages and "new_recipe_key" in messages
    assert recipe.techniques[0].keep == 3


def test_newer_technique_version_warns():
    data = ToyFFNSliceConfig(keep=3).to_dict()
    data["version"] = 99
    with pytest.warns(UserWarning, match="version 99"):
        TechniqueConfig.from_dict(data)


def test_unknown_technique_is_a_clear_error():
    with pytest.raises(ValueError, match=r"Unknown compression technique 'teleport'.*Registered techniques"):
        CompressionConfig([{"method": "teleport", "version": 1}])


def test_bad_technique_value_is_rejected_when_built():
    with pytest.raises(ValueError, match="keep must be >= 1, got 0"):
        ToyFFNSliceConfig(keep=0)


def test_techniques_must_be_configs():
    with pytest.raises(TypeError, match="must be a list of technique configs"):
        CompressionConfig("int8")
    with pytest.raises(TypeError, match="TechniqueConfig or its dict"):
        CompressionConfig([42])


def test_canonical_order_is_enforced():
    from dataclasses import dataclass

    @dataclass
    class LateConfig(TechniqueConfig):
        method = "toy_late_stage"

    register_technique(
        Technique(
            name="toy_late_stage",
            config_cls=LateConfig,
            stage="quantize",
            apply=lambda m, c, **k: c,
            restructure=lambda m, c: None,
        )
    )
    assert get_technique("toy_late_stage").order > get_technique("toy_ffn_slice").order
    CompressionConfig([ToyFFNSliceConfig(), LateConfig()])  # right order: fine
    with pytest.raises(ValueError, match=r"reorder them as \['toy_ffn_slice', 'toy_late_stage'\]"):
        CompressionConfig([LateConfig(), ToyFFNSliceConfig()])


def test_registering_a_different_technique_under_a_taken_name_fails():
    existing = get_technique("toy_ffn_slice")
    clash = Technique(
        name="toy_ffn_slice",
        config_cls=ToyFFNSliceConfig,
        stage="prune",
        apply=lambda m, c, **k: c,
        restructure=lambda m, c: None,
    )
    with pytest.raises(KeyError, match="already registered"):
        register_technique(clash)
    assert get_technique("toy_ffn_slice") is existing


def test_no_warning_for_a_current_recipe():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CompressionConfig.from_dict(CompressionConfig([ToyFFNSliceConfig()]).to_dict())
