"""Where things live in each supported model family: one table, read by every technique.

Paths are dotted attribute paths. ``layers`` and ``embeddings`` are relative to the *base model*
(`model.base_model`, so ``BertModel`` and ``BertForSequenceClassification`` share one entry); every other path is
relative to one transformer layer. Head counts come from the config (transformers' ``attribute_map`` makes
``num_attention_heads`` / ``hidden_size`` work for DistilBERT and GPT-2 too).

To add a family: add an `ArchitectureAdapter` to `ADAPTERS` under its ``model_type`` and run the family tests
(``tests/core/test_architectures.py`` builds a tiny model of every family from its config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = [
    "ArchitectureAdapter",
    "ADAPTERS",
    "get_adapter",
    "UnsupportedArchitectureError",
    "num_heads",
    "num_kv_heads",
    "head_dim",
]


class UnsupportedArchitectureError(ValueError):
    """Raised for a model family hf_compress has no adapter for."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Module paths of one model family.

    Attributes:
        layers: the `nn.ModuleList` of transformer layers, from the base model.
        embeddings: the input token embedding (`nn.Embedding`), from the base model; ``None`` for vision models.
        attention: the module that runs attention (holds head-count attributes), from a layer.
        query, key, value: separate q/k/v projections, from a layer (``None`` when fused).
        fused_qkv: one projection producing q, k and v concatenated (GPT-2's ``Conv1D c_attn``), from a layer.
        output: the attention output projection, from a layer.
        ffn_in: the FFN input projections (one, or gate and up for gated MLPs), from a layer.
        ffn_out: the FFN output projection, from a layer.
        conv1d: whether projections are GPT-2 style `Conv1D` (weight stored as ``[in, out]``).
        decoder: causal language model family (has a tied LM head when ``tie_word_embeddings``).
    """

    layers: str
    embeddings: str | None
    attention: str
    output: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    query: str | None = None
    key: str | None = None
    value: str | None = None
    fused_qkv: str | None = None
    conv1d: bool = False
    decoder: bool = False

    # -- access ----------------------------------------------------------------------------------------------------
    def layer_modules(self, model: nn.Module) -> nn.ModuleList:
        """The transformer layers of `model` (any head class of the family)."""
        return _get(_base(model), self.layers)

    def layer_prefix(self, model: nn.Module, index: int) -> str:
        """Full module name of layer `index` inside `model`, e.g. ``"bert.encoder.layer.3"``."""
        base = _base(model)
        base_name = next((name for name, mod in model.named_modules() if mod is base), "")
        return ".".join(p for p in (base_name, self.layers, str(index)) if p)

    def input_embeddings(self, model: nn.Module) -> nn.Module:
        if self.embeddings is None:
            raise ValueError(f"{type(model).__name__} has no input token embedding (it is a vision model).")
        return _get(_base(model), self.embeddings)

    def sub(self, layer: nn.Module, path: str) -> nn.Module:
        return _get(layer, path)

    def attention_projections(self) -> tuple[str, ...]:
        """Paths of every attention projection in a layer (q, k, v or the fused one, then o)."""
        qkv = (self.fused_qkv,) if self.fused_qkv else (self.query, self.key, self.value)
        return (*qkv, self.output)

    def ffn_projections(self) -> tuple[str, ...]:
        return (*self.ffn_in, self.ffn_out)


def _base(model: nn.Module) -> nn.Module:
    return getattr(model, "base_model", model)


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = getattr(module, part)
    return module


_BERT_LIKE = ArchitectureAdapter(
    layers="encoder.layer",
    embeddings="embeddings.word_embeddings",
    attention="attention.self",
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    output="attention.output.dense",
    ffn_in=("intermediate.dense",),
    ffn_out="output.dense",
)
_LLAMA_LIKE = ArchitectureAdapter(
    layers="layers",
    embeddings="embed_tokens",
    attention="self_attn",
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    output="self_attn.o_proj",
    ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj",
    decoder=True,
)

ADAPTERS: dict[str, ArchitectureAdapter] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": ArchitectureAdapter(
        layers="transformer.layer",
        embeddings="embeddings.word_embeddings",
        attention="attention",
        query="attention.q_lin",
        key="attention.k_lin",
        value="attention.v_lin",
        output="attention.out_lin",
        ffn_in=("ffn.lin1",),
        ffn_out="ffn.lin2",
    ),
    "gpt2": ArchitectureAdapter(
        layers="h",
        embeddings="wte",
        attention="attn",
        fused_qkv="attn.c_attn",
        output="attn.c_proj",
        ffn_in=("mlp.c_fc",),
        ffn_out="mlp.c_proj",
        conv1d=True,
        decoder=True,
    ),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "vit": ArchitectureAdapter(
        layers="layers",
        embeddings=None,
        attention="attention",
        query="attention.q_proj",
        key="attention.k_proj",
        value="attention.v_proj",
        output="attention.o_proj",
        ffn_in=("mlp.fc1",),
        ffn_out="mlp.fc2",
    ),
}


def get_adapter(model: PreTrainedModel) -> ArchitectureAdapter:
    """The adapter for `model`'s family, or an `UnsupportedArchitectureError` that lists the supported ones."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"hf_compress has no adapter for model_type {model_type!r} ({type(model).__name__}). Supported families: "
            f"{sorted(ADAPTERS)}. To add one, register an ArchitectureAdapter with its module paths in "
            "hf_compress.architectures.ADAPTERS (see the module docstring)."
        )
    return ADAPTERS[model_type]


def num_heads(model: PreTrainedModel) -> int:
    """Query heads per layer in the *uncompressed* architecture."""
    return int(model.config.get_text_config().num_attention_heads)


def num_kv_heads(model: PreTrainedModel) -> int:
    """Key/value heads per layer (equal to `num_heads` without grouped-query attention)."""
    config = model.config.get_text_config()
    return int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)


def head_dim(model: PreTrainedModel) -> int:
    config = model.config.get_text_config()
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
