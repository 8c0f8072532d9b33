"""Sequential structured pruning (`PruningStep`, importance='activation'): layer 0 chooses exactly as the one-pass
per-layer path, later layers are scored on the pruned stream, padding changes nothing, the bias compensation lowers
the error, the checkpoint reloads with plain from_pretrained, compress(..., sequential=True) records the recipe, and
what cannot run layer by layer is refused with the fix."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from conftest import tiny_model, token_batches
from transformers import AutoModel, AutoModelForCausalLM

import hf_compress
from hf_compress import apply_compression, get_recipe
from hf_compress.architectures import get_adapter
from hf_compress.calibration import Calibration
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig
from hf_compress.pruning.activation import channel_statistics
from hf_compress.quantization import WeightQuantizationConfig
from hf_compress.sequential import PruningStep, run_sequential, sequential_compress, step_for


pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"bert": AutoModel, "gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM}
HEADS = HeadPruningConfig(fraction=0.5, importance="activation", ranking="per_layer")
FFN = FFNPruningConfig(fraction=0.25, importance="activation", ranking="per_layer")


class _Recording(PruningStep):
    """PruningStep that keeps every layer's [E[x], E[x^2]] it was given."""

    def __init__(self, config):
        super().__init__(config)
        self.stats: dict[str, torch.Tensor] = {}

    def compress_layer(self, model, prefix, moments, cross=None):
        self.stats.update({k: v.clone() for k, v in moments.items()})
        return super().compress_layer(model, prefix, moments, cross)


def _run(model, config, data):
    step = _Recording(config)
    resolved = run_sequential(model, step, Calibration.of(data), progress=False)
    return resolved, step.stats


def _layer(model, index):
    return dict(get_adapter(model).layer_modules(model)[index].state_dict())


@pytest.mark.parametrize("config", [HEADS, FFN], ids=["heads", "ffn"])
@pytest.mark.parametrize("family", sorted(CLASSES))
def test_layer0_as_one_pass_later_layers_on_the_pruned_stream(family, config):
    base = tiny_model(family, auto_class=CLASSES[family])
    data = token_batches(pad=3)
    kind = "heads" if isinstance(config, HeadPruningConfig) else "ffn"
    float_stats = channel_statistics(copy.deepcopy(base), kind, data)
    sequential, one_pass = copy.deepcopy(base), copy.deepcopy(base)
    resolved, stats = _run(sequential, config, data)
    apply_compression(one_pass, config, calibration_data=data)
    expected = get_recipe(one_pass).techniques[0]
    assert type(resolved) is type(expected) and resolved.importance == "activation"
    if kind == "heads":
        assert resolved.heads_to_prune[0] == expected.heads_to_prune[0]
        assert resolved.head_importance[0] == pytest.approx(expected.head_importance[0], rel=1e-4, abs=1e-6)
        # every layer loses its share, in a valid grouped-query layout for the Llama (2 key/value heads)
        assert sorted(len(v) for v in resolved.heads_to_prune.values()) == [2, 2]
    else:
        assert resolved.intermediate_sizes == expected.intermediate_sizes  # per_layer: the sizes need no scores
    # layer 0 (float inputs) is cut and compensated exactly as in one pass; its neighbours' weights differ later
    first, reference = _layer(sequential, 0), _layer(one_pass, 0)
    assert first.keys() == reference.keys()
    for key in first:
        torch.testing.assert_close(first[key], reference[key], rtol=1e-5, atol=1e-6)
    # the statistics of layer 0 are the float model's; layer 1 saw layer 0's pruned outputs, so its are not
    names = sorted(stats)
    assert len(names) == 2
    torch.testing.assert_close(stats[names[0]], float_stats[0], rtol=1e-5, atol=1e-8)
    assert not torch.allclose(stats[names[1]], float_stats[1], rtol=1e-3, atol=1e-6)


def test_padding_does_not_change_the_choice():
    base = tiny_model("llama", auto_class=AutoModelForCausalLM)
    padded = token_batches(count=2, pad=5)
    alone = [{"input_ids": b["input_ids"][i : i + 1, : int(b["attention_mask"][i].sum())]} for b in padded
             for i in range(4)]  # fmt: skip
    with_padding, stats_padded = _run(copy.deepcopy(base), HEADS, padded)
    without, stats_alone = _run(copy.deepcopy(base), HEADS, alone)
    assert with_padding.heads_to_prune == without.heads_to_prune
    for name in stats_alone:
        torch.testing.assert_close(stats_padded[name], stats_alone[name], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("config", [HEADS, FFN], ids=["heads", "ffn"])
def test_bias_compensation_lowers_the_error(config):
    base = tiny_model("bert")
    data = token_batches(pad=3)
    errors = {}
    for compensate in (False, True):
        model = copy.deepcopy(base)
        sequential_compress(model, dataclasses.replace(config, compensate_bias=compensate), data, progress=False)
        with torch.no_grad():
            errors[compensate] = sum((model(**b).last_hidden_state - base(**b).last_hidden_state)
                                     [b["attention_mask"].bool()].pow(2).sum().item() for b in data)  # fmt: skip
    assert errors[True] < 0.9 * errors[False], errors


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_sequential_checkpoint_reloads_with_from_pretrained(family, tmp_path):
    model = tiny_model(family, auto_class=CLASSES[family])
    data = token_batches(pad=3)
    sequential_compress(model, HEADS, data, progress=False)
    sequential_compress(model, FFN, data, progress=False)
    recipe = get_recipe(model)
    assert [t.method for t in recipe.techniques] == ["head_pruning", "ffn_pruning"]
    model.save_pretrained(tmp_path)
    reloaded = CLASSES[family].from_pretrained(tmp_path).eval()  # hf_compress is imported: the recipe rebuilds shapes
    assert get_recipe(reloaded).techniques[0].heads_to_prune == recipe.techniques[0].heads_to_prune
    with torch.no_grad():
        key = "last_hidden_state" if family == "bert" else "logits"
        torch.testing.assert_close(reloaded(**data[0])[key], model(**data[0])[key])
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in model.parameters())


def test_compress_sequential_records_the_recipe(tmp_path):
    base = tiny_model("gpt2", auto_class=AutoModelForCausalLM)
    base.save_pretrained(tmp_path / "fp32")
    data = token_batches(pad=3)
    gptq = WeightQuantizationConfig(bits=4, algorithm="gptq", group_size=16)
    result = hf_compress.compress(str(tmp_path / "fp32"), HEADS, gptq, calibration_data=data, sequential=True,
                                  output_dir=tmp_path / "out", measure=False)  # fmt: skip
    recipe = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["techniques"]
    assert [t["method"] for t in recipe] == ["head_pruning", "weight_quantization"]
    assert recipe[0]["importance"] == "activation" and recipe[0]["fraction"] is None
    assert sum(len(v) for v in recipe[0]["heads_to_prune"].values()) == 4
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**data[0]).logits, result.model(**data[0]).logits)


def test_what_cannot_run_layer_by_layer_is_refused():
    with pytest.raises(ValueError, match=r"ranking='global'.*Allowed: ranking='per_layer'.*Pass ranking='per_layer'"):
        step_for(HeadPruningConfig(fraction=0.5, importance="activation"))
    with pytest.raises(ValueError, match=r"ranking='global'.*ranking='per_layer'"):
        sequential_compress(tiny_model("bert"), FFNPruningConfig(fraction=0.5, importance="activation"),
                            token_batches(), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"needs importance='activation'; got .*importance='gradient'"):
        step_for(HeadPruningConfig(fraction=0.5, importance="gradient", ranking="per_layer"))
    with pytest.raises(ValueError, match="needs calibration_data"):
        sequential_compress(tiny_model("bert"), HEADS, None, progress=False)
    with pytest.raises(ValueError, match=r"HeadPruningConfig.*importance='activation'.*got configs"):
        hf_compress.compress(tiny_model("bert"), HeadPruningConfig(fraction=0.5, importance="gradient"),
                             calibration_data=token_batches(), sequential=True, measure=False)  # fmt: skip
    # an explicit map needs no ranking: accepted whatever `ranking` says, and applied as given
    model = tiny_model("bert")
    explicit = HeadPruningConfig(heads_to_prune={1: [0, 2]}, importance="activation")
    assert sequential_compress(model, explicit, token_batches(), progress=False) is model
    assert get_recipe(model).techniques[0].heads_to_prune == {1: [0, 2]}
