"""The load guard in config.json: plain transformers refuses a compressed checkpoint; `import hf_compress` lifts it.

Why a guard at all: transformers only *warns* about an unknown ``quant_method`` and then builds the uncompressed
model, so without our plugin a compressed checkpoint would load with random weights wherever a module was
compressed. The guard must therefore make plain transformers *raise*, whatever the entry point.

The mechanism (read off transformers 5.24.0; re-check these facts when upgrading):

- Every way of loading a checkpoint builds its config from ``config.json`` first: ``AutoConfig``, every
  ``AutoModel*`` / model class ``from_pretrained`` (with any ``attn_implementation``, ``dtype``,
  ``ignore_mismatched_sizes``, ...), ``pipeline(...)``, ``AutoTokenizer`` and sentence-transformers (which call
  ``AutoConfig``). They all end in ``PreTrainedConfig.__post_init__``, which turns ``id2label`` keys into ints:
  ``{int(key): value ...}``. A non-numeric key raises ``ValueError: invalid literal for int() with base 10: '<key>'``,
  so a key that *is* the instruction puts "run `import hf_compress`" into the error of every path.
- ``id2label`` is not overridable before that line runs: ``PreTrainedConfig.from_dict`` merges only ``num_labels``,
  ``attn_implementation``, ``experts_implementation``, ``output_attentions``, ``dtype`` and ``name_or_path`` into
  the dict before ``cls(**config_dict)``; ``id2label=...`` kwargs are applied after construction, too late to help.
  (The previous guard, an invalid ``attn_implementation``, was replaced by any ``attn_implementation=`` argument;
  ``dtype`` is replaced by ``pipeline(dtype=...)``. ``problem_type``'s ``Literal`` is *not* validated: the module uses
  ``from __future__ import annotations``, and huggingface_hub's ``@strict`` skips string annotations.)
- Everything that reads ``config.json`` goes through ``PreTrainedConfig._dict_from_json_file`` (``from_pretrained``
  of configs, models, pipelines and tokenizers via ``get_config_dict``, and ``from_json_file``, used by
  ``Trainer`` when resuming); everything that writes it goes through ``PreTrainedConfig.to_json_string``
  (``save_pretrained``, ``push_to_hub``, ``to_json_file``).

So the guard lives only in the JSON text. `install` wraps those two functions, once, at ``import hf_compress``:
writing a config whose ``quantization_config`` is an hf_compress recipe stores ``"id2label": {LOAD_GUARD: <the real
id2label, or null when it was left out>}``; reading puts the real value back before the config is built. A live
config (``model.config``, ``config.to_dict()``, its ``repr``, which is wrapped too) never holds the guard, so it
round-trips unchanged. The price: without the plugin, ``AutoTokenizer.from_pretrained`` of a compressed folder fails
too (it reads the model config), with the same "import hf_compress" message.
"""

from __future__ import annotations

import json
from functools import wraps
from typing import Any

from transformers import PreTrainedModel
from transformers.configuration_utils import PreTrainedConfig

from ..config import QUANT_METHOD


__all__ = ["LOAD_GUARD", "install", "add_load_guard", "remove_load_guard"]

# The `id2label` key that plain transformers fails on. Shown as:
#   ValueError: invalid literal for int() with base 10: '<LOAD_GUARD>'
LOAD_GUARD = "hf_compress checkpoint: run `import hf_compress` before loading it (pip install hf-compress)"


def _is_compressed(config_dict: dict[str, Any]) -> bool:
    recipe = config_dict.get("quantization_config")
    return isinstance(recipe, dict) and recipe.get("quant_method") == QUANT_METHOD


def add_load_guard(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Put the guard into a ``config.json`` dict of a compressed model (in place; a no-op for any other config)."""
    if _is_compressed(config_dict) and not _has_guard(config_dict):
        config_dict["id2label"] = {LOAD_GUARD: config_dict.get("id2label")}
    return config_dict


def remove_load_guard(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Undo `add_load_guard` (in place): the real ``id2label`` back, or no key at all if there was none."""
    if _has_guard(config_dict):
        real = config_dict["id2label"][LOAD_GUARD]
        if real is None:
            del config_dict["id2label"]
        else:
            config_dict["id2label"] = real
    return config_dict


def _has_guard(config_dict: dict[str, Any]) -> bool:
    id2label = config_dict.get("id2label")
    return isinstance(id2label, dict) and LOAD_GUARD in id2label


def install() -> None:
    """Wrap `PreTrainedConfig`'s JSON reader and writer (idempotent; called by ``import hf_compress``)."""
    if getattr(PreTrainedConfig.to_json_string, "_hf_compress_guard", False):
        return
    to_json_string = PreTrainedConfig.to_json_string
    dict_from_json_file = PreTrainedConfig._dict_from_json_file.__func__

    @wraps(to_json_string)
    def guarded_to_json_string(self, use_diff: bool = True) -> str:
        text = to_json_string(self, use_diff=use_diff)
        if QUANT_METHOD not in text:  # cheap pre-check: most configs are not ours
            return text
        config_dict = json.loads(text)
        if not _is_compressed(config_dict):
            return text
        # Same layout as transformers' own `to_json_string` (indent 2, sorted keys, trailing newline).
        return json.dumps(add_load_guard(config_dict), indent=2, sort_keys=True) + "\n"

    @wraps(dict_from_json_file)
    def unguarded_dict_from_json_file(cls, json_file):
        return remove_load_guard(dict_from_json_file(cls, json_file))

    @wraps(PreTrainedConfig.__repr__)
    def unguarded_repr(self) -> str:
        # `print(model.config)` shows the config as it is, not the guarded file (transformers: name + JSON string).
        return f"{self.__class__.__name__} {to_json_string(self)}"

    guarded_to_json_string._hf_compress_guard = True
    PreTrainedConfig.to_json_string = guarded_to_json_string
    PreTrainedConfig.__repr__ = unguarded_repr
    PreTrainedConfig._dict_from_json_file = classmethod(unguarded_dict_from_json_file)


# -- tied weights (used by embedding factorization) ----------------------------------------------------------------
def all_tied_keys(model: PreTrainedModel) -> dict[str, str]:
    """The model's tied weights, target -> source (``all_tied_weights_keys``, transformers 5.23/5.24)."""
    return dict(getattr(model, "all_tied_weights_keys", None) or {})


def drop_tied_keys(model: PreTrainedModel, embedding_name: str, head_names: list[str]) -> None:
    """Drop the ties between the old table and the heads' weights: the heads now read the factors themselves.

    Other ties (BERT's decoder bias -> ``cls.predictions.bias``) keep their names and stay. Private internals,
    checked on transformers 5.23/5.24: ``PreTrainedModel._tied_weights_keys`` and ``get_expanded_tied_weights_keys``.
    """
    dropped = {f"{embedding_name}.weight", *(f"{head}.weight" for head in head_names)}
    for prefix, sub in model.named_modules():
        if isinstance(sub, PreTrainedModel) and sub._tied_weights_keys:
            lead = f"{prefix}." if prefix else ""
            # An instance attribute, read by `get_expanded_tied_weights_keys` when `tie_weights()` recomputes.
            sub._tied_weights_keys = {
                t: s for t, s in sub._tied_weights_keys.items() if lead + t not in dropped and lead + s not in dropped
            }
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            sub.all_tied_weights_keys = sub.get_expanded_tied_weights_keys(all_submodels=True)
