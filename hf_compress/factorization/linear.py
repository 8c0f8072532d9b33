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


__all__ = ["apply_low_rank_linear", "restructure_low_rank_linear"]

_LINEAR_TYPES = (nn.Linear, Conv1D)


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an `nn.Linear` or a GPT-2 `Conv1D` (which stores its weight transposed)."""
    return (module.nf, module.nx) if isinstance(module, Conv1D) else (module.out_features, module.in_features)


def _dense(module: nn.Module) -> torch.Tensor:
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
    return {name: moments.get(name, torch.zeros(_shape(m)[1], _shape(m)[1], dtype=torch.float64))
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


@torch.no_grad()
def apply_low_rank_linear(
    model: PreTrainedModel, config: LowRankLinearConfig, calibration_data: Any = None, tokenizer: Any = None
) -> LowRankLinearConfig:
    """Factorize the targeted linear layers of `model` in place; return the config with the rank of each layer."""
    targets = _targets(model, config)
    if config.ranks is not None:  # fixed by the caller: only those modules
        unknown = sorted(set(config.ranks) - set(dict(model.base_model.named_modules())))
        if unknown:
            raise ValueError(f"ranks names modules that do not exist in {type(model.base_model).__name__}: {unknown}.")
        targets = {name: model.base_model.get_submodule(name) for name in config.ranks}
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
    shapes = {name: _shape(m) for name, m in targets.items()}
    decompositions = {name: whitened_svd(_dense(m), moments.get(name)) for name, m in targets.items()}
    if config.ranks is not None:
        ranks = dict(config.ranks)
    elif config.rank is not None:
        ranks = dict.fromkeys(targets, config.rank)
    elif config.energy is not None:
        ranks = {name: rank_for_energy(d[1], config.energy) for name, d in decompositions.items()}
    else:
        ranks = _budget_ranks({n: d[1] for n, d in decompositions.items()}, shapes, config.param_budget)
    skipped = {}
    for name, rank in list(ranks.items()):
        out_f, in_f = shapes[name]
        if factor_params(out_f, in_f, rank) > (1.0 - config.min_saving) * out_f * in_f:
            skipped[name] = rank
            del ranks[name]
    if skipped:
        out_f, in_f = shapes[next(iter(skipped))]
        limit = int((1.0 - config.min_saving) * out_f * in_f / (out_f + in_f))
        message = (
            f"Left {len(skipped)} layer(s) dense because their rank would save less than min_saving="
            f"{config.min_saving} of their parameters (two thin products are then no faster than the dense one): "
            f"{dict(list(skipped.items())[:6])}{' ...' if len(skipped) > 6 else ''}. For a {out_f}x{in_f} layer "
            f"the rank must be at most {limit}: lower rank/energy/param_budget, or lower min_saving."
        )
        if not ranks:
            raise ValueError("No layer was factorized. " + message)
        warnings.warn(message, stacklevel=3)
    for name, rank in ranks.items():
        old = targets[name]
        u, s, vh, inverse = decompositions[name]
        root = s[:rank].sqrt()  # split the scale evenly: both factors get similar ranges (kinder to quantization)
        down = root[:, None] * vh[:rank]
        if inverse is not None:
            down = down @ inverse
        weight = _dense(old)
        new = LowRankLinear(
            *shapes[name][::-1], rank, bias=old.bias is not None, device=weight.device, dtype=weight.dtype
        )
        new.down.weight.copy_(down)
        new.up.weight.copy_(u[:, :rank] * root)
        if old.bias is not None:
            new.up.bias.copy_(old.bias)
        new.requires_grad_(weight.requires_grad)
        replace_module(model.base_model, name, new)
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
        out_f, in_f = _shape(old)
        new = LowRankLinear(
            in_f, out_f, rank, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
        )
        replace_module(base, name, new)
