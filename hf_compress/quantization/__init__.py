"""8-bit and 4-bit weight quantization with packed storage, fast CPU kernels and quantize-on-load.

```py
>>> import hf_compress
>>> from hf_compress.quantization import WeightQuantizationConfig
>>> hf_compress.apply_compression(model, WeightQuantizationConfig(bits=4))
```
"""

from __future__ import annotations

from . import hooks  # noqa: F401  (registers the technique)
from .config import WeightQuantizationConfig
from .layers import QuantEmbedding, QuantLinear
from .qat import convert_qat, prepare_qat


__all__ = ["WeightQuantizationConfig", "QuantLinear", "QuantEmbedding", "prepare_qat", "convert_qat"]
