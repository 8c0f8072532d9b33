"""Importance of attention heads and FFN neurons.

A *unit* is one attention head (``head_dim`` input features of the attention output projection) or one FFN neuron
(one input feature of the FFN output projection). Every family feeds the concatenated head outputs to its output
projection and the FFN activations to its down projection, so one forward pre-hook on those two modules can put a
gate ``xi`` in front of every unit, in every family, without touching the modeling code:

* ``gradient`` (Michel et al., 2019, "Are Sixteen Heads Really Better than One?"): the sensitivity
  ``|dL/dxi|`` at ``xi = 1``, averaged over examples and normalised to unit L2 norm per layer. ``L`` is the model's
  own loss when the batch has labels (a causal LM uses its inputs as labels). An encoder without a task head has
  no loss; the natural target, the divergence of the pruned model's outputs from the original's, has a *zero*
  gradient at ``xi = 1`` (it is at its minimum), so first-order scores cannot see it. We use its second-order
  (Gauss-Newton) term instead: removing unit ``u`` changes the output by ``~ J_u`` and the squared divergence by
  ``~ ||J_u||^2``, estimated without bias as ``(dr.y/dxi_u)^2`` with a Gaussian probe ``r`` over the last hidden
  state ``y`` (one backward pass per batch, Hutchinson-style).
* ``activation`` (FLAP, An et al., 2024): the variance of each output-projection input channel over the real
  calibration tokens times its weight column's squared norm, summed over a head's channels
  (`hf_compress.pruning.activation`; forward passes only, and layer-local, so the sequential pipeline computes it
  one layer at a time), normalised per layer like the gradient scores.
* ``magnitude``: data-free, the norm of the weights a unit writes with times the norm of those it reads with.
* ``random``: a seeded baseline.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from ..architectures import get_adapter, head_dim
from ..calibration import calibration_batches, unwrap
from .activation import activation_batches, activation_importance, channel_statistics
from .layers import ConstantProjection, EmptyAttention
from .surgery import gqa_layout, kept_heads


__all__ = ["UnitGates", "compute_importance", "normalize_per_layer"]


class UnitGates:
    """Forward pre-hooks that gate (and optionally differentiate) the units of every layer.

    Args:
        model: the model to hook.
        kind: ``"heads"`` or ``"ffn"``.

    Attributes:
        masks: ``{layer: tensor[units]}`` of fixed gates (0 removes a unit's contribution exactly as pruning does).
        record: when true, each forward creates per-example gates ``probes[layer]`` (``[batch, units]``, ones, with
            ``requires_grad``) whose gradients are the per-example sensitivities.
        accumulate: with `record`, every backward pass adds ``|dL/dxi|`` summed over examples to ``totals[layer]``
            (and the example count to ``examples[layer]``): Michel scores of whatever loss is trained, for free.
    """

    def __init__(self, model: nn.Module, kind: str) -> None:
        if kind not in ("heads", "ffn"):
            raise ValueError(f"kind must be 'heads' or 'ffn', got {kind!r}.")
        adapter = get_adapter(model)
        self.width = head_dim(model) if kind == "heads" else 1
        self.masks: dict[int, torch.Tensor] = {}
        self.probes: dict[int, torch.Tensor] = {}
        self.record = False
        self.accumulate = False
        self.totals: dict[int, torch.Tensor] = {}
        self.examples: dict[int, int] = {}
        self._handles = []
        for index, layer in enumerate(adapter.layer_modules(model)):
            if kind == "heads" and isinstance(adapter.sub(layer, adapter.attention), EmptyAttention):
                continue
            module = adapter.sub(layer, adapter.output if kind == "heads" else adapter.ffn_out)
            if isinstance(module, ConstantProjection):
                continue
            self._handles.append(module.register_forward_pre_hook(self._hook(index)))

    def _hook(self, index: int):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            x = args[0]
            gate = self.masks.get(index)
            if gate is not None:
                gate = gate.to(device=x.device, dtype=x.dtype)
            if self.record:
                probe = torch.ones(x.shape[0], x.shape[-1] // self.width, device=x.device, dtype=x.dtype)
                self.probes[index] = probe.requires_grad_(True)
                if self.accumulate and torch.is_grad_enabled():
                    probe.register_hook(self._accumulator(index))
                gate = probe if gate is None else probe * gate
            if gate is None:
                return None
            gate = gate.repeat_interleave(self.width, dim=-1)
            if gate.dim() == 2:  # per example: broadcast over the token dimensions
                gate = gate.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1])
            return (x * gate, *args[1:])

        return hook

    def _accumulator(self, index: int):
        def add(grad: torch.Tensor) -> None:
            total = grad.detach().abs().sum(0).double().cpu()
            self.totals[index] = self.totals[index] + total if index in self.totals else total
            self.examples[index] = self.examples.get(index, 0) + grad.shape[0]

        return add

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> UnitGates:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def normalize_per_layer(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Divide each layer's scores by their L2 norm (Michel et al.), so layers compare in a global ranking."""
    return [s / s.norm().clamp_min(1e-12) if s.numel() else s for s in scores]


def compute_importance(
    model: nn.Module,
    kind: str,
    method: str,
    calibration_data: Any = None,
    *,
    tokenizer: Any = None,
    max_samples: int = 256,
    batch_size: int = 16,
    max_length: int = 128,
    seed: int = 0,
    progress: bool = True,
) -> list[torch.Tensor]:
    """Per-layer importance of the units the model currently has, normalised per layer (higher = keep).

    Args:
        kind: ``"heads"`` (query heads, in the order of `kept_heads`) or ``"ffn"`` (current FFN neurons).
        method: ``"gradient"``, ``"activation"``, ``"magnitude"`` or ``"random"``.
        calibration_data: texts, a `datasets.Dataset` (a ``label``/``labels`` column is used by models with a task
            head) or an iterable of model-ready batches; required by ``"gradient"`` and ``"activation"``.
    """
    if method == "random":
        generator = torch.Generator().manual_seed(seed)
        return [torch.rand(n, generator=generator) for n in _unit_counts(model, kind)]
    if method == "magnitude":
        return normalize_per_layer(_magnitude(model, kind))
    if method == "activation":
        batches = activation_batches(model, calibration_data, tokenizer=tokenizer, max_samples=max_samples,
                                     batch_size=batch_size, max_length=max_length)  # fmt: skip
        return normalize_per_layer(activation_importance(model, kind, channel_statistics(model, kind, batches)))
    if method != "gradient":
        raise ValueError(f"method must be 'gradient', 'activation', 'magnitude' or 'random', got {method!r}.")
    calibration_data, tokenizer = unwrap(calibration_data, tokenizer)
    if calibration_data is None:
        raise ValueError(
            "importance='gradient' needs calibration data (a list of texts or a datasets.Dataset); pass "
            "calibration_data=..., or use importance='magnitude' for data-free pruning."
        )
    return normalize_per_layer(
        _gradient(model, kind, calibration_data, tokenizer, max_samples, batch_size, max_length, seed, progress)
    )


def _unit_counts(model: nn.Module, kind: str) -> list[int]:
    if kind == "heads":
        return [len(h) for h in kept_heads(model)]
    from .surgery import ffn_size

    return [ffn_size(model, layer) for layer in get_adapter(model).layer_modules(model)]


def _weight_io(module: nn.Module, inputs: bool) -> torch.Tensor:
    """Weight as ``[features, other]`` along its input (or output) features, for Linear and Conv1D alike."""
    weight = module.weight.detach().float()
    conv1d = type(module).__name__ == "Conv1D"
    return (weight if conv1d else weight.t()) if inputs else (weight.t() if conv1d else weight)


def _magnitude(model: nn.Module, kind: str) -> list[torch.Tensor]:
    adapter = get_adapter(model)
    scores = []
    for index, layer in enumerate(adapter.layer_modules(model)):
        if kind == "ffn":
            out = adapter.sub(layer, adapter.ffn_out)
            if isinstance(out, ConstantProjection):
                scores.append(torch.zeros(0))
                continue
            score = _weight_io(out, inputs=True).norm(dim=1)
            for path in adapter.ffn_in:
                score = score * _weight_io(adapter.sub(layer, path), inputs=False).norm(dim=1)
            scores.append(score)
            continue
        heads = kept_heads(model)[index]
        if not heads:
            scores.append(torch.zeros(0))
            continue
        dim = head_dim(model)
        # A head writes through its o-proj columns and reads values through its v rows; q/k only route attention.
        out = _weight_io(adapter.sub(layer, adapter.output), inputs=True).reshape(len(heads), -1).norm(dim=1)
        if adapter.fused_qkv:
            rows = _weight_io(adapter.sub(layer, adapter.fused_qkv), inputs=False)
            values = rows[2 * len(heads) * dim :].reshape(len(heads), -1).norm(dim=1)
        else:
            groups = gqa_layout(heads, model)
            group_size = len(heads) // len(groups)
            v = _weight_io(adapter.sub(layer, adapter.value), inputs=False).reshape(len(groups), -1).norm(dim=1)
            values = v.repeat_interleave(group_size)
        scores.append(out * values)
    return scores


def _labeled(model: nn.Module, data: Any) -> list | None:
    """Labels of a `datasets.Dataset` when the model has a task head that takes them, else ``None``."""
    columns = getattr(data, "column_names", None) or []
    column = next((c for c in ("labels", "label") if c in columns), None)
    has_head = getattr(model, "base_model", model) is not model
    takes_labels = "labels" in inspect.signature(model.forward).parameters
    return list(data[column]) if column and has_head and takes_labels else None


def _is_causal_lm(model: nn.Module) -> bool:
    name = type(model).__name__
    return name.endswith(("ForCausalLM", "LMHeadModel"))


def _gradient(model, kind, data, tokenizer, max_samples, batch_size, max_length, seed, progress):
    from tqdm.auto import tqdm

    labels = _labeled(model, data)
    counts = _unit_counts(model, kind)
    totals = [torch.zeros(n, dtype=torch.float64) for n in counts]
    seen = 0
    generator = torch.Generator().manual_seed(seed)
    batches = calibration_batches(
        model, data, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length, max_samples=max_samples
    )
    was_training = model.training
    needs_grad = {p: p.requires_grad for p in model.parameters()}
    model.eval()  # dropout off: scores must not depend on a random mask
    for p in needs_grad:
        p.requires_grad_(False)  # gradients are wanted only w.r.t. the gates: no parameter .grad is built
    total = -(-min(max_samples, len(data)) // batch_size) if hasattr(data, "__len__") else None
    try:
        with UnitGates(model, kind) as gates, torch.enable_grad():
            gates.record = True
            for batch in tqdm(batches, total=total, desc=f"Scoring {kind}", disable=not progress):
                size = next(iter(v for v in batch.values() if isinstance(v, torch.Tensor))).shape[0]
                if labels is not None:
                    batch["labels"] = torch.tensor(labels[seen : seen + size], device=batch["input_ids"].device)
                elif "labels" not in batch and _is_causal_lm(model) and "input_ids" in batch:
                    mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"]))
                    batch["labels"] = batch["input_ids"].masked_fill(mask == 0, -100)
                outputs = model(**batch)
                if "labels" in batch:
                    loss, power = outputs.loss * size, 1  # per-example gradients of a mean loss, rescaled
                else:
                    target = getattr(outputs, "last_hidden_state", None)
                    target = outputs.logits if target is None else target
                    probe = torch.randn(target.shape, generator=generator).to(target)
                    if "attention_mask" in batch and target.dim() == 3:
                        probe = probe * batch["attention_mask"][..., None].to(target)
                    loss, power = (probe * target).sum(), 2
                layers = sorted(gates.probes)
                grads = torch.autograd.grad(loss, [gates.probes[i] for i in layers], allow_unused=True)
                for index, grad in zip(layers, grads):
                    if grad is not None:
                        totals[index] += grad.detach().abs().pow(power).sum(0).double().cpu()
                gates.probes.clear()
                seen += size
    finally:
        for p, flag in needs_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if seen == 0:
        raise ValueError("The calibration data gave no batch; pass at least one text.")
    return [(t / seen).float() for t in totals]
