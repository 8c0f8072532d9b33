"""Sequential GPTQ with the float model's outputs as the target: the cross moments (padding left out), the first
layer as plain GPTQ, the float stream spilled like the quantized one, and a lower error to the float model."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_model, token_batches
from torch import nn
from transformers import AutoModelForCausalLM

from hf_compress import apply_compression
from hf_compress.calibration import Calibration, MomentCollector, real_tokens
from hf_compress.quantization import WeightQuantizationConfig
from hf_compress.quantization.gptq import float_target_weight, hessian_factor
from hf_compress.sequential import GPTQStep, run_sequential, sequential_compress
from hf_compress.sequential.steps import DEFAULT_FLOAT_TARGET


pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = WeightQuantizationConfig(bits=4, algorithm="gptq", group_size=16)


def test_cross_moments_over_real_tokens():
    torch.manual_seed(0)
    first, second = nn.Linear(8, 8), nn.Linear(8, 3)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    pairs = [(torch.randn(2, 5, 8), torch.randn(2, 5, 8)) for _ in range(2)]
    with MomentCollector({"first": first, "second": second}) as collector:
        for x_float, x_quant in pairs:
            collector.set_mask(mask, reference=True)
            second(first(x_float))
            collector.set_mask(mask)
            second(first(x_quant))
    moments, cross = collector.moments(), collector.cross_moments()
    for name, inputs in (("first", lambda x: x), ("second", lambda x: first(x))):
        xf = torch.cat([real_tokens(inputs(f), mask) for f, _ in pairs]).detach()
        xq = torch.cat([real_tokens(inputs(q), mask) for _, q in pairs]).detach()
        torch.testing.assert_close(moments[name], xq.t() @ xq / 16)  # 2 batches x 8 real tokens
        torch.testing.assert_close(cross[name], (xf - xq).t() @ xq / 16)
    with MomentCollector({"first": first}) as collector:  # a reference forward must be paired before the next one
        collector.set_mask(None, reference=True)
        first(torch.randn(2, 8))
        with pytest.raises(RuntimeError, match="never paired"):
            collector.set_mask(None, reference=True)



def test_projected_cross_moment_is_the_weight_times_the_full_one():
    """A module in ``project`` gets ``W D`` (``[out, in]``) instead of ``D``, never shares its sums with a module
    on the same input, and gives the same float-target weight as the full ``D``."""
    torch.manual_seed(0)
    down, side = nn.Linear(12, 4), nn.Linear(12, 6)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 1:] = False
    pairs = [(torch.randn(3, 5, 12), torch.randn(3, 5, 12)) for _ in range(2)]
    collectors = {}
    for label, project in (("full", None), ("projected", {"down": down.weight})):
        with MomentCollector({"down": down, "side": side}, project=project) as collector:
            for x_float, x_quant in pairs:
                collector.set_mask(mask, reference=True)
                down(x_float), side(x_float)
                collector.set_mask(mask)
                down(x_quant), side(x_quant)
        collectors[label] = collector
    full, projected = collectors["full"].cross_moments(), collectors["projected"].cross_moments()
    assert projected["down"].shape == (4, 12) and projected["side"].shape == (12, 12)
    torch.testing.assert_close(projected["down"], down.weight.detach() @ full["down"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(projected["side"], full["side"])
    moments = collectors["projected"].moments()
    factor = hessian_factor(moments["down"], 0.01)
    for strength in (1.0, 0.5):
        expected = float_target_weight(down.weight, factor, full["down"], "down", strength)
        got = float_target_weight(down.weight, factor, dict(projected), "down", strength, projected=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    cross = {"down": full["down"].clone()}
    float_target_weight(down.weight, factor, cross, "down")
    assert "down" not in cross  # popped: freed as soon as W D exists
    with pytest.raises(ValueError, match=r"expected \(4, 12\)"):
        float_target_weight(down.weight, factor, full["down"], "down", projected=True)
    with pytest.raises(ValueError, match="no cross moments to project"):
        MomentCollector({"down": down}, channels=True, project={"down": down.weight})

class _Recording(GPTQStep):
    """GPTQStep that notes the stages it compresses and which modules got cross moments, and the activation spill
    folders while it runs."""

    def __init__(self, config, folder=None, **kwargs):
        super().__init__(config, **kwargs)
        self.stages, self.cross, self.folder, self.spills = [], {}, folder, set()

    def _note(self, folder):
        if folder is not None:
            self.spills.update(p.name for p in folder.iterdir() if p.name.startswith("hf_compress_activations_"))

    def compress_modules(self, model, names, moments, cross=None):
        self.stages.append(list(names))
        self.cross.update({name: name in (cross or {}) for name in names})
        self._note(self.folder)
        return super().compress_modules(model, names, moments, cross)

    def compress_layer(self, model, prefix, moments, cross=None):
        self.cross.update({name: False for name in moments})
        return super().compress_layer(model, prefix, moments, cross)

    def finish(self, model, moments, cross=None):
        self.cross.update({name: name in (cross or {}) for name in moments})
        return super().finish(model, moments, cross)


def test_stages_and_where_the_cross_moments_go():
    base = tiny_model("llama", auto_class=AutoModelForCausalLM)
    step = _Recording(CONFIG)
    run_sequential(base, step, Calibration.of(token_batches(pad=4)), progress=False)
    attn, mlp = "model.layers.{}.self_attn.", "model.layers.{}.mlp."
    for index in (0, 1):  # in execution order, grouped by the input they share
        assert step.stages[4 * index : 4 * index + 4] == [
            [attn.format(index) + p for p in ("q_proj", "k_proj", "v_proj")], [attn.format(index) + "o_proj"],
            [mlp.format(index) + p for p in ("gate_proj", "up_proj")], [mlp.format(index) + "down_proj"]]  # fmt: skip
    # the first stage of the first layer sees the float model's own inputs: plain (one-pass) GPTQ; every later
    # stage, and the untied LM head on the last hidden states, gets the float target
    assert [n for n, has in step.cross.items() if not has] == [
        attn.format(0) + p for p in ("q_proj", "k_proj", "v_proj")
    ]
    assert step.cross["lm_head"]
    symmetric = _Recording(CONFIG, float_target=False)
    run_sequential(tiny_model("llama", auto_class=AutoModelForCausalLM), symmetric, Calibration.of(token_batches()),
                   progress=False)  # fmt: skip
    assert symmetric.stages == [] and not any(symmetric.cross.values())


def test_both_streams_spill_and_match_memory(tmp_path):
    base = tiny_model("gpt2", auto_class=AutoModelForCausalLM)  # Conv1D: transposed weights
    data = token_batches()
    in_memory, on_disk = copy.deepcopy(base), copy.deepcopy(base)
    sequential_compress(in_memory, CONFIG, data, max_activation_bytes=None, progress=False)
    step = _Recording(CONFIG, folder=tmp_path)
    one_stream = 4 * 12 * base.config.n_embd * 4  # bytes of one batch's hidden states
    run_sequential(on_disk, step, Calibration.of(data), max_activation_bytes=3 * one_stream, offload_dir=tmp_path,
                   offload_layers=True, progress=False)  # fmt: skip
    assert len(step.spills) == 2  # each stream's half of the bound holds one batch of three: both spilled
    for (key, a), (_, b) in zip(in_memory.state_dict().items(), on_disk.state_dict().items(), strict=True):
        assert torch.equal(a, b), key
    assert list(tmp_path.iterdir()) == []


def test_float_target_is_closer_to_the_float_model():
    torch.manual_seed(0)
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, tie_word_embeddings=False)  # fmt: skip
    base = AutoModelForCausalLM.from_config(config).eval()
    calibration, held_out = token_batches(count=8, rows=8, seq=32, seed=1), token_batches(count=2, rows=8, seq=32, seed=2)
    with torch.no_grad():
        reference = [base(**b).logits.log_softmax(-1) for b in held_out]
    quantization = WeightQuantizationConfig(bits=4, algorithm="gptq", group_size=32)
    kl = {}
    for variant in ("one-pass", False, True):
        model = copy.deepcopy(base)
        if variant == "one-pass":
            apply_compression(model, quantization, calibration_data=calibration)
        else:
            sequential_compress(model, quantization, calibration, progress=False, float_target=variant)
        with torch.no_grad():
            logp = [model(**b).logits.float().log_softmax(-1) for b in held_out]
        kl[variant] = sum(torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean").item()
                               for p, q in zip(reference, logp, strict=True))  # fmt: skip
    # measured: one-pass 0.0172, plain sequential 0.0171, float target 0.0104
    assert kl[True] < 0.9 * min(kl[False], kl["one-pass"]), kl


def test_float_target_values():
    assert GPTQStep(CONFIG).strength == DEFAULT_FLOAT_TARGET == 0.5 and GPTQStep(CONFIG).float_target
    assert GPTQStep(CONFIG, float_target=0.25).strength == 0.25 and GPTQStep(CONFIG, float_target=1).strength == 1.0
    assert not GPTQStep(CONFIG, float_target=False).float_target
    for wrong in ("yes", 0, 1.5, -0.1, None):
        with pytest.raises(ValueError, match=r"float_target must be True .* a strength in \(0, 1\]"):
            GPTQStep(CONFIG, float_target=wrong)


class _Keeping(GPTQStep):
    """GPTQStep that keeps, per stage, its moments, cross moments and a copy of the model as the stage found it."""

    def __init__(self, config):
        super().__init__(config)
        self.seen = []

    def compress_modules(self, model, names, moments, cross=None):
        kept = ({n: moments[n].clone() for n in names}, {n: v.clone() for n, v in (cross or {}).items()})
        self.seen.append((list(names), *kept, copy.deepcopy(model)))
        return super().compress_modules(model, names, moments, cross)


def _module_inputs(model, names, batches):
    """Real-token inputs of the named modules over `batches`."""
    seen = {name: [] for name in names}
    state = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: seen[n].append(real_tokens(a[0], state["mask"]).detach().float())) for n in names]  # fmt: skip
    with torch.no_grad():
        for batch in batches:
            state["mask"] = batch["attention_mask"].bool()
            model(**batch)
    for hook in hooks:
        hook.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_cross_moments_pair_the_float_model_with_the_quantized_one(family):
    """Each stage's moments: ``x_q`` from the model as that stage found it (earlier layers and stages quantized),
    ``x_f`` from the float model."""
    base = tiny_model(family) if family == "bert" else tiny_model(family, auto_class=AutoModelForCausalLM)
    data = token_batches(pad=5)
    step = _Keeping(WeightQuantizationConfig(bits=4, algorithm="gptq", group_size=16, compute_dtype="float32"))
    run_sequential(copy.deepcopy(base), step, Calibration.of(data), progress=False)
    assert len(step.seen) == 8  # 2 layers x 4 stages
    for names, moments, cross, snapshot in step.seen:
        x_float, x_quant = _module_inputs(base, names, data), _module_inputs(snapshot, names, data)
        for name in names:
            xf, xq = x_float[name], x_quant[name]
            torch.testing.assert_close(moments[name], xq.t() @ xq / len(xq), rtol=1e-4, atol=1e-5)
            if name in step.projected:  # a down-projection's cross moment arrives already multiplied: W D
                weight = base.get_submodule(name).weight.detach().float()
                expected = weight @ ((xf - xq).t() @ xq / len(xq))
                torch.testing.assert_close(cross[name], expected, rtol=1e-4, atol=1e-5)
            elif name in cross:
                torch.testing.assert_close(cross[name], (xf - xq).t() @ xq / len(xq), rtol=1e-4, atol=1e-5)
            else:  # the first stage: the same inputs
                torch.testing.assert_close(xf, xq, rtol=0, atol=0)


@pytest.mark.parametrize("with_cross", [False, True])
def test_gptq_by_row_blocks_equals_the_whole_weight(monkeypatch, with_cross):
    """A tall weight (an LM head) is quantized a block of rows at a time into preallocated outputs: GPTQ never mixes
    rows, so the result is the whole weight's bit for bit, the last block short included."""
    from hf_compress.quantization.config import ModuleSpec
    from hf_compress.quantization.gptq import gptq_weight
    from hf_compress.sequential import steps

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(13, 32, generator=generator)
    x = torch.randn(200, 32, generator=generator)
    factor = hessian_factor(x.t() @ x / len(x), CONFIG.damp)
    cross = 0.05 * torch.randn(32, 32, generator=generator) if with_cross else None
    spec = ModuleSpec("linear", 4, 16, False)
    whole = gptq_weight(weight, factor, spec, CONFIG.damp, CONFIG.scale_dtype, "head", cross=cross, strength=0.5)
    monkeypatch.setattr(steps, "_GPTQ_ROWS", 5)  # blocks of 5, 5 and 3 rows
    blocks = steps._gptq_by_rows(weight, factor, spec, CONFIG, "head", cross, 0.5)
    for got, want in zip(blocks, whole):
        assert torch.equal(got, want)
    assert blocks.q.shape == (13, 32) and blocks.zero is not None
