"""The one-call `compress`: loading, canonical order, the report, saving, recipes, presets and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from huggingface_hub import ModelCard
from transformers import AutoModel, AutoModelForSequenceClassification, BertForSequenceClassification

from hf_compress import compress
from hf_compress.evaluation.measure import size_breakdown
from hf_compress.pipeline.loading import load_model
from hf_compress.pipeline.presets import PRESETS, preset_configs
from hf_compress.plugin import get_recipe
from hf_compress.quantization import WeightQuantizationConfig


INT8 = dict(bits=8, algorithm="rtn")  # round-to-nearest keeps the tests fast


@pytest.fixture(scope="module")
def minilm_result(tmp_path_factory, minilm_dir, debian_texts):
    from hf_compress.data import load_debian

    out = tmp_path_factory.mktemp("compress") / "minilm-int8"
    rows = load_debian("test", per_section=3)
    result = compress(str(minilm_dir), WeightQuantizationConfig(**INT8), eval_data=debian_texts[:24], task_data=rows,
                      output_dir=out, latency_rounds=1)  # fmt: skip
    return result, out


def test_report_measures_sizes_latency_fidelity_and_task(minilm_result):
    result, _ = minilm_result
    report = result.report
    assert report.before["params"] == pytest.approx(22.7e6, rel=0.01)
    assert report.after["params"] == report.before["params"]  # quantization keeps the logical parameter count
    assert report.after["bytes"] < 0.3 * report.before["bytes"]
    parts = report.before["breakdown"]
    assert sum(p["bytes"] for p in parts.values()) == report.before["bytes"]
    assert parts["embeddings"]["params"] > parts["attention"]["params"] > 0 and parts["ffn"]["params"] > 0
    assert report.latency["ratio"] > 0 and report.latency["batch"] == [32, 128]
    assert 0.99 < report.fidelity["cosine_mean"] <= 1.0 and report.fidelity["texts"] == 24
    assert report.task["mode"] == "probe" and set(report.task["after"]) == {"accuracy", "macro_f1"}
    assert 0 <= report.task["after"]["accuracy"] <= 1
    text = report.to_text()
    assert "embeddings (MB)" in text and "cosine to original" in text


def test_saved_folder_reloads_identically_and_is_documented(minilm_result, minilm_tokenizer):
    result, out = minilm_result
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "plots/size_breakdown.png",
            "hf_compress_report.json", "hf_compress_request.json"} <= names  # fmt: skip
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    reloaded = AutoModel.from_pretrained(out).eval()
    inputs = minilm_tokenizer(["a mail client", "image viewer"], padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).last_hidden_state, result.model(**inputs).last_hidden_state)
    report = json.loads((out / "hf_compress_report.json").read_text())
    assert report["checkpoint_bytes"] == (out / "model.safetensors").stat().st_size
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert card.data.base_model_relation == "quantized"
    assert card.data.library_name == "hf_compress"
    assert {"hf_compress", "int8", "quantized"} <= set(card.data.tags)
    assert card.data.eval_results[0].metric_type == "cosine_similarity"
    assert "import hf_compress" in card.text and "| size (MB) |" in card.text


def test_card_regeneration_is_idempotent(minilm_result, tmp_path):
    import shutil

    from hf_compress.hub.card import regenerate_card

    _, out = minilm_result
    copy = shutil.copytree(out, tmp_path / "copy")
    readme, plot = (copy / "README.md").read_bytes(), (copy / "plots/size_breakdown.png").read_bytes()
    regenerate_card(copy)
    assert (copy / "README.md").read_bytes() == readme
    assert (copy / "plots/size_breakdown.png").read_bytes() == plot
    regenerate_card(copy)
    assert (copy / "README.md").read_bytes() == readme


def test_recipe_file_reproduces_the_same_recipe(minilm_result, tmp_path):
    result, out = minilm_result
    again = compress(result.report.base_model, recipe=out / "hf_compress_request.json", measure=False)
    assert get_recipe(again.model) == get_recipe(result.model)
    resolved = compress(result.report.base_model, recipe=out / "config.json", measure=False)  # the resolved recipe
    assert get_recipe(resolved.model).techniques == get_recipe(result.model).techniques
    report = json.loads((out / "hf_compress_report.json").read_text())
    assert report["recipe"] == {"see": "config.json", "key": "quantization_config"}  # held once, in config.json


def test_model_object_and_canonical_order(family_free_tiny):
    model = family_free_tiny
    from _toy_technique import ToyFFNSliceConfig

    result = compress(model, WeightQuantizationConfig(**INT8), ToyFFNSliceConfig(keep=8), measure=True,
                      latency_rounds=1)  # fmt: skip
    assert result.model is model
    assert [t.method for t in get_recipe(model).techniques] == ["toy_ffn_slice", "weight_quantization"]
    assert result.report.after["breakdown"]["ffn"]["params"] < result.report.before["breakdown"]["ffn"]["params"]
    assert result.report.fidelity is None  # no texts given: no fidelity, no crash


@pytest.fixture()
def family_free_tiny():
    return tiny_model("bert")


def test_folder_is_loaded_with_its_architecture(tmp_path):
    classifier = tiny_model("bert", auto_class=AutoModelForSequenceClassification, num_labels=3)
    classifier.save_pretrained(tmp_path / "clf")
    model, tokenizer, name = load_model(str(tmp_path / "clf"))
    assert isinstance(model, BertForSequenceClassification) and tokenizer is None
    assert size_breakdown(model)["breakdown"]["other"]["params"] > 0  # pooler + classifier


def test_presets_build_registered_configs():
    for name in PRESETS:
        configs, distill = preset_configs(name)
        assert configs and all(hasattr(c, "method") for c in configs)
        # recovery after the structural steps: recover()'s defaults for distil, a time budget for max
        assert distill == {"distil": True, "max": {"max_seconds": 180.0}}.get(name, False)
    assert preset_configs("int4")[0][0].bits == 4


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(preset="int8", recipe=[]), ValueError, "only one of configs, recipe, preset or budget"),
        (dict(preset="int9"), ValueError, r"Unknown preset 'int9'. Choose one of \['distil', 'int4', 'int8', 'max'\]"),
        (dict(recipe=42), TypeError, "recipe must be"),
        (dict(recipe="missing.json"), FileNotFoundError, "missing.json not found"),
    ],
)
def test_bad_arguments_are_explained(kwargs, error, match):
    with pytest.raises(error, match=match):
        compress(tiny_model("bert"), measure=False, **kwargs)


def test_bad_model_inputs(tmp_path):
    with pytest.raises(TypeError, match="a model, a local folder or a Hub id"):
        compress(3.5)
    with pytest.raises(FileNotFoundError, match="without config.json"):
        compress(str(tmp_path))
    with pytest.raises(TypeError, match="technique configs"):
        compress(tiny_model("bert"), "int8")
