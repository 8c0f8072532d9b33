"""The one-call pipeline: load (`loading`), apply techniques in order (`apply`), pick a recipe (`presets`,
`budget`), recover quality (`recovery`), check inputs (`checks`) and tie it together (`compress`).

Only `apply` is imported with the package: techniques (e.g. `quantization.qat`) use `apply_compression`, and
`compress` imports the techniques and the exporters, so loading it here too would close an import cycle. The other
names load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from .apply import apply_compression


# `compress` itself is `hf_compress.compress` (a submodule here has that name, so it is not re-exported).
_LAZY = {"CompressionResult": ".compress", "recover": ".recovery"}
__all__ = ["apply_compression", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
