"""Decoder exports with a key/value cache: ONNX Runtime and OpenVINO generate the tokens PyTorch generates.

The compressed models compute in float32, the engines too (`load_exported(..., exact=True)`), and they hold the same
integers and scales, so greedy decoding picks the same token at every step unless two logits tie to float32
rounding; the per-step logits are compared as well, within the tolerances of `test_export_onnx.py`.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from hf_compress import apply_compression
from hf_compress.export import export, load_exported
from hf_compress.export.decoder import returned_cache
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig


onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")
TOL = {"onnx": 1e-5, "openvino": 1e-3}  # max |engine - PyTorch| / max(1, max |PyTorch|), as in test_export_onnx.py
TARGETS = ["onnx", pytest.param("openvino", marks=pytest.mark.skipif(
    pytest.importorskip("importlib").util.find_spec("openvino") is None, reason="the openvino extra is not installed"))]  # fmt: skip


def _decoder(family: str, prune: dict | None = None):
    model = tiny_model(family, auto_class=AutoModelForCausalLM)
    if prune is not None:  # per-layer head counts differ: each layer's cache has its own shape
        apply_compression(model, HeadPruningConfig(heads_to_prune=prune), FFNPruningConfig(fraction=0.25))
    apply_compression(model, WeightQuantizationConfig(bits=4, group_size=16, symmetric=False, compute_dtype="float32"))
    return model


def _prompt(model):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # a left-padded row, as batched generation pads
    return ids, mask


def _close(got: torch.Tensor, expected: torch.Tensor, target: str) -> None:
    error = (got - expected).abs().max().item()
    assert error < TOL[target] * max(1.0, expected.abs().max().item()), error


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family, prune", [("gpt2", None), ("llama", {0: [0, 1]}), ("qwen2", None),
                                           ("llama", {0: [0, 1, 2, 3]})])  # fmt: skip
def test_exported_decoder_generates_what_pytorch_generates(family, prune, target, tmp_path):
    model = _decoder(family, prune)
    folder = export(model, to=target, output_dir=tmp_path / target)
    info = json.loads((tmp_path / target / "hf_compress_export.json").read_text())
    layers = model.config.num_hidden_layers
    assert info["inputs"][:3] == ["input_ids", "attention_mask", "position_ids"]
    assert info["inputs"][3:] == [f"past_key_values.{i}.{p}" for i in range(layers) for p in ("key", "value")]
    assert info["outputs"] == ["logits"] + [f"present.{i}.{p}" for i in range(layers) for p in ("key", "value")]
    with torch.no_grad():
        cache = returned_cache(model(input_ids=torch.zeros(1, 2, dtype=torch.long), use_cache=True))
    assert info["cache"] == [[layer.keys.shape[1], layer.keys.shape[3]] for layer in cache.layers]
    if prune == {0: [0, 1]}:
        assert info["cache"][0][0] < info["cache"][1][0]  # the pruned layer's cache is narrower
    assert "past_key_values" in (tmp_path / target / "README.md").read_text()

    runner = load_exported(folder)
    ids, mask = _prompt(model)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(runner.generate(ids, mask, max_new_tokens=8), expected)

    # Prompt, then one cached step, against the model run on the whole sequence without a cache.
    with torch.no_grad():
        full_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
        whole = model(input_ids=expected[:, :7], attention_mask=full_mask, position_ids=positions, use_cache=False)
    first = runner(input_ids=ids, attention_mask=mask, position_ids=positions[:, :6])
    real = mask.bool()
    _close(first.logits[real], whole.logits[:, :6][real], target)
    step = runner(input_ids=expected[:, 6:7], attention_mask=full_mask, position_ids=positions[:, 6:],
                  past_key_values=first.past_key_values)  # fmt: skip
    assert [p.shape[2] for p in step.past_key_values] == [7] * (2 * layers)
    _close(step.logits[:, -1], whole.logits[:, -1], target)


def test_without_past_the_graph_takes_no_cache_and_cannot_generate(tmp_path):
    model = _decoder("llama")
    folder = export(model, to="onnx", output_dir=tmp_path / "plain", with_past=False)
    info = json.loads((tmp_path / "plain" / "hf_compress_export.json").read_text())
    assert info["inputs"] == ["input_ids", "attention_mask"] and "cache" not in info
    graph_inputs = [i.name for i in onnx.load(f"{folder}/model.onnx").graph.input]
    assert graph_inputs == ["input_ids", "attention_mask"]
    ids, mask = _prompt(model)
    runner = load_exported(folder)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    _close(runner(input_ids=ids, attention_mask=mask).logits[mask.bool()], expected[mask.bool()], "onnx")
    with pytest.raises(ValueError, match="with_past=True"):
        runner.generate(ids, mask)


def test_with_past_refusals(tmp_path):
    with pytest.raises(ValueError, match="not a causal LM"):
        export(tiny_model("bert"), to="onnx", output_dir=tmp_path / "bert", with_past=True)
    with pytest.raises(ValueError, match="applies to the 'onnx' and 'openvino' targets"):
        export(_decoder("llama"), to="compressed-tensors", output_dir=tmp_path / "ct", with_past=True)
    assert not (tmp_path / "bert").exists() or not any((tmp_path / "bert").iterdir())
    runner = load_exported(export(_decoder("llama"), to="onnx", output_dir=tmp_path / "llama"))
    ids, mask = _prompt(_decoder("llama"))
    with pytest.raises(ValueError, match="cached \\+ new"):
        runner(input_ids=ids, attention_mask=mask[:, :3])


def test_cli_export_past_and_no_past(tmp_path, capsys):
    from hf_compress.cli import main

    model = _decoder("gpt2")
    model.save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--to", "onnx"]) == 0
    assert json.loads((tmp_path / "m-onnx" / "hf_compress_export.json").read_text())["cache"]
    assert main(["export", str(tmp_path / "m"), "--to", "onnx", "--no-past", "--output-dir", str(tmp_path / "n")]) == 0
    assert "cache" not in json.loads((tmp_path / "n" / "hf_compress_export.json").read_text())
    capsys.readouterr()
    assert main(["export", str(tmp_path / "m"), "--to", "compressed-tensors", "--past"]) == 2
    assert "applies to the 'onnx' and 'openvino' targets" in capsys.readouterr().err
