"""hf_compress: make Hugging Face Transformers models really smaller and faster.

Importing the package registers the ``"hf_compress"`` quantizer plugin with transformers, so a compressed
checkpoint reloads with plain ``AutoModel.from_pretrained(path)``. The import is cheap: heavier parts (trainers,
the one-call API, the Hub helpers) load on first use, and nothing initialises CUDA.
"""

from __future__ import annotations

import importlib
from typing import Any

from .architectures import ADAPTERS, ArchitectureAdapter, UnsupportedArchitectureError, get_adapter  # noqa: E402
from .config import (  # noqa: E402
    CompressionConfig,
    TechniqueConfig,
    __version__,  # noqa: E402
)
from .plugin import HfCompressQuantizer, get_recipe  # noqa: E402
from .registry import register_technique, registered_techniques  # noqa: E402


# Each technique subpackage registers itself on import; the list fixes which ones ship.
_TECHNIQUE_PACKAGES = ("pruning", "quantization", "factorization")
for _name in _TECHNIQUE_PACKAGES:
    importlib.import_module(f"{__name__}.{_name}")

# LoRA on our quantized layers through plain `get_peft_model`: registered when PEFT is (or gets) imported, which
# this line never does itself (see hf_compress/integrations/peft.py).
from .integrations.peft import install as _install_peft  # noqa: E402


_install_peft()

# Public names that live in submodules with heavier imports, loaded on first access (PEP 562).
_LAZY = {
    "compress": ".pipeline.compress",
    "CompressionResult": ".pipeline.compress",
    "CompressionReport": ".evaluation",
    "push_to_hub": ".hub",
    "save_compressed": ".hub",
    "HeadPruningConfig": ".pruning",
    "FFNPruningConfig": ".pruning",
    "GradualPruningCallback": ".pruning",
    "WeightQuantizationConfig": ".quantization",
    "QuantLinear": ".quantization",
    "QuantEmbedding": ".quantization",
    "EmbeddingFactorizationConfig": ".factorization",
    "LowRankLinearConfig": ".factorization",
    "FactorizedEmbedding": ".factorization",
    "LowRankLinear": ".factorization",
    "apply_compression": ".pipeline",
    "DistillationArguments": ".distillation",
    "DistillationTrainer": ".distillation",
    "make_student": ".distillation",
    "recover": ".pipeline",
    "sequential_compress": ".sequential",
}

__all__ = [
    "__version__",
    "ADAPTERS",
    "ArchitectureAdapter",
    "CompressionConfig",
    "HfCompressQuantizer",
    "TechniqueConfig",
    "UnsupportedArchitectureError",
    "get_adapter",
    "get_recipe",
    "register_technique",
    "registered_techniques",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
