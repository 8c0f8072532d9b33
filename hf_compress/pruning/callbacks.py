"""Gradual pruning while a model trains or distils: a `TrainerCallback` (it decides *when*; the Trainer is unchanged).

During training, removed units are *gated to zero* rather than sliced away: the optimizer, its state and any
accelerate/DDP wrapper hold references to the parameter tensors, and swapping modules mid-run would silently
leave the new tensors untrained. A gated unit contributes exactly nothing, so the model trains as the pruned one
would; at the end of training the gated units are physically removed (outputs unchanged) and the recipe recorded,
so `save_pretrained` writes a truly smaller model.

Importance comes for free from the training loss itself: the gates are differentiated in every backward pass, which
gives Michel et al.'s ``|dL/dxi|`` sensitivities of the loss being optimised (task or distillation loss), averaged
since the previous pruning step.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from transformers import TrainerCallback

from ..architectures import get_adapter
from ..config import CompressionConfig
from ..plugin import attach_recipe, get_recipe
from .config import FFNPruningConfig, HeadPruningConfig
from .hooks import _importance_matrix, plan_ffn, plan_heads
from .scoring import UnitGates, normalize_per_layer
from .surgery import ffn_size, kept_heads, prune_ffn, prune_heads


__all__ = ["GradualPruningCallback"]

# Score given to units already gated off, so that they stay first in line for removal.
_GONE = -1e9


class GradualPruningCallback(TrainerCallback):
    """Prune attention heads and/or FFN neurons step by step during `Trainer.train()`, then remove them for real.

    The removed share follows the cubic schedule of Zhu & Gupta (2017), ``s_t = s * (1 - (1 - t)^3)`` for training
    progress ``t`` from `start_step` to `end_step`: fast at first, when many units are redundant, slow at the end,
    leaving the steps after `end_step` for recovery.

    Args:
        head_config (`HeadPruningConfig`, *optional*): target for heads, with `fraction` or `num_heads_to_prune`.
            `ranking` and `min_heads_per_layer` apply; importance always comes from the training loss.
        ffn_config (`FFNPruningConfig`, *optional*): target for FFN neurons, with `fraction`.
        start_step (`int`, *optional*, defaults to `0`): first optimizer step that may prune.
        end_step (`int`, *optional*): step at which the target is reached; defaults to 70% of training.
        num_pruning_steps (`int`, *optional*, defaults to `5`): pruning events between `start_step` and `end_step`.

    ```py
    >>> callback = GradualPruningCallback(HeadPruningConfig(fraction=0.33), FFNPruningConfig(fraction=0.25))
    >>> trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    >>> trainer.train()  # heads and neurons are physically removed at the end
    >>> trainer.save_model("pruned")  # AutoModel.from_pretrained("pruned") after `import hf_compress`
    ```
    """

    def __init__(
        self,
        head_config: HeadPruningConfig | None = None,
        ffn_config: FFNPruningConfig | None = None,
        *,
        start_step: int = 0,
        end_step: int | None = None,
        num_pruning_steps: int = 5,
    ) -> None:
        if head_config is None and ffn_config is None:
            raise ValueError("Give a HeadPruningConfig, an FFNPruningConfig or both to GradualPruningCallback.")
        if head_config is not None and head_config.heads_to_prune is not None:
            raise ValueError(
                "GradualPruningCallback ranks heads itself: give HeadPruningConfig(fraction=...) or "
                "num_heads_to_prune=..., not an explicit heads_to_prune map (apply that with apply_compression)."
            )
        if ffn_config is not None and ffn_config.fraction is None:
            raise ValueError("GradualPruningCallback needs FFNPruningConfig(fraction=...), not intermediate_sizes.")
        if not isinstance(num_pruning_steps, int) or num_pruning_steps < 1:
            raise ValueError(f"num_pruning_steps must be a positive integer, got {num_pruning_steps!r}.")
        if start_step < 0 or (end_step is not None and end_step <= start_step):
            raise ValueError(f"Need 0 <= start_step < end_step, got start_step={start_step}, end_step={end_step}.")
        self.configs = {"heads": head_config, "ffn": ffn_config}
        self.start_step, self.end_step, self.num_pruning_steps = start_step, end_step, num_pruning_steps
        self.gates: dict[str, UnitGates] = {}
        self.history: list[tuple[int, dict[str, int]]] = []  # (step, units gated off per kind)
        self._units: dict[str, list[list[int]]] = {}  # identity of each gated unit: original heads / FFN positions
        self._targets: dict[str, int] = {}
        self._done = False

    # -- schedule ------------------------------------------------------------------------------------------------------
    def _schedule(self) -> list[int]:
        span = self.end_step - self.start_step
        return sorted(
            {self.start_step + round(span * (i + 1) / self.num_pruning_steps) for i in range(self.num_pruning_steps)}
        )

    def _share(self, step: int) -> float:
        progress = min(max((step - self.start_step) / (self.end_step - self.start_step), 0.0), 1.0)
        return 1.0 - (1.0 - progress) ** 3

    # -- Trainer events ------------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self.end_step is None:
            self.end_step = max(self.start_step + 1, int(0.7 * state.max_steps))
        self._steps = set(self._schedule())
        for kind, config in self.configs.items():
            if config is None:
                continue
            gates = UnitGates(model, kind)
            gates.record = gates.accumulate = True
            self.gates[kind] = gates
            if kind == "heads":
                self._units[kind] = kept_heads(model)
                total = sum(len(h) for h in self._units[kind])
                full = config.num_heads_to_prune if config.fraction is None else round(config.fraction * total)
            else:
                sizes = [ffn_size(model, layer) for layer in get_adapter(model).layer_modules(model)]
                self._units[kind] = [list(range(n)) for n in sizes]
                full = round(config.fraction * sum(sizes))
            self._targets[kind] = full

    def on_step_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if state.global_step in self._steps:
            self._prune_step(model, self._share(state.global_step), state.global_step)

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self._done:
            return
        if state.global_step < self.end_step:
            warnings.warn(
                f"Training stopped at step {state.global_step}, before the pruning target (step {self.end_step}); "
                "pruning the rest now, with no recovery steps after it.",
                stacklevel=2,
            )
            self._prune_step(model, 1.0, state.global_step)
        self.finalize(model)

    # -- pruning -------------------------------------------------------------------------------------------------------
    def _scores(self, kind: str) -> list[torch.Tensor]:
        gates, units = self.gates[kind], self._units[kind]
        scores = [
            gates.totals[i].float() / max(gates.examples.get(i, 1), 1) if i in gates.totals else torch.zeros(len(u))
            for i, u in enumerate(units)
        ]
        scores = normalize_per_layer(scores)
        for i, score in enumerate(scores):
            if i in gates.masks:
                score[gates.masks[i] == 0] = _GONE
        gates.totals.clear()
        gates.examples.clear()
        return scores

    def _prune_step(self, model: nn.Module, share: float, step: int) -> None:
        gated = {}
        for kind, gates in self.gates.items():
            config, units = self.configs[kind], self._units[kind]
            scores = self._scores(kind)
            to_remove = round(share * self._targets[kind])
            if kind == "heads":
                self._last_head_scores = scores
                plan = plan_heads(model, units, scores, to_remove, config)
                removed = {layer: {units[layer].index(h) for h in heads} for layer, heads in plan.items()}
            else:
                sizes = plan_ffn(scores, to_remove, config)
                removed = {
                    layer: set(scores[layer].argsort()[: len(units[layer]) - size].tolist())
                    for layer, size in sizes.items()
                }
            for layer, positions in removed.items():
                mask = torch.ones(len(units[layer]))
                mask[sorted(positions)] = 0
                gates.masks[layer] = mask
            gated[kind] = int(sum((m == 0).sum() for m in gates.masks.values()))
        self.history.append((step, gated))

    def finalize(self, model: nn.Module) -> CompressionConfig:
        """Remove the gated units for real and record them in the model's recipe (run at the end of training)."""
        resolved = []
        for kind, gates in self.gates.items():
            gates.remove()
            units, config = self._units[kind], self.configs[kind]
            positions = {i: (m == 0).nonzero().flatten().tolist() for i, m in gates.masks.items()}
            if kind == "heads":
                plan = {i: sorted(units[i][p] for p in pos) for i, pos in positions.items() if pos}
                matrix = _importance_matrix(model, units, getattr(self, "_last_head_scores", []))
                matrix = [[None if v is not None and v <= _GONE / 2 else v for v in row] for row in matrix]
                prune_heads(model, plan)
                resolved.append(
                    dataclasses.replace(
                        config, fraction=None, num_heads_to_prune=None, heads_to_prune=plan, importance="gradient",
                        head_importance=matrix if len(matrix) else None,
                    )
                )  # fmt: skip
            else:
                keep = {
                    i: torch.tensor([p for p in range(len(units[i])) if p not in set(pos)])
                    for i, pos in positions.items()
                }
                prune_ffn(model, keep)
                sizes = {i: len(k) for i, k in keep.items()}
                resolved.append(
                    dataclasses.replace(config, fraction=None, intermediate_sizes=sizes, importance="gradient")
                )
        previous = get_recipe(model)
        done = list(previous.techniques) if previous is not None else []
        attn = previous.attn_implementation if previous is not None else None
        recipe = CompressionConfig(done + resolved, attn_implementation=attn)
        attach_recipe(model, recipe)
        self._done = True
        return recipe
