"""ONNX Runtime and OpenVINO exports: every compressed structure round-trips within float rounding of PyTorch.

The PyTorch reference computes in float32 (``compute_dtype="float32"``), the engines too (ORT's MatMulNBits at
accuracy level 1, OpenVINO with an f32 precision hint), and both hold the very same integers, scales and zero
points, so the outputs agree to float32 rounding: TOL on tiny models, looser on 6-layer MiniLM.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FAMILIES, tiny_inputs, tiny_model
from transformers import AutoModel, AutoModelForCausalLM

from hf_compress import apply_compression
from hf_compress.distillation import make_student
from hf_compress.export import export, load_exported
from hf_compress.factorization import EmbeddingFactorizationConfig, LowRankLinearConfig
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig


onnx = pytest.importorskip("onnx")  # the `onnx` extra
pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")
# max |engine - PyTorch| / max(1, max |PyTorch|) on tiny models: ORT measured <= 1e-6; OpenVINO's CPU kernels
# (its own GELU / softmax / MatMul over decompressed weights) measured up to 1.4e-4.
TOL = {"onnx": 1e-5, "openvino": 1e-3}

QUANT = {
    "fp32": None,
    "int8": dict(bits=8),
    "int8_g16_asym": dict(bits=8, group_size=16, symmetric=False),
    "int4_g16": dict(bits=4, group_size=16),
    "int4_g16_asym": dict(bits=4, group_size=16, symmetric=False),
}


def _inputs(model, batch=3, seq=12):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _reference(model, inputs):
    kwargs = {"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {}
    names = ["input_ids", "attention_mask"] + (
        ["token_type_ids"] if getattr(model.config, "type_vocab_size", 0) else []
    )
    with torch.no_grad():
        out = model(**{n: inputs[n] for n in names}, **kwargs, return_dict=True)
    return (out.logits if "logits" in out else out.last_hidden_state).float()


def _check(model, tmp_path, target="onnx"):
    folder = export(model, to=target, output_dir=tmp_path / target)
    inputs = _inputs(model)
    expected = _reference(model, inputs)
    got = load_exported(folder)(**inputs)
    tensor = got.logits if hasattr(got, "logits") else got.last_hidden_state
    mask = inputs["attention_mask"].bool()
    diff = (tensor - expected)[mask] if tensor.dim() == 3 else tensor - expected
    assert diff.abs().max().item() < TOL[target] * max(1.0, expected.abs().max().item()), diff.abs().max()
    return folder


def _quantize(model, name):
    if QUANT[name] is not None:
        apply_compression(model, WeightQuantizationConfig(**QUANT[name], compute_dtype="float32"))
    return model


@pytest.mark.parametrize("quant", list(QUANT))
@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])
def test_onnx_round_trip_quantized(family, quant, tmp_path):
    auto = AutoModelForCausalLM if family in ("gpt2", "llama") else AutoModel
    model = _quantize(tiny_model(family, auto_class=auto), quant)
    folder = _check(model, tmp_path)
    proto = onnx.load(f"{folder}/model.onnx")
    dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    ints = [i for i in proto.graph.initializer if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.INT4)]
    if quant == "fp32":
        assert not dq
    else:
        assert dq and len(ints) == len(dq)
        want = onnx.TensorProto.INT8 if QUANT[quant]["bits"] == 8 else onnx.TensorProto.INT4
        assert {i.data_type for i in ints} == {want}
        if "asym" in quant:  # linear layers take their float zero offsets as an x-side correction
            assert any(n.op_type == "ReduceSum" for n in proto.graph.node)


def _pruned_factorized(family):
    model = tiny_model(family)
    apply_compression(
        model,
        # per-layer head counts differ (GQA: whole key/value groups)
        HeadPruningConfig(heads_to_prune={0: [0, 1]} if family == "llama" else {0: [0, 1], 1: [3]}),
        FFNPruningConfig(fraction=0.25, importance="magnitude"),
        EmbeddingFactorizationConfig(rank=8, init="svd"),
        LowRankLinearConfig(rank=8),
        WeightQuantizationConfig(bits=4, group_size=8, symmetric=False, compute_dtype="float32"),
    )
    return model


@pytest.mark.parametrize("family", ["bert", "llama", "distilbert"])
def test_onnx_pruned_factorized_int4(family, tmp_path):
    _check(_pruned_factorized(family), tmp_path)


def test_onnx_student_and_empty_layer(tmp_path):
    teacher = tiny_model("bert", num_hidden_layers=3)
    student = make_student(teacher, num_layers=2)
    apply_compression(student, HeadPruningConfig(heads_to_prune={0: [0, 1, 2, 3]}))  # layer 0 keeps no head
    _check(student, tmp_path)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_openvino_round_trip(family, tmp_path):
    pytest.importorskip("openvino")
    for quant in ("int8", "int4_g16_asym"):
        _check(_quantize(tiny_model(family), quant), tmp_path / quant, target="openvino")
    _check(_pruned_factorized(family), tmp_path / "pruned", target="openvino")


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_engine_config_reaches_the_engine(target, tmp_path):
    """`engine_config` is applied over `exact`: the exact settings given explicitly over the engine's defaults
    reproduce the exact run bit for bit, and an option the engine does not know is the engine's own error."""
    pytest.importorskip("openvino" if target == "openvino" else "onnxruntime")
    model = _quantize(tiny_model("bert"), "int8")
    folder = export(model, to=target, output_dir=tmp_path / target)
    inputs = _inputs(model)
    exact = load_exported(folder)(**inputs).last_hidden_state
    settings = (
        {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}
        if target == "openvino"
        else {"session.qdq_matmulnbits_accuracy_level": "1"}
    )
    again = load_exported(folder, exact=False, engine_config=settings)(**inputs).last_hidden_state
    assert torch.equal(exact, again)
    if target == "openvino":  # ONNX Runtime accepts any session config key; OpenVINO checks its properties
        with pytest.raises(Exception, match="NOT_A_PROPERTY"):
            load_exported(folder, engine_config={"NOT_A_PROPERTY": 1})


def test_minilm_int8_int4_onnx_and_openvino(minilm_dir, minilm_tokenizer, debian_texts, tmp_path):
    for bits, group in ((8, None), (4, 32)):
        model = AutoModel.from_pretrained(minilm_dir).eval()
        apply_compression(model, WeightQuantizationConfig(bits=bits, group_size=group, compute_dtype="float32"))
        enc = minilm_tokenizer(debian_texts[:16], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            expected = model(**enc).last_hidden_state
        mask = enc["attention_mask"].bool()
        for target in ("onnx", "openvino"):
            folder = export(model, to=target, output_dir=tmp_path / f"{bits}-{target}", tokenizer=minilm_tokenizer)
            got = load_exported(folder, threads=1)(**enc).last_hidden_state
            assert (got - expected)[mask].abs().max() < 1e-3  # measured ~2e-5 (ORT), ~5e-5 (OpenVINO)
            info = json.loads(open(f"{folder}/hf_compress_export.json").read())
            assert "tokenizer.json" in info["files"] and "README.md" in info["files"]
        # int weights, not float copies (an expanded zero offset once made OpenVINO's int4 .bin 105 MB)
        limit = (0.3 if bits == 8 else 0.2) * 90.9e6
        assert (tmp_path / f"{bits}-onnx" / "model.onnx").stat().st_size < limit
        assert (tmp_path / f"{bits}-openvino" / "openvino_model.bin").stat().st_size < limit


def test_output_folder_rules(tmp_path):
    model = tiny_model("bert")
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="overwrite=True"):
        export(model, to="onnx", output_dir=user)
    export(model, to="onnx", output_dir=user, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine" and (user / "model.onnx").is_file()
    # a previous export is replaced without overwrite=True, and the user's file still stays
    export(model, to="openvino", output_dir=user)
    assert not (user / "model.onnx").exists() and (user / "openvino_model.xml").is_file()
    assert (user / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="expected one of"):
        export(model, to="tflite", output_dir=tmp_path / "x")


def test_export_from_folder_copies_tokenizer(minilm_dir, tmp_path):
    model = AutoModel.from_pretrained(minilm_dir)
    apply_compression(model, WeightQuantizationConfig(bits=8, compute_dtype="float32"))
    model.save_pretrained(tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (tmp_path / "src" / name).write_bytes((minilm_dir / name).read_bytes())
    folder = export(str(tmp_path / "src"), to="onnx", output_dir=tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert "onnxruntime" in (tmp_path / "out" / "README.md").read_text()
    assert load_exported(folder).inputs == ["input_ids", "attention_mask", "token_type_ids"]


@pytest.mark.parametrize("target", ["onnx", "openvino"])
def test_bf16_scales_stored_as_bf16(target, tmp_path):
    """Default configs keep bf16 scales: stored as BFLOAT16 + Cast, the graph equals the float32 view exactly."""
    from hf_compress.export._common import float_view

    if target == "openvino":
        pytest.importorskip("openvino")
    model = tiny_model("bert")
    apply_compression(model, WeightQuantizationConfig(bits=4, group_size=16, compute_dtype="bfloat16"))
    folder = export(model, to=target, output_dir=tmp_path / target)
    if target == "onnx":
        proto = onnx.load(f"{folder}/model.onnx")
        assert any(i.data_type == onnx.TensorProto.BFLOAT16 for i in proto.graph.initializer)
    else:  # scales and offsets stored in 16 bits where that is exact (fp16, else bf16), never rounded
        import openvino as ov

        ir = ov.Core().read_model(f"{folder}/openvino_model.xml")
        narrow = [op for op in ir.get_ops() if op.get_type_name() == "Constant"
                  and op.get_element_type() in (ov.Type.f16, ov.Type.bf16)]  # fmt: skip
        assert len(narrow) >= 2 * sum(isinstance(m, torch.nn.Linear) for m in tiny_model("bert").modules()) - 2
    inputs = _inputs(model)
    expected = _reference(float_view(model), inputs)
    got = load_exported(folder)(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()
    assert (got - expected)[mask].abs().max() < TOL[target] * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_every_family_int4(family, tmp_path):
    """Every supported family (ViT with pixel inputs) exports and matches PyTorch; measured <= 1.5e-6."""
    model = _quantize(tiny_model(family), "int4_g16_asym")
    inputs = tiny_inputs(family, batch=3, seq=9)
    if "input_ids" in inputs:
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    folder = export(model, to="onnx", output_dir=tmp_path / family)
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
    assert (load_exported(folder)(**inputs).last_hidden_state - expected).abs().max() < TOL["onnx"]
