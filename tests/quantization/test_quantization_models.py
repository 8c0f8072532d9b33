"""Weight quantization on real model families: save -> plain from_pretrained round trips, loading guards,
quantize-on-load, GPTQ and QAT (tiny models; MiniLM where the real checkpoint matters)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from transformers import AutoModel, AutoModelForSequenceClassification, BertForSequenceClassification

from hf_compress import CompressionConfig, apply_compression
from hf_compress.quantization import (
    QuantEmbedding,
    QuantLinear,
    WeightQuantizationConfig,
    convert_qat,
    prepare_qat,
)
from hf_compress.quantization.kernels import preferred_compute_dtype
from hf_compress.utils import count_parameters, model_bytes


def _hidden(model, inputs):
    with torch.no_grad():
        return model(**inputs).last_hidden_state


@pytest.mark.parametrize("bits", [8, 4])
def test_roundtrip_every_family(family, bits, tmp_path):
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    reference = _hidden(model, inputs).float()
    fp_params, fp_bytes = count_parameters(model), model_bytes(model)
    apply_compression(model, WeightQuantizationConfig(bits=bits))
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    if family != "vit":
        assert any(isinstance(m, QuantEmbedding) for m in model.modules())
    assert count_parameters(model) == fp_params  # packed weights count as what they represent
    assert model_bytes(model) < fp_bytes * (0.5 if family == "vit" else 0.35 if bits == 8 else 0.25)
    # The leftover floats (norms, biases, a ViT's conv) stay in the compute dtype; the packed modules themselves hold
    # int8 + one bf16 scale per row of 32, or int4 + bf16 scale and zero per group of 32.
    packed = [m for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    packed_bytes = sum(b.numel() * b.element_size() for m in packed for b in m.buffers())
    represented_fp32 = 4 * sum(m.weight_scale.shape[0] * m.in_features for m in packed)
    assert packed_bytes <= represented_fp32 * (0.27 if bits == 8 else 0.16)
    out = _hidden(model, inputs)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(1), reference.flatten(1)).min()
    assert cos > (0.995 if bits == 8 else 0.95)
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded.get_submodule(next(n for n, m in model.named_modules() if isinstance(m, QuantLinear))))\
        is QuantLinear  # fmt: skip
    assert torch.equal(_hidden(reloaded, inputs), out)


def test_minilm_int8_roundtrip_and_fidelity(minilm_dir, minilm_tokenizer, debian_texts, tmp_path):
    model = AutoModel.from_pretrained(minilm_dir).eval()
    enc = minilm_tokenizer(debian_texts[:16], padding=True, truncation=True, max_length=64, return_tensors="pt")
    reference = _hidden(model, enc)
    fp_bytes = model_bytes(model)
    apply_compression(model, WeightQuantizationConfig(bits=8, algorithm="rtn"))
    assert model_bytes(model) <= 0.27 * fp_bytes
    out = _hidden(model, enc)
    mask = enc["attention_mask"].unsqueeze(-1)
    pooled = lambda h: (h.float() * mask).sum(1) / mask.sum(1)  # noqa: E731
    assert torch.nn.functional.cosine_similarity(pooled(out), pooled(reference)).mean() > 0.999
    model.save_pretrained(tmp_path)
    disk = sum(p.stat().st_size for p in tmp_path.glob("*.safetensors"))
    assert disk <= 0.27 * fp_bytes
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    # compute_dtype="auto": the machine's fast dtype for the floats, scales stored in bf16 whatever the machine.
    assert reloaded.dtype == preferred_compute_dtype("cpu")
    assert reloaded.encoder.layer[0].output.dense.weight_scale.dtype == torch.bfloat16
    assert torch.equal(_hidden(reloaded, enc), out)
    for module in reloaded.modules():  # re-aligned after the zero-copy mmap load (int8 kernel requirement)
        if isinstance(module, QuantLinear):
            assert module.weight_packed.data_ptr() % 64 == 0


@pytest.mark.parametrize("compute_dtype", ["auto", "bfloat16", "float32"])
def test_compute_dtype_decides_float_weights_and_scales(compute_dtype, tmp_path):
    model = tiny_model("llama")
    inputs = tiny_inputs("llama")
    apply_compression(model, WeightQuantizationConfig(bits=4, compute_dtype=compute_dtype))
    expected = preferred_compute_dtype("cpu") if compute_dtype == "auto" else getattr(torch, compute_dtype)
    scale_dtype = torch.bfloat16 if compute_dtype == "auto" else expected
    layer = model.layers[0].mlp.down_proj
    assert model.norm.weight.dtype == expected and layer.compute_dtype == expected
    assert layer.weight_scale.dtype == scale_dtype
    out = _hidden(model, inputs)
    assert out.dtype == expected
    model.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    again = reloaded.layers[0].mlp.down_proj
    assert reloaded.norm.weight.dtype == expected and again.compute_dtype == expected
    assert again.weight_scale.dtype == scale_dtype
    assert torch.equal(_hidden(reloaded, inputs), out)


def test_head_class_names_survive_auto_model(tmp_path):
    model = tiny_model("bert", AutoModelForSequenceClassification, num_labels=3)
    apply_compression(model, WeightQuantizationConfig(bits=4))
    recipe = model.config.quantization_config.techniques[0]
    assert "head:classifier" in recipe.modules and "encoder.layer.0.attention.self.query" in recipe.modules
    model.save_pretrained(tmp_path)
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        logits = model(**inputs).logits
    again = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(again.classifier, QuantLinear)
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, logits)
    base = AutoModel.from_pretrained(tmp_path).eval()  # no classifier: its entry is skipped
    assert isinstance(base.encoder.layer[0].attention.self.query, QuantLinear)


def test_loading_without_plugin_fails_loudly(tmp_path):
    model = tiny_model("bert")
    apply_compression(model, WeightQuantizationConfig(bits=8))
    model.save_pretrained(tmp_path)
    code = f"from transformers import AutoModel; AutoModel.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "import hf_compress" in result.stderr


def test_bad_targets_and_tied_embeddings():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="matched no"):
        apply_compression(model, WeightQuantizationConfig(target_modules=["not_a_module"]))
    with pytest.raises(ValueError, match="does not divide"):
        apply_compression(tiny_model("bert"), WeightQuantizationConfig(bits=4, group_size=48))
    from transformers import AutoModelForCausalLM

    lm = tiny_model("gpt2", AutoModelForCausalLM)
    apply_compression(lm, WeightQuantizationConfig(bits=8))
    # Tied input embedding and LM head stay float (quantizing one would silently untie them).
    assert isinstance(lm.transformer.wte, torch.nn.Embedding) and lm.lm_head.weight is lm.transformer.wte.weight


def test_mixed_precision_overrides():
    model = tiny_model("llama")
    config = WeightQuantizationConfig(bits=4, overrides={"down_proj": {"bits": 8}}, exclude_modules=["o_proj"])
    apply_compression(model, config)
    layer = model.layers[0]
    assert layer.mlp.down_proj.bits == 8 and layer.mlp.up_proj.bits == 4
    assert isinstance(layer.self_attn.o_proj, torch.nn.Linear)


def test_quantize_on_load_matches_apply(tmp_path):
    model = tiny_model("llama", tie_word_embeddings=False)
    model.save_pretrained(tmp_path / "fp", max_shard_size="20KB")
    assert len(list((tmp_path / "fp").glob("*.safetensors"))) > 1
    inputs = tiny_inputs("llama")
    config = WeightQuantizationConfig(bits=4)
    loaded = AutoModel.from_pretrained(tmp_path / "fp", quantization_config=CompressionConfig([config])).eval()
    assert isinstance(loaded.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(loaded.embed_tokens, QuantEmbedding)
    apply_compression(model, config)
    assert torch.equal(_hidden(loaded, inputs), _hidden(model, inputs))
    assert (
        loaded.config.quantization_config.techniques[0].modules
        == model.config.quantization_config.techniques[0].modules
    )
    loaded.save_pretrained(tmp_path / "q")
    again = AutoModel.from_pretrained(tmp_path / "q").eval()
    assert torch.equal(_hidden(again, inputs), _hidden(model, inputs))


def test_gptq_beats_rtn_and_needs_data():
    model = tiny_model("bert")
    inputs = tiny_inputs("bert", batch=8, seq=16)
    reference = _hidden(model, inputs).float()
    batches = [tiny_inputs("bert", batch=8, seq=16, seed=s) for s in range(4)]
    with pytest.raises(ValueError, match="needs calibration data"):
        apply_compression(tiny_model("bert"), WeightQuantizationConfig(bits=4, algorithm="gptq"))
    errors = {}
    for algorithm in ("rtn", "gptq"):
        quantized = tiny_model("bert")
        apply_compression(quantized, WeightQuantizationConfig(bits=4, algorithm=algorithm), calibration_data=batches)
        errors[algorithm] = (_hidden(quantized, inputs).float() - reference).norm()
    assert errors["gptq"] < errors["rtn"]


def test_qat_trains_then_converts(tmp_path):
    model = tiny_model("bert").train()
    config = WeightQuantizationConfig(bits=4)
    prepare_qat(model, config)
    query = model.encoder.layer[0].attention.self.query
    before = query.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=100.0)
    inputs = tiny_inputs("bert")
    model(**inputs).last_hidden_state.square().mean().backward()
    assert query.weight.grad is not None and query.weight.grad.abs().sum() > 0  # straight-through gradient
    optimizer.step()
    assert not torch.equal(query.weight, before)
    model.eval()
    fake = _hidden(model, inputs).float()
    convert_qat(model)
    assert isinstance(model.encoder.layer[0].attention.self.query, QuantLinear)
    # Same grid as in training; only the bf16 storage of the scales can flip a rounding here and there.
    converted = _hidden(model, inputs).float()
    assert torch.nn.functional.cosine_similarity(converted.flatten(1), fake.flatten(1)).min() > 0.99
    model.save_pretrained(tmp_path)
    assert isinstance(AutoModel.from_pretrained(tmp_path).encoder.layer[0].attention.self.query, QuantLinear)
