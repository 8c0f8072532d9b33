"""The one-call pipeline: load (`loading`), apply techniques in order (`apply`), pick a recipe (`presets`,
`budget`), recover quality (`recovery`), check inputs (`checks`) and tie it together (`compress`).

Only `apply` is imported with the package: techniques (e.g. `quantization.qat`) use `apply_compression`, and
`compress` imports the techniques and the exporters, so loading it here too would close an import cycle.
"""

from __future__ import annotations

import importlib
from typing import Any

from .apply import apply_compression


__all__ = ["apply_compression", "compress", "CompressionResult", "recover"]

_LAZY = {"compress": ".compress", "CompressionResult": ".compress", "recover": ".recovery"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
