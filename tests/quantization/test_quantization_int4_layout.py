"""The CPU int4 kernel layout as a state of `QuantLinear`: one copy of the weights, portable everywhere else."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_same_model_outputs, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM

from hf_compress import apply_compression
from hf_compress.quantization import QuantLinear, WeightQuantizationConfig, int4_layout, int4_matmul
from hf_compress.quantization.packing import unpack_int4_unsigned
from hf_compress.utils import model_bytes


pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=25, deadline=None)
@given(
    blocks=st.integers(1, 40),  # rows in units of 16, the CPU kernel's requirement
    group=st.sampled_from([32, 64, 128, 256]),
    groups=st.integers(1, 3),
    chunk=st.sampled_from([64, 96, 4096]),
    seed=st.integers(0, 2**16),
)
def test_portable_kernel_portable_round_trip_is_exact(blocks, group, groups, chunk, seed):
    rows, cols = 16 * blocks, group * groups
    portable = torch.randint(
        0, 256, (rows, cols // 2), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    saved, int4_layout.CHUNK_ROWS = int4_layout.CHUNK_ROWS, chunk
    try:
        kernel = int4_layout.to_cpu_kernel(portable)
        assert kernel is not None and kernel.shape == portable.shape and kernel.dtype == torch.uint8
        assert torch.equal(int4_layout.from_cpu_kernel(kernel), portable)
        assert torch.equal(int4_layout.kernel_nibbles(kernel), unpack_int4_unsigned(portable))
    finally:
        int4_layout.CHUNK_ROWS = saved
    if chunk % 64 == 0:  # chunks of whole blocks (64 rows with AVX512, 32 otherwise): torch's whole-matrix layout
        whole = torch._convert_weight_to_int4pack_for_cpu(unpack_int4_unsigned(portable).to(torch.int32), 2)
        assert torch.equal(kernel, whole)


def test_blocks_in_any_slot_order_unpack_and_multiply_through_the_generic_gather():
    layout = int4_layout._block_layout(112)
    assert layout is not None and sum(blocks.count * blocks.rows for blocks in layout) == 112
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.nn.Linear(96, 112), bits=4, group_size=32, compute_dtype=torch.float32)
    portable = layer.weight_packed
    assert int4_layout.to_cpu_kernel_(layer)
    kernel, x = layer.weight_packed, torch.randn(40, 96)
    expected = int4_matmul.kernel_linear(layer, x, layer.bias)
    # The same blocks described by explicit slot tensors (what an unknown but regular order would get).
    explicit = []
    for blocks in layout:
        r = torch.arange(blocks.rows)
        half = blocks.rows // 2
        slots = 2 * (r % half) + r // half if blocks.order == "halves" else r
        explicit.append(blocks._replace(order=slots if isinstance(blocks.order, str) else blocks.order))
    assert torch.equal(int4_layout._unpack_chunk(kernel, tuple(explicit)), unpack_int4_unsigned(portable))
    layer._int4_converted = layer._int4_converted._replace(layouts=((0, 112, tuple(explicit)),))
    torch.testing.assert_close(int4_matmul.kernel_linear(layer, x, layer.bias), expected, rtol=0, atol=0)


@pytest.mark.parametrize("rows, cols, group, symmetric", [(1536, 384, 32, False), (112, 96, 32, True),
                                                          (4160, 64, 64, False)])  # fmt: skip
@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
def test_many_rows_from_the_kernel_layout_equal_the_portable_layout_exactly(rows, cols, group, symmetric, compute):
    # Whole 64-row blocks, a partial 48-row one (pairs order), two conversion chunks (4096 + 64 rows); 300 input rows
    # take the dequantize + GEMM path in both dtypes (above `kernel_linear`'s float32 limit).
    torch.manual_seed(0)
    linear = torch.nn.Linear(cols, rows)
    layer = QuantLinear.from_float(linear, bits=4, group_size=group, symmetric=symmetric, compute_dtype=compute)
    x = torch.randn(300, cols).to(compute)
    with torch.inference_mode():
        weight, expected = layer.dequantize(compute), layer(x)
        assert int4_layout.to_cpu_kernel_(layer) and layer._layout == int4_layout.CPU_INT4PACK
        transposed = int4_matmul.kernel_weight_t(layer, compute)
        assert transposed is not None and transposed.shape == (cols, rows)
        # The same (q - 8) * s + z steps in the same dtype: bit-identical values, not merely close.
        assert torch.equal(transposed.t(), weight) and torch.equal(layer.dequantize(compute), weight)
        # x @ W^T from the transposed weight may run another GEMM kernel (accumulation order) than F.linear: allow
        # one rounding of the output in its dtype plus a float32 accumulation-order error over the `cols` products.
        magnitude = x.abs().float() @ weight.abs().float().t() + layer.bias.abs().float()
        tolerance = torch.finfo(compute).eps * expected.abs().float() + cols * torch.finfo(torch.float32).eps * magnitude
        for _ in range(2):  # the second call reuses the scratch buffers the first one filled
            assert ((layer(x).float() - expected.float()).abs() <= tolerance).all()


def _int4_llama():
    torch.manual_seed(0)
    # 224 = 3 x 64 + 32 rows: whole kernel blocks and a partial one; 2 key/value heads of 16: a 32-row projection.
    config = tiny_config("llama", hidden_size=64, intermediate_size=224, num_attention_heads=4, vocab_size=160)
    model = AutoModelForCausalLM.from_config(config).eval()
    apply_compression(model, WeightQuantizationConfig(bits=4, group_size=32, symmetric=False, algorithm="rtn"))
    return model


def _resident_int4_bytes(model) -> int:
    """Bytes of every distinct storage a QuantLinear holds: buffers, the kernel table and any cached layouts."""
    storages = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            cached = [t for value in module._kernel_cache.values() for t in value]
            table = int4_layout.kernel_table(module) if module._layout == int4_layout.CPU_INT4PACK else None
            for tensor in [*module.buffers(recurse=False), table, *cached]:
                if tensor is not None:
                    storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def test_decoding_switches_layers_to_the_kernel_layout_without_a_second_copy(tmp_path, machine_compute_dtype):
    model = _int4_llama()
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    ids = torch.randint(0, 160, (1, 40), generator=torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    resident, reported = _resident_int4_bytes(model), model_bytes(model)
    with torch.inference_mode():
        dense = model(ids).logits  # 40 rows: dequantize + GEMM from the portable layout
        decoded = model(ids[:, :1]).logits  # 1 row: the int4 kernel, which converts each layer once
    assert all(m._layout == int4_layout.CPU_INT4PACK and not m._kernel_cache for m in linears)
    # Causal: the first position does not see the rest. bf16 activations in the kernel: close, not equal.
    torch.testing.assert_close(decoded[:, 0], dense[:, 0], atol=2e-2, rtol=2e-2)
    # One copy: the packed bytes are replaced (not joined) by the kernel's, and the kernel's scale/zero table is
    # the storage of weight_scale / weight_zero. Keeping the portable tensors too would add ~80 % here.
    assert _resident_int4_bytes(model) == resident
    assert all(m.weight_scale.untyped_storage().data_ptr() == int4_layout.kernel_table(m).untyped_storage().data_ptr()
               for m in linears)  # fmt: skip
    assert model_bytes(model) == reported
    with torch.inference_mode():
        # many rows straight from the kernel layout (blockwise GEMMs: the same weights, another summation order)
        assert_same_model_outputs(model(ids).logits, dense, machine_compute_dtype)
        assert torch.equal(model(ids[:, :1]).logits, decoded)
    after = model.state_dict()  # always the portable layout
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state.items())
    with torch.inference_mode():
        assert torch.equal(reloaded(ids[:, :1]).logits, decoded)


def test_converted_layers_copy_load_move_and_realign_exactly(machine_compute_dtype):
    model = _int4_llama()
    ids = torch.randint(0, 160, (1, 1), generator=torch.Generator().manual_seed(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        decoded = model(ids).logits
    layer = model.model.layers[0].mlp.down_proj
    weight = layer.dequantize(torch.float32)

    copied = copy.deepcopy(model)  # pickles and copies carry the portable layout; they convert again when decoding
    assert copied.model.layers[0].mlp.down_proj._layout == int4_layout.PORTABLE
    with torch.inference_mode():
        assert torch.equal(copied(ids).logits, decoded)

    layer.realign_()
    assert layer._layout == int4_layout.CPU_INT4PACK and torch.equal(layer.dequantize(torch.float32), weight)
    model.to("cpu")  # changes nothing: the layout stays
    assert layer._layout == int4_layout.CPU_INT4PACK
    # A buffer replaced from outside (an offloading hook, an assignment) is portable again: never read as the kernel's.
    other = model.model.layers[1].mlp.up_proj
    other.weight_packed = state["model.layers.1.mlp.up_proj.weight_packed"].clone()
    assert other._layout == int4_layout.PORTABLE
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, decoded) and other._layout == int4_layout.CPU_INT4PACK
    model.load_state_dict(state)  # portable tensors into converted layers: back to portable first
    assert layer._layout == int4_layout.PORTABLE and torch.equal(layer.weight_packed, state[
        "model.layers.0.mlp.down_proj.weight_packed"])  # fmt: skip
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, decoded)
    model.double()  # a real cast (or a device move) returns to the portable layout, values intact
    assert layer._layout == int4_layout.PORTABLE and layer.weight_scale.dtype == torch.float64
    torch.testing.assert_close(layer.dequantize(torch.float32), weight)


def test_lora_trains_on_top_of_the_kernel_layout(machine_compute_dtype):
    from peft import LoraConfig, get_peft_model

    model = _int4_llama()
    ids = torch.randint(0, 160, (2, 3), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        model(ids[:1, :1])  # decoding converts every layer
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    peft_model.train()
    loss = peft_model(input_ids=ids, labels=ids).loss  # 6 rows: kernel forward, backward via dequantized_weight
    loss.backward()
    # lora_B starts at zero, so lora_A gets no gradient yet; layer 0's lora_B gets one only through the backward
    # pass of every later quantized layer (the input gradient from `dequantized_weight` of the kernel layout).
    grads = {n: p.grad for n, p in peft_model.named_parameters() if "lora_B" in n}
    assert len(grads) == 4 and all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "layers.0." in n)
    base = peft_model.base_model.model.model.layers[0].self_attn.q_proj
    assert base.base_layer._layout == int4_layout.CPU_INT4PACK


def test_a_graph_compiled_before_any_eager_decoding_step_still_decodes(machine_compute_dtype):
    model = _int4_llama()
    reference = copy.deepcopy(model)
    ids = torch.randint(0, 160, (1, 1), generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(model, fullgraph=True)  # the data-dependent conversion checks cannot run while tracing
    with torch.inference_mode():
        expected = reference(ids).logits  # eager: converts the reference's layers
        # One row: both run the int4 kernel on bf16 activations (whatever the compute dtype), fused differently.
        assert_same_model_outputs(compiled(ids).logits, expected, torch.bfloat16)
    assert reference.model.layers[0].mlp.up_proj._layout == int4_layout.CPU_INT4PACK
    assert model.model.layers[0].mlp.up_proj._layout == int4_layout.PORTABLE  # with a cached copy, as before


# The int4 kernel's block layout depends on the ATen CPU capability torch selects at start-up (64-row blocks with
# AVX-512, 32 with AVX2, 32 in the generic build); ATEN_CPU_CAPABILITY forces a lower one. This module runs once
# natively and once more in a subprocess under each other capability this CPU can run.
_CAPABILITIES = ("default", "avx2", "avx512")


@pytest.mark.skipif(os.environ.get("ATEN_CPU_CAPABILITY") is not None, reason="already the forced-capability run")
@pytest.mark.parametrize("capability", _CAPABILITIES)
def test_this_module_passes_under_every_aten_cpu_capability(capability, tmp_path):
    native = torch.backends.cpu.get_cpu_capability().lower()
    if capability == native:
        pytest.skip(f"{capability} is this machine's native capability: the run above already covered it")
    if _CAPABILITIES.index(capability) > _CAPABILITIES.index(native if native in _CAPABILITIES else "default"):
        pytest.skip(f"this CPU cannot run {capability} code (its best is {native})")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__]
    # A fresh inductor cache: its precompiled C++ header is keyed without the ATen capability, so a header built
    # under another one (without at::vec) breaks compiled graphs here (torch 2.13; "'at::vec' has not been declared").
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    lines = done.stdout.strip().splitlines() or [done.stderr[-500:]]
    failures = "\n".join(line for line in lines if line.startswith(("FAILED", "ERROR", "E   ")))[:3000]
    assert done.returncode == 0, f"under ATEN_CPU_CAPABILITY={capability}: {lines[-1]}\n{failures}"
    summary = lines[-1]
    assert "passed" in summary and "failed" not in summary
