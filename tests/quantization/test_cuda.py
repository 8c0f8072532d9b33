"""The CUDA branches of hf_compress.quantization, each checked against the CPU result (issue #14). Not yet run on a GPU.

Needs a CUDA GPU: ``bash scripts/gpu_check.sh`` on a GPU machine runs it. ``HF_COMPRESS_TEST_DEVICE=cpu`` runs the
same tests with the CPU standing in for the GPU (CPU vs CPU): a dry run of the test logic where there is no GPU.
Which torch kernel ran is checked with spies on ``torch.<kernel>`` (hf_compress looks each one up at call time)
against torch's kernel contracts; tolerances follow from the compute dtype's unit roundoff (bf16 keeps 8 significant
bits: u = 2^-8; float32 24: u = 2^-24), see `_cuda_support`. Two bugs found by reading this
module's targets were fixed before any GPU ran it (GPTQ's Hessians allocated on the CPU, and quantize-on-load
resolving ``compute_dtype="auto"`` for the host CPU instead of the ``device_map`` target); their tests stay here.
"""

from __future__ import annotations

import copy

import pytest
import torch
from _cuda_support import (
    DEVICE,
    OPS,
    assert_matmul_close,
    assert_model_close,
    coarsest,
    expected_kernel,
    spy,
    unit_roundoff,
    used,
)
from conftest import tiny_inputs, tiny_model
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification

from hf_compress import CompressionConfig, apply_compression
from hf_compress.quantization import QuantEmbedding, QuantLinear, WeightQuantizationConfig, kernels
from hf_compress.quantization.int4_layout import PORTABLE, layout_of
from hf_compress.quantization.kernels import SMALL_M, preferred_compute_dtype
from hf_compress.quantization.packing import dequantize_groups, unpack


pytestmark = [
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(),
                       reason="needs a CUDA GPU: run scripts/gpu_check.sh on a GPU machine"),
    pytest.mark.usefixtures("one_thread"),
]  # fmt: skip
COMPUTE = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
# Big enough that every projection meets the CUDA int4 kernel's K % 128 (hidden 128, FFN 256); no dropout.
LLAMA = dict(hidden_size=128, intermediate_size=256, tie_word_embeddings=False)
BERT = dict(hidden_size=128, intermediate_size=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(params=[DEVICE])
def device(request) -> torch.device:
    return torch.device(request.param)


# -- helpers ---------------------------------------------------------------------------------------------------------
def _run(model, inputs) -> torch.Tensor:
    where = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(where) for k, v in inputs.items()})
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _on(model, device) -> bool:
    return all(t.device.type == device.type for t in (*model.parameters(), *model.buffers()))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _layer(k: int, n: int, **kwargs) -> QuantLinear:
    torch.manual_seed(0)
    return QuantLinear.from_float(nn.Linear(k, n), **kwargs)


def _old_cpu(monkeypatch) -> None:
    """Pretend the host CPU has no native bf16 (AVX512-BF16 / AMX), so only the device can make "auto" bf16."""
    for flag in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, flag, lambda: False, raising=False)


# -- single layers ----------------------------------------------------------------------------------------------------
CASES = {  # name -> (in, out, bits, group, symmetric, activations): inside every kernel contract, and outside
    "int8-channel": (256, 128, 8, None, True, None),
    "int8-channel-asym": (256, 128, 8, None, False, None),  # the packed kernel plus the zero-offset correction
    "int8-group64": (256, 128, 8, 64, True, None),  # grouped 8-bit: no packed kernel anywhere
    "int8-k104": (104, 40, 8, None, True, None),  # the CPU int8 kernel needs K % 16
    "int4-g32-asym": (256, 128, 4, 32, False, None),
    "int4-g128-sym": (256, 128, 4, 128, True, None),
    "int4-k96-n40": (96, 40, 4, 32, False, None),  # CUDA tinygemm needs K % 128, the CPU kernel N % 16
    "dynamic-k128-n64": (128, 64, 8, None, True, "int8_dynamic"),  # many rows: torch._int_mm; few: packed int8
    "dynamic-k100": (100, 64, 8, None, True, "int8_dynamic"),  # CUDA _int_mm needs K % 8 ...
    "dynamic-n36": (128, 36, 8, None, True, "int8_dynamic"),  # ... and N % 8 (and M > 16: always, M > SMALL_M)
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("rows", [5, SMALL_M + 9], ids=["few", "many"])
@pytest.mark.parametrize("compute", COMPUTE)
def test_quant_linear_matches_cpu(device, case, rows, compute, monkeypatch):
    monkeypatch.setitem(kernels._FUSED, "fn", None)  # eager dynamic int8 on CPU: the same ops, same int8 activations
    k, n, bits, group, symmetric, activations = CASES[case]
    layer = _layer(k, n, bits=bits, group_size=group, symmetric=symmetric, activations=activations,
                   compute_dtype=compute)  # fmt: skip
    moved, reference = copy.deepcopy(layer).to(device), copy.deepcopy(layer)
    expected = expected_kernel(device, layer, rows)
    if activations and rows > SMALL_M and expected is None:
        reference.activations = None  # a refused _int_mm falls back to the weight-only path
    x = torch.randn(rows, k)
    with torch.no_grad():
        ref = reference(x)
        calls = spy(monkeypatch)
        out = moved(x.to(device))
    assert out.device.type == device.type and out.dtype == torch.float32 and out.shape == (rows, n)
    assert_matmul_close(out, ref, x, layer.dequantize(torch.float32), coarsest(compute, rows=rows))
    assert used(calls, device) == {expected} - {None}


@pytest.mark.parametrize("kernel", ["int8", "int4", "dynamic"])
@pytest.mark.parametrize("missing", ["raises", "absent"])
def test_dequantize_fallback_when_a_kernel_is_missing(device, kernel, missing, monkeypatch):
    bits = 4 if kernel == "int4" else 8
    name = {"int8": "_weight_int8pack_mm", "dynamic": "_int_mm"}.get(kernel, "_weight_int4pack_mm")
    name += "_for_cpu" if kernel == "int4" and device.type == "cpu" else ""
    activations = "int8_dynamic" if kernel == "dynamic" else None
    layer = _layer(256, 128, bits=bits, group_size=32 if bits == 4 else None, activations=activations,
                   compute_dtype=torch.bfloat16)  # fmt: skip
    moved = copy.deepcopy(layer).to(device)
    x = torch.randn(2 * SMALL_M if kernel == "dynamic" else 3, 256).to(torch.bfloat16)
    with torch.no_grad():
        ref = kernels._dense(layer, x)  # what every fallback computes: dequantize + dense GEMM
    monkeypatch.setitem(kernels._FUSED, "fn", None)  # CPU: no torch.compile tracing of the patched kernel
    tries = []

    def refuse(*args, **kwargs):
        tries.append(1)
        raise NotImplementedError(f"{name} is not available (test)")

    monkeypatch.delattr(torch, name) if missing == "absent" else monkeypatch.setattr(torch, name, refuse)
    with torch.no_grad():
        outs = [kernels.quantized_matmul(moved, x.to(device)) for _ in range(2)]
    for out in outs:
        assert_matmul_close(out, ref, x, layer.dequantize(torch.float32), unit_roundoff(torch.bfloat16))
    assert len(tries) == (1 if missing == "raises" else 0)  # remembered: the second call does not try again
    assert any(key[1] == device.type for key in moved._unsupported)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("compute", COMPUTE)
def test_quant_embedding_matches_cpu(device, bits, compute):
    torch.manual_seed(0)
    emb = QuantEmbedding.from_float(nn.Embedding(300, 128, padding_idx=0), bits=bits, group_size=32,
                                    symmetric=bits == 8)  # fmt: skip
    emb.compute_dtype = compute
    moved = copy.deepcopy(emb).to(device)
    ids = torch.randint(0, 300, (4, 9))
    ref, out = emb(ids), moved(ids.to(device))
    assert out.device.type == device.type and out.dtype == compute
    # Each value is q * scale + zero rounded once per side; an FMA on one side can flip the last bit.
    zero = None if emb.weight_zero is None else emb.weight_zero.abs()
    q = unpack(emb.weight_packed, bits).short().abs()
    magnitude = dequantize_groups(q, emb.weight_scale.abs(), zero, torch.float64)
    assert ((out.double().cpu() - ref.double()).abs() <= 4 * unit_roundoff(compute) * magnitude[ids]).all()


# -- whole models ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("compute", COMPUTE)
def test_quantized_model_moves_to_device_and_back(device, bits, compute, monkeypatch):
    model = tiny_model("llama", **LLAMA)
    apply_compression(model, WeightQuantizationConfig(bits=bits, compute_dtype=_name(compute)))
    few, many = tiny_inputs("llama", 2, 7), tiny_inputs("llama", 4, 16)
    ref_few, ref_many = _run(model, few), _run(model, many)  # on CPU int4 layers now hold the CPU kernel layout
    state = {name: t.clone() for name, t in model.state_dict().items()}
    calls = spy(monkeypatch)
    model.to(device)
    assert _on(model, device)
    if device.type != "cpu":  # a layer in the CPU int4 kernel layout went back to the portable one first
        assert all(layout_of(m) == PORTABLE for m in model.modules() if isinstance(m, QuantLinear))
    assert_model_close(_run(model, few), ref_few, coarsest(compute, rows=14))
    assert_model_close(_run(model, many), ref_many, unit_roundoff(compute))
    expected = expected_kernel(device, model.layers[0].self_attn.q_proj, rows=14)
    assert used(calls, device) == {expected} - {None}
    model.to("cpu")
    assert torch.equal(_run(model, few), ref_few) and torch.equal(_run(model, many), ref_many)
    assert all(torch.equal(t, state[name]) for name, t in model.state_dict().items())


def _packed_equal_fraction(a, b) -> float:
    pairs = [(ma.weight_packed.cpu(), mb.weight_packed.cpu()) for ma, mb in zip(a.modules(), b.modules())
             if isinstance(ma, (QuantLinear, QuantEmbedding))]  # fmt: skip
    return sum(int((x == y).sum()) for x, y in pairs) / sum(x.numel() for x, _ in pairs)


@pytest.mark.parametrize("compute", [*COMPUTE, "auto"])
def test_quantize_on_load_onto_device(device, compute, tmp_path, monkeypatch, request):
    tiny_model("llama", **LLAMA).save_pretrained(tmp_path / "fp")
    if compute == "auto":  # with a host CPU without native bf16, only the target device can make "auto" bf16
        _old_cpu(monkeypatch)
    dtype = preferred_compute_dtype(device) if compute == "auto" else compute

    def load(**kwargs):
        recipe = CompressionConfig([WeightQuantizationConfig(bits=4, compute_dtype=_name(compute))])
        return AutoModel.from_pretrained(tmp_path / "fp", quantization_config=recipe, **kwargs).eval()

    loaded, on_cpu = load(device_map=device.type), load()
    assert _on(loaded, device) and isinstance(loaded.embed_tokens, QuantEmbedding)
    layer = loaded.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.compute_dtype == dtype and loaded.norm.weight.dtype == dtype
    inputs, u = tiny_inputs("llama", 4, 16), coarsest(dtype, on_cpu.dtype, rows=64)
    out = _run(loaded, inputs)
    # The device quantized the weights itself: a near-tie in the scale search may rarely round another way.
    equal = _packed_equal_fraction(loaded, on_cpu)
    assert equal >= 0.99
    if equal == 1.0:
        assert_model_close(out, _run(on_cpu, inputs), u)
    assert_model_close(out, _run(copy.deepcopy(loaded).to("cpu"), inputs), u)  # the same weights on the CPU


def test_quantize_on_load_auto_dtype_follows_device_map_simulated(monkeypatch):
    """Shown without a GPU: a CUDA target with bf16 and a host CPU without it; the handler picks the CPU's float32."""
    from hf_compress.plugin import HfCompressQuantizer

    _old_cpu(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    quantizer = HfCompressQuantizer(CompressionConfig([WeightQuantizationConfig(bits=4)]), pre_quantized=False)
    quantizer.update_device_map({"": "cuda"})
    with torch.device("meta"):
        skeleton = AutoModel.from_config(tiny_model("llama", **LLAMA).config)
    quantizer._process_model_before_weight_loading(skeleton)
    assert quantizer._on_load_handlers[0].compute_dtype == torch.bfloat16


def test_gptq_calibration_on_device(device, request):
    batches = [tiny_inputs("bert", 8, 16, seed=s) for s in range(2)]
    inputs = tiny_inputs("bert", 4, 16, seed=9)
    reference = _run(tiny_model("bert", **BERT), inputs)
    errors = {}
    for where in ("cpu", device.type):
        model = tiny_model("bert", **BERT).to(where)
        config = WeightQuantizationConfig(bits=4, algorithm="gptq", compute_dtype="float32")
        apply_compression(model, config, calibration_data=batches)
        errors[where] = float((_run(model, inputs).cpu() - reference).norm() / reference.norm())
    assert errors[device.type] <= 1.5 * errors["cpu"] + 1e-6, errors


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("compute", COMPUTE)
def test_lora_backward_through_quantized_layers(device, bits, compute):
    peft = pytest.importorskip("peft")
    model = tiny_model("bert", AutoModelForSequenceClassification, num_labels=3, **BERT)
    config = WeightQuantizationConfig(bits=bits, compute_dtype=_name(compute), exclude_modules=["classifier"])
    apply_compression(model, config)
    torch.manual_seed(0)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, init_lora_weights=False,
                             target_modules=["query", "value", "intermediate.dense"])  # fmt: skip
    lora = peft.get_peft_model(model, config).eval()  # eval: no dropout, so both devices see the same graph
    moved = copy.deepcopy(lora).to(device)
    batch = {**tiny_inputs("bert", 2, 9), "labels": torch.tensor([0, 2])}  # 18 rows: the packed kernels
    grads = {}
    for key, m in (("cpu", lora), ("device", moved)):
        where = next(m.parameters()).device
        m(**{k: v.to(where) for k, v in batch.items()}).loss.backward()
        trainable = {n: p for n, p in m.named_parameters() if p.requires_grad}
        assert trainable and all(p.grad is not None and p.grad.device.type == where.type for p in trainable.values())
        grads[key] = {n: p.grad for n, p in trainable.items()}
    first = next(n for n in grads["cpu"] if "layer.0." in n and "lora_A" in n)
    assert grads["device"][first].abs().sum() > 0  # the gradient crossed the frozen quantized layers
    for n, g in grads["cpu"].items():
        assert_model_close(grads["device"][n], g, coarsest(compute, rows=18), ops=2 * OPS)


@pytest.mark.parametrize("made_on", ["cpu", "device"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("compute", [*COMPUTE, "auto"])
def test_checkpoint_reloads_on_cpu_and_with_device_map(device, made_on, bits, compute, tmp_path, monkeypatch):
    """Quantize on the CPU or on the device, save, reload on the CPU and with ``device_map``: the same tensors, and
    "auto" resolved where each copy runs (bf16 on any bf16 GPU, float32 on a CPU without native bf16)."""
    _old_cpu(monkeypatch)
    dtype = {"cpu": preferred_compute_dtype("cpu"), "device": preferred_compute_dtype(device)}
    if compute != "auto":
        dtype = dict.fromkeys(dtype, compute)
    assert device.type == "cpu" or compute != "auto" or dtype["device"] == torch.bfloat16
    model = tiny_model("llama", **LLAMA).to("cpu" if made_on == "cpu" else device)
    apply_compression(model, WeightQuantizationConfig(bits=bits, compute_dtype=_name(compute)))
    inputs = tiny_inputs("llama", 4, 16)
    out, state = _run(model, inputs), model.state_dict()
    model.save_pretrained(tmp_path)
    for where, kwargs in (("cpu", {}), ("device", {"device_map": device.type})):
        again = AutoModel.from_pretrained(tmp_path, **kwargs).eval()
        assert _on(again, device if where == "device" else torch.device("cpu"))
        assert again.norm.weight.dtype == again.layers[0].mlp.up_proj.compute_dtype == dtype[where]
        assert all(torch.equal(t.cpu(), state[name].cpu().to(t.dtype)) for name, t in again.state_dict().items())
        if where == made_on:  # the same weights, dtype and kernels
            assert_model_close(_run(again, inputs), out, unit_roundoff(dtype[where]), ops=1)
        else:
            assert_model_close(_run(again, inputs), out, coarsest(*dtype.values(), rows=64))


def test_compress_end_to_end_on_device(device, tmp_path):
    from hf_compress import compress

    model = tiny_model("bert", **BERT).to(device)
    result = compress(model, WeightQuantizationConfig(bits=8), output_dir=tmp_path / "out", latency_rounds=1,
                      card=False)  # fmt: skip
    assert result.report.latency["device"] == device.type and _on(result.model, device)
    assert isinstance(result.model.encoder.layer[0].attention.self.query, QuantLinear)
    inputs = tiny_inputs("bert", 2, 7)
    cpu = AutoModel.from_pretrained(tmp_path / "out").eval()
    assert_model_close(_run(cpu, inputs), _run(result.model, inputs), coarsest(cpu.dtype, result.model.dtype, rows=14))
