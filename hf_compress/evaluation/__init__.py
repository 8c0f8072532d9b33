"""Measuring a compressed model against its original: the report dataclass (`report`), the measuring code
(`measure`) and the local `evaluate` metric scripts (`metrics/`)."""

from __future__ import annotations

from .report import CompressionReport


__all__ = ["CompressionReport"]
