"""What each ``hf-compress`` subcommand does (the argument parsing lives in `hf_compress.cli`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..config import TechniqueConfig


def technique_configs(args: argparse.Namespace) -> list[TechniqueConfig]:
    """Technique configs from ``--<technique>-<field>`` options: a technique is used when any of its options is set."""
    from ..registry import get_technique

    chosen: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        method, sep, name = dest.partition("__")
        if not sep:
            continue
        options = chosen.setdefault(method, {})
        if name != "enable":
            options[name] = value[0] if isinstance(value, list) and len(value) == 1 and _is_str_or_list(
                get_technique(method).config_cls, name) else value  # fmt: skip
    return [get_technique(method).config_cls(**options) for method, options in chosen.items()]


def _is_str_or_list(config_cls: type, name: str) -> bool:
    """`list[str] | str` fields take one value as a regex string, like PEFT's target_modules."""
    import dataclasses

    kind = str(next(f.type for f in dataclasses.fields(config_cls) if f.name == name))
    return "| str" in kind


def load_texts(source: str | None, split: str, limit: int) -> list[str] | None:
    """Texts from 'debian', 'none', a .txt file (one per line) or a .jsonl file with a 'text' field."""
    if source is None:
        source = "debian" if _debian_available() else "none"
    if source == "none":
        return None
    if source == "debian":
        from ..data import DEBIAN_SECTIONS, load_debian

        per_section = math.ceil(limit / len(DEBIAN_SECTIONS))
        return [r["text"] for r in load_debian(split, per_section=per_section)][:limit]
    rows = _read_file(source)
    texts = [r if isinstance(r, str) else r.get("text") for r in rows]
    if not texts or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"{source}: expected one text per line (.txt) or JSON lines with a 'text' field (.jsonl).")
    return texts[:limit]


def load_rows(source: str | None) -> list[dict] | None:
    """Labeled rows from 'debian' (test split, 20 per section) or a .jsonl file with 'text' and 'label'."""
    if source is None:
        return None
    if source == "debian":
        from ..data import load_debian

        return load_debian("test", per_section=20)
    rows = _read_file(source)
    if not rows or not all(isinstance(r, dict) and "text" in r and "label" in r for r in rows):
        raise ValueError(f"{source}: expected JSON lines with 'text' and 'label' fields.")
    return rows


def _read_file(source: str) -> list:
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"Data source {source!r} is not 'debian', 'none' or an existing .txt/.jsonl file.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in lines]
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON lines: {err}") from None
    return lines


def _debian_available() -> bool:
    from ..data import debian_dataset_path

    try:
        debian_dataset_path()
    except FileNotFoundError:
        return False
    return True


def _default_model() -> tuple[str, str]:
    from ..data import minilm_path

    return str(minilm_path()), "all-MiniLM-L6-v2"


def _print_report(report: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print(report.to_text())


def run_compress(args: argparse.Namespace, argv: list[str]) -> int:
    from ..pipeline.checks import check_one_source
    from ..pipeline.compress import compress
    from .redaction import reproduce_command

    configs = technique_configs(args)
    given = [n for n in ("preset", "recipe", "budget") if getattr(args, n)]
    if configs and given:
        raise ValueError(f"Give technique options or --{given[0]}, not both.")
    check_one_source(given, options=True)
    if args.token and not args.push_to_hub:
        raise ValueError("--token is only used with --push-to-hub USER/NAME: add --push-to-hub, or drop --token.")
    if args.max_samples < 1:
        raise ValueError(f"--max-samples must be at least 1 (calibration texts used), got {args.max_samples}.")
    model, name = (args.model, Path(args.model.rstrip("/")).name) if args.model else _default_model()
    output_dir = args.output_dir or f"{name}-hf_compress"
    calibration = load_texts(args.calibration, "train", args.max_samples)
    eval_texts = load_texts(args.eval_texts, "test", 64)
    shown = [a for a in argv if a != model] if not args.model else argv
    result = compress(
        model, *configs, preset=args.preset, recipe=args.recipe, budget=args.budget, latency=args.latency,
        calibration_data=calibration, eval_data=eval_texts, task_data=load_rows(args.task_data), metric=args.metric,
        distill=args.distill, output_dir=output_dir, push_to_hub=args.push_to_hub, private=args.private,
        overwrite="source" if args.overwrite_source else args.overwrite, token=args.token,
        measure=not args.no_measure, progress=True, reproduce_command=reproduce_command(shown),
        latency_rounds=args.latency_rounds, export=args.export, sequential=args.sequential,
    )  # fmt: skip
    if result.report is not None:
        _print_report(result.report, args.json)
        if result.report.choice and not args.json:
            from ..pipeline.budget import candidates_table

            print(f"\nbudget: {result.report.choice['summary']}\n{candidates_table(result.report.choice)}")
    print(f"\nsaved to {result.output_dir} (reload: import hf_compress; AutoModel.from_pretrained(...))")
    for target, folder in result.exports.items():
        print(f"exported for {target} to {folder}")
    if result.push is not None:
        _print_push(result.push)
    if result.report is not None and not args.json:
        print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in result.report.seconds.items()))
    return 0


def _print_push(push: Any) -> None:
    print(f"pushed {len(push.files)} files, {push.total_bytes / 1e6:.2f} MB in one commit: {push.commit_url}")
    for name, size in sorted(push.files.items()):
        print(f"  {name:40s} {size:>12,d} bytes")


def run_inspect(args: argparse.Namespace, argv: list[str]) -> int:
    from ..evaluation.measure import CATEGORIES, size_breakdown
    from ..plugin import get_recipe

    model, _, source = _load_checkpoint(args.path)
    recipe = get_recipe(model)
    if recipe is None:
        raise ValueError(f"{args.path} was not compressed by hf_compress (its config.json has no hf_compress recipe).")
    sizes = size_breakdown(model)
    folder = Path(args.path)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}
    if args.json:
        print(json.dumps({"recipe": recipe.to_dict(), "sizes": sizes, "files": files}, indent=2))
        return 0
    print(f"{source}: {type(model).__name__}, compressed by hf_compress {recipe.hf_compress_version}")
    for t in recipe.techniques:
        shown = {
            k: v for k, v in t.to_dict().items() if k not in ("method", "version") and not isinstance(v, (dict, list))
        }
        print(f"  {t.method}: " + ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None))
    print(f"\nparameters {sizes['params'] / 1e6:.2f}M, {sizes['bytes'] / 1e6:.2f} MB in memory")
    for cat in CATEGORIES:
        part = sizes["breakdown"][cat]
        print(f"  {cat:<11s} {part['params'] / 1e6:8.2f}M params {part['bytes'] / 1e6:9.2f} MB")
    if files:
        print("\nfiles:")
        for name, size in files.items():
            print(f"  {name:40s} {size:>12,d} bytes")
    return 0


def _load_checkpoint(path: str) -> tuple[Any, Any, str]:
    """`load_model`, with unreadable weights (truncated, corrupt, a refused pickle) as a one-line ValueError."""
    import pickle

    from safetensors import SafetensorError

    from ..pipeline.loading import load_model

    if Path(path).is_file():
        raise ValueError(f"{path} is a file: pass the checkpoint folder holding it ({Path(path).parent}) or a Hub id.")
    try:
        return load_model(path)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "PytorchStreamReader" not in str(err):
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        first = first if len(first) <= 120 else first[:117] + "..."
        files = sorted(p.name for p in Path(path).glob("*") if p.suffix in (".safetensors", ".bin", ".pt"))
        raise ValueError(
            f"{path}: the weights ({', '.join(files) or 'weights file'}) could not be read ({type(err).__name__}: "
            f"{first}). The file is truncated or corrupt, or a pickle that torch.load(weights_only=True) refuses; "
            f"download or save it again (save_pretrained writes safetensors)."
        ) from None


def run_evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    from ..evaluation.measure import measure_report
    from ..pipeline.loading import load_model

    base = args.base
    report_path = Path(args.path) / "hf_compress_report.json"
    if base is None and report_path.is_file():
        base = json.loads(report_path.read_text()).get("base_model")
    if base is None:
        raise ValueError(f"No --base given and {args.path} has no hf_compress_report.json naming its original.")
    model, tokenizer, _ = load_model(args.path)
    original, base_tokenizer, _ = load_model(base)
    tokenizer = tokenizer or base_tokenizer
    eval_texts = load_texts(args.eval_texts, "test", 64)
    report = measure_report(original, model, tokenizer, base, eval_texts, load_rows(args.task_data), args.metric,
                            latency_rounds=args.latency_rounds)  # fmt: skip
    _print_report(report, args.json)
    return 0


def run_push(args: argparse.Namespace, argv: list[str]) -> int:
    from ..hub import push_to_hub

    folder = Path(args.path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; push a folder written by `hf-compress compress`.")
    _print_push(push_to_hub(folder, args.repo_id, private=args.private, commit_message=args.message, token=args.token))
    return 0


def run_export(args: argparse.Namespace, argv: list[str]) -> int:
    from ..export import export

    if not Path(args.path).is_dir():
        raise FileNotFoundError(f"{args.path} is not a folder; export a folder written by `hf-compress compress`.")
    output_dir = args.output_dir or f"{args.path.rstrip('/')}-{args.to}"
    folder = export(args.path, to=args.to, output_dir=output_dir, overwrite=args.overwrite, with_past=args.past)
    print(f"exported for {args.to} to {folder}")
    return 0


def run_card(args: argparse.Namespace, argv: list[str]) -> int:
    from ..hub.card import regenerate_card

    path = regenerate_card(args.path, repo_id=args.repo_id)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the hf-compress command")
