"""Decoder graphs with a key/value cache, so ONNX Runtime and OpenVINO generate as fast as transformers does.

A causal LM exported without a cache recomputes every earlier token at each generated one. Here its graph takes
the cache of the tokens before as inputs and returns the new cache, in the names other ONNX decoders use
(``past_key_values.{i}.key`` / ``.value`` in, ``present.{i}.key`` / ``.value`` out, each ``[batch, kv_heads, tokens,
head_dim]``), with ``position_ids`` as an input so that left-padded batches decode like ``generate`` does.

Every layer's cache keeps that layer's own shape: head pruning leaves layers with different key/value head counts,
which the probe run (`cache_layout`) reads from the model itself. The same traced graph serves the prompt (empty
cache, a zero-length axis) and each decoding step (one token, the cache so far). The tracer warns about Python
branches in transformers' SDPA code that depend on the traced lengths: a one-token query packs GQA heads instead of
repeating key/value heads (the same product), and causality is taken from the mask whenever one is given (always
here), so the traced path is exact for prompts and single-token steps alike (tested on both engines).
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


__all__ = [
    "cache_layout",
    "cache_argument",
    "returned_cache",
    "WithPast",
    "past_names",
    "present_names",
    "example_with_past",
    "position_ids",
]


def cache_argument(model: nn.Module) -> str | None:
    """The name a causal LM's forward takes its cache under (``cache`` since transformers 5.24, before it
    ``past_key_values``), or None for models that do not decode (encoders, classifiers)."""
    params = inspect.signature(model.forward).parameters
    if not (hasattr(model, "generate") and hasattr(model, "lm_head")):
        return None
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def returned_cache(output):
    """The cache in a model output, under either transformers name."""
    cache = output.get("cache")
    return cache if cache is not None else output.get("past_key_values")


def cache_layout(model: nn.Module) -> list[tuple[int, int]] | None:
    """``[(kv_heads, head_dim), ...]`` per layer of a causal LM's cache, read from one forward; None for models that
    do not decode (encoders, classifiers)."""
    if cache_argument(model) is None:
        return None
    ids = torch.zeros(1, 2, dtype=torch.long)
    with torch.no_grad():
        cache = returned_cache(model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True))
    layers = getattr(cache, "layers", None)
    expected = model.config.get_text_config().num_hidden_layers
    if layers is None or len(layers) != expected or any(getattr(layer, "keys", None) is None for layer in layers):
        raise ValueError(
            f"{type(model).__name__}'s cache does not hold one key/value pair per layer ({expected} layers; a layer "
            "whose every attention head was pruned keeps none): export it with with_past=False (a graph without a "
            "cache, which recomputes the whole sequence per token)."
        )
    return [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers]


def past_names(layers: int) -> list[str]:
    return [f"past_key_values.{i}.{part}" for i in range(layers) for part in ("key", "value")]


def present_names(layers: int) -> list[str]:
    return [f"present.{i}.{part}" for i in range(layers) for part in ("key", "value")]


class WithPast(nn.Module):
    """``(input_ids, attention_mask, position_ids, *past) -> (logits, *present)`` around a causal LM."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model, self.layers, self.argument = model, layers, cache_argument(model)

    def forward(self, input_ids, attention_mask, position_ids, *past):
        from transformers import DynamicCache

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(self.layers)]
        cache = DynamicCache(ddp_cache_data=pairs, config=self.model.config)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, return_dict=True, **{self.argument: cache})  # fmt: skip
        present = [tensor for layer in returned_cache(out).layers for tensor in (layer.keys, layer.values)]
        return (out.logits, *present)


def position_ids(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Positions of the last `new_tokens` tokens, counted over the real ones (as ``generate`` does for left padding)."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, -new_tokens:]


def example_with_past(model: nn.Module, layout: list[tuple[int, int]]) -> tuple[tuple, list[str], list[str], dict]:
    """Tracing inputs (2 cached tokens, 3 new ones, the first row left-padded), input / output names and the dynamic
    axes of the graph."""
    batch, cached, new = 2, 2, 3
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch, new), generator=generator)
    mask = torch.ones(batch, cached + new, dtype=torch.long)
    mask[0, 0] = 0  # a padded position: the mask path is traced, not constant-folded
    past = []
    for heads, dim in layout:
        past += [torch.randn(batch, heads, cached, dim, generator=generator) for _ in range(2)]
    inputs = ["input_ids", "attention_mask", "position_ids", *past_names(len(layout))]
    outputs = ["logits", *present_names(len(layout))]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}  # fmt: skip
    axes.update({name: {0: "batch", 2: "past_sequence"} for name in inputs[3:]})
    axes.update({name: {0: "batch", 2: "total_sequence"} for name in outputs[1:]})
    return (ids, mask, position_ids(mask, new), *past), inputs, outputs, axes
