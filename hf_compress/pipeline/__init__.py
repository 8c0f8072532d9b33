"""The one-call pipeline: load (`loading`), apply techniques in order (`apply`), pick a recipe (`presets`,
`budget`), recover quality (`recovery`), check inputs (`checks`) and tie it together (`compress`)."""

from __future__ import annotations

from .apply import apply_compression
from .compress import CompressionResult, compress
from .recovery import recover


__all__ = ["apply_compression", "compress", "CompressionResult", "recover"]
