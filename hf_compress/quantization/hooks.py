"""Apply weight quantization to a model, rebuild it on a skeleton, and quantize while loading.

`apply` quantizes a model that holds real weights and returns the resolved config (the exact modules and settings);
`restructure` rebuilds the same module types on the empty meta skeleton inside `from_pretrained`; `after_load`
re-aligns packed tensors read zero-copy from a safetensors mmap. `quantize_on_load` returns the handler that the
`HfCompressQuantizer` plugin drives for ``from_pretrained(fp_checkpoint, quantization_config=...)``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..registry import Technique, register_technique, registered_techniques
from ..utils import check_pattern_matches, matches, replace_module, select_modules
from .config import ModuleSpec, WeightQuantizationConfig
from .convert import new_module, quantize_into
from .layers import QuantEmbedding, QuantLinear
from .mmap_pages import drop_pages, in_checkpoint_mmap, trim_heap
from .static_activations import calibrate_static_inputs, smoothed_weights


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = ["apply", "restructure", "after_load", "quantize_on_load", "plan"]

_HEAD = "head:"


def _conv1d_type() -> type:
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Embedding):
        return "embedding"
    return "conv1d" if isinstance(module, _conv1d_type()) else "linear"


def _base_prefix(model: nn.Module) -> str:
    base = getattr(model, "base_model", model)
    return next((name for name, module in model.named_modules() if module is base), "")


def stored_name(model: nn.Module, full_name: str) -> str:
    """Name kept in the recipe: relative to ``model.base_model`` (so any head class reloads it), else ``head:``."""
    prefix = _base_prefix(model)
    if not prefix:
        return full_name
    if full_name.startswith(prefix + "."):
        return full_name[len(prefix) + 1 :]
    return _HEAD + full_name


def resolve_name(model: nn.Module, name: str) -> str | None:
    """Full module name in `model` for a recipe name, or ``None`` when this model class lacks it (another head)."""
    if name.startswith(_HEAD):
        full = name[len(_HEAD) :]
    else:
        prefix = _base_prefix(model)
        full = f"{prefix}.{name}" if prefix else name
    try:
        model.get_submodule(full)
    except AttributeError:
        return None
    return full


def _tied_skip(model: nn.Module) -> set[int]:
    """Ids of input embeddings (and the heads) that share a weight: quantizing one would untie or break them."""
    skip: set[int] = set()
    get_in, get_out = getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None)
    emb = get_in() if get_in else None
    head = get_out() if get_out else None
    if emb is not None and head is not None and getattr(head, "weight", None) is getattr(emb, "weight", None):
        skip.update({id(emb), id(head)})
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    if tied and emb is not None and head is not None:  # on a meta skeleton tying happens after loading
        skip.update({id(emb), id(head)})
    return skip


def _is_decoder(model: nn.Module) -> bool:
    """A generative model (decoding runs few rows at a time): a decoder family or any model that can generate."""
    from ..architectures import ADAPTERS

    adapter = ADAPTERS.get(getattr(getattr(model, "config", None), "model_type", None))
    can_generate = getattr(model, "can_generate", None)
    return bool((adapter is not None and adapter.decoder) or (callable(can_generate) and can_generate()))


def plan(model: nn.Module, config: WeightQuantizationConfig) -> dict[str, ModuleSpec]:
    """Full module name -> `ModuleSpec` for every module `config` selects in `model` (checked shapes)."""
    if config.modules is not None:
        resolved = {resolve_name(model, name): ModuleSpec.from_value(spec) for name, spec in config.modules.items()}
        return {name: spec for name, spec in resolved.items() if name is not None}
    types: tuple[type, ...] = (nn.Linear, _conv1d_type())
    if config.quantize_embeddings:
        types += (nn.Embedding,)
    skip = _tied_skip(model)
    decoder = _is_decoder(model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))]
    try:
        selected = list(select_modules(model, types, config.target_modules, config.exclude_modules))
    except ValueError:
        targets = config.target_modules
        if quantized and targets is not None and any(matches(n, targets) for n in quantized):
            raise _already_quantized(model, quantized) from None
        raise
    eligible = [n for n, m in model.named_modules() if isinstance(m, types)]
    check_pattern_matches("exclude_modules", config.exclude_modules, eligible)
    chosen = {}
    for name, module in selected:
        if id(module) in skip or isinstance(module, (QuantLinear, QuantEmbedding)):
            continue
        kind = _kind(module)
        in_features = module.weight.shape[0] if kind == "conv1d" else module.weight.shape[1]
        chosen[name] = config.spec_for(name, kind, in_features, decoder)
    if not chosen and quantized:
        raise _already_quantized(model, quantized)
    if not chosen:
        raise ValueError(
            f"No module of {type(model).__name__} was selected for quantization (target_modules="
            f"{config.target_modules!r}, exclude_modules={config.exclude_modules!r}). It must contain nn.Linear, "
            "Conv1D or nn.Embedding modules."
        )
    for pattern in config.overrides or {}:  # a misspelt override would silently keep the default precision
        check_pattern_matches(f"overrides pattern {pattern!r}", [pattern], list(chosen), pattern, "quantized module")
    return chosen


def _already_quantized(model: nn.Module, quantized: list[str]) -> ValueError:
    return ValueError(
        f"{type(model).__name__} is already quantized ({len(quantized)} modules such as {quantized[0]!r} hold packed "
        "weights): quantizing again would only add error. Start from the floating-point model, or leave out the "
        "weight_quantization config."
    )


@torch.no_grad()
def cast_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the model's float weights to the compute `dtype`, and set it as every quantized module's compute dtype.

    Scales and zero offsets of quantized modules keep their storage dtype. Non-persistent buffers (rotary
    ``inv_freq``, ...) are rebuilt by the model in float32 when it is reloaded, so they keep their dtype here too:
    otherwise the reloaded model would not compute exactly what was saved.
    """
    for module in model.modules():
        quantized = isinstance(module, (QuantLinear, QuantEmbedding))
        if quantized:
            module.compute_dtype = dtype
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point() and not quantized and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(dtype)
    if hasattr(model, "config"):
        model.config.dtype = dtype


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))


def apply(model: PreTrainedModel, config: WeightQuantizationConfig, calibration_data: Any = None):
    """Quantize `model` in place; every other float weight is cast to the compute dtype (`compute_dtype_for`)."""
    if config.algorithm == "auto":
        config = dataclasses.replace(config, algorithm="gptq" if calibration_data is not None else "mse")
    specs = plan(model, config)
    compute_dtype = config.compute_dtype_for(_device(model))
    static = None
    if config.activations == "int8_static":  # calibrated on the float model, before any weight is rounded
        static = calibrate_static_inputs(
            model, [n for n, spec in specs.items() if spec.kind != "embedding" and spec.bits == 8 and spec.symmetric],
            calibration_data, smoothing=config.smoothing, max_samples=config.calibration_samples,
            dtype=config.scale_dtype,
        )  # fmt: skip
    with smoothed_weights(model, static):  # the smoothed weights are the ones quantized
        if config.algorithm == "gptq":
            from .gptq import gptq_quantize

            gptq_quantize(model, specs, config, calibration_data)
        else:
            for name, spec in specs.items():
                module = model.get_submodule(name)
                new = new_module(module, spec, config, module.weight.device, compute_dtype)
                quantize_into(new, module.weight, getattr(module, "bias", None), spec, config, name)
                replace_module(model, name, new)
    for name, plan_ in (static or {}).items():
        model.get_submodule(name).set_static_input(plan_.multiplier, plan_.scale, plan_.zero_point)
    cast_floats(model, compute_dtype)
    modules = {stored_name(model, name): spec.to_list() for name, spec in specs.items()}
    return dataclasses.replace(config, modules=modules)


def restructure(model: PreTrainedModel, config: WeightQuantizationConfig) -> None:
    """Swap in empty `QuantLinear` / `QuantEmbedding` modules of the recorded shapes (no weight is computed)."""
    for name, spec in plan(model, config).items():
        module = model.get_submodule(name)
        dtype = module.weight.dtype
        replace_module(model, name, new_module(module, spec, config, module.weight.device, dtype))


def after_load(model: PreTrainedModel, config: WeightQuantizationConfig) -> None:
    """Re-align packed tensors (mmap loads can leave them 8-byte aligned, which crashes the int8 kernel) and give
    every quantized module the dtype the loader chose for the model (the plugin's `update_dtype`)."""
    dtype = getattr(getattr(model, "config", None), "dtype", None)
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            module.realign_()
            if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
                module.compute_dtype = dtype


def quantize_on_load(config: WeightQuantizationConfig) -> _OnLoadHandler:
    """The handler `HfCompressQuantizer` uses for ``from_pretrained(fp_checkpoint, quantization_config=...)``."""
    if config.algorithm == "gptq":
        raise ValueError(
            "algorithm='gptq' needs calibration data and the whole model; it cannot run while loading. Use "
            "algorithm='mse' (calibration-free) on load, or load the model and call apply_compression(...)."
        )
    if config.activations == "int8_static":
        raise ValueError(
            "activations='int8_static' calibrates input scales on real data and cannot run while loading. Load the "
            "model and call apply_compression(model, config, calibration_data=texts), or use "
            "activations='int8_dynamic' on load."
        )
    if config.algorithm == "auto":
        config = dataclasses.replace(config, algorithm="mse")
    return _OnLoadHandler(config)


class _OnLoadHandler:
    """Quantizes each selected weight the moment the loader reads it, so the float model never exists whole."""

    def __init__(self, config: WeightQuantizationConfig) -> None:
        self.config = config
        self.specs: dict[str, ModuleSpec] = {}
        self.stored: dict[str, list] = {}
        self.compute_dtype = torch.float32

    def prepare(self, model: PreTrainedModel, device: torch.device | str | None = None) -> None:
        """Plan the skeleton's quantization; `device` is where the model will run (``device_map``), which decides
        what ``compute_dtype="auto"`` means (the skeleton itself is on the meta device)."""
        # The skeleton keeps its float modules (so the loader routes the checkpoint's `.weight` keys to us); each
        # is replaced by its quantized module inside the conversion op, when its weight arrives.
        self.specs = plan(model, self.config)
        self.compute_dtype = self.config.compute_dtype_for(device if device is not None else _device(model))
        self.stored = {stored_name(model, name): spec.to_list() for name, spec in self.specs.items()}

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str) -> bool:
        module_name, _, leaf = param_name.rpartition(".")
        return leaf == "weight" and module_name in self.specs

    def quantize_ops(self, quantizer: Any) -> Any:
        return _QuantizeOnLoad(self)

    def resolved_config(self, model: PreTrainedModel) -> WeightQuantizationConfig:
        """The resolved config; called once after loading, it also casts the float leftovers to the compute dtype."""
        cast_floats(model, self.compute_dtype)
        return dataclasses.replace(self.config, modules=self.stored)


def _conversion_ops_base() -> type:
    from transformers.core_model_loading import ConversionOps

    return ConversionOps


class _QuantizeOnLoad(_conversion_ops_base()):
    def __init__(self, handler: _OnLoadHandler) -> None:
        self.handler = handler

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model=None, missing_keys=None, **kwargs):
        value = next(iter(input_dict.values()))
        weight = value[0] if isinstance(value, list) else value
        module_name = full_layer_name.rpartition(".")[0]
        spec = self.handler.specs[module_name]
        old = model.get_submodule(module_name)
        new = new_module(old, spec, self.handler.config, weight.device, self.handler.compute_dtype)
        # A weight read zero-copy from a shard: drop each block's pages once it is quantized, so at most one block
        # of the float weight is resident (the 262 MB embedding / LM head of a 1B model would be, whole).
        release = drop_pages if in_checkpoint_mmap(weight) else None
        quantize_into(new, weight, getattr(old, "bias", None), spec, self.handler.config, module_name, release)
        if release is not None:
            release(weight)  # the pages between blocks, and a transposed (Conv1D) weight's
        for tensor in (*new.parameters(), *new.buffers()):
            tensor._is_hf_initialized = True
        new._is_hf_initialized = True
        replace_module(model, module_name, new)
        del weight, value, input_dict
        trim_heap()
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
            for key in ("weight_packed", "weight_scale", "weight_zero"):
                missing_keys.discard(f"{module_name}.{key}")
        return {}


if WeightQuantizationConfig.method not in registered_techniques():
    register_technique(
        Technique(
            name=WeightQuantizationConfig.method,
            config_cls=WeightQuantizationConfig,
            stage="quantize",
            apply=apply,
            restructure=restructure,
            after_load=after_load,
            quantize_on_load=quantize_on_load,
        )
    )
