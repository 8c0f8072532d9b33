"""Checks of `compress` arguments, run before any work (the type and range helpers are in `hf_compress.validation`).

Every message names the parameter, the value received, what is allowed and how to fix it.
"""

from __future__ import annotations

import numbers
import os
import re
from typing import Any

from ..validation import WrongTypeError, check_bool, check_number, describe


__all__ = ["check_compress_args", "check_one_source", "export_targets", "load_config", "recipe_configs"]


def check_one_source(given: list[str], options: bool = False) -> None:
    """Only one of configs, recipe, preset and budget (`given`: the ones passed); `options` words it for the CLI."""
    if len(given) <= 1:
        return
    if options:
        raise ValueError(f"Give only one of --preset, --recipe and --budget; got {', '.join('--' + g for g in given)}.")
    raise ValueError(f"Give only one of configs, recipe, preset or budget; got {' and '.join(given)}.")


# -- compress() arguments ------------------------------------------------------------------------------------------
def check_compress_args(args: dict[str, Any], structural: bool) -> dict[str, str | None]:
    """Check every argument of `compress` that can be checked without the model; return the data forms.

    `structural` says whether pruning or factorization will run (recovery distillation needs them and texts).
    """
    from ..validation import check_task_data, data_form
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
    if args.get("latency") is not None:
        from .budget import parse_latency

        parse_latency(args["latency"])
        if budget is None:
            raise ValueError(
                f"latency={args['latency']!r} is a target of budget mode: give a size target too, e.g. "
                "budget='10x', latency='0.5x' (--budget 10x --latency 0.5x)."
            )
        if args["latency_rounds"] == 0:
            raise ValueError("latency=... is measured: latency_rounds must be >= 1 with a latency target, got 0.")
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
    if distill and (structural or budget is not None):
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
    from ..evaluation.measure import METRICS_DIR

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

    from ..distillation import DistillationArguments
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

    from ..config import CompressionConfig, TechniqueConfig

    if isinstance(recipe, CompressionConfig):
        return [TechniqueConfig.from_dict(t.to_dict()) for t in recipe.techniques]
    if isinstance(recipe, (str, os.PathLike)):
        path = Path(recipe)
        if path.is_dir() and (path / "config.json").is_file():  # a compressed folder: its resolved recipe
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"Recipe file {path} not found; expected a JSON list of technique dicts.")
        try:
            recipe = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"Recipe file {path} is not valid JSON ({err}); expected a list of technique dicts."
            ) from None
        if isinstance(recipe, dict) and isinstance(recipe.get("quantization_config"), dict):  # a config.json
            recipe = recipe["quantization_config"]
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


def export_targets(export: Any, output_dir: Any, configs) -> list[str]:
    """The export targets asked for, checked before any work (a typo must not cost a finished compression), with
    the configs they cannot hold (free float offsets for compressed-tensors)."""
    if export is None:
        return []
    from ..export import TARGETS
    from ..export.compressed_tensors import check_configs

    targets = [export] if isinstance(export, str) else export
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"export must be a target name or a list of them, one of {list(TARGETS)}; got {export!r}.")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"export got unknown target(s) {unknown}; choose from {list(TARGETS)}.")
    if targets and output_dir is None:
        raise ValueError(f"export={export!r} writes next to the saved model: pass output_dir=... too.")
    if "compressed-tensors" in targets:
        check_configs(configs)
    return list(dict.fromkeys(targets))
