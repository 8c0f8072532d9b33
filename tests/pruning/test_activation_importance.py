"""importance='activation' (FLAP's fluctuation) in the one-pass path: the scores are Var(x_j) * ||W[:, j]||^2 of the
output projections' inputs over the real tokens, padding changes nothing, and the bias compensation lowers the
error of the pruned model where the output projection has a bias (and leaves a bias-free Llama as it is)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import tiny_model, token_batches
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from hf_compress import apply_compression, get_recipe
from hf_compress.architectures import get_adapter, head_dim
from hf_compress.calibration import MomentCollector
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig, compute_importance


pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = {"bert": None, "gpt2": AutoModelForCausalLM, "llama": AutoModelForCausalLM}


def _model(family: str, **overrides):
    cls = CLASSES[family]
    return tiny_model(family, **overrides) if cls is None else tiny_model(family, auto_class=cls, **overrides)


def direct_scores(model, kind: str, batches: list[dict]) -> list[torch.Tensor]:
    """The fluctuation scores computed from scratch: the output projections' inputs recorded by plain hooks, the
    padding positions dropped by hand, the variance and the weight-column norms in float64, normalised per layer."""
    adapter = get_adapter(model)
    path = adapter.output if kind == "heads" else adapter.ffn_out
    layers = adapter.layer_modules(model)
    inputs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    mask = {}
    handles = [adapter.sub(layer, path).register_forward_pre_hook(
        lambda m, a, i=i: inputs[i].append(a[0].detach()[mask["now"]])) for i, layer in enumerate(layers)]  # fmt: skip
    with torch.no_grad():
        for batch in batches:
            mask["now"] = batch["attention_mask"].bool()
            model(**batch)
    for handle in handles:
        handle.remove()
    width = head_dim(model) if kind == "heads" else 1
    scores = []
    for i, layer in enumerate(layers):
        x = torch.cat(inputs[i]).double()
        module = adapter.sub(layer, path)
        weight = module.weight.detach().double()
        norms = weight.pow(2).sum(1) if isinstance(module, Conv1D) else weight.pow(2).sum(0)
        score = (x.var(0, unbiased=False) * norms).reshape(-1, width).sum(1)
        scores.append(score / score.norm())
    return scores


@pytest.mark.parametrize("kind", ["heads", "ffn"])
@pytest.mark.parametrize("family", sorted(CLASSES))
def test_scores_equal_a_direct_computation(family, kind):
    model = _model(family)
    data = token_batches(pad=4)
    scores = compute_importance(model, kind, "activation", data, progress=False)
    expected = direct_scores(model, kind, data)
    assert len(scores) == len(expected) == 2
    for actual, wanted in zip(scores, expected):
        assert actual.shape == wanted.shape == ((4,) if kind == "heads" else (64 if family != "gpt2" else 128,))
        torch.testing.assert_close(actual.double(), wanted, rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_scores():
    model = _model("llama")
    padded = token_batches(count=2, pad=5)
    alone = [{"input_ids": b["input_ids"][i : i + 1, : int(b["attention_mask"][i].sum())]} for b in padded
             for i in range(4)]  # fmt: skip
    for kind in ("heads", "ffn"):
        with_padding = compute_importance(model, kind, "activation", padded, progress=False)
        without = compute_importance(model, kind, "activation", alone, progress=False)
        for a, b in zip(with_padding, without):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and the padding positions do hold activations that would change them (the mask matters)
    unmasked = [{"input_ids": b["input_ids"]} for b in padded]
    scores = [torch.cat(compute_importance(model, "heads", "activation", d, progress=False))
              for d in (unmasked, padded)]  # fmt: skip
    assert not torch.allclose(*scores)


def test_channel_moments_are_the_mean_and_the_diagonal_of_the_full_moment():
    model = _model("bert")
    module = model.encoder.layer[0].output.dense
    data = token_batches(pad=4)
    stats = {}
    for channels in (False, True):
        with MomentCollector({"down": module}, channels=channels) as collector:
            for batch in data:
                collector.set_mask(batch["attention_mask"])
                model(**batch)
        stats[channels] = collector.moments()["down"]
    direct_inputs = []
    handle = module.register_forward_pre_hook(lambda m, a: direct_inputs.append(a[0].detach()))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    handle.remove()
    x = torch.cat([t[b["attention_mask"].bool()] for t, b in zip(direct_inputs, data)]).double()
    assert stats[True].shape == (2, 64) and stats[True].dtype == torch.float64
    torch.testing.assert_close(stats[True][0], x.mean(0), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(stats[True][1], stats[False].diagonal().double(), rtol=1e-5, atol=1e-7)


def _output_error(model, pruned, data) -> float:
    with torch.no_grad():
        return sum((pruned(**b).last_hidden_state - model(**b).last_hidden_state)[b["attention_mask"].bool()]
                   .pow(2).sum().item() for b in data)  # fmt: skip


@pytest.mark.parametrize("config", [
    HeadPruningConfig(fraction=0.5, importance="activation", ranking="per_layer"),
    FFNPruningConfig(fraction=0.5, importance="activation"),
    # whatever ranks the units, calibration data gives the means the compensation needs
    HeadPruningConfig(fraction=0.5, importance="gradient", ranking="per_layer"),
    FFNPruningConfig(fraction=0.5, importance="gradient"),
    HeadPruningConfig(heads_to_prune={0: [0, 2], 1: [1]}),
], ids=["heads", "ffn", "heads-gradient", "ffn-gradient", "heads-explicit"])  # fmt: skip
def test_bias_compensation_lowers_the_error(config):
    model = _model("bert")
    data = token_batches(pad=3)
    errors, recipes = {}, {}
    for compensate in (False, True):
        pruned = copy.deepcopy(model)
        apply_compression(pruned, dataclasses.replace(config, compensate_bias=compensate), calibration_data=data)
        errors[compensate] = _output_error(model, pruned, data)
        recipes[compensate] = get_recipe(pruned).techniques[0]
    # the same units went (the scores do not depend on the compensation), and the compensated model is closer
    assert recipes[True].heads_to_prune if isinstance(config, HeadPruningConfig) else recipes[True].intermediate_sizes
    assert dict(vars(recipes[True]), compensate_bias=False) == vars(recipes[False])
    assert errors[True] < 0.9 * errors[False], errors


def test_bias_compensation_adds_the_removed_mean_to_the_bias():
    model = _model("gpt2")
    data = token_batches(pad=3)
    pruned = copy.deepcopy(model)
    apply_compression(pruned, FFNPruningConfig(fraction=0.5, importance="activation", ranking="per_layer"),
                      calibration_data=data)  # fmt: skip
    inputs = []
    handle = model.transformer.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    handle.remove()
    mean = torch.cat([x[b["attention_mask"].bool()] for x, b in zip(inputs, data)]).double().mean(0)
    kept = compute_importance(model, "ffn", "activation", data, progress=False)[0].argsort(descending=True)[:64]
    removed = sorted(set(range(128)) - set(kept.tolist()))
    weight = model.transformer.h[0].mlp.c_proj.weight.double()  # Conv1D: [in, out]
    expected = model.transformer.h[0].mlp.c_proj.bias.double() + mean[removed] @ weight[removed]
    torch.testing.assert_close(pruned.transformer.h[0].mlp.c_proj.bias.double(), expected, rtol=1e-5, atol=1e-6)


def test_llama_without_bias_is_left_as_it_is():
    model = _model("llama")
    data = token_batches()
    states = []
    for compensate in (False, True):
        pruned = copy.deepcopy(model)
        apply_compression(pruned, HeadPruningConfig(fraction=0.5, importance="activation", ranking="per_layer",
                                                    compensate_bias=compensate), calibration_data=data)  # fmt: skip
        states.append(pruned.state_dict())
        assert pruned.model.layers[0].self_attn.o_proj.bias is None
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_global_ranking_and_the_recipe():
    model = _model("gpt2")
    apply_compression(model, HeadPruningConfig(fraction=0.25, importance="activation"),
                      calibration_data=token_batches())  # fmt: skip
    recipe = get_recipe(model).techniques[0]
    assert recipe.importance == "activation" and recipe.ranking == "global"
    assert sum(len(v) for v in recipe.heads_to_prune.values()) == 2
    assert len(recipe.head_importance) == 2 and all(len(row) == 4 for row in recipe.head_importance)


def test_activation_without_calibration_data_is_refused():
    for config in (HeadPruningConfig(fraction=0.5, importance="activation"),
                   FFNPruningConfig(fraction=0.5, importance="activation")):  # fmt: skip
        with pytest.raises(ValueError, match=r"'activation' needs calibration data.*importance='magnitude'"):
            apply_compression(_model("bert"), config)
    with pytest.raises(ValueError, match="compensate_bias must be True or False"):
        HeadPruningConfig(fraction=0.5, importance="activation", compensate_bias="yes")
