"""Calibration data: turn what a user passes (texts, a `datasets.Dataset`, token batches) into model batches."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch


__all__ = ["calibration_batches", "resolve_tokenizer"]


def resolve_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """`tokenizer`, or the one saved next to the model's checkpoint (``config._name_or_path``)."""
    if tokenizer is not None:
        return tokenizer
    source = getattr(model, "hf_compress_tokenizer", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise ValueError(
            "Calibration texts need a tokenizer, and this model was not loaded from a checkpoint that has one. "
            "Pass tokenizer=AutoTokenizer.from_pretrained(...) or pre-tokenized batches."
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def calibration_batches(
    model: Any,
    data: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    max_length: int = 128,
    max_samples: int | None = None,
    text_column: str = "text",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield model-ready batches (on the model's device) from calibration `data`.

    Args:
        data: a list of strings; a `datasets.Dataset` with a `text_column` (or already tokenized, with
            ``input_ids``); or an iterable of dicts of tensors (used as they are).
        tokenizer: needed for texts; found from the model's checkpoint when omitted.
        max_samples: use at most this many texts.
    """
    if data is None:
        raise ValueError("No calibration data given; pass a list of texts or a datasets.Dataset.")
    device = next(model.parameters()).device
    texts = _texts(data, text_column)
    if texts is None:  # pre-tokenized: a tokenized Dataset (equal lengths) or an iterable of tensor dicts
        if hasattr(data, "with_format"):
            data = data.with_format("torch").iter(batch_size=batch_size)
        for batch in data:
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return
    if max_samples is not None:
        texts = texts[:max_samples]
    if not texts:
        raise ValueError("The calibration data is empty; give at least one text.")
    tokenizer = resolve_tokenizer(model, tokenizer)
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {k: v.to(device) for k, v in encoded.items()}


def _texts(data: Any, text_column: str) -> Sequence[str] | None:
    if isinstance(data, str):
        raise TypeError("Calibration data must be a list of texts, not a single string; wrap it in a list.")
    if isinstance(data, (list, tuple)) and all(isinstance(t, str) for t in data):
        return list(data)
    column_names = getattr(data, "column_names", None)
    if column_names is not None:  # datasets.Dataset
        if text_column in column_names:
            return list(data[text_column])
        if "input_ids" in column_names:
            return None
        raise ValueError(
            f"The calibration dataset has columns {column_names}; expected a {text_column!r} column "
            "(pass text_column=...) or tokenized 'input_ids'."
        )
    return None
