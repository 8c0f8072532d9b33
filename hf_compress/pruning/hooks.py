"""The two registered techniques: rank units, choose what to remove, slice, and return the resolved config."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from torch import nn

from ..architectures import get_adapter, num_heads, num_kv_heads
from ..registry import Technique, register_technique
from .activation import activation_batches, activation_importance, channel_statistics, compensate_ffn, compensate_heads
from .config import FFNPruningConfig, HeadPruningConfig
from .scoring import compute_importance, normalize_per_layer
from .surgery import ffn_size, kept_heads, prune_ffn, prune_heads


__all__ = [
    "apply_head_pruning",
    "restructure_head_pruning",
    "apply_ffn_pruning",
    "restructure_ffn_pruning",
    "removal_counts",
    "plan_heads",
    "plan_ffn",
    "layer_head_choice",
    "heads_to_remove",
    "ffn_targets",
    "ffn_keep",
]


def _method(config: HeadPruningConfig | FFNPruningConfig, calibration_data: Any) -> str:
    if config.importance != "auto":
        return config.importance
    if calibration_data is None:
        warnings.warn(
            f"{type(config).__name__}: no calibration data given, so units are ranked by weight magnitude. Pass "
            "calibration_data=... for the data-driven (Michel et al.) ranking, which keeps far more quality.",
            stacklevel=3,
        )
        return "magnitude"
    return "gradient"


def _scores(model, kind, config, calibration_data) -> tuple[str, list[torch.Tensor], dict | None]:
    """(method, per-layer scores normalised per layer, the activation statistics of ``"activation"`` or None)."""
    method = _method(config, calibration_data)
    if method == "activation":  # the statistics are kept: the bias compensation needs their means
        stats = _statistics(model, kind, config, calibration_data)
        return method, normalize_per_layer(activation_importance(model, kind, stats)), stats
    scores = compute_importance(
        model, kind, method, calibration_data, max_samples=config.max_samples, batch_size=config.batch_size,
        max_length=config.max_length, seed=config.seed,
    )  # fmt: skip
    return method, scores, None


def _statistics(model, kind, config, calibration_data) -> dict[int, torch.Tensor]:
    batches = activation_batches(model, calibration_data, max_samples=config.max_samples,
                                 batch_size=config.batch_size, max_length=config.max_length)  # fmt: skip
    return channel_statistics(model, kind, batches)


def removal_counts(scores: list[torch.Tensor], to_remove: int, ranking: str, minimum: int) -> list[int]:
    """How many units each layer loses: the lowest `to_remove` scores overall (``global``) or a proportional share
    of every layer (``per_layer``), never leaving a layer with fewer than `minimum` units (or than it has)."""
    sizes = [len(s) for s in scores]
    room = [max(n - minimum, 0) for n in sizes]
    if to_remove > sum(room):
        raise ValueError(
            f"Cannot remove {to_remove} units: with at least {minimum} kept per layer only {sum(room)} can go. Lower "
            "the amount or the per-layer minimum."
        )
    counts = [0] * len(scores)
    if ranking == "global":
        order = sorted((float(v), layer) for layer, s in enumerate(scores) for v in s)
        for _, layer in order:
            if sum(counts) == to_remove:
                break
            if counts[layer] < room[layer]:
                counts[layer] += 1
        return counts
    total = sum(sizes)
    exact = [to_remove * n / total for n in sizes]
    counts = [min(int(e), r) for e, r in zip(exact, room)]
    # Hand out the rounding remainder by largest fractional part, where there is room.
    for layer in sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True):
        if sum(counts) == to_remove:
            break
        if counts[layer] < room[layer]:
            counts[layer] += 1
    while sum(counts) < to_remove:  # layers at their minimum pushed the share elsewhere
        layer = max(range(len(sizes)), key=lambda i: room[i] - counts[i])
        counts[layer] += 1
    return counts


def _gqa_choice(heads: list[int], scores: torch.Tensor, keep: int, minimum: int, group_size: int) -> list[int]:
    """Best kept heads in a GQA layer: ``g`` groups keeping ``r`` query heads each, ``g * r <= keep`` (largest),
    the groups and heads with the highest summed importance."""
    groups: dict[int, list[tuple[float, int]]] = {}
    for head, score in zip(heads, scores.tolist()):
        groups.setdefault(head // group_size, []).append((score, head))
    for members in groups.values():
        members.sort(reverse=True)
    per_group = len(next(iter(groups.values())))
    options = [(g * r, g, r) for g in range(1, len(groups) + 1) for r in range(1, per_group + 1)]
    feasible = [o for o in options if o[0] <= keep] if keep else []
    if not feasible or max(feasible)[0] < minimum:
        above = [o for o in options if o[0] >= minimum]
        feasible = [min(above)] if keep and above else feasible
    if not feasible:
        return []
    size = max(o[0] for o in feasible)
    best, best_value = [], float("-inf")
    for _, g, r in (o for o in feasible if o[0] == size):
        ranked = sorted(groups.values(), key=lambda m: sum(s for s, _ in m[:r]), reverse=True)[:g]
        value = sum(s for m in ranked for s, _ in m[:r])
        if value > best_value:
            best, best_value = sorted(h for m in ranked for _, h in m[:r]), value
    return best


def _importance_matrix(model: nn.Module, heads: list[list[int]], scores: list[torch.Tensor]) -> list[list]:
    matrix = [[None] * num_heads(model) for _ in heads]
    for layer, (kept, score) in enumerate(zip(heads, scores)):
        for head, value in zip(kept, score.tolist()):
            matrix[layer][head] = round(float(value), 6)
    return matrix


def plan_heads(
    model: nn.Module, heads: list[list[int]], scores: list[torch.Tensor], to_remove: int, config: HeadPruningConfig
) -> dict[int, list[int]]:
    """``{layer: [original heads]}`` to remove: the `to_remove` least important, as `config` ranks them, adjusted
    per layer to a valid grouped-query layout."""
    counts = removal_counts(scores, to_remove, config.ranking, config.min_heads_per_layer)
    plan = {}
    for layer, (kept, score, count) in enumerate(zip(heads, scores, counts)):
        removed = layer_head_choice(model, kept, score, count, config)
        if removed:
            plan[layer] = removed
    return plan


def layer_head_choice(model: nn.Module, kept: list[int], score: torch.Tensor, count: int,
                      config: HeadPruningConfig) -> list[int]:  # fmt: skip
    """The original heads one layer (holding heads `kept`, scored `score`) loses when `count` of them go: the least
    important, adjusted to a valid grouped-query layout."""
    keep = len(kept) - count
    group_size = num_heads(model) // num_kv_heads(model)
    if group_size > 1:
        chosen = _gqa_choice(kept, score, keep, min(config.min_heads_per_layer, len(kept)), group_size)
    else:
        chosen = [kept[i] for i in sorted(score.argsort(descending=True)[:keep].tolist())]
    return sorted(set(kept) - set(chosen))


def heads_to_remove(heads: list[list[int]], config: HeadPruningConfig) -> int:
    """How many heads a ranked `config` removes from a model with `heads` kept per layer (a `ValueError` for a
    fraction that rounds to none)."""
    total = sum(len(h) for h in heads)
    to_remove = config.num_heads_to_prune if config.fraction is None else round(config.fraction * total)
    if config.fraction and not to_remove:  # before scoring: a fraction that rounds to no head is a mistake
        raise ValueError(
            f"HeadPruningConfig(fraction={config.fraction}) removes round({config.fraction} * {total} heads) = 0 "
            f"heads. Use fraction >= {1 / total:.3g} (one head), or num_heads_to_prune=1."
        )
    return to_remove


def apply_head_pruning(model: nn.Module, config: HeadPruningConfig, calibration_data: Any = None) -> HeadPruningConfig:
    """Rank and remove heads of `model` in place; return the config with the explicit `heads_to_prune` map.

    With calibration data and `compensate_bias`, whatever ranked the heads (or an explicit `heads_to_prune` map),
    the removed heads' mean output on that data is first added to the attention output projection's bias, where
    it has one (`activation.compensate_heads`)."""
    heads = kept_heads(model)
    if config.heads_to_prune is not None:
        if config.compensate_bias and calibration_data is not None:
            _compensate_heads(model, config.heads_to_prune, _statistics(model, "heads", config, calibration_data))
        prune_heads(model, config.heads_to_prune)
        return config
    to_remove = heads_to_remove(heads, config)
    method, scores, stats = _scores(model, "heads", config, calibration_data)
    plan = plan_heads(model, heads, scores, to_remove, config)
    matrix = _importance_matrix(model, heads, scores)
    if config.compensate_bias and calibration_data is not None:
        _compensate_heads(model, plan, stats if stats is not None else _statistics(model, "heads", config,
                                                                                  calibration_data))  # fmt: skip
    prune_heads(model, plan)
    return dataclasses.replace(
        config, fraction=None, num_heads_to_prune=None, heads_to_prune=plan, importance=method, head_importance=matrix
    )


def _compensate_heads(model: nn.Module, plan: dict[int, list[int]], stats: dict[int, torch.Tensor]) -> None:
    for layer, removed in plan.items():
        if removed and layer in stats:
            compensate_heads(model, layer, removed, stats[layer][0])


def restructure_head_pruning(model: nn.Module, config: HeadPruningConfig) -> None:
    """Rebuild the pruned attention shapes on an empty skeleton (inside `from_pretrained`)."""
    prune_heads(model, config.heads_to_prune or {})


def plan_ffn(scores: list[torch.Tensor], to_remove: int, config: FFNPruningConfig) -> dict[int, int]:
    """FFN size kept per layer when the `to_remove` least important neurons go (rounded up to `round_to`)."""
    counts = removal_counts(scores, to_remove, config.ranking, config.min_neurons_per_layer)
    return {layer: config.kept_size(len(s) - c, len(s)) for layer, (s, c) in enumerate(zip(scores, counts))}


def ffn_targets(config: FFNPruningConfig, sizes: list[int], scores: list[torch.Tensor]) -> dict[int, int]:
    """FFN neurons each layer keeps under `config` (its explicit `intermediate_sizes`, checked against the model's
    FFN `sizes`, or its ranked `fraction`); with ``ranking="per_layer"`` the scores' values do not matter."""
    if config.intermediate_sizes is not None:
        for layer, size in config.intermediate_sizes.items():
            if layer >= len(sizes) or size > sizes[layer]:
                raise ValueError(
                    f"intermediate_sizes={config.intermediate_sizes} does not fit the model: it has {len(sizes)} "
                    f"layers with FFN sizes {sizes}."
                )
        return {layer: sizes[layer] for layer in range(len(sizes))} | config.intermediate_sizes
    _check_prunes_something(config, sizes, scores)
    return plan_ffn(scores, round(config.fraction * sum(sizes)), config)


def ffn_keep(score: torch.Tensor, target: int) -> torch.Tensor:
    """Indices (ascending) of the `target` most important neurons of one layer."""
    return score.argsort(descending=True)[:target].sort().values


def apply_ffn_pruning(model: nn.Module, config: FFNPruningConfig, calibration_data: Any = None) -> FFNPruningConfig:
    """Rank and remove FFN neurons of `model` in place; return the config with explicit `intermediate_sizes`.

    With calibration data and `compensate_bias`, whatever ranked the neurons, the removed neurons' mean output on
    that data is first added to the FFN down projection's bias, where it has one (`activation.compensate_ffn`)."""
    layers = get_adapter(model).layer_modules(model)
    sizes = [ffn_size(model, layer) for layer in layers]
    _check_prunes_something(config, sizes)  # the certain cases, before the scoring passes
    method, scores, stats = _scores(model, "ffn", config, calibration_data)
    targets = ffn_targets(config, sizes, scores)
    keep = {layer: ffn_keep(s, targets[layer]) for layer, s in enumerate(scores) if targets[layer] < sizes[layer]}
    if config.compensate_bias and calibration_data is not None and keep:
        if stats is None:  # gradient or magnitude ranking: one forward pass more for the means
            stats = _statistics(model, "ffn", config, calibration_data)
        for layer, index in keep.items():
            compensate_ffn(model, layer, index, stats[layer][0])
    prune_ffn(model, keep)
    resolved = {layer: len(index) for layer, index in keep.items()}
    return dataclasses.replace(config, fraction=None, intermediate_sizes=resolved, importance=method)


def _check_prunes_something(config: FFNPruningConfig, sizes: list[int], scores: list | None = None) -> None:
    """Refuse a fraction > 0 that prunes nothing (every kept size rounds back up to its layer's full size, or the
    fraction rounds to no neuron), naming a `round_to` and a `fraction` that would prune.

    Without `scores` only the case certain before scoring is checked: every layer no larger than `round_to`.
    """
    if not config.fraction:
        return

    def prunes(cfg: FFNPruningConfig) -> bool:
        if scores is None:
            return any(s > cfg.round_to for s in sizes) or cfg.min_neurons_per_layer == 0
        plan = plan_ffn(scores, round(cfg.fraction * sum(sizes)), cfg)
        return any(plan[layer] < size for layer, size in enumerate(sizes))

    if prunes(config):
        return
    smaller = next((r for r in (256, 128, 64, 32, 16, 8, 4, 2, 1) if r < config.round_to
                    and prunes(dataclasses.replace(config, round_to=r))), None)  # fmt: skip
    larger = next((f / 100 for f in range(int(config.fraction * 100) + 1, 100)
                   if prunes(dataclasses.replace(config, fraction=f / 100))), None)  # fmt: skip
    fixes = [f"round_to={smaller} (or less)" if smaller else "", f"fraction={larger} (or more)" if larger else ""]
    raise ValueError(
        f"FFNPruningConfig(fraction={config.fraction}, round_to={config.round_to}) prunes nothing: every layer's kept "
        f"FFN size rounds back up to its full size (FFN sizes {sizes}). Use "
        f"{' or '.join(f for f in fixes if f) or 'a larger fraction'}."
    )


def restructure_ffn_pruning(model: nn.Module, config: FFNPruningConfig) -> None:
    """Rebuild the pruned FFN shapes on an empty skeleton (inside `from_pretrained`)."""
    prune_ffn(model, dict(config.intermediate_sizes or {}))


register_technique(
    Technique(
        name="head_pruning",
        config_cls=HeadPruningConfig,
        stage="prune",
        apply=apply_head_pruning,
        restructure=restructure_head_pruning,
    )
)
register_technique(
    Technique(
        name="ffn_pruning",
        config_cls=FFNPruningConfig,
        stage="prune",
        apply=apply_ffn_pruning,
        restructure=restructure_ffn_pruning,
    )
)
