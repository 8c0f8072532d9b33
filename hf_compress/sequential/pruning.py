"""Structured pruning (attention heads, FFN neurons) layer by layer, scored by FLAP's fluctuation (`PruningStep`).

The one-pass path (`hf_compress.pruning.hooks`, ``importance="activation"``) scores every layer from the *float*
model's activations. Here each layer is scored from the outputs of the layers before it as already pruned (and
bias-compensated), so it is ranked on the inputs it will actually get in the pruned model: the variance of each
input channel of its output projection over the real tokens (summed by the pipeline's `MomentCollector` with
``channels=True``: ``E[x]`` and ``E[x^2]`` per channel, no ``channels^2`` matrix) times that channel's squared
weight-column norm (`hf_compress.pruning.activation`). The layer is then cut (`prune_heads` / `prune_ffn` on that
layer only) before its outputs become the next layer's inputs. Layer 0 sees the float model's inputs, so its choice
is exactly the one-pass path's with ``ranking="per_layer"``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..architectures import get_adapter, head_dim
from ..pruning.activation import compensate_ffn, compensate_heads, output_projections, unit_scores
from ..pruning.config import FFNPruningConfig, HeadPruningConfig
from ..pruning.hooks import (
    _importance_matrix,
    ffn_keep,
    ffn_targets,
    heads_to_remove,
    layer_head_choice,
    removal_counts,
)
from ..pruning.scoring import normalize_per_layer
from ..pruning.surgery import ffn_size, kept_heads, prune_ffn, prune_heads
from .layer_step import LayerStep


__all__ = ["PruningStep"]


class PruningStep(LayerStep):
    """Remove attention heads (`HeadPruningConfig`) or FFN neurons (`FFNPruningConfig`) one layer at a time.

    Each layer loses its share of the units as ``ranking="per_layer"`` sets it (the same count per layer as the
    one-pass path, which does not depend on the scores), or what an explicit `heads_to_prune` / `intermediate_sizes`
    names; which units go is decided from that layer's own input statistics. With `compensate_bias`, the removed
    units' mean output is added to the output projection's bias where it has one (BERT, GPT-2, ...; Llama's has none
    and is left as it is, so the checkpoint format does not change). `finish` returns the resolved config exactly
    as the one-pass path records it (explicit map, importance scores), so ``from_pretrained`` rebuilds the shapes.

    Args:
        config: the pruning, with ``importance="activation"``; a ranked amount (`fraction`, `num_heads_to_prune`)
            needs ``ranking="per_layer"``: a global ranking compares all layers' scores, which never exist at once
            here.
        float_target: accepted for `step_for`'s sake; True or False, both meaning none (pruning fits no weights).
    """

    channels = True  # per-channel E[x] and E[x^2] of each output projection's input are all the scores need

    def __init__(self, config: HeadPruningConfig | FFNPruningConfig, *, float_target: bool | float = True) -> None:
        if not isinstance(config, (HeadPruningConfig, FFNPruningConfig)):
            raise TypeError(f"PruningStep takes a HeadPruningConfig or FFNPruningConfig, got {type(config).__name__}.")
        if not isinstance(float_target, bool):  # True is `sequential_compress`'s default: the step's own (none)
            raise ValueError(
                f"Sequential pruning has no float target (it removes units, it fits no weights); got float_target="
                f"{float_target!r}. Leave float_target at its default."
            )
        name = type(config).__name__
        if config.importance != "activation":
            raise ValueError(
                f"Sequential pruning scores each layer from its own inputs: it needs importance='activation'; got "
                f"{name}(importance={config.importance!r}). Use importance='activation', or drop sequential=True for "
                f"importance={config.importance!r}."
            )
        explicit = config.intermediate_sizes if isinstance(config, FFNPruningConfig) else config.heads_to_prune
        ranked = explicit is None
        if ranked and config.ranking != "per_layer":
            raise ValueError(
                f"Sequential pruning removes each layer's share as it reaches that layer; got {name}(ranking="
                f"{config.ranking!r}), which ranks the units of all layers together (their scores never exist at "
                "once here). Allowed: ranking='per_layer'. Pass ranking='per_layer', or drop sequential=True for a "
                "global ranking."
            )
        self.config = config
        self.kind = "heads" if isinstance(config, HeadPruningConfig) else "ffn"
        self.names: dict[int, str] = {}  # layer -> full name of its output projection
        self.layer_of: dict[str, int] = {}  # layer prefix -> index
        self.amounts: dict[int, int] = {}  # heads: how many go; FFN: the size kept
        self.explicit: dict[int, list[int]] = {}  # an explicit heads_to_prune
        self.heads: list[list[int]] = []  # heads before pruning, for the importance matrix
        self.scores: list[torch.Tensor] = []
        self.plan: dict[int, list[int]] = {}  # heads removed, or (FFN) the resolved sizes
        self.sizes: dict[int, int] = {}

    def prepare(self, model: nn.Module) -> None:
        adapter = get_adapter(model)
        layers = adapter.layer_modules(model)
        self.names = output_projections(model, self.kind)
        self.layer_of = {adapter.layer_prefix(model, index): index for index in range(len(layers))}
        if self.kind == "heads":
            self.heads = kept_heads(model)
            self.scores = [torch.zeros(0) for _ in layers]
            if self.config.heads_to_prune is not None:
                self.explicit = dict(self.config.heads_to_prune)
                outside = sorted(layer for layer in self.explicit if layer >= len(layers))
                if outside:
                    raise ValueError(f"heads_to_prune names layers {outside}, but the model has {len(layers)} layers.")
                return
            sizes_only = [torch.zeros(len(h)) for h in self.heads]  # per_layer counts depend on the sizes alone
            counts = removal_counts(sizes_only, heads_to_remove(self.heads, self.config), "per_layer",
                                    self.config.min_heads_per_layer)  # fmt: skip
            self.amounts = dict(enumerate(counts))
        else:
            sizes = [ffn_size(model, layer) for layer in layers]
            self.amounts = ffn_targets(self.config, sizes, [torch.zeros(n) for n in sizes])
            self.sizes = dict(enumerate(sizes))

    def layer_modules(self, model: nn.Module, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        name = self.names.get(self.layer_of[prefix])
        return {name: model.get_submodule(name)} if name is not None else {}

    def compress_layer(self, model: nn.Module, prefix: str, moments: dict[str, torch.Tensor],
                       cross: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
        index = self.layer_of[prefix]
        name = self.names.get(index)
        if name is None:  # nothing of this kind left in the layer
            return []
        if name not in moments:
            raise ValueError(f"The calibration forward passes never reached {name}; it cannot be scored.")
        stats = moments.pop(name)
        width = head_dim(model) if self.kind == "heads" else 1
        score = normalize_per_layer([unit_scores(model.get_submodule(name), stats, width)])[0]
        adapter = get_adapter(model)
        layer = adapter.layer_modules(model)[index]
        if self.kind == "heads":
            self.scores[index] = score
            kept = self.heads[index]
            removed = self.explicit.get(index) if self.config.heads_to_prune is not None else (
                layer_head_choice(model, kept, score, self.amounts[index], self.config))  # fmt: skip
            if not removed:
                return []
            released = [adapter.sub(layer, path).weight for path in adapter.attention_projections()]
            if self.config.compensate_bias:
                compensate_heads(model, index, removed, stats[0])
            prune_heads(model, {index: removed})
            self.plan[index] = removed
            return released
        if self.amounts[index] >= self.sizes[index]:
            return []
        keep = ffn_keep(score, self.amounts[index])
        released = [adapter.sub(layer, path).weight for path in adapter.ffn_projections()]
        if self.config.compensate_bias:
            compensate_ffn(model, index, keep, stats[0])
        prune_ffn(model, {index: keep})
        self.plan[index] = len(keep)
        return released

    def finish(self, model: nn.Module, moments: dict[str, torch.Tensor],
               cross: dict[str, torch.Tensor] | None = None) -> HeadPruningConfig | FFNPruningConfig:  # fmt: skip
        config = self.config
        if self.kind == "ffn":
            resolved = dict(self.plan)
            return dataclasses.replace(config, fraction=None, intermediate_sizes=resolved, importance="activation")
        if config.heads_to_prune is not None:  # as the one-pass path: an explicit map is its own resolution
            return config
        matrix = _importance_matrix(model, self.heads, self.scores)
        return dataclasses.replace(config, fraction=None, num_heads_to_prune=None, heads_to_prune=dict(self.plan),
                                   importance="activation", head_importance=matrix)  # fmt: skip
