"""The transformers plugin: save -> plain `from_pretrained` rebuilds the compressed model, for every family."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from _toy_technique import ToyFFNSliceConfig
from conftest import tiny_inputs, tiny_model
from transformers import AutoModel, AutoModelForSequenceClassification

import hf_compress
from hf_compress import CompressionConfig, get_recipe
from hf_compress.plugin import LOAD_GUARD


def _outputs(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_empty_recipe_round_trip_every_family(family, tmp_path):
    model = tiny_model(family)
    hf_compress.apply_compression(model)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["quantization_config"]["quant_method"] == "hf_compress"
    assert LOAD_GUARD in saved["id2label"] and "attn_implementation" not in saved  # the guard lives in the JSON only
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(get_recipe(reloaded), CompressionConfig)
    assert reloaded.config.id2label == model.config.id2label
    assert LOAD_GUARD not in json.dumps(reloaded.config.to_dict())
    inputs = tiny_inputs(family)
    torch.testing.assert_close(_outputs(reloaded, inputs), _outputs(model, inputs), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "llama", "qwen2", "vit"])
def test_restructured_model_round_trip(family, tmp_path):
    model = tiny_model(family)
    hf_compress.apply_compression(model, ToyFFNSliceConfig(keep=8))
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert get_recipe(reloaded).techniques == [ToyFFNSliceConfig(keep=8)]
    inputs = tiny_inputs(family)
    torch.testing.assert_close(_outputs(reloaded, inputs), _outputs(model, inputs), rtol=0, atol=0)
    # and a second save of the reloaded model is the same checkpoint again
    reloaded.save_pretrained(tmp_path / "again")
    again = AutoModel.from_pretrained(tmp_path / "again").eval()
    torch.testing.assert_close(_outputs(again, inputs), _outputs(model, inputs), rtol=0, atol=0)


def test_head_class_checkpoint_loads_with_other_auto_class(tmp_path):
    model = tiny_model("bert", AutoModelForSequenceClassification, num_labels=3)
    hf_compress.apply_compression(model, ToyFFNSliceConfig(keep=4))
    model.save_pretrained(tmp_path)
    same = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    base = AutoModel.from_pretrained(tmp_path).eval()
    inputs = tiny_inputs("bert")
    torch.testing.assert_close(_outputs(same, inputs), _outputs(model, inputs), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(base(**inputs).last_hidden_state, model.bert(**inputs).last_hidden_state)


def test_techniques_append_in_canonical_order(tmp_path):
    model = tiny_model("bert")
    hf_compress.apply_compression(model, ToyFFNSliceConfig(keep=16))
    hf_compress.apply_compression(model, ToyFFNSliceConfig(keep=8))
    assert [t.keep for t in get_recipe(model).techniques] == [16, 8]
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path)
    assert reloaded.encoder.layer[0].intermediate.dense.out_features == 8


def test_loading_without_the_plugin_fails_loudly(tmp_path):
    model = tiny_model("bert")
    hf_compress.apply_compression(model, ToyFFNSliceConfig(keep=8))
    model.save_pretrained(tmp_path)
    script = (
        "import sys\n"
        "from transformers import AutoModel\n"
        f"AutoModel.from_pretrained({str(tmp_path)!r})\n"
        "assert 'hf_compress' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "import hf_compress" in result.stderr


def test_minilm_checkpoint_saves_and_reloads(minilm, minilm_tokenizer, tmp_path):
    inputs = minilm_tokenizer(["an editor for programmers", "a tiling window manager"], padding=True,
                              return_tensors="pt")  # fmt: skip
    expected = _outputs(minilm, inputs)
    hf_compress.apply_compression(minilm, ToyFFNSliceConfig(keep=1536))  # same width: a no-op structurally
    torch.testing.assert_close(_outputs(minilm, inputs), expected, rtol=0, atol=0)
    minilm.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_outputs(reloaded, inputs), expected, rtol=0, atol=0)
    assert get_recipe(reloaded).techniques == [ToyFFNSliceConfig(keep=1536)]


def test_import_is_lean():
    script = (
        "import sys, hf_compress, torch\n"
        "assert not torch.cuda.is_initialized()\n"
        "heavy = [m for m in ('hf_compress.pipeline.apply', 'sklearn', 'matplotlib', 'peft', 'datasets') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
