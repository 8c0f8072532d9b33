"""Apply technique configs to a loaded model and record the recipe (the core under `hf_compress.compress`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..calibration import Calibration
from ..config import CompressionConfig, TechniqueConfig, check_canonical_order
from ..plugin import attach_recipe, get_recipe
from ..registry import get_technique
from ..validation import check_supported


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = ["apply_compression"]


def apply_compression(
    model: PreTrainedModel, *configs: TechniqueConfig, calibration_data: Any = None, tokenizer: Any = None
) -> PreTrainedModel:
    """Compress `model` in place with `configs`, in canonical order, and record the resolved recipe.

    A model that was already compressed by hf_compress keeps its recipe and gets the new techniques appended, as
    long as the canonical order (prune, factorize, quantize) still holds.

    Args:
        model (`PreTrainedModel`): a model with real weights.
        *configs (`TechniqueConfig`): what to apply.
        calibration_data (`datasets.Dataset | list[str]`, *optional*): text for data-aware techniques.
        tokenizer (*optional*): tokenizes the calibration texts; by default the one saved with the model's
            checkpoint. Both travel to each technique's apply hook as one `hf_compress.calibration.Calibration`.

    Raises:
        `UnsupportedArchitectureError` (a `ValueError`): a model family without an adapter in
            `hf_compress.architectures.ADAPTERS`, before anything is changed.

    Returns:
        The same model object, compressed; ``model.config.quantization_config`` is its `CompressionConfig`.

    ```py
    >>> from hf_compress import apply_compression
    >>> from hf_compress.quantization import WeightQuantizationConfig
    >>> apply_compression(model, WeightQuantizationConfig(bits=8))
    >>> model.save_pretrained("minilm-int8")  # AutoModel.from_pretrained("minilm-int8") after `import hf_compress`
    ```
    """
    for config in configs:
        if not isinstance(config, TechniqueConfig):
            raise TypeError(
                f"Expected technique configs such as WeightQuantizationConfig(bits=8), got {type(config).__name__}."
            )
    check_supported(model)  # before any change: a family without an adapter would not reload
    previous = get_recipe(model)
    done = list(previous.techniques) if previous is not None else []
    ordered = sorted(configs, key=lambda c: get_technique(c.method).order)
    check_canonical_order(done + ordered)
    calibration = Calibration.of(calibration_data, tokenizer)
    for config in ordered:
        resolved = get_technique(config.method).apply(model, config, calibration_data=calibration)
        done.append(resolved)
    attn = previous.attn_implementation if previous is not None else None
    attach_recipe(model, CompressionConfig(done, attn_implementation=attn))
    return model
