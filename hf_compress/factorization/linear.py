"""Factorize linear layers into two thin ones (`apply`) and rebuild them on an empty skeleton (`restructure`)."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ..architectures import get_adapter
from ..calibration import calibration_batches, input_moments
from ..config import TechniqueConfig
from ..utils import check_pattern_matches, matches, replace_module
from .config import LowRankLinearConfig
from .layers import FactorizedEmbedding, FactorizedLMHead, LowRankLinear
from .svd import factor_params, rank_for_energy, whitened_svd


__all__ = [
    "apply_low_rank_linear",
    "restructure_low_rank_linear",
    "low_rank_targets",
    "linear_shape",
    "linear_weight",
    "factorize_targets",
    "saves_too_little",
    "dense_message",
    "resolved_config",
]

_LINEAR_TYPES = (nn.Linear, Conv1D)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an `nn.Linear` or a GPT-2 `Conv1D` (which stores its weight transposed)."""
    return (module.nf, module.nx) if isinstance(module, Conv1D) else (module.out_features, module.in_features)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of an `nn.Linear` or a GPT-2 `Conv1D` (a transposed view of the latter's)."""
    return module.weight.t() if isinstance(module, Conv1D) else module.weight


def _targets(model: PreTrainedModel, config: LowRankLinearConfig) -> dict[str, nn.Module]:
    """Target layers by name relative to the base model (so the names survive loading with another Auto class)."""
    adapter = get_adapter(model)
    base = model.base_model
    inside_factorized = {
        id(m) for owner in base.modules() if isinstance(owner, (LowRankLinear, FactorizedEmbedding, FactorizedLMHead))
        for m in owner.modules()
    }  # fmt: skip
    if config.target_modules is None:
        default = {
            f"{adapter.layers}.{i}.{path}" for i in range(len(adapter.layer_modules(model)))
            for path in adapter.ffn_projections()
        }  # fmt: skip
        found = {n: m for n, m in base.named_modules() if n in default and isinstance(m, _LINEAR_TYPES)}
    else:
        found = {
            n: m for n, m in base.named_modules() if isinstance(m, _LINEAR_TYPES) and matches(n, config.target_modules)
        }
        if not found:
            examples = [n for n, m in base.named_modules() if isinstance(m, _LINEAR_TYPES)][:6]
            raise ValueError(
                f"target_modules {config.target_modules!r} matched no linear layer of {type(base).__name__}. Names "
                f"(relative to the base model) look like {examples}."
            )
    check_pattern_matches("exclude_modules", config.exclude_modules, list(found), kind="targeted linear layer")
    return {
        n: m for n, m in found.items() if id(m) not in inside_factorized and not matches(n, config.exclude_modules)
    }


def _input_moments(
    model: PreTrainedModel, targets: dict[str, nn.Module], data: Any, max_texts: int, tokenizer: Any
) -> dict[str, torch.Tensor]:
    """``E[x x^T]`` of each target's input over the real (unpadded) calibration tokens (zeros where none arrive)."""
    batches = calibration_batches(model, data, tokenizer=tokenizer, max_samples=max_texts)
    moments = input_moments(model, targets, batches, float64=True)
    return {name: moments.get(name, torch.zeros(linear_shape(m)[1], linear_shape(m)[1], dtype=torch.float64))
            for name, m in targets.items()}  # fmt: skip


def _budget_ranks(spectra: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]], budget: float):
    """Spend ``budget`` of the layers' parameters on the components with the most (relative) energy per parameter."""
    candidates = []
    for name, s in spectra.items():
        energy = s.double().pow(2)
        energy = energy / energy.sum().clamp_min(1e-30)
        cost = sum(shapes[name])
        candidates += [(float(e) / cost, name, cost) for e in energy]
    allowance = budget * sum(o * i for o, i in shapes.values())
    ranks = dict.fromkeys(spectra, 0)
    for _, name, cost in sorted(candidates, key=lambda c: -c[0]):
        if cost > allowance:
            break
        allowance -= cost
        ranks[name] += 1
    return {name: max(rank, 1) for name, rank in ranks.items()}


def low_rank_targets(model: PreTrainedModel, config: LowRankLinearConfig) -> dict[str, nn.Module]:
    """The linear layers `config` factorizes, by name relative to the base model: its `ranks` when given (fixed by
    the caller: only those modules), else the targeted layers (`target_modules`, default every FFN projection)."""
    if config.ranks is None:
        return _targets(model, config)
    unknown = sorted(set(config.ranks) - set(dict(model.base_model.named_modules())))
    if unknown:
        raise ValueError(f"ranks names modules that do not exist in {type(model.base_model).__name__}: {unknown}.")
    return {name: model.base_model.get_submodule(name) for name in config.ranks}


def _choose_ranks(decompositions: dict[str, tuple], shapes: dict[str, tuple[int, int]],
                  config: LowRankLinearConfig) -> dict[str, int]:  # fmt: skip
    if config.ranks is not None:
        return {name: config.ranks[name] for name in decompositions}
    if config.rank is not None:
        return dict.fromkeys(decompositions, config.rank)
    if config.energy is not None:
        return {name: rank_for_energy(d[1], config.energy) for name, d in decompositions.items()}
    return _budget_ranks({n: d[1] for n, d in decompositions.items()}, shapes, config.param_budget)


def saves_too_little(shape: tuple[int, int], rank: int, min_saving: float) -> bool:
    """Whether a rank-`rank` factorization of an ``(out, in)`` layer saves less than `min_saving` of its parameters."""
    out_f, in_f = shape
    return factor_params(out_f, in_f, rank) > (1.0 - min_saving) * out_f * in_f


def dense_message(skipped: dict[str, int], shape: tuple[int, int], min_saving: float) -> str:
    """Why the `skipped` layers (name -> rank) stay dense; `shape` is the first one's ``(out, in)``."""
    out_f, in_f = shape
    limit = int((1.0 - min_saving) * out_f * in_f / (out_f + in_f))
    return (
        f"Left {len(skipped)} layer(s) dense because their rank would save less than min_saving="
        f"{min_saving} of their parameters (two thin products are then no faster than the dense one): "
        f"{dict(list(skipped.items())[:6])}{' ...' if len(skipped) > 6 else ''}. For a {out_f}x{in_f} layer "
        f"the rank must be at most {limit}: lower rank/energy/param_budget, or lower min_saving."
    )


@torch.no_grad()
def factorize_targets(base: nn.Module, targets: dict[str, nn.Module], moments: dict[str, torch.Tensor],
                      config: LowRankLinearConfig, weights: dict[str, torch.Tensor] | None = None,
                      ) -> tuple[dict[str, int], dict[str, int]]:  # fmt: skip
    """Replace `targets` (name in `base` -> linear layer) in place by `LowRankLinear` layers cut from their input
    moments ``E[x x^T]`` (a target without one gets a plain SVD), ranks chosen by `config` over these targets (a
    `param_budget` is shared among them only). `weights` (name -> ``(out, in)``) are cut instead of the targets'
    own (the sequential float target). Returns ``(ranks, skipped)``: the ranks of the layers replaced, and those of
    the layers left dense by `min_saving` (name -> the rank they would have had)."""
    shapes = {name: linear_shape(m) for name, m in targets.items()}
    decompositions = {}
    for name, module in targets.items():
        moment = moments.get(name)
        weight = (weights or {}).get(name, linear_weight(module))  # cut where the moment is (float64 on the CPU)
        decompositions[name] = whitened_svd(weight if moment is None else weight.to(moment.device), moment)
    ranks = _choose_ranks(decompositions, shapes, config)
    skipped = {name: rank for name, rank in ranks.items() if saves_too_little(shapes[name], rank, config.min_saving)}
    ranks = {name: rank for name, rank in ranks.items() if name not in skipped}
    for name, rank in ranks.items():
        replace_module(base, name, _low_rank_module(targets[name], decompositions[name], rank))
    return ranks, skipped


def _low_rank_module(old: nn.Module, decomposition: tuple, rank: int) -> LowRankLinear:
    """The rank-`rank` `LowRankLinear` of `old` from its (whitened) SVD ``(U, S, Vh, L_inv)``."""
    u, s, vh, inverse = decomposition
    root = s[:rank].sqrt()  # split the scale evenly: both factors get similar ranges (kinder to quantization)
    down = root[:, None] * vh[:rank]
    if inverse is not None:
        down = down @ inverse
    weight = linear_weight(old)
    out_f, in_f = linear_shape(old)
    new = LowRankLinear(in_f, out_f, rank, bias=old.bias is not None, device=weight.device, dtype=weight.dtype)
    new.down.weight.copy_(down)
    new.up.weight.copy_(u[:, :rank] * root)
    if old.bias is not None:
        new.up.bias.copy_(old.bias)
    new.requires_grad_(weight.requires_grad)
    return new


@torch.no_grad()
def apply_low_rank_linear(
    model: PreTrainedModel, config: LowRankLinearConfig, calibration_data: Any = None, tokenizer: Any = None
) -> LowRankLinearConfig:
    """Factorize the targeted linear layers of `model` in place; return the config with the rank of each layer."""
    targets = low_rank_targets(model, config)
    whiten = config.whiten
    if whiten == "auto":
        whiten = "activation" if calibration_data is not None else "none"
    if whiten == "activation" and calibration_data is None:
        raise ValueError("whiten='activation' needs calibration_data (a list of texts); or use whiten='none'.")
    moments = (
        _input_moments(model, targets, calibration_data, config.max_calibration_texts, tokenizer)
        if whiten == "activation"
        else {}
    )
    ranks, skipped = factorize_targets(model.base_model, targets, moments, config)
    if skipped:
        message = dense_message(skipped, linear_shape(targets[next(iter(skipped))]), config.min_saving)
        if not ranks:
            raise ValueError("No layer was factorized. " + message)
        warnings.warn(message, stacklevel=3)
    return resolved_config(config, ranks)


def resolved_config(config: LowRankLinearConfig, ranks: dict[str, int]) -> LowRankLinearConfig:
    """What the recipe stores: the rank of every factorized module (names relative to the base model)."""
    return dataclasses.replace(config, rank=None, energy=None, param_budget=None, ranks=ranks)


def restructure_low_rank_linear(model: PreTrainedModel, config: TechniqueConfig) -> None:
    """Put empty `LowRankLinear` modules of the stored ranks where the recipe says; the weights come next."""
    base = model.base_model
    for name, rank in (config.ranks or {}).items():
        old = base.get_submodule(name)
        if not isinstance(old, _LINEAR_TYPES):
            raise ValueError(
                f"The recipe factorizes {name!r}, but that is a {type(old).__name__}, not a linear layer."
            )
        out_f, in_f = linear_shape(old)
        new = LowRankLinear(
            in_f, out_f, rank, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
        replace_module(base, name, new)
