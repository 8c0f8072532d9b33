"""Packing, quantization error bounds, kernels and bad input of hf_compress.quantization (no models)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from hf_compress.quantization import QuantEmbedding, QuantLinear, WeightQuantizationConfig
from hf_compress.quantization.algorithms import quantize_weight
from hf_compress.quantization.config import ModuleSpec
from hf_compress.quantization.kernels import SMALL_M, _dense, quantized_matmul
from hf_compress.quantization.packing import dequantize_groups, pack, pack_int4, unpack, unpack_int4, unpack_int4_into
from hf_compress.utils import aligned


@settings(max_examples=50, deadline=None)
@given(rows=st.integers(1, 9), half_cols=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_int4_pack_roundtrip(rows, half_cols, seed):
    q = torch.randint(-8, 8, (rows, 2 * half_cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_cols)
    assert torch.equal(unpack_int4(packed), q)
    # Portable layout: even column in the low nibble, offset by 8.
    assert torch.equal(packed[:, 0] & 15, (q[:, 0] + 8).to(torch.uint8))
    # The table unpacking into float outputs, with and without a caller's (dirty) index buffer.
    for dtype in (torch.float32, torch.bfloat16):
        fresh = unpack_int4_into(packed, torch.empty(q.shape, dtype=dtype))
        index = torch.full(packed.shape, 255, dtype=torch.int32)
        reused = unpack_int4_into(packed, torch.empty(q.shape, dtype=dtype), index)
        assert torch.equal(fresh, q.to(dtype)) and torch.equal(reused, fresh)



@pytest.mark.parametrize("shape", [(2500, 6), (3, 700, 4), (1, 1030, 2), (0, 8)])
def test_int4_pack_in_row_blocks_equals_the_whole_tensor_formula(shape):
    """Packing works on blocks of rows (bounded temporaries for an LM head); the result is the whole-tensor
    formula's, across block edges, for leading dimensions that flatten over a block and for a transposed input."""
    q = torch.randint(-8, 8, shape, generator=torch.Generator().manual_seed(1), dtype=torch.int8)
    for source in (q, q.transpose(0, -2).contiguous().transpose(0, -2)):
        u = (source.to(torch.int16) + 8).to(torch.uint8)
        assert torch.equal(pack_int4(source), u[..., 0::2] | (u[..., 1::2] << 4))
    if q.numel():
        assert torch.equal(unpack_int4(pack_int4(q)), q)

@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_int8_pack_is_identity(seed):
    q = torch.randint(-128, 128, (3, 16), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    assert torch.equal(unpack(pack(q, 8), 8), q)


def test_pack_rejects_odd_columns():
    with pytest.raises(ValueError, match="even number of columns"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


def _reconstruct(weight, bits, group, symmetric, algorithm, dtype=torch.float32):
    qw = quantize_weight(weight, bits, group, symmetric, algorithm, dtype)
    return qw, dequantize_groups(qw.q, qw.scale, qw.zero, torch.float32)


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([4, 8]),
    symmetric=st.booleans(),
    group=st.sampled_from([8, 16, 32]),
    scale=st.floats(1e-3, 10.0),
    seed=st.integers(0, 2**16),
)
def test_rtn_error_bound(bits, symmetric, group, scale, seed):
    """Round-to-nearest never errs by more than half a step inside its range (fp32 scales, so no storage rounding)."""
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(seed)) * scale
    qw, rec = _reconstruct(weight, bits, group, symmetric, "rtn")
    step = qw.scale.float().repeat_interleave(group, 1)
    assert ((weight - rec).abs() <= step * 0.5001 + 1e-6).all()
    assert int(qw.q.min()) >= -(1 << (bits - 1)) and int(qw.q.max()) < (1 << (bits - 1))


@settings(max_examples=25, deadline=None)
@given(bits=st.sampled_from([4, 8]), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_error_minimising_methods_beat_rtn(bits, symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(16, 64, generator=gen) * torch.rand(16, 1, generator=gen) + 0.1 * torch.randn(16, 64)
    _, rtn = _reconstruct(weight, bits, 32, symmetric, "rtn")
    _, mse = _reconstruct(weight, bits, 32, symmetric, "mse")
    assert ((weight - mse) ** 2).sum() <= ((weight - rtn) ** 2).sum() * 1.0001 + 1e-9


def test_hqq_improves_heavy_tailed_groups():
    weight = torch.distributions.StudentT(2.0).sample((64, 128))
    _, rtn = _reconstruct(weight, 4, 32, False, "rtn")
    _, hqq = _reconstruct(weight, 4, 32, False, "hqq")
    assert (weight - hqq).abs().mean() < (weight - rtn).abs().mean()


def test_zero_rows_are_exact_and_nan_is_rejected():
    weight = torch.randn(4, 64)
    weight[1] = 0
    for bits, symmetric in [(8, True), (4, False), (4, True)]:
        _, rec = _reconstruct(weight, bits, 32, symmetric, "mse", torch.bfloat16)
        assert torch.equal(rec[1], torch.zeros(64))
    weight[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf"):
        quantize_weight(weight, 8, 64, True, name="encoder.layer.0.query")
    weight[2, 3] = float("inf")
    with pytest.raises(ValueError, match="encoder.layer.0.query"):
        quantize_weight(weight, 8, 64, True, name="encoder.layer.0.query")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(bits=3), "bits must be 4 or 8"),
        (dict(bits=True), "bits must be 4 or 8"),
        (dict(group_size=1), "group_size must be an integer >= 2"),
        (dict(algorithm="awq"), "algorithm must be one of"),
        (dict(bits=4, activations="int8_dynamic"), "needs bits=8"),
        (dict(activations="int4"), "activations must be"),
        (dict(compute_dtype="float64"), "compute_dtype must be one of"),
        (dict(overrides={"query": {"bitz": 4}}), "unknown keys"),
        (dict(overrides={"query": {"bits": 2}}), r"overrides\['query'\]\['bits'\] must be 4 or 8"),
    ],
    ids=[
        "bits",
        "bool-bits",
        "group",
        "algorithm",
        "dyn-4bit",
        "activations",
        "dtype",
        "override-key",
        "override-bits",
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        WeightQuantizationConfig(**kwargs)


def test_group_size_minus_one_is_one_scale_per_output_channel():
    for bits in (8, 4):
        config = WeightQuantizationConfig(bits=bits, group_size=-1, overrides={"query": {"group_size": 16}})
        assert config.spec_for("layer.0.output.dense", "linear", 1536).group_size == 1536
        assert config.spec_for("layer.0.intermediate.dense", "linear", 384).group_size == 384
        assert config.spec_for("layer.0.query", "linear", 384).group_size == 16
    assert WeightQuantizationConfig(bits=8, overrides={"value": {"group_size": -1}}).spec_for(
        "layer.0.value", "linear", 512
    ).group_size == 512
    with pytest.raises(ValueError, match=r"or -1 \(one scale per output channel\), got -2"):
        WeightQuantizationConfig(group_size=-2)
    from conftest import tiny_model

    from hf_compress import apply_compression

    model = tiny_model("bert")
    apply_compression(model, WeightQuantizationConfig(bits=8, group_size=-1, algorithm="rtn"))
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.weight_scale.shape == (m.out_features, 1) for m in layers)
    assert {m.in_features for m in layers} == {32, 64}  # both widths: the whole row each time


def test_group_size_must_divide_features():
    config = WeightQuantizationConfig(bits=4, group_size=48)
    with pytest.raises(ValueError, match="does not divide the 64 input features of 'fc'"):
        config.spec_for("fc", "linear", 64)


def test_config_json_roundtrip_and_overrides():
    config = WeightQuantizationConfig(bits=4, overrides={"value": {"bits": 8}})
    again = WeightQuantizationConfig.from_dict(config.to_dict())
    assert again == config
    assert config.spec_for("layer.0.value", "linear", 64) == ModuleSpec("linear", 8, 64, True)
    assert config.spec_for("layer.0.query", "linear", 64) == ModuleSpec("linear", 4, 32, False)


@pytest.mark.parametrize("bits, group, symmetric", [(8, None, True), (8, None, False), (8, 32, True), (4, 32, False),
                                                    (4, 64, True)])  # fmt: skip
@pytest.mark.parametrize("rows", [1, 5, SMALL_M + 7])
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_quant_linear_kernels_match_dequantized_weight(bits, group, symmetric, rows, compute):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    layer = QuantLinear.from_float(linear, bits=bits, group_size=group, symmetric=symmetric, compute_dtype=compute)
    assert layer.weight_scale.dtype == torch.bfloat16 and layer.bias.dtype == compute
    x = torch.randn(rows, 128)
    expected = x.double() @ layer.dequantize(torch.float64).t() + layer.bias.double()
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (rows, 64)
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.02)
    # Whatever kernel was picked (few rows: packed kernels on bf16 activations), it agrees with the dense path.
    x2 = x.to(compute)
    out2 = quantized_matmul(layer, x2)
    assert out2.dtype == compute
    torch.testing.assert_close(out2.float(), _dense(layer, x2).float(), atol=0.05, rtol=0.02)
    # And the weight really is stored packed.
    assert layer.weight_packed.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert layer.weight_packed.numel() == 64 * 128 * bits // 8
    assert layer.logical_numel() == 64 * 128 + 64


def test_int8_few_rows_with_width_not_multiple_of_16_falls_back_instead_of_crashing():
    # torch._weight_int8pack_mm segfaults on CPU for in_features % 16 != 0 (e.g. 3 pruned heads of 8 dims = 24).
    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(24, 16), bits=8)
    x2 = torch.randn(2, 24).to(torch.bfloat16)
    torch.testing.assert_close(quantized_matmul(layer, x2).float(), _dense(layer, x2).float(), atol=0.05, rtol=0.02)


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_dynamic_int8_activations_close_to_weight_only(compute):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    weight_only = QuantLinear.from_float(linear, bits=8, compute_dtype=compute)
    dynamic = QuantLinear.from_float(linear, bits=8, activations="int8_dynamic", compute_dtype=compute)
    x = torch.randn(2 * SMALL_M, 128)
    ref = weight_only(x)
    out = dynamic(x)
    assert not torch.equal(out, ref)  # really a different kernel
    assert torch.nn.functional.cosine_similarity(out, ref, dim=-1).min() > 0.999


def test_gradients_reach_the_input_and_bias_of_a_frozen_quant_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = QuantLinear.from_float(linear, bits=4, group_size=32, symmetric=False)
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.bias.grad is not None
    # The input gradient is that of the dequantized linear map.
    x2 = x.detach().clone().requires_grad_(True)
    ref = torch.nn.functional.linear(x2, layer.dequantize(torch.float32), layer.bias.detach().float())
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, atol=0.1, rtol=0.05)


def test_to_bfloat16_and_embedding_lookup():
    torch.manual_seed(0)
    table = nn.Embedding(50, 64, padding_idx=0)
    emb = QuantEmbedding.from_float(table, bits=4, group_size=32, symmetric=False)
    ids = torch.tensor([[1, 2, 49], [0, 5, 7]])
    out = emb(ids)
    torch.testing.assert_close(out.float(), emb.dequantize(torch.float32)[ids], atol=1e-2, rtol=1e-2)
    assert (out.float() - table(ids)).abs().max() < 0.5
    layer = QuantLinear.from_float(nn.Linear(64, 16), bits=8, compute_dtype=torch.float32)
    assert layer.compute_dtype == torch.float32
    layer = layer.to(torch.bfloat16)  # a float cast of the module moves its compute dtype along
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer.to("cpu").compute_dtype == torch.bfloat16  # a device move does not
    assert emb.logical_numel() == 50 * 64


def test_realign_gives_aligned_storage():
    base = torch.zeros(64 * 65 + 8, dtype=torch.int8)
    view = base[8:].view(65, 64)
    assert view.data_ptr() % 64 != 0
    fixed = aligned(view)
    assert fixed.data_ptr() % 64 == 0 and torch.equal(fixed, view)


def test_default_group_sizes_follow_bits_model_kind_and_activations():
    int8 = WeightQuantizationConfig(bits=8)
    assert int8.spec_for("enc.dense", "linear", 384).group_size == 128  # best measured fidelity for encoders
    assert int8.spec_for("enc.dense", "linear", 200).group_size == 200  # 128 does not divide: one scale per row
    assert int8.spec_for("enc.dense", "linear", 128).group_size == 128
    # Decoders keep per-channel scales for the packed decoding kernel; so does the int8 x int8 matmul.
    assert int8.spec_for("dec.proj", "linear", 4096, decoder=True).group_size == 4096
    dynamic = WeightQuantizationConfig(bits=8, activations="int8_dynamic")
    assert dynamic.spec_for("enc.dense", "linear", 384).group_size == 384
    assert WeightQuantizationConfig(bits=4).spec_for("x", "linear", 384).group_size == 32
    assert WeightQuantizationConfig(bits=8, group_size=64).spec_for("x", "linear", 384, decoder=True).group_size == 64


def test_dynamic_int8_refuses_grouped_scales_and_falls_back():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    grouped = QuantLinear.from_float(
        linear, bits=8, group_size=128, activations="int8_dynamic", compute_dtype=torch.float32
    )
    x = torch.randn(2 * SMALL_M, 256)
    # A per-channel int8 x int8 matmul would be wrong here; the dense path gives the dequantized result instead.
    expected = x @ grouped.dequantize(torch.float32).t() + grouped.bias
    torch.testing.assert_close(grouped(x), expected, atol=1e-4, rtol=1e-4)


def test_fused_dynamic_int8_matches_the_eager_kernel():
    import shutil

    from hf_compress.quantization import kernels

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(128, 96), bits=8, activations="int8_dynamic", compute_dtype=torch.float32)
    x = torch.randn(3 * SMALL_M, 128)
    with torch.no_grad():
        fused = quantized_matmul(layer, x, layer.bias)
        eager = kernels._dynamic_int8_eager(x, layer.weight_packed.t(), layer.weight_scale[:, 0], layer.bias)
    if shutil.which("c++") or shutil.which("g++"):  # torch.compile builds the fused loops with the C++ compiler
        assert kernels._FUSED.get("dynamic") is not None
    torch.testing.assert_close(fused, eager, atol=1e-4, rtol=1e-4)


def test_int4_cpu_kernel_layout_is_built_in_row_blocks_without_changing_it():
    from hf_compress.quantization.kernels import _int4_kernel_layout
    from hf_compress.quantization.packing import unpack_int4_unsigned

    torch.manual_seed(0)
    layer = QuantLinear.from_float(nn.Linear(64, 4096 + 48), bits=4, group_size=32, symmetric=False)
    whole = torch._convert_weight_to_int4pack_for_cpu(unpack_int4_unsigned(layer.weight_packed).to(torch.int32), 2)
    blocked, _ = _int4_kernel_layout(layer, torch.device("cpu"))  # the layer now holds this tensor, not a copy
    assert torch.equal(blocked, whole)
