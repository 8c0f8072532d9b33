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
import os
import re
from typing import Any


__all__ = [
    "WrongTypeError",
    "check_number",
    "check_bool",
    "check_patterns",
    "check_compress_args",
    "check_supported",
    "load_config",
    "recipe_configs",
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


# -- compress() arguments ------------------------------------------------------------------------------------------
def check_compress_args(args: dict[str, Any], structural: bool) -> dict[str, str | None]:
    """Check every argument of `compress` that can be checked without the model; return the data forms.

    `structural` says whether pruning or factorization will run (recovery distillation needs them and texts).
    """
    from .calibration import check_task_data, data_form
    from .presets import PRESETS

    preset, budget, distill = args["preset"], args["budget"], args["distill"]
    if preset is not None and not isinstance(preset, str):
        raise WrongTypeError(f"preset must be a preset name (str), one of {sorted(PRESETS)}; got {describe(preset)}.")
    if budget is not None:
        if isinstance(budget, bool) or not isinstance(budget, (numbers.Real, str)):
            raise WrongTypeError(
                f"budget must be megabytes (12 or '12MB') or a reduction factor ('10x'); got {describe(budget)}."
            )
        from .budget import parse_budget

        parse_budget(budget, 10**12)  # the format only; the target depends on the model
    check_number("max_eval_texts", args["max_eval_texts"], low=1, integer=True)
    check_number("latency_rounds", args["latency_rounds"], low=0, integer=True,
                 hint=" latency_rounds=0 skips the latency measurement.")  # fmt: skip
    for name in ("measure", "card", "private", "progress"):
        check_bool(name, args[name])
    metric = args["metric"]
    if not isinstance(metric, (str, os.PathLike)):
        raise WrongTypeError(
            f"metric must be an evaluate metric name or path (str), e.g. 'accuracy'; got {describe(metric)}."
        )
    if args["output_dir"] is not None and not isinstance(args["output_dir"], (str, os.PathLike)):
        raise WrongTypeError(
            f"output_dir must be a folder path (str or os.PathLike); got {describe(args['output_dir'])}."
        )
    _check_repo_id(args["push_to_hub"])
    if args["token"] is not None and not isinstance(args["token"], str):
        raise WrongTypeError(f"token must be a Hub token (str) or None; got a {type(args['token']).__name__}.")
    forms = {
        "calibration_data": data_form("calibration_data", args["calibration_data"]),
        "eval_data": data_form("eval_data", args["eval_data"], batches=False),
    }
    check_task_data(args["task_data"])
    if args["task_data"] is not None and args["measure"]:
        _check_metric_available(str(metric))
    if budget is not None and args["calibration_data"] is None:
        raise ValueError("Budget mode measures candidates on data: pass calibration_data=[texts] (or --calibration).")
    if distill is not None and not isinstance(distill, (bool, dict)):
        raise WrongTypeError(
            f"distill must be True, False, None (as the preset says) or a dict of recover() options such as "
            f"{{'max_steps': 200}}; got {describe(distill)}."
        )
    if distill and structural and budget is None:
        if isinstance(distill, dict):
            _check_distill_options(distill)
        if forms["calibration_data"] in (None, "batches"):
            raise ValueError(
                "Recovery distillation (distill=True, or preset 'distil') trains on calibration texts; got "
                f"calibration_data={'None' if forms['calibration_data'] is None else 'tokenized batches'}. Pass "
                "calibration_data=[texts], or distill=False."
            )
    return forms


def _check_repo_id(repo_id: Any) -> None:
    if repo_id is None:
        return
    if not isinstance(repo_id, str) or not re.fullmatch(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}", repo_id):
        raise ValueError(
            f"push_to_hub must be a Hub repo id 'user/name' (letters, digits, '-', '_', '.'); got {describe(repo_id)}."
        )


def _check_metric_available(metric: str) -> None:
    """A Hub metric cannot load offline: say so before compressing, not after."""
    from .report import METRICS_DIR

    shipped = sorted(p.name for p in METRICS_DIR.iterdir() if p.is_dir() and not p.name.startswith("_"))
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("HF_EVALUATE_OFFLINE") == "1"
    if metric not in shipped and not os.path.exists(metric) and offline:
        raise ValueError(
            f"metric {metric!r} is neither shipped with hf_compress ({shipped}) nor a path to a metric script, and "
            "the Hub is offline (HF_HUB_OFFLINE=1), so it cannot be downloaded. Use one of those or a local path."
        )


def _check_distill_options(options: dict) -> None:
    import dataclasses
    import inspect

    from .distillation import DistillationArguments
    from .recovery import recover

    own = [p for p in inspect.signature(recover).parameters if p not in ("student", "teacher", "texts", "tokenizer",
                                                                           "kwargs")]  # fmt: skip
    allowed = set(own) | {f.name for f in dataclasses.fields(DistillationArguments) if f.init}
    unknown = sorted(set(map(str, options)) - allowed)
    if unknown:
        raise ValueError(
            f"distill has unknown options {unknown}; it takes recover() options {own} and DistillationArguments "
            "fields (e.g. alpha_mse, seed)."
        )


# -- where the model and recipe come from ---------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")


def load_config(source: str) -> Any:
    """`AutoConfig` of a local folder or a Hub id; a path that is neither says where it looked and why it failed."""
    import transformers

    if os.path.isdir(source) and not os.path.isfile(os.path.join(source, "config.json")):
        raise FileNotFoundError(f"{source} is a folder without config.json: it is not a transformers checkpoint.")
    if os.path.exists(source):
        return transformers.AutoConfig.from_pretrained(source)
    looked = os.path.abspath(os.path.expanduser(source))
    hub_like = re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", source) is not None
    if not hub_like:
        raise FileNotFoundError(
            f"{source} is not a local folder (looked in {looked}), and it is not a Hub id ('user/name') either. Check "
            "the path."
        )
    try:
        return transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        mode = " (offline: HF_HUB_OFFLINE=1, so only models already in the local cache load)" if _offline() else ""
        raise FileNotFoundError(
            f"{source} is not a local folder (looked in {looked}) and could not be loaded as a Hub id{mode}: {reason} "
            "Check the spelling, give the folder's path, or go online for a Hub model."
        ) from err


def recipe_configs(recipe: Any) -> list:
    """Technique configs from a `CompressionConfig`, a list of technique dicts or configs, or a JSON file of that."""
    import json
    from pathlib import Path

    from .config import CompressionConfig, TechniqueConfig

    if isinstance(recipe, CompressionConfig):
        return [TechniqueConfig.from_dict(t.to_dict()) for t in recipe.techniques]
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        if not path.is_file():
            raise FileNotFoundError(f"Recipe file {path} not found; expected a JSON list of technique dicts.")
        try:
            recipe = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"Recipe file {path} is not valid JSON ({err}); expected a list of technique dicts."
            ) from None
        recipe = recipe.get("techniques", recipe) if isinstance(recipe, dict) else recipe
    if not isinstance(recipe, list):
        raise TypeError(
            f"recipe must be a CompressionConfig, a list of technique dicts or a JSON path; got {recipe!r}."
        )
    bad = next((i for i, r in enumerate(recipe) if not isinstance(r, (dict, TechniqueConfig))), None)
    if bad is not None:
        raise WrongTypeError(
            f"recipe[{bad}] is {describe(recipe[bad])}; each item must be a technique config or its dict, e.g. "
            "{'method': 'weight_quantization', 'bits': 8}."
        )
    return [r if isinstance(r, TechniqueConfig) else TechniqueConfig.from_dict(r) for r in recipe]


# -- the model -----------------------------------------------------------------------------------------------------
def check_supported(config_or_model: Any, name: str = "") -> None:
    """Refuse a model family without an architecture adapter: its compressed folder would not reload."""
    from .adapters import ADAPTERS, UnsupportedArchitectureError

    config = getattr(config_or_model, "config", config_or_model)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedArchitectureError(
            f"{name or type(config_or_model).__name__} is a {model_type!r} model, a family hf_compress does not "
            f"support (its compressed folder would not reload). Supported families (model_type): {sorted(ADAPTERS)}. "
            "To add one, register an ArchitectureAdapter in hf_compress.adapters.ADAPTERS."
        )
