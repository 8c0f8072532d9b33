"""`load_model`: a model object, a local folder or a Hub id to (model, tokenizer, name), for `compress` and the CLI."""

from __future__ import annotations

import os
from typing import Any

import torch

from ..calibration import check_tokenizer_fits
from ..validation import check_supported
from .checks import load_config


__all__ = ["load_model"]


def load_model(model_or_id: Any, auto_class: Any = None, tokenizer: Any = None,
               supported_only: bool = False) -> tuple[Any, Any, str]:  # fmt: skip
    """(model, tokenizer, name) for a model object, a local folder or a Hub id.

    A folder or id is loaded with the class named in its ``config.json`` ``architectures`` (so a classifier keeps
    its head), or `auto_class` when given; the tokenizer saved with it is loaded too when there is one.
    `supported_only` (what `compress` asks for) refuses, before the weights are read, a family hf_compress has no
    adapter for, and a tokenizer with more tokens than the embedding has rows.
    """
    import transformers

    if not isinstance(model_or_id, (str, os.PathLike)):
        if not isinstance(model_or_id, torch.nn.Module):
            raise TypeError(
                f"compress() takes a model, a local folder or a Hub id such as 'user/name'; got "
                f"{type(model_or_id).__name__}."
            )
        if supported_only:
            check_supported(model_or_id)
            check_tokenizer_fits(model_or_id, tokenizer)
        name = getattr(getattr(model_or_id, "config", None), "_name_or_path", "") or type(model_or_id).__name__
        return model_or_id, tokenizer, str(name)
    source = str(model_or_id)
    config = load_config(source)
    if supported_only:
        check_supported(config, source)
    cls = auto_class
    if cls is None:
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
    model = cls.from_pretrained(source).eval()
    # transformers 5 builds an empty tokenizer for a folder saved without one; only load what was saved.
    local_without_tokenizer = os.path.isdir(source) and not any(
        os.path.isfile(os.path.join(source, name)) for name in ("tokenizer.json", "tokenizer_config.json")
    )
    if tokenizer is None and not local_without_tokenizer:
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError):
            tokenizer = None  # vision models, or a checkpoint saved without its tokenizer
    if supported_only:
        check_tokenizer_fits(model, tokenizer)
    return model, tokenizer, source
