"""The factorization techniques' hooks and their registration: ``"embedding_factorization"`` (apply and restructure in
`embedding.py`) and ``"low_rank_linear"`` (in `linear.py`); after loading, both realign the factors."""

from __future__ import annotations

from ..registry import Technique, register_technique, registered_techniques
from ..utils import realign_parameters_
from .config import EmbeddingFactorizationConfig, LowRankLinearConfig
from .embedding import apply_embedding_factorization, restructure_embedding_factorization
from .layers import FactorizedEmbedding, LowRankLinear
from .linear import apply_low_rank_linear, restructure_low_rank_linear


__all__ = [
    "apply_embedding_factorization",
    "restructure_embedding_factorization",
    "apply_low_rank_linear",
    "restructure_low_rank_linear",
    "after_load",
]


def after_load(model, config) -> None:
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
                after_load=after_load,
            )
        )
