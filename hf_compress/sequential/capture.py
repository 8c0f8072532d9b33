"""Running calibration batches one transformer layer at a time.

`capture_inputs` runs the model's own forward up to its first layer (embeddings, position embeddings, masks: only
what precedes the layers) and records what the model hands each layer: the hidden states of layer 0 and, for every
layer, its other positional and keyword arguments (attention mask, rotary position embeddings, position ids...).
Each layer's forward is temporarily replaced by a recorder that returns its input unchanged, and the last one stops
the forward, so no layer computes anything and nothing after the layers runs. Arguments shared by every layer (one
mask object, one position-embedding pair) are stored once per batch.

`run_tail` does the opposite for the modules after the layers (final norm, LM head, pooler, classifier): it feeds
the last layer's stored outputs into the model's own forward in place of the layers, and stops as soon as every
module of interest has seen its input (an LM head's logits over the whole vocabulary are never computed); with the
float model's stream beside it, each batch runs on both (the float one first, as the reference).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .offload import ActivationStore


__all__ = ["BatchInputs", "capture_inputs", "run_layer", "run_tail"]


class _Stop(Exception):
    """Raised inside the model's forward once what is needed was recorded."""


@dataclass
class BatchInputs:
    """What the layers of one calibration batch receive besides the hidden states.

    Attributes:
        layer_args: per layer, the positional arguments after the hidden states and the keyword arguments.
        mask: the batch's ``attention_mask`` (padding is left out of the statistics), or None.
    """

    layer_args: list[tuple[tuple, dict]] = field(default_factory=list)
    mask: torch.Tensor | None = None


@contextlib.contextmanager
def _patched(layers: nn.ModuleList, make: Callable[[int], Callable[..., Any]]) -> Iterator[None]:
    """Replace each layer's forward (an instance attribute, so the module and its attributes stay in place)."""
    for index, layer in enumerate(layers):
        layer.forward = make(index)
    try:
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, tuple, dict]:
    """(hidden states, other positional args, keyword args) of a layer call; the hidden states go first."""
    if args:
        return args[0], tuple(args[1:]), dict(kwargs)
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), (), kwargs


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """No key/value cache while calibrating: layers must not append to a cache shared between batches."""
    try:
        names = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in names else {}


@torch.no_grad()
def capture_inputs(model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict[str, torch.Tensor]],
                   store: ActivationStore) -> list[BatchInputs]:  # fmt: skip
    """Record every layer's inputs for each batch; layer 0's hidden states go to `store` (one entry per batch)."""
    captured: list[BatchInputs] = []
    current: dict[str, BatchInputs] = {}

    def make(index: int):
        def record(*args, **kwargs):
            hidden, rest, keywords = _split(args, kwargs)
            current["batch"].layer_args.append((rest, keywords))
            if index == 0:
                store.append(hidden)
            if index == len(layers) - 1:
                raise _Stop
            return hidden

        return record

    extra = _forward_kwargs(model)
    with _patched(layers, make):
        for batch in batches:
            current["batch"] = BatchInputs(mask=batch.get("attention_mask"))
            try:
                model(**batch, **extra)
            except _Stop:
                pass
            if len(current["batch"].layer_args) != len(layers):
                raise RuntimeError(
                    f"{type(model).__name__}'s forward called {len(current['batch'].layer_args)} of its "
                    f"{len(layers)} layers: the sequential pipeline needs every layer to run once per forward."
                )
            captured.append(current["batch"])
    return captured


def _to(value: Any, device: torch.device | None) -> Any:
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_to(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


def _stop(module, args):
    raise _Stop


@torch.no_grad()
def run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, device: torch.device | None = None,
              stop_at: nn.Module | None = None) -> torch.Tensor | None:  # fmt: skip
    """One layer's forward on one batch (on `device` when given); returns its hidden-state output. With `stop_at`,
    the forward stops once that module got its input (after the hooks registered before this call ran): None."""
    handle = stop_at.register_forward_pre_hook(_stop) if stop_at is not None else None
    try:
        out = layer(_to(hidden, device), *_to(args, device), **_to(kwargs, device))
    except _Stop:
        return None
    finally:
        if handle is not None:
            handle.remove()
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def run_tail(model: nn.Module, layers: nn.ModuleList, batches: Iterable[dict[str, torch.Tensor]],
             store: ActivationStore, modules: dict[str, nn.Module], on_batch: Callable[[dict, bool], None], *,
             reference: ActivationStore | None = None) -> None:  # fmt: skip
    """Run what follows the layers on the stored last-layer outputs until every module in `modules` got its input.

    `on_batch(batch, is_reference)` is called before each forward (e.g. to set the padding mask of a
    `MomentCollector`). With a `reference` store (the float model's last-layer outputs), each batch runs twice:
    first on `reference` (``is_reference=True``), then on `store`.
    """
    state: dict[str, Any] = {"hidden": None, "seen": set()}

    def make(index: int):
        def replay(*args, **kwargs):
            hidden, _, _ = _split(args, kwargs)
            return state["hidden"].to(hidden.device) if index == 0 else hidden

        return replay

    def seen(name: str):
        def hook(module, args):
            state["seen"].add(name)
            if len(state["seen"]) == len(modules):
                raise _Stop

        return hook

    handles = [module.register_forward_pre_hook(seen(name)) for name, module in modules.items()]
    extra = _forward_kwargs(model)
    streams = [(reference, True), (store, False)] if reference is not None else [(store, False)]
    try:
        with _patched(layers, make):
            for index, batch in enumerate(batches):
                for source, is_reference in streams:
                    state["hidden"], state["seen"] = source[index], set()
                    on_batch(batch, is_reference)
                    try:
                        model(**batch, **extra)
                    except _Stop:
                        pass
    finally:
        for handle in handles:
            handle.remove()
