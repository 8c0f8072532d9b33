"""8-bit and 4-bit weight quantization with packed storage, fast CPU kernels and quantize-on-load.

```py
>>> import hf_compress
>>> from hf_compress.quantization import WeightQuantizationConfig
>>> hf_compress.apply_compression(model, WeightQuantizationConfig(bits=4))
```
"""

from __future__ import annotations

from ..registry import Technique, register_technique, registered_techniques
from . import hooks as transform
from .config import WeightQuantizationConfig
from .layers import QuantEmbedding, QuantLinear
from .qat import convert_qat, prepare_qat


__all__ = ["WeightQuantizationConfig", "QuantLinear", "QuantEmbedding", "prepare_qat", "convert_qat"]

if WeightQuantizationConfig.method not in registered_techniques():
    register_technique(
        Technique(
            name=WeightQuantizationConfig.method,
            config_cls=WeightQuantizationConfig,
            stage="quantize",
            apply=transform.apply,
            restructure=transform.restructure,
            after_load=transform.after_load,
            quantize_on_load=transform.quantize_on_load,
        )
    )
