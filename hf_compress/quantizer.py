"""The transformers quantizer plugin: how plain `AutoModel.from_pretrained(path)` rebuilds a compressed model.

`from_pretrained` finds ``"quant_method": "hf_compress"`` in ``config.json``, rebuilds our `CompressionConfig` and
creates `HfCompressQuantizer`. Its `_process_model_before_weight_loading` replays every technique's `restructure` on
the empty (meta) skeleton, so the module types and shapes match the saved tensors exactly before they are read; no
fp32 weight of a compressed module is ever materialised.

Loading a compressed checkpoint *without* ``import hf_compress`` must never give a silently wrong model.
transformers only warns about an unknown ``quant_method``, so `attach_recipe` also writes a guard value as the
checkpoint's ``attn_implementation``: without the plugin, model construction fails with an error that contains
"import hf_compress"; with the plugin, `update_attn_implementation` puts the model's real value back first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transformers.quantizers import HfQuantizer, register_quantizer

from .config import QUANT_METHOD, CompressionConfig
from .registry import get_technique


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = ["HfCompressQuantizer", "attach_recipe", "get_recipe", "LOAD_GUARD"]

# Shown by transformers when a compressed checkpoint is loaded without the plugin:
#   ValueError: Specified `attn_implementation="<LOAD_GUARD>"` is not supported. ...
LOAD_GUARD = "hf_compress-checkpoint: run `import hf_compress` before from_pretrained (pip install hf-compress)"


@register_quantizer(QUANT_METHOD)
class HfCompressQuantizer(HfQuantizer):
    """Rebuilds (pre-quantized path) or creates (quantize-on-load path) an hf_compress model inside `from_pretrained`."""

    requires_calibration = False
    quantization_config: CompressionConfig

    def __init__(self, quantization_config: CompressionConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._on_load_handlers: list[Any] = []
        self._target_device = "cpu"  # where the model will run, from `update_device_map`

    # -- before the model exists -------------------------------------------------------------------------------------
    def update_attn_implementation(self, config):
        for sub in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            if getattr(sub, "_attn_implementation", None) == LOAD_GUARD:
                sub._attn_implementation = self.quantization_config.attn_implementation
            sub.__dict__.pop("attn_implementation", None)
        return config

    def update_device_map(self, device_map):
        # Remembered for `update_dtype`: "auto" compute dtypes depend on where the model will run.
        placed = device_map.values() if isinstance(device_map, dict) else [device_map]
        on_cpu = all(d is None or str(d) in ("cpu", "disk") for d in placed)
        self._target_device = "cpu" if on_cpu else "cuda"
        return device_map

    def update_dtype(self, dtype):
        # A quantized checkpoint is rebuilt in its technique's compute dtype for the target device: the leftover float
        # weights follow it (scales keep the dtype they were saved in, see `QuantLinear`).
        if self.pre_quantized:
            for technique_config in self.quantization_config.techniques:
                model_dtype = getattr(technique_config, "model_dtype", None)
                if model_dtype is not None:
                    return model_dtype(self._target_device)
        return dtype

    # -- on the empty skeleton ---------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        if self.pre_quantized:
            for technique_config in self.quantization_config.techniques:
                get_technique(technique_config.method).restructure(model, technique_config)
            return model
        # Quantize-on-load: each technique that supports it prepares the skeleton and hands back per-weight ops.
        for technique_config in self.quantization_config.techniques:
            technique = get_technique(technique_config.method)
            if technique.quantize_on_load is None:
                raise ValueError(
                    f"The {technique.name!r} technique cannot run inside from_pretrained (it needs the whole model "
                    "or calibration data). Load the model first, then call hf_compress.compress(model, ...)."
                )
            handler = technique.quantize_on_load(technique_config)
            handler.prepare(model)
            self._on_load_handlers.append(handler)
        return model

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        return any(h.param_needs_quantization(model, param_name) for h in self._on_load_handlers)

    def get_quantize_ops(self):
        if len(self._on_load_handlers) != 1:
            raise ValueError("Quantize-on-load takes exactly one quantization technique in the recipe.")
        return self._on_load_handlers[0].quantize_ops(self)

    # -- once the weights are in -------------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        if self._on_load_handlers:
            resolved = [handler.resolved_config(model) for handler in self._on_load_handlers]
            self.quantization_config = CompressionConfig(
                resolved, attn_implementation=self.quantization_config.attn_implementation
            )
        for technique_config in self.quantization_config.techniques:
            after_load = get_technique(technique_config.method).after_load
            if after_load is not None:
                after_load(model, technique_config)
        attach_recipe(model, self.quantization_config, quantizer=self)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def attach_recipe(
    model: PreTrainedModel, recipe: CompressionConfig, quantizer: HfCompressQuantizer | None = None
) -> PreTrainedModel:
    """Mark `model` as compressed by `recipe`, so `save_pretrained` writes the recipe and the load guard.

    Called by `compress` after the techniques ran, and by the quantizer after loading.
    """
    if recipe.attn_implementation is None:
        current = getattr(model.config, "_attn_implementation", None)
        # Only an explicit user choice is worth restoring; transformers picks the default itself on load.
        recipe.attn_implementation = current if current not in (None, LOAD_GUARD, "sdpa") else None
    model.config.quantization_config = recipe
    # A plain attribute named like the config.json key: serialised by `to_dict`, ignored by the running model.
    model.config.__dict__["attn_implementation"] = LOAD_GUARD
    model.hf_quantizer = quantizer or HfCompressQuantizer(recipe, pre_quantized=True)
    model.hf_quantizer.quantization_config = recipe
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for module in model.modules():
        if hasattr(module, "config") and module.config is not model.config and hasattr(module.config, "to_dict"):
            module.config._is_quantized = True
    model.config._is_quantized = True
    return model


def get_recipe(model: PreTrainedModel) -> CompressionConfig | None:
    """The `CompressionConfig` of a model compressed by hf_compress, or `None` for an uncompressed model."""
    recipe = getattr(getattr(model, "config", None), "quantization_config", None)
    return recipe if isinstance(recipe, CompressionConfig) else None
