"""Calibration data: what a user passes (texts, a `datasets.Dataset`, token batches) as one `Calibration` object,
built once per `apply_compression` / `compress` call and passed explicitly to each technique's apply hook; model
batches from it (`calibration_batches`) and the padding-aware input moments GPTQ and low-rank whitening use
(`input_moments`). How the data forms are checked is in `hf_compress.validation`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from .validation import check_batch, data_form, texts_of


__all__ = [
    "Calibration",
    "calibration_batches",
    "input_moments",
    "real_tokens",
    "MomentCollector",
    "unwrap",
    "resolve_tokenizer",
    "usable_length",
    "check_tokenizer_fits",
]

DEFAULT_MAX_LENGTH = 128


@dataclasses.dataclass
class Calibration:
    """The calibration data of one compression, handed to every technique's ``apply(model, config, calibration)``.

    Attributes:
        data: texts, row dicts, a `datasets.Dataset` or tokenized batches (see `calibration_batches`).
        tokenizer: tokenizes texts; None means the one saved with the model's checkpoint (``config._name_or_path``).
        max_length: tokens per text at most (None: `usable_length`'s default, capped by the model).
        text_column: the text field of rows and datasets.

    Batches carry their ``attention_mask``: `input_moments` leaves the padding out.
    """

    data: Any
    tokenizer: Any = None
    max_length: int | None = None
    text_column: str = "text"

    @classmethod
    def of(cls, data: Any, tokenizer: Any = None) -> Calibration | None:
        """`data` as a `Calibration` (None stays None; a `Calibration` gets `tokenizer` if it has none)."""
        if data is None or (isinstance(data, Calibration) and (tokenizer is None or data.tokenizer is not None)):
            return data
        if isinstance(data, Calibration):
            return dataclasses.replace(data, tokenizer=tokenizer)
        return cls(data, tokenizer)

    def batches(self, model: Any, *, batch_size: int = 16, max_samples: int | None = None,
                name: str = "calibration_data") -> Iterator[dict[str, torch.Tensor]]:  # fmt: skip
        return calibration_batches(model, self, batch_size=batch_size, max_samples=max_samples, name=name)

    def input_moments(self, model: nn.Module, module_names: Iterable[str], *, max_samples: int | None = None,
                      batch_size: int = 16, float64: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
        """``E[x x^T]`` of each named module's input over the real (unpadded) tokens (see `input_moments`)."""
        modules = {name: model.get_submodule(name) for name in module_names}
        return input_moments(model, modules, self.batches(model, batch_size=batch_size, max_samples=max_samples),
                             float64=float64)  # fmt: skip


def unwrap(data: Any, tokenizer: Any = None) -> tuple[Any, Any]:
    """The raw data and tokenizer of `data` (a `Calibration` or the raw data itself); an explicit `tokenizer` wins."""
    if isinstance(data, Calibration):
        return data.data, tokenizer if tokenizer is not None else data.tokenizer
    return data, tokenizer


class MomentCollector:
    """Sums ``x^T x`` of each module's input over the real tokens while it is active (``with collector:``).

    The one padding-aware accumulator behind `input_moments` (a whole-model forward per batch) and the sequential
    pipeline (`hf_compress.sequential`: one layer's forward per batch). Set `mask` to the batch's ``attention_mask``
    before each forward: positions where it is 0 (padding) are left out of every 3-D ``[batch, seq, features]``
    input. Modules fed the very same input tensor in a forward (q/k/v, gate/up) share one sum instead of computing
    it again (`share=True`); `moments()` then returns the same tensor for each of them. ``float64=False`` sums
    float32 products on the input's device (GPTQ's Hessians); ``float64=True`` adds each float32 product to a
    float64 sum on the CPU (low-rank whitening). ``channels=True`` sums only each feature's ``x`` and ``x^2`` (per
    batch in float32, added to float64 sums on the CPU): `moments()` then gives a ``[2, features]`` tensor
    ``(E[x], E[x^2])`` per module instead of the ``features x features`` matrix, all that structured pruning's
    fluctuation scores need (`hf_compress.pruning.activation`); it has no cross moments.

    Cross moments (the sequential pipeline's float target): a forward announced with
    ``set_mask(mask, reference=True)`` only keeps each module's real-token input ``x_f`` (the float model's); the
    next forward, on the same batch (the quantized model's stream), adds ``x^T x`` as usual and also
    ``(x_f - x)^T x`` (`cross_moments`), then drops ``x_f``. A module in `project` (name -> an ``[out, in]``
    weight ``W``) gets ``W (x_f - x)^T x`` instead, ``W D``, all a float-target weight needs: for a module with
    fewer outputs than inputs (a down_proj, 2048 x 8192) that sum is the size of its weight rather than ``in x in``
    (67 MB instead of 268 MB in float32) and costs half the multiply-adds. Such a module never shares sums.
    """

    def __init__(self, modules: dict[str, nn.Module], *, float64: bool = False, share: bool = True,
                 channels: bool = False, project: dict[str, torch.Tensor] | None = None) -> None:  # fmt: skip
        self.modules = modules
        self.float64 = float64
        self.share = share
        self.channels = channels
        self.project = project or {}
        if self.project and channels:
            raise ValueError("A channels=True collector has no cross moments to project.")
        self.mask: torch.Tensor | None = None
        self.sums: dict[str, torch.Tensor] = {}
        self.cross: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.aliases: dict[str, str] = {}  # module -> the module whose sum it shares
        self.reference = False
        self._kept: dict[str, torch.Tensor] = {}  # the reference forward's inputs, until the paired forward
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs of the current forward (identity, owner)
        self._handles: list = []

    def set_mask(self, mask: torch.Tensor | None, *, reference: bool = False) -> None:
        """The ``attention_mask`` of the next forward (None: every position counts); starts a new forward.
        ``reference=True``: that forward's inputs are the float reference of the next one (see the class)."""
        if reference and self.channels:
            raise ValueError("A channels=True collector sums per-feature moments only; it has no cross moments.")
        if reference and self._kept:
            raise RuntimeError(f"Two reference forwards in a row: {sorted(self._kept)[:4]} were never paired.")
        # Without padding the inputs are summed as they are: x[mask] would copy them (67 MB at 4 x 512 x 8192).
        self.mask = mask.bool() if mask is not None and not mask.bool().all() else None
        self.reference = reference
        self._seen = []

    def _add(self, sums: dict[str, torch.Tensor], name: str, left: torch.Tensor, x: torch.Tensor) -> None:
        if self.channels:
            part = torch.stack([x.sum(0), (x * x).sum(0)]).double().cpu()
            sums[name] = sums[name] + part if name in sums else part
            return
        if name not in sums:
            shape = (left.shape[1], x.shape[1])
            sums[name] = torch.zeros(shape, dtype=torch.float64) if self.float64 else x.new_zeros(shape)
        if self.float64:
            sums[name] += (left.t() @ x).double().cpu()
        else:
            sums[name].addmm_(left.t(), x)

    def _record(self, name: str):
        @torch.no_grad()
        def record(module, args):
            raw = args[0].detach()
            if self.share and name not in self.project:
                owner = next((n for t, n in self._seen if t is raw), None)
                if owner in self.project:
                    owner = None  # its cross sum is its own weight's: nothing to share
                if owner is not None and self.aliases.get(name, owner) == owner and name not in self.sums:
                    self.aliases[name] = owner
                    return
                self._seen.append((raw, name))
            x = real_tokens(raw, self.mask).float()
            if self.reference:  # a copy of its own: it is subtracted from in place, and the layer may reuse `raw`
                self._kept[name] = x.clone() if x.data_ptr() == raw.data_ptr() else x
                return
            self._add(self.sums, name, x, x)
            self.counts[name] = self.counts.get(name, 0) + x.shape[0]
            reference = self._kept.pop(name, None)
            if reference is not None:
                if reference.shape != x.shape:
                    raise RuntimeError(f"{name}: the reference forward gave {tuple(reference.shape)} real-token "
                                       f"inputs, the paired one {tuple(x.shape)}; they must run the same batch.")  # fmt: skip
                delta = reference.sub_(x)
                weight = self.project.get(name)
                if weight is not None:
                    delta = delta @ weight.detach().to(delta.device, delta.dtype).t()  # [tokens, out]
                self._add(self.cross, name, delta, x)

        return record

    def __enter__(self) -> MomentCollector:
        self._handles = [m.register_forward_pre_hook(self._record(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._seen = []
        self._kept = {}

    def _means(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # In place: a sum is not needed once averaged, and a second full-size copy of a wide layer's moment
        # (268 MB at 8192 features) would raise the peak.
        means = {name: total.div_(max(self.counts[name], 1)) for name, total in sums.items()}
        means.update({name: means[owner] for name, owner in self.aliases.items() if owner in means})
        return means

    def moments(self) -> dict[str, torch.Tensor]:
        """``E[x x^T]`` per module (with `channels`: ``[E[x], E[x^2]]``), the sums divided by the real-token counts,
        in place: call it once; modules never reached are missing."""
        return self._means(self.sums)

    def cross_moments(self) -> dict[str, torch.Tensor]:
        """``E[(x_f - x) x^T]`` per module that had reference forwards (``x_f``: the reference input; ``W`` times it
        for a module in `project`), in place like `moments`; empty without reference forwards."""
        return self._means(self.cross)


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows ``[n, features]`` of a module input that belong to real tokens: a 3-D ``[batch, seq, features]``
    input loses the positions where the boolean `mask` (the batch's ``attention_mask``) is False; other inputs (a
    pooler's ``[batch, features]``) keep every row."""
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        x = x[mask]
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def input_moments(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[dict[str, torch.Tensor]], *,
                  float64: bool = False) -> dict[str, torch.Tensor]:  # fmt: skip
    """``E[x x^T]`` of each module's input over the real tokens of `batches`: positions whose ``attention_mask`` is 0
    (padding) are left out. One forward per batch (see `MomentCollector`, which does the summing). Modules the
    forward passes never reach are missing from the result."""
    with MomentCollector(modules, float64=float64) as collector:
        for batch in batches:
            collector.set_mask(batch.get("attention_mask"))
            model(**batch)
    return collector.moments()


def resolve_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """`tokenizer`, or the one saved next to the model's checkpoint (``config._name_or_path``)."""
    if tokenizer is not None:
        return tokenizer
    source = getattr(model.config, "_name_or_path", None)
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
    if isinstance(data, Calibration):
        max_length = max_length if max_length is not None else data.max_length
        text_column = data.text_column
    data, tokenizer = unwrap(data, tokenizer)
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
