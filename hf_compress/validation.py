"""Checks of what users pass in, run before any work, so a bad input costs a second instead of a compression.

Every message names the parameter, the value received, what is allowed and how to fix it. Wrong types raise
`WrongTypeError` (a `TypeError` that is also a `ValueError`, since hf_compress raised `ValueError` for some of them
before and ``except ValueError`` must keep working); wrong values raise `ValueError`; missing paths
`FileNotFoundError`. The CLI turns all of them into one line and exit status 2.

This module imports nothing from hf_compress at import time: the config dataclasses use its helpers.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any


__all__ = [
    "WrongTypeError",
    "check_number",
    "check_bool",
    "check_patterns",
    "check_supported",
    "describe",
    "data_form",
    "texts_of",
    "check_batch",
    "check_task_data",
]


class WrongTypeError(TypeError, ValueError):
    """A value of the wrong type: a `TypeError`, and a `ValueError` for code written against older hf_compress."""


def describe(value: Any, limit: int = 60) -> str:
    """``repr`` of `value` (shortened) with its type, for messages: ``'high' (str)``."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}" if high is not None else ""


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False, optional: bool = False,
                 hint: str = "") -> Any:  # fmt: skip
    """`value` if it is a finite number (an integer when `integer`) in the range, else a message naming `name`.

    Booleans are refused although Python counts them as integers: ``fraction=True`` is a mistake, not 1.
    """
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} {_range_text(low, high, low_open, high_open)}".strip() + (" or None" if optional else "")
    numeric = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise WrongTypeError(f"{name} must be {allowed}; got {describe(value)}.{hint}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name} must be {allowed}; got {value!r}.{hint}")
    return value


def check_bool(name: str, value: Any, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise WrongTypeError(f"{name} must be True or False{' or None' if optional else ''}; got {describe(value)}.")


def check_patterns(name: str, value: Any) -> None:
    """Module patterns in PEFT's vocabulary: a full-match regex (str) or a list of name suffixes (str)."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name} {value!r} is not a valid regular expression ({err}).") from None
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise WrongTypeError(
            f"{name} must be a list of module-name suffixes (e.g. ['query', 'value']) or one full-match regex "
            f"(str); got {describe(value)}."
        )


# -- the model -----------------------------------------------------------------------------------------------------
def check_supported(config_or_model: Any, name: str = "") -> None:
    """Refuse a model family without an architecture adapter: its compressed folder would not reload."""
    from .architectures import ADAPTERS, UnsupportedArchitectureError

    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"{name or type(config_or_model).__name__} is a {model_type!r} model, a family hf_compress does not "
            f"support (its compressed folder would not reload). Supported families (model_type): {sorted(ADAPTERS)}. "
            "To add one, register an ArchitectureAdapter in hf_compress.architectures.ADAPTERS."
        )


DATA_FORMS = (
    "a list of texts (list[str]), a datasets.Dataset with a {col!r} column, a list of row dicts with a {col!r} "
    "field, or tokenized batches (a list of dicts of tensors with 'input_ids', as tokenizer(..., return_tensors='pt') "
    "gives)"
)
TEXT_FORMS = (
    "a list of texts (list[str]), a datasets.Dataset with a {col!r} column or a list of row dicts with a {col!r} field"
)


# -- data forms -----------------------------------------------------------------------------------------------------
def data_form(name: str, data: Any, text_column: str = "text", batches: bool = True) -> str | None:
    """Which accepted form `data` has: ``"texts"``, ``"rows"``, ``"dataset"``, ``"batches"`` (``None`` for None).

    `batches` says whether tokenized batches are accepted (calibration) or texts are needed (fidelity, recovery).
    Lists are checked item by item; an iterator of batches is checked as it is consumed (`calibration_batches`).
    """
    forms = (DATA_FORMS if batches else TEXT_FORMS).format(col=text_column)
    if data is None:
        return None
    if isinstance(data, (str, bytes)):
        raise WrongTypeError(
            f"{name} must be a list of texts, not a single string; wrap it in a list: [{data!r:.40}]."
        )
    columns = getattr(data, "column_names", None)
    if isinstance(columns, Mapping):  # a DatasetDict
        raise WrongTypeError(
            f"{name} is a DatasetDict with splits {sorted(columns)}; pass one split, e.g. data['train']."
        )
    if isinstance(data, Mapping):
        raise WrongTypeError(
            f"{name} is a dict (keys {sorted(map(str, data))[:6]}); accepted: {forms}. For a dict of columns use "
            f"datasets.Dataset.from_dict(...){'; wrap one tokenized batch in a list' if batches else ''}."
        )
    if columns is not None:
        if text_column in columns:
            return "dataset"
        if batches and "input_ids" in columns:
            return "batches"
        raise ValueError(
            f"The {name} dataset has columns {columns}; expected a {text_column!r} column (pass text_column=...)"
            + (" or tokenized 'input_ids'." if batches else ".")
        )
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{name} is empty; give at least one text.")
        if all(isinstance(item, str) for item in data):
            return "texts"
        if all(isinstance(item, Mapping) for item in data):
            if batches and all("input_ids" in item for item in data):
                for index, item in enumerate(data):
                    check_batch(name, index, item)
                return "batches"
            bad = next((i for i, item in enumerate(data) if not isinstance(item.get(text_column), str)), None)
            if bad is None:
                return "rows"
            raise WrongTypeError(
                f"{name}[{bad}] is a dict with keys {sorted(map(str, data[bad]))[:6]} and no {text_column!r} text; "
                f"accepted: {forms}."
            )
        bad = next(i for i, item in enumerate(data) if not isinstance(item, str))
        raise WrongTypeError(
            f"{name}[{bad}] is {describe(data[bad])}; every item must be a text (str). Accepted: {forms}."
        )
    if batches and isinstance(data, Iterable) and not isinstance(data, (numbers.Number, bytes)):
        return "batches"  # a generator or DataLoader of batches, checked batch by batch as it is read
    raise WrongTypeError(f"{name} must be {forms}; got {describe(data)}.")


def check_batch(name: str, index: int, batch: Any) -> None:
    import torch

    if not isinstance(batch, Mapping):
        raise WrongTypeError(f"{name}: batch {index} is {describe(batch)}; tokenized batches are dicts of tensors.")
    ids = batch.get("input_ids")
    if not isinstance(ids, torch.Tensor):
        raise WrongTypeError(
            f"{name}[{index}]['input_ids'] is {describe(ids)}; tokenized batches hold tensors: "
            "tokenizer(texts, padding=True, return_tensors='pt')."
        )


def texts_of(data: Any, form: str | None, text_column: str = "text") -> list[str] | None:
    """The texts of `data` of form `form` (see `data_form`), or ``None`` for tokenized batches / no data."""
    if form == "texts":
        return list(data)
    if form == "rows":
        return [row[text_column] for row in data]
    if form == "dataset":
        texts = list(data[text_column])
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise WrongTypeError(
                f"The {text_column!r} column holds {describe(texts[bad])} at row {bad}; it must hold texts."
            )
        return texts
    return None


def check_task_data(data: Any, text_column: str = "text", label_column: str = "label") -> None:
    """Labeled rows: a list of dicts or a `datasets.Dataset`, each with a text and a label."""
    if data is None:
        return
    need = f"{text_column!r} and {label_column!r}"
    columns = getattr(data, "column_names", None)
    if columns is not None and not isinstance(columns, Mapping):
        missing = [c for c in (text_column, label_column) if c not in columns]
        if missing:
            raise ValueError(f"task_data has columns {columns}; it needs {need} (missing {missing}).")
        return
    if not isinstance(data, (list, tuple)) or not data or not all(isinstance(r, Mapping) for r in data):
        raise WrongTypeError(
            f"task_data must be labeled rows: a list of dicts or a datasets.Dataset with {need}, e.g. "
            f"[{{'text': 'a mail client', 'label': 3}}, ...]; got {describe(data)}."
        )
    bad = next(
        (i for i, r in enumerate(data) if not isinstance(r.get(text_column), str) or label_column not in r), None
    )
    if bad is not None:
        raise ValueError(
            f"task_data[{bad}] = {describe(data[bad])} needs a {text_column!r} text and a {label_column!r}."
        )


# -- tokenization ---------------------------------------------------------------------------------------------------
