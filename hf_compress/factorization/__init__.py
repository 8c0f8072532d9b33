"""Low-rank factorization: ALBERT-style factorized token embeddings and low-rank linear layers.

```py
>>> import hf_compress
>>> from hf_compress.factorization import EmbeddingFactorizationConfig, LowRankLinearConfig
>>> hf_compress.apply_compression(model, EmbeddingFactorizationConfig(rank=128), calibration_data=texts)
>>> model.save_pretrained("minilm-r128")  # AutoModel.from_pretrained("minilm-r128") after `import hf_compress`
```
"""

from __future__ import annotations

from . import hooks  # noqa: F401  (registers the techniques)
from .config import EmbeddingFactorizationConfig, LowRankLinearConfig
from .embedding import token_frequencies
from .layers import FactorizedEmbedding, FactorizedLMHead, LowRankLinear


__all__ = [
    "EmbeddingFactorizationConfig",
    "LowRankLinearConfig",
    "FactorizedEmbedding",
    "FactorizedLMHead",
    "LowRankLinear",
    "token_frequencies",
]
