"""compressed-tensors export of asymmetric (integer zero point) int4 / int8, reloaded by plain transformers in a
subprocess that never imports hf_compress."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_compress import apply_compression
from hf_compress.export import export
from hf_compress.export.compressed_tensors import check_configs
from hf_compress.quantization import QuantLinear, WeightQuantizationConfig


pytestmark = pytest.mark.usefixtures("one_thread")

# Plain transformers: logits, greedy tokens and the dense weights it dequantized (to compare bit for bit).
_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
ref = torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
assert "hf_compress" not in sys.modules
with torch.no_grad():
    logits = model(input_ids=ref["ids"]).logits
    tokens = model.generate(input_ids=ref["ids"], max_new_tokens=8, do_sample=False)
weights = {name: model.get_submodule(name).weight.detach() for name in ref["names"]}
torch.save({"logits": logits, "tokens": tokens, "weights": weights}, sys.argv[3])
"""


def _llama():
    return tiny_model("llama", auto_class=AutoModelForCausalLM, hidden_size=64, intermediate_size=128)


def _calibration():
    return [{"input_ids": torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i))}
            for i in range(4)]  # fmt: skip


def _reload(folder, model, tmp_path):
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    torch.save({"ids": ids, "names": names}, tmp_path / "ref.pt")
    run = subprocess.run([sys.executable, "-c", _RELOAD, str(folder), str(tmp_path / "ref.pt"), str(tmp_path / "out.pt")],
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        tokens = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    return out, (out["logits"] - logits).abs().max().item(), torch.equal(out["tokens"], tokens)


@pytest.mark.parametrize(("algorithm", "bits"), [("gptq", 4), ("mse", 4), ("hqq", 4), ("rtn", 8)])
def test_asymmetric_llama_round_trips(algorithm, bits, tmp_path):
    pytest.importorskip("compressed_tensors")
    model = _llama()
    config = WeightQuantizationConfig(bits=bits, group_size=16, symmetric=False, zero_point="integer",
                                      algorithm=algorithm, quantize_embeddings=False, compute_dtype="float32")  # fmt: skip
    apply_compression(model, config, calibration_data=_calibration() if algorithm == "gptq" else None)
    folder = export(model, to="compressed-tensors", output_dir=tmp_path / "ct")
    quantization = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    schemes = [group["weights"] for group in quantization["config_groups"].values()]
    assert all(s["symmetric"] is False and s["num_bits"] == bits and s["group_size"] == 16 for s in schemes)
    out, diff, same = _reload(folder, model, tmp_path)
    # float32 scales: (q - zp) * scale is exact in both, so the dense weights are ours bit for bit.
    for name, weight in out["weights"].items():
        assert torch.equal(weight, model.get_submodule(name).dequantize(torch.float32)), name
    assert diff < 1e-5 and same  # measured 0.0
    model.save_pretrained(tmp_path / "ours")
    ours, theirs = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("ours", "ct"))
    # The format packs zero points into `bits` bits where we keep a float offset per group: smaller, by about that.
    offsets = sum(m.weight_zero.numel() for m in model.modules() if isinstance(m, QuantLinear))
    expected = ours - offsets * (4 - bits / 8)
    assert abs(theirs / expected - 1) < 0.05 and theirs <= ours * 1.05


def test_bf16_scales_dequantize_identically(tmp_path):
    """With bf16 scales, compressed-tensors' dense weights are bf16((q - zp) * scale), the correctly rounded value of
    our exact float32 dequantization: integer zero points make the two formats agree in every weight."""
    pytest.importorskip("compressed_tensors")
    model = _llama()
    apply_compression(model, WeightQuantizationConfig(bits=4, group_size=16, zero_point="integer",
                                                      quantize_embeddings=False, compute_dtype="bfloat16"))  # fmt: skip
    folder = export(model, to="compressed-tensors", output_dir=tmp_path / "ct")
    with safe_open(f"{folder}/model.safetensors", "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight_zero_point").dtype == torch.int32  # packed
    out, _, _ = _reload(folder, model, tmp_path)
    for name, weight in out["weights"].items():
        exact = model.get_submodule(name).dequantize(torch.float32)
        assert torch.equal(weight, exact.to(torch.bfloat16)), name


def test_float_offsets_are_refused_with_the_option(tmp_path):
    model = _llama()
    apply_compression(model, WeightQuantizationConfig(bits=4, group_size=16))  # embeddings + float offsets
    with pytest.raises(ValueError, match=r"WeightQuantizationConfig\(quantize_embeddings=False, zero_point='integer'"):
        export(model, to="compressed-tensors", output_dir=tmp_path / "a")
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match="zero_point='integer'"):
        check_configs([WeightQuantizationConfig(bits=4)])  # int4 defaults to asymmetric
    with pytest.raises(ValueError, match="zero_point='integer'"):
        check_configs([WeightQuantizationConfig(bits=8, overrides={"down_proj": {"bits": 4}})])
    check_configs([WeightQuantizationConfig(bits=4, zero_point="integer"), WeightQuantizationConfig(bits=8),
                   WeightQuantizationConfig(bits=4, symmetric=True)])  # fmt: skip
