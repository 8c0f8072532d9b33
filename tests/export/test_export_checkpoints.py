"""compressed-tensors and plain transformers exports, reloaded in a subprocess that never imports hf_compress."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForCausalLM

from hf_compress import apply_compression
from hf_compress.distillation import make_student
from hf_compress.export import export
from hf_compress.factorization import EmbeddingFactorizationConfig
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig


pytestmark = pytest.mark.usefixtures("one_thread")

# Loads `folder` with plain transformers, checks hf_compress stayed out, compares logits and greedy tokens.
_RELOAD = """
import sys, torch
from transformers import {cls}
ref = torch.load(sys.argv[2])
model = {cls}.from_pretrained(sys.argv[1]).eval()
assert "hf_compress" not in sys.modules
with torch.no_grad():
    diff = (model(input_ids=ref["ids"]).logits - ref["logits"]).abs().max().item()
same = {generate}
print(f"DIFF {{diff}} SAME {{same}}")
"""


def _reload(folder, model, tmp_path, causal=True):
    ids = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    ref = {"ids": ids}
    with torch.no_grad():
        ref["logits"] = model(input_ids=ids).logits
    if causal:
        ref["tokens"] = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    torch.save(ref, tmp_path / "ref.pt")
    generate = ("torch.equal(model.generate(input_ids=ref['ids'], max_new_tokens=8, do_sample=False), ref['tokens'])"
                if causal else "True")  # fmt: skip
    code = _RELOAD.format(cls=type(model).__name__, generate=generate)
    run = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "ref.pt")], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    line = [x for x in run.stdout.splitlines() if x.startswith("DIFF")][0].split()
    return float(line[1]), line[3] == "True"


def _llama(**overrides):
    return tiny_model("llama", auto_class=AutoModelForCausalLM, hidden_size=64, intermediate_size=128, **overrides)


@pytest.mark.parametrize("bits", [8, 4])
def test_compressed_tensors_gptq_llama(bits, tmp_path):
    pytest.importorskip("compressed_tensors")
    model = _llama()
    calibration = [{"input_ids": torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(i))}
                   for i in range(4)]  # fmt: skip
    config = WeightQuantizationConfig(bits=bits, group_size=16 if bits == 4 else None, algorithm="gptq", symmetric=True,
                                      quantize_embeddings=False, compute_dtype="float32")  # fmt: skip
    apply_compression(model, HeadPruningConfig(heads_to_prune={0: [2, 3], 1: [0, 1]}), config,
                      calibration_data=calibration)  # fmt: skip
    folder = export(model, to="compressed-tensors", output_dir=tmp_path / "ct")
    diff, same = _reload(folder, model, tmp_path)
    # 4-bit: measured 0.0 (the same integers and scales, dequantized the same way). 8-bit: hf_compress runs calls
    # of <= 32 rows through torch's int8 kernel on bf16 activations, the reloaded model in float32.
    assert diff < (1e-5 if bits == 4 else 1e-2) and same
    model.save_pretrained(tmp_path / "ours")
    ours, theirs = ((tmp_path / d / "model.safetensors").stat().st_size for d in ("ours", "ct"))
    assert abs(theirs / ours - 1) < 0.05


def test_compressed_tensors_refusals(tmp_path):
    model = _llama()
    apply_compression(model, WeightQuantizationConfig(bits=4, group_size=16, compute_dtype="float32"))
    with pytest.raises(ValueError, match="quantize_embeddings=False"):
        export(model, to="compressed-tensors", output_dir=tmp_path / "a")
    model = _llama()
    apply_compression(model, WeightQuantizationConfig(bits=4, group_size=16, symmetric=False,
                                                      quantize_embeddings=False))  # fmt: skip
    with pytest.raises(ValueError, match="zero_point='integer'"):
        export(model, to="compressed-tensors", output_dir=tmp_path / "b")
    model = _llama()
    apply_compression(model, HeadPruningConfig(heads_to_prune={0: [0, 1]}),
                      WeightQuantizationConfig(bits=8, quantize_embeddings=False))  # fmt: skip
    with pytest.raises(ValueError, match="different numbers of heads"):
        export(model, to="compressed-tensors", output_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()  # refused before the folder is made
    with pytest.raises(ValueError, match="to='transformers'"):
        export(_llama(), to="compressed-tensors", output_dir=tmp_path / "d")


def test_transformers_uniform_pruned_llama(tmp_path):
    model = _llama()
    apply_compression(model, HeadPruningConfig(heads_to_prune={0: [0, 1], 1: [2, 3]}),
                      FFNPruningConfig(fraction=0.25, importance="magnitude", ranking="per_layer"))  # fmt: skip
    folder = export(model, to="transformers", output_dir=tmp_path / "plain")
    text = (tmp_path / "plain" / "config.json").read_text()
    assert "quantization_config" not in text and '"num_attention_heads": 2' in text
    assert '"intermediate_size": 96' in text
    diff, same = _reload(folder, model, tmp_path)
    assert diff < 1e-6 and same  # measured 0.0


def test_transformers_student(tmp_path):
    from transformers import AutoModelForMaskedLM

    student = make_student(tiny_model("bert", auto_class=AutoModelForMaskedLM, num_hidden_layers=3), num_layers=2)
    folder = export(student, to="transformers", output_dir=tmp_path / "s")
    diff, _ = _reload(folder, student, tmp_path, causal=False)
    assert diff < 1e-6


@pytest.mark.parametrize(
    ("configs", "match"),
    [
        ([WeightQuantizationConfig(bits=8)], "compressed-tensors"),
        ([HeadPruningConfig(heads_to_prune={0: [0], 1: [1]})], "head size"),
        ([HeadPruningConfig(heads_to_prune={0: [0]})], "different numbers of heads"),
        ([EmbeddingFactorizationConfig(rank=8, init="svd")], "factorized"),
        ([FFNPruningConfig(intermediate_sizes={0: 32}, importance="magnitude")], "FFN widths differ"),
    ],
)
def test_transformers_refusals(configs, match, tmp_path):
    model = tiny_model("bert")
    apply_compression(model, *configs)
    with pytest.raises(ValueError, match=match):
        export(model, to="transformers", output_dir=tmp_path / "x")
