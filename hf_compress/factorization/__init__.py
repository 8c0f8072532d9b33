"""Low-rank factorization: ALBERT-style factorized token embeddings and low-rank linear layers.

```py
>>> import hf_compress
>>> from hf_compress.factorization import EmbeddingFactorizationConfig, LowRankLinearConfig
>>> hf_compress.apply_compression(model, EmbeddingFactorizationConfig(rank=128), calibration_data=texts)
>>> model.save_pretrained("minilm-r128")  # AutoModel.from_pretrained("minilm-r128") after `import hf_compress`
```
"""

from __future__ import annotations

from ..registry import Technique, register_technique, registered_techniques
from ..utils import realign_parameters_
from .config import EmbeddingFactorizationConfig, LowRankLinearConfig
from .embedding import apply_embedding_factorization, restructure_embedding_factorization, token_frequencies
from .layers import FactorizedEmbedding, FactorizedLMHead, LowRankLinear
from .linear import apply_low_rank_linear, restructure_low_rank_linear


__all__ = [
    "EmbeddingFactorizationConfig",
    "LowRankLinearConfig",
    "FactorizedEmbedding",
    "FactorizedLMHead",
    "LowRankLinear",
    "token_frequencies",
]

def _realign_factors(model, config) -> None:
    """After loading: the factors get aligned memory (see `hf_compress.utils.aligned`), so a reloaded model computes
    bit for bit what the saved one did, whatever the BLAS kernels do with unaligned data."""
    for module in model.modules():
        if isinstance(module, (FactorizedEmbedding, LowRankLinear)):
            realign_parameters_(module)


for _config_cls, _apply, _restructure in (
    (EmbeddingFactorizationConfig, apply_embedding_factorization, restructure_embedding_factorization),
    (LowRankLinearConfig, apply_low_rank_linear, restructure_low_rank_linear),
):
    if _config_cls.method not in registered_techniques():
        register_technique(
            Technique(
                name=_config_cls.method,
                config_cls=_config_cls,
                stage="factorize",
                apply=_apply,
                restructure=_restructure,
                after_load=_realign_factors,
            )
        )
