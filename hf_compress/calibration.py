"""Calibration data: turn what a user passes (texts, a `datasets.Dataset`, token batches) into model batches."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from .validation import WrongTypeError, describe


__all__ = [
    "calibration_batches",
    "resolve_tokenizer",
    "usable_length",
    "data_form",
    "texts_of",
    "check_task_data",
    "check_tokenizer_fits",
]

DATA_FORMS = (
    "a list of texts (list[str]), a datasets.Dataset with a {col!r} column, a list of row dicts with a {col!r} "
    "field, or tokenized batches (a list of dicts of tensors with 'input_ids', as tokenizer(..., return_tensors='pt') "
    "gives)"
)
TEXT_FORMS = (
    "a list of texts (list[str]), a datasets.Dataset with a {col!r} column or a list of row dicts with a {col!r} field"
)
DEFAULT_MAX_LENGTH = 128


def remember_tokenizer(model, tokenizer) -> None:
    """Let the techniques' calibration find the tokenizer (`hf_compress.calibration.resolve_tokenizer` reads
    ``model.hf_compress_tokenizer`` as a path or Hub id) when the model was passed as an object."""
    source = getattr(tokenizer, "name_or_path", None)
    if source and getattr(model, "hf_compress_tokenizer", None) is None:
        model.hf_compress_tokenizer = source


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
    max_length: int | None = None,
    max_samples: int | None = None,
    text_column: str = "text",
    name: str = "calibration_data",
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield model-ready batches (on the model's device) from calibration `data`.

    Args:
        data: a list of strings; a list of row dicts with a `text_column` text; a `datasets.Dataset` with a
            `text_column` (or already tokenized, with ``input_ids``); or an iterable of dicts of tensors (used as
            they are). Anything else raises a `TypeError` naming `name` and the accepted forms.
        tokenizer: needed for texts; found from the model's checkpoint when omitted. It must not have more tokens
            than the model's embedding has rows.
        max_length: tokens per text, at most; always capped at what the model and tokenizer hold (see
            `usable_length`: 128 by default, fewer for a model with fewer positions).
        max_samples: use at most this many texts.
        name: what the data is called in error messages (``calibration_data``, ``eval_data``, ...).
    """
    if data is None:
        raise ValueError(f"No {name} given; pass a list of texts or a datasets.Dataset.")
    device = next(model.parameters()).device
    texts = texts_of(data, data_form(name, data, text_column), text_column)
    if texts is None:  # pre-tokenized: a tokenized Dataset (equal lengths) or an iterable of tensor dicts
        if hasattr(data, "with_format"):
            data = data.with_format("torch").iter(batch_size=batch_size)
        for index, batch in enumerate(data):
            check_batch(name, index, batch)
            yield {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        return
    if max_samples is not None:
        texts = texts[:max_samples]
    if not texts:
        raise ValueError(f"The {name} is empty; give at least one text.")
    tokenizer = resolve_tokenizer(model, tokenizer)
    check_tokenizer_fits(model, tokenizer)
    max_length = usable_length(model, tokenizer, max_length)
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            list(texts[start : start + batch_size]),
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        yield {k: v.to(device) for k, v in encoded.items()}


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
def _vocab_rows(model: Any) -> int | None:
    get = getattr(model, "get_input_embeddings", None)
    try:
        embedding = get() if get is not None else None
    except (NotImplementedError, AttributeError):
        embedding = None
    rows = getattr(embedding, "num_embeddings", None)
    return int(rows) if rows is not None else None


def check_tokenizer_fits(model: Any, tokenizer: Any) -> None:
    """A tokenizer with more tokens than the embedding has rows would index past the table (an IndexError)."""
    rows = _vocab_rows(model)
    if tokenizer is None or rows is None or not hasattr(tokenizer, "__len__"):
        return
    if len(tokenizer) > rows:
        raise ValueError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's input embedding has {rows} rows "
            f"(vocab_size {rows}): token ids >= {rows} would index past it. Pass the model's own tokenizer "
            "(tokenizer=AutoTokenizer.from_pretrained(<the model's checkpoint>))."
        )


def usable_length(model: Any, tokenizer: Any = None, requested: int | None = None) -> int:
    """Tokens per text: ``min(requested or 128, the model's position limit, tokenizer.model_max_length)``.

    RoBERTa-style models number positions from ``padding_idx + 1``, so they hold that many fewer tokens.
    """
    length = requested or DEFAULT_MAX_LENGTH
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    positions = getattr(text_config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        table = getattr(getattr(getattr(model, "base_model", model), "embeddings", None), "position_embeddings", None)
        offset = getattr(table, "padding_idx", None)
        length = min(length, positions - (offset + 1 if isinstance(offset, int) else 0))
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit > 0:
        length = min(length, limit)
    return max(int(length), 1)
