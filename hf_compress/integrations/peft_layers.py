"""LoRA layers for hf_compress quantized modules (imports PEFT; loaded by `hf_compress.integrations.peft`).

`QuantLoraLinear` is PEFT's own `lora.Linear` with the parts that touch the base weight rewritten for a packed one:
the forward pass, adapter bookkeeping, DoRA, saving and loading are PEFT's; the base layer stays packed and frozen
and the LoRA matrices (float32 by default, see `get_peft_model(..., autocast_adapter_dtype=True)`) are the only
trainable tensors. Gradients reach the layer input through `QuantLinear`'s own backward, so adapters in earlier
layers train too.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.lora import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge

from ..factorization import LowRankLinear
from ..quantization import QuantEmbedding, QuantLinear
from ..quantization.algorithms import quantize_weight


__all__ = ["QuantLoraLinear", "dispatch_quantized"]


class QuantLoraLinear(LoraLinear):
    """LoRA on a `QuantLinear`: ``y = Q(W) x + B A x * scaling``, with ``Q(W)`` packed int8/int4 and frozen.

    Merging (`merge`, `merge_and_unload`) dequantizes the base weight, adds the update and quantizes the sum again
    with the layer's own bits, group size and symmetry: the result is still packed, but rounding makes it differ
    slightly from the unmerged model. For an exact merge, load the adapter onto the float version of the compressed
    model (same pruned/factorized shapes) and merge there.
    """

    @property
    def lora_variants(self):
        from peft.tuners.lora import variants

        # Plain LoRA and DoRA read the base weight only through `.weight`, which QuantLinear dequantizes.
        return {(): None, ("use_dora",): variants.DoraLinearVariant}

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer):
        # Read from the scales: `base_layer.weight` would dequantize the whole matrix just to learn its dtype.
        if isinstance(base_layer, QuantLinear):
            return base_layer.weight_scale.device, base_layer.compute_dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    def _requantize(self, weight: torch.Tensor) -> None:
        layer = self.get_base_layer()
        dtype = layer.weight_scale.dtype
        layer.load_quantized(quantize_weight(weight.float(), layer.bits, layer.group_size, layer.symmetric, "mse",
                                             dtype, name="lora-merged"))  # fmt: skip

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge the active adapters into the packed base weight (dequantize, add, quantize again)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        layer = self.get_base_layer()
        for name in adapter_names:
            if name not in self.lora_A:
                continue
            weight = layer.dequantize(torch.float32)
            if name in self.lora_variant:
                weight = self.lora_variant[name].merge_safe(self, name, weight)
            else:
                weight = weight + self.get_delta_weight(name).float()
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapter {name!r} seems to be broken.")
            if self.lora_bias[name]:
                if layer.bias is None:
                    raise RuntimeError("Cannot merge a LoRA bias (lora_bias=True) into a base layer without bias.")
                layer.bias += (self.lora_B[name].bias * self.scaling[name]).to(layer.bias.dtype)
            self._requantize(weight)
            self.merged_adapters.append(name)
        warnings.warn(
            "Merged LoRA into a quantized layer: the sum was quantized again, so outputs differ slightly from the "
            "unmerged model. Merge into the float model for an exact result.",
            stacklevel=2,
        )

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract merged adapters again (quantized once more, so not bit-exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        layer = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A:
                continue
            weight = layer.dequantize(torch.float32)
            if name in self.lora_variant:
                weight = self.lora_variant[name].unmerge(self, name, weight)
            else:
                weight = weight - self.get_delta_weight(name).float()
            if self.lora_bias[name]:
                layer.bias -= (self.lora_B[name].bias * self.scaling[name]).to(layer.bias.dtype)
            self._requantize(weight)


def dispatch_quantized(target: torch.nn.Module, adapter_name: str, config: LoraConfig, **kwargs):
    """PEFT dispatcher: a `QuantLoraLinear` for a `QuantLinear` target, a clear error for module types LoRA cannot
    wrap (quantized embeddings, factorized layers), `None` (PEFT decides) for anything else."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QuantLinear):
        if kwargs.get("parameter_name") is not None:
            raise ValueError("LoRA on a quantized layer targets the module (target_modules), not target_parameters.")
        if config.fan_in_fan_out:
            config.fan_in_fan_out = False  # QuantLinear stores [out, in] like nn.Linear, even for GPT-2 Conv1D
        kwargs.pop("parameter_name", None)
        return QuantLoraLinear(target, adapter_name, config=config, **kwargs)
    if isinstance(base, LowRankLinear):
        # A merged update would raise the layer's rank, which the recipe fixes; each factor is an ordinary (or
        # quantized) linear layer that LoRA can wrap and merge into exactly.
        raise ValueError(
            f"LoRA cannot wrap a factorized layer ({base}) as a whole. Target its factors instead, e.g. "
            "target_modules=['intermediate.dense.up'] (the r -> out factor) or '...down' (in -> r), or leave it "
            "out with exclude_modules."
        )
    if isinstance(base, QuantEmbedding):
        raise ValueError(
            f"LoRA on a quantized embedding ({base}) is not supported. Leave the embedding out of target_modules, "
            "or quantize with WeightQuantizationConfig(quantize_embeddings=False) to train it."
        )
    return None
