"""Calibrated static int8 inputs (``activations="int8_static"``): smoothing keeps the float function, ranges leave the
padding out, checkpoints reload bit for bit, and the exports run as int8 matmuls in OpenVINO."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from conftest import COMPUTE_DTYPES, pooled_embeddings, tiny_model
from transformers import AutoModel, AutoModelForCausalLM

from hf_compress import apply_compression
from hf_compress.quantization import QuantLinear, WeightQuantizationConfig
from hf_compress.quantization.static_activations import calibrate_static_inputs, smoothed_weights


pytestmark = pytest.mark.usefixtures("one_thread")


def _batches(n=4, batch=4, seq=16, vocab=128, pad=0):
    """Token batches for tiny models: the last `pad` positions of every other row are padding."""
    generator = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (batch, seq), generator=generator)
        mask = torch.ones_like(ids)
        if pad:
            mask[::2, -pad:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]


def _static(model, **kwargs):
    config = WeightQuantizationConfig(bits=8, activations="int8_static", compute_dtype="float32", **kwargs)
    return apply_compression(model, config, calibration_data=_batches())


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(bits=4), ValueError, "bits=8"),
        (dict(symmetric=False), ValueError, "symmetric"),
        (dict(smoothing=1.5), ValueError, "smoothing"),
        (dict(smoothing="strong"), TypeError, "'auto'"),
        (dict(activations="int8"), ValueError, "int8_static"),
    ],
)
def test_config_refuses_what_int8_matmuls_cannot_take(kwargs, error, words):
    with pytest.raises(error, match=words):
        WeightQuantizationConfig(**{"bits": 8, "activations": "int8_static", **kwargs})


def test_needs_calibration_data_and_cannot_run_on_load():
    with pytest.raises(ValueError, match="calibration_data"):
        apply_compression(tiny_model("bert"), WeightQuantizationConfig(bits=8, activations="int8_static"))
    from hf_compress.quantization.hooks import quantize_on_load

    with pytest.raises(ValueError, match="cannot run while loading"):
        quantize_on_load(WeightQuantizationConfig(bits=8, activations="int8_static", algorithm="mse"))


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_smoothing_keeps_the_float_function_and_restores_weights(family):
    model = tiny_model(family)
    names = [n for n in _linear_names(model) if "lm_head" not in n]
    static = calibrate_static_inputs(model, names, _batches(), smoothing=0.8)
    assert all(not torch.allclose(p.multiplier, torch.ones_like(p.multiplier)) for p in static.values())
    batch = _batches(1)[0]
    with torch.no_grad():
        expected = model(**batch).last_hidden_state
        before = {n: model.get_submodule(n).weight.clone() for n in names}
        with pytest.raises(RuntimeError, match="stop"), smoothed_weights(model, static):
            torch.testing.assert_close(model(**batch).last_hidden_state, expected, atol=1e-5, rtol=1e-5)
            assert not torch.equal(model.get_submodule(names[0]).weight, before[names[0]])
            raise RuntimeError("stop")
    for name in names:  # an error inside the block leaves the float model as it was
        torch.testing.assert_close(model.get_submodule(name).weight, before[name])


def test_ranges_leave_padding_out():
    model = tiny_model("bert")
    names = ["encoder.layer.0.attention.self.query"]
    plain = _batches(2, seq=12)
    # The same real tokens, then 6 padding positions whose ids are extreme (they would widen an unmasked range).
    padded = []
    for batch in plain:
        ids = torch.cat((batch["input_ids"], torch.full((4, 6), 127)), 1)
        mask = torch.cat((batch["attention_mask"], torch.zeros(4, 6, dtype=torch.long)), 1)
        padded.append({"input_ids": ids, "attention_mask": mask})
    a = calibrate_static_inputs(model, names, plain, smoothing=0.0)[names[0]]
    b = calibrate_static_inputs(model, names, padded, smoothing=0.0)[names[0]]
    assert (a.scale, a.zero_point) == pytest.approx((b.scale, b.zero_point), rel=1e-5)


@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
def test_layer_input_is_what_quantize_linear_computes(compute_dtype):
    model = tiny_model("bert")
    _static(model)
    layer = model.get_submodule("encoder.layer.0.intermediate.dense")
    assert isinstance(layer, QuantLinear) and layer.activations == "int8_static"
    x = (torch.randn(5, layer.in_features) * 3).to(compute_dtype)
    smoothed = x.float() * layer.input_multiplier.float()
    q = torch.clamp(torch.round(smoothed / layer.input_scale.float()) + layer.input_zero_point.float(), 0, 255)
    expected = (q - layer.input_zero_point.float()) * layer.input_scale.float()
    torch.testing.assert_close(layer.quantize_input(x).float(), expected.to(compute_dtype).float())
    assert 0 <= int(layer.input_zero_point) <= 255 and float(layer.input_scale) > 0


@pytest.mark.parametrize("compute_dtype", COMPUTE_DTYPES)
@pytest.mark.parametrize("rows", [3, 64])
def test_inference_runs_the_int8_matmul_exactly(compute_dtype, rows):
    # Inference multiplies the uint8 grid by the int8 weight in integers (torch._int_mm), as the exported
    # QuantizeLinear -> int8 MatMul does: against the float64 value of that product, only the final scaling and the
    # output cast round, so it is at least as close as the fake-quantized float GEMM (which also rounds the input
    # and the weight to the compute dtype). The training path keeps the fake-quantized input (a gradient through
    # the grid) and agrees with inference to the compute dtype's rounding.
    model = tiny_model("bert")
    _static(model)
    for name in ("encoder.layer.0.intermediate.dense", "encoder.layer.1.output.dense"):
        layer = model.get_submodule(name).to(compute_dtype)
        layer.compute_dtype = compute_dtype
        x = (torch.randn(rows, layer.in_features) * 3).to(compute_dtype)
        with torch.inference_mode():
            fast = layer(x).double()
            fake = layer.quantize_input(x).double() @ layer.dequantize().double().t() + layer.bias.double()
        u = torch.clamp(torch.round(x.float() * layer.input_multiplier.float() * (1 / layer.input_scale.float())
                                    + layer.input_zero_point.float()), 0, 255).double()  # fmt: skip
        weight = layer.weight_packed.double() * layer.weight_scale.double()
        exact = (u - float(layer.input_zero_point)) * float(layer.input_scale) @ weight.t() + layer.bias.double()
        eps = torch.finfo(compute_dtype).eps
        assert (fast - exact).abs().max() <= 2 * eps * exact.abs().max()  # one output rounding, with margin
        assert (fast - exact).abs().max() <= (fake - exact).abs().max() + eps * exact.abs().max()
        assert not layer._unsupported  # the int8 kernel ran, no fallback
        xg = x.clone().requires_grad_(True)
        trained = layer(xg)
        trained.sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0
        torch.testing.assert_close(trained.detach().double(), fast, atol=8 * eps * exact.abs().max().item(), rtol=0)


def test_loading_other_weights_into_a_layer_that_ran_recomputes_its_integer_sums():
    # The int8 matmul caches the weight's per-channel integer sums; weights loaded in place afterwards (load_state_dict
    # copies into the same buffers) must not be multiplied with the old sums.
    torch.manual_seed(0)
    layers = [QuantLinear.from_float(torch.nn.Linear(64, 48), bits=8, group_size=64, activations="int8_static",
                                     compute_dtype=torch.float32) for _ in range(2)]  # fmt: skip
    for layer in layers:
        layer.set_static_input(torch.rand(64) + 0.5, 0.02, 120)
    x = torch.randn(40, 64)
    with torch.inference_mode():
        expected = layers[1](x)
        layers[0](x)  # caches layer 0's sums
        layers[0].load_state_dict(layers[1].state_dict())
        torch.testing.assert_close(layers[0](x), expected, atol=0, rtol=0)


def test_grouped_weights_fall_back_to_the_fake_quantized_input():
    # torch._int_mm takes one weight scale per output channel: group-wise int8 weights cannot run it, so the layer
    # multiplies the fake-quantized input densely (same grid, float GEMM) instead of failing.
    layer = QuantLinear.from_float(torch.nn.Linear(64, 48), bits=8, group_size=32, activations="int8_static",
                                   compute_dtype=torch.float32)  # fmt: skip
    layer.set_static_input(torch.rand(64) + 0.5, 0.02, 120)
    x = torch.randn(40, 64)
    with torch.inference_mode():
        out = layer(x)
        expected = layer.quantize_input(x) @ layer.dequantize().t() + layer.bias
    torch.testing.assert_close(out, expected)
    assert any(key[0] == "_static_int8" for key in layer._unsupported)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_quantized_model_is_close_and_reloads_bit_exact(family, tmp_path):
    auto = AutoModelForCausalLM if family in ("gpt2", "llama") else AutoModel
    reference = tiny_model(family, auto_class=auto)
    model = tiny_model(family, auto_class=auto)
    _static(model, algorithm="gptq", quantize_embeddings=False)
    batch = _batches(1)[0]
    with torch.no_grad():
        ref = reference(**batch)[0]
        out = model(**batch)[0]
    # 8-bit weights and 8-bit inputs on a random tiny model: a few percent of the output's scale, never garbage
    assert (out - ref).norm() / ref.norm() < 0.1
    model.save_pretrained(tmp_path)
    reloaded = auto.from_pretrained(tmp_path).eval()
    layer = next(m for m in reloaded.modules() if isinstance(m, QuantLinear))
    assert layer.activations == "int8_static"
    with torch.no_grad():
        assert torch.equal(reloaded(**batch)[0], out)


def test_refused_by_compressed_tensors(tmp_path):
    from hf_compress.export import export

    model = tiny_model("llama", auto_class=AutoModelForCausalLM)
    _static(model, quantize_embeddings=False)
    with pytest.raises(ValueError, match="to='onnx' / 'openvino'"):
        export(model, to="compressed-tensors", output_dir=tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def _runtime_precisions(folder) -> Counter:
    import openvino as ov

    compiled = ov.Core().compile_model(f"{folder}/openvino_model.xml", "CPU", {"INFERENCE_NUM_THREADS": 1})
    infos = (op.get_rt_info() for op in compiled.get_runtime_model().get_ops())
    return Counter((i["layerType"].astype(str), i["runtimePrecision"].astype(str)) for i in infos)


def test_minilm_exports_run_as_int8_matmuls(minilm_dir, minilm_tokenizer, debian_texts, tmp_path):
    """Real MiniLM, real calibration text: PyTorch and both engines stay close to fp32, and OpenVINO multiplies
    every linear layer in int8 (u8 activations x i8 weights)."""
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("openvino")
    from hf_compress.export import export, load_exported

    base = AutoModel.from_pretrained(minilm_dir).eval()
    model = AutoModel.from_pretrained(minilm_dir).eval()
    calibration, test = debian_texts[:32], debian_texts[32:]
    apply_compression(model, WeightQuantizationConfig(bits=8, activations="int8_static", algorithm="mse",
                                                      compute_dtype="float32"),
                      calibration_data=calibration, tokenizer=minilm_tokenizer)  # fmt: skip
    reference = pooled_embeddings(base, minilm_tokenizer, test)
    ours = pooled_embeddings(model, minilm_tokenizer, test)
    # measured 0.9980 on 480 test texts with 144 calibration texts; 32 texts here: a margin, still far from the
    # 0.994 of unsmoothed min/max input scales
    assert torch.nn.functional.cosine_similarity(ours, reference).mean() > 0.996
    folders = {t: export(model, to=t, output_dir=tmp_path / t, tokenizer=minilm_tokenizer) for t in ("onnx", "openvino")}
    graph = onnx.load(f"{folders['onnx']}/model.onnx").graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == 36  # every encoder linear layer's input
    precisions = _runtime_precisions(folders["openvino"])
    fully_connected = {p: c for (kind, p), c in precisions.items() if kind == "FullyConnected"}
    assert sum(fully_connected.values()) == 36 and set(fully_connected) <= {"u8", "i8"}, precisions
    for target, folder in folders.items():
        engine = pooled_embeddings(load_exported(folder, threads=1), minilm_tokenizer, test)
        # the same integers and scales; an input landing on a rounding boundary may round the other way
        assert torch.nn.functional.cosine_similarity(engine, ours).mean() > 0.999, target
