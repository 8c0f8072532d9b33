"""Plain transformers checkpoints: a compressed model whose structure the family's own config can describe.

That is: the same number of heads and the same FFN width in every layer (written to ``num_attention_heads`` /
``num_key_value_heads`` and ``intermediate_size``-like fields), layers dropped (students), no factorized or quantized
module. Families whose head size is ``hidden_size / num_attention_heads`` (BERT, GPT-2, DistilBERT, ViT) cannot hold
pruned heads at all; Llama, Mistral and Qwen2 store ``head_dim`` and can. The check is the strictest possible: the
plain model built from the rewritten config must take the compressed state dict with every shape equal
(``load_state_dict(strict=True)``), so what loads is exactly the compressed model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_compress.factorization import FactorizedEmbedding, LowRankLinear

from ._common import quantized_modules


__all__ = ["export_transformers", "plain_config", "plain_model"]

_HEAD_FIELDS = ("num_attention_heads", "n_head", "n_heads")
_FFN_FIELDS = ("intermediate_size", "n_inner", "hidden_dim")
_KV_FIELD = "num_key_value_heads"


def _refuse(reason: str, fix: str) -> ValueError:
    return ValueError(f"This model cannot be written as a plain transformers checkpoint: {reason}. {fix}")


def _first(config, fields):
    return next((f for f in fields if getattr(config, f, None) is not None or f in config.to_dict()), None)


def plain_config(model: nn.Module, allow_quantized: bool = False):
    """The model's config rewritten for its compressed shapes, without the hf_compress recipe.

    Raises a `ValueError` that says what to change when the structure is not uniform or the family cannot hold it.
    """
    factorized = [n for n, m in model.named_modules() if isinstance(m, (FactorizedEmbedding, LowRankLinear))]
    if factorized:
        raise _refuse(f"factorized modules {factorized[:3]}", "Export without EmbeddingFactorizationConfig / "
                      "LowRankLinearConfig, or use to='onnx' / 'openvino', which hold every structure.")  # fmt: skip
    if quantized_modules(model) and not allow_quantized:
        raise _refuse("it has quantized layers", "Use to='compressed-tensors' (int8/int4 weights) or 'onnx' / "
                      "'openvino', or export the model before WeightQuantizationConfig.")  # fmt: skip
    empty = [n for n, m in model.named_modules() if type(m).__name__ in ("EmptyAttention", "ConstantProjection")]
    if empty:
        raise _refuse(f"{empty[:3]} lost all their heads or inputs", "Prune fewer heads or use to='onnx'.")
    config = type(model.config).from_dict(
        {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "architectures")}
    )
    config.architectures = [type(model).__name__]
    head_field = _first(config, _HEAD_FIELDS)
    layers = config.num_hidden_layers if hasattr(config, "num_hidden_layers") else None
    pruned = [m for m in model.modules() if hasattr(m, "hf_compress_heads")]
    if pruned and head_field:
        counts = {len(m.hf_compress_heads) for m in pruned}
        if layers is not None and len(pruned) < layers:
            counts.add(getattr(config, head_field))
        if len(counts) > 1:
            raise _refuse(f"layers keep different numbers of heads ({sorted(counts)})", "Prune the same heads count "
                          "in every layer (HeadPruningConfig ranking='per_layer'), or use to='onnx'.")  # fmt: skip
        heads = counts.pop()
        original = getattr(config, head_field)
        if heads != original:
            if getattr(config, "head_dim", None) is None:
                raise _refuse(f"{config.model_type} derives its head size from hidden_size / {head_field}, so "
                              "pruned heads change it", "Use to='onnx' / 'openvino' for pruned heads.")  # fmt: skip
            groups = {m.num_key_value_groups for m in pruned if hasattr(m, "num_key_value_groups")}
            setattr(config, head_field, heads)
            if getattr(config, _KV_FIELD, None) is not None and groups:
                setattr(config, _KV_FIELD, heads // groups.pop())
    _fit_ffn(model, config)
    return config


def _meta_shapes(model_cls, config) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        skeleton = model_cls(config)
    return {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}


def _fit_ffn(model: nn.Module, config) -> None:
    """Set the FFN width field from the compressed shapes, or refuse when layers differ."""
    ours = {k: tuple(v.shape) for k, v in _float_state(model).items()}
    theirs = _meta_shapes(type(model), config)
    field = _first(config, _FFN_FIELDS)
    width = getattr(config, field, None) if field else None
    if width is None and field == "n_inner":
        width = 4 * config.n_embd
    widths = set()
    for key, shape in theirs.items():
        if key in ours and ours[key] != shape and width in shape:
            widths.update(a for a, b in zip(ours[key], shape) if a != b)
    if len(widths) > 1:
        raise _refuse(f"FFN widths differ between layers ({sorted(widths)})", "Use FFNPruningConfig with "
                      "ranking='per_layer' (the same width everywhere), or to='onnx'.")  # fmt: skip
    if widths and field:
        setattr(config, field, widths.pop())
    theirs = _meta_shapes(type(model), config)
    wrong = [k for k in ours if k in theirs and ours[k] != theirs[k]]
    if wrong:
        raise _refuse(f"shapes the config cannot describe: {wrong[:4]} (FFN widths differ between layers?)",
                      "Give every layer the same FFN width (FFNPruningConfig ranking='per_layer'), or use "
                      "to='onnx' / 'openvino'.")  # fmt: skip


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each quantized module's packed tensors replaced by its float ``weight`` (shape check)."""
    state = {}
    quantized = quantized_modules(model)
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized:
            if leaf == "weight_packed":
                state[f"{owner}.weight"] = quantized[owner].dequantize(torch.float32)
            elif leaf == "bias":
                state[key] = value
        else:
            state[key] = value
    return state


def plain_model(model: nn.Module, allow_quantized: bool = False) -> nn.Module:
    """A plain transformers model equal to `model` (float weights; quantized layers dequantized if allowed)."""
    config = plain_config(model, allow_quantized)
    plain = type(model)(config).to(model.dtype)  # a real init: non-persistent buffers (rotary tables) are computed
    missing, unexpected = plain.load_state_dict(_float_state(model), strict=False)
    tied = set(getattr(plain, "_tied_weights_keys", None) or {})
    buffers = dict(plain.named_buffers())
    missing = [k for k in missing if k not in tied and k not in buffers]
    if unexpected or missing:
        raise _refuse(f"missing {missing[:3]}, unexpected {unexpected[:3]} weights", "Use to='onnx'.")
    plain.tie_weights()
    return plain.eval()


def check(model: nn.Module) -> None:
    plain_config(model)


def export_transformers(model: nn.Module, out: Path) -> dict[str, Any]:
    """Write a plain checkpoint (``config.json`` without ``quantization_config``, safetensors weights)."""
    plain = plain_model(model)
    before = {p.name for p in out.iterdir()}
    plain.save_pretrained(out)
    written = sorted({p.name for p in out.iterdir()} - before | {"config.json"})
    config = json.loads((out / "config.json").read_text())
    readme = f"""# Plain transformers checkpoint (hf_compress)

A {config.get("model_type")} model with the compressed shapes written into `config.json`: no plugin is needed.

```python
from transformers import {type(model).__name__}, AutoTokenizer

model = {type(model).__name__}.from_pretrained(".")
tokenizer = AutoTokenizer.from_pretrained(".")
```
"""
    return {"model_files": [f for f in written if f.endswith((".safetensors", ".json"))], "readme": readme}


export_transformers.check = check
