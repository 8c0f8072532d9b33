"""`compress(..., export=...)` and `hf-compress export`: the one-call and CLI paths to the engines' formats."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model

import hf_compress
from hf_compress.cli import main
from hf_compress.export import load_exported
from hf_compress.quantization import WeightQuantizationConfig


pytest.importorskip("onnx")  # the `onnx` extra
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


def _inputs() -> dict:
    ids = tiny_inputs("bert", batch=2, seq=7)["input_ids"]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def _check_onnx_folder(folder, model, inputs) -> None:
    runner = load_exported(folder)
    with torch.inference_mode():
        expected = model(**inputs).last_hidden_state.float()
        got = runner(**inputs).last_hidden_state
    # The same integers and scales, run by ONNX Runtime in float32: float rounding only (see test_export_onnx).
    assert (got - expected).abs().max() <= 1e-4 * max(1.0, expected.abs().max().item())


def test_compress_exports_next_to_the_saved_folder(tmp_path):
    model = tiny_model("bert")
    config = WeightQuantizationConfig(bits=8, algorithm="rtn", compute_dtype="float32")
    result = hf_compress.compress(model, config, output_dir=tmp_path / "m", measure=False, card=False, export="onnx")
    assert list(result.exports) == ["onnx"] and str(result.exports["onnx"]).endswith("m-onnx")
    _check_onnx_folder(result.exports["onnx"], result.model, _inputs())


@pytest.mark.parametrize(("export", "error", "words"), [
    ("tflite", ValueError, r"unknown target\(s\) \['tflite'\]; choose from \['onnx', 'openvino'"),
    (["onnx", 3], TypeError, r"export must be a target name or a list of them"),
    ("onnx", ValueError, r"export='onnx' writes next to the saved model: pass output_dir"),
])  # fmt: skip
def test_compress_refuses_bad_export_targets_before_any_work(export, error, words, tmp_path):
    model = tiny_model("bert")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    output_dir = None if words.startswith("export='onnx'") else tmp_path / "m"
    with pytest.raises(error, match=words):
        hf_compress.compress(model, WeightQuantizationConfig(bits=8), output_dir=output_dir, export=export)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was compressed
    assert not (tmp_path / "m").exists()


def test_compress_refuses_float_offsets_for_compressed_tensors_before_any_work(tmp_path):
    # int4 defaults to asymmetric layers with free float offsets, which compressed-tensors cannot store: the error
    # must come before the compression (and name the option that fixes it), not after a finished run.
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"zero_point='integer'"):
        hf_compress.compress(model, WeightQuantizationConfig(bits=4), output_dir=tmp_path / "m",
                             export="compressed-tensors")  # fmt: skip
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not (tmp_path / "m").exists()


def test_cli_export_writes_the_engine_folder(tmp_path, capsys):
    model = tiny_model("bert")
    hf_compress.apply_compression(model, WeightQuantizationConfig(bits=4, algorithm="rtn", compute_dtype="float32"))
    model.save_pretrained(tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--to", "onnx"]) == 0
    assert f"exported for onnx to {tmp_path / 'm-onnx'}" in capsys.readouterr().out
    _check_onnx_folder(tmp_path / "m-onnx", model, _inputs())
    # A second export into the same folder replaces the previous export; a missing source is one line, exit 2.
    assert main(["export", str(tmp_path / "m"), "--to", "onnx"]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "gone"), "--to", "onnx"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "gone is not a folder" in err[0]
