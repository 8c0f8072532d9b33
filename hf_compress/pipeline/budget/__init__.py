"""Budget mode: a target size (``budget="10x"``) and, optionally, a speed target (``latency="0.5x"``), met by the
measured settings with the best fidelity. `search` holds the search, `space` the grid and the size estimate,
`speed` the latency target, speed probes and latency estimate."""

from __future__ import annotations

from .search import candidates_table, search_budget
from .space import Candidate, Space, parse_budget
from .speed import parse_latency


__all__ = ["parse_budget", "parse_latency", "search_budget", "candidates_table", "Candidate", "Space"]
