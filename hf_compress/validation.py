"""Checks of what users pass in, run before any work, so a bad input costs a second instead of a compression.

Every message names the parameter, the value received, what is allowed and how to fix it. Wrong types raise
`WrongTypeError` (a `TypeError` that is also a `ValueError`, since hf_compress raised `ValueError` for some of them
before and ``except ValueError`` must keep working); wrong values raise `ValueError`; missing paths
`FileNotFoundError`. The CLI turns all of them into one line and exit status 2.

This module imports nothing from hf_compress at import time: the config dataclasses use its helpers.
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any


__all__ = [
    "WrongTypeError",
    "check_number",
    "check_bool",
    "check_patterns",
    "check_supported",
    "describe",
]


class WrongTypeError(TypeError, ValueError):
    """A value of the wrong type: a `TypeError`, and a `ValueError` for code written against older hf_compress."""


def describe(value: Any, limit: int = 60) -> str:
    """``repr`` of `value` (shortened) with its type, for messages: ``'high' (str)``."""
    text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({type(value).__name__})"


def _range_text(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}" if high is not None else ""


def check_number(name: str, value: Any, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False, integer: bool = False, optional: bool = False,
                 hint: str = "") -> Any:  # fmt: skip
    """`value` if it is a finite number (an integer when `integer`) in the range, else a message naming `name`.

    Booleans are refused although Python counts them as integers: ``fraction=True`` is a mistake, not 1.
    """
    if value is None and optional:
        return None
    kind = "an integer" if integer else "a number"
    allowed = f"{kind} {_range_text(low, high, low_open, high_open)}".strip() + (" or None" if optional else "")
    numeric = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise WrongTypeError(f"{name} must be {allowed}; got {describe(value)}.{hint}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        raise ValueError(f"{name} must be {allowed}; got {value!r}.{hint}")
    return value


def check_bool(name: str, value: Any, optional: bool = False) -> None:
    if not (isinstance(value, bool) or (optional and value is None)):
        raise WrongTypeError(f"{name} must be True or False{' or None' if optional else ''}; got {describe(value)}.")


def check_patterns(name: str, value: Any) -> None:
    """Module patterns in PEFT's vocabulary: a full-match regex (str) or a list of name suffixes (str)."""
    if value is None:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name} {value!r} is not a valid regular expression ({err}).") from None
        return
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise WrongTypeError(
            f"{name} must be a list of module-name suffixes (e.g. ['query', 'value']) or one full-match regex "
            f"(str); got {describe(value)}."
        )


# -- the model -----------------------------------------------------------------------------------------------------
def check_supported(config_or_model: Any, name: str = "") -> None:
    """Refuse a model family without an architecture adapter: its compressed folder would not reload."""
    from .architectures import ADAPTERS, UnsupportedArchitectureError

    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"{name or type(config_or_model).__name__} is a {model_type!r} model, a family hf_compress does not "
            f"support (its compressed folder would not reload). Supported families (model_type): {sorted(ADAPTERS)}. "
            "To add one, register an ArchitectureAdapter in hf_compress.architectures.ADAPTERS."
        )
