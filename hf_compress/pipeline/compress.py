"""`compress`: from a model (object, local folder or Hub id) to a compressed, evaluated, documented model in one call."""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CompressionConfig, TechniqueConfig
from ..evaluation.measure import measure_report
from ..evaluation.report import CompressionReport
from ..hub.card import RECIPE_REFERENCE, REPORT_FILE, REQUEST_FILE
from ..hub.saving import check_output_dir, save_compressed, source_folders
from ..registry import get_technique
from ..sequential import choose_sequential, has_step, sequential_compress
from ..validation import texts_of
from .apply import apply_compression
from .checks import check_compress_args, check_one_source, export_targets, recipe_configs
from .loading import load_model
from .presets import DEFAULT_PRESET, preset_configs


__all__ = ["compress", "CompressionResult", "load_model"]

logger = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """What `compress` returns: the compressed model, its report, and where it was saved and pushed."""

    model: Any
    report: CompressionReport | None
    tokenizer: Any = None
    output_dir: Path | None = None
    push: Any = None  # hf_compress.hub.PushResult
    configs: list[TechniqueConfig] = field(default_factory=list)
    exports: dict[str, str] = field(default_factory=dict)  # target -> folder, for compress(..., export=...)

    def __repr__(self) -> str:
        where = f", saved to {self.output_dir}" if self.output_dir else ""
        table = f"\n{self.report.to_text()}" if self.report else ""
        return f"CompressionResult({type(self.model).__name__}{where}){table}"


def compress(
    model_or_id: Any,
    *configs: TechniqueConfig,
    recipe: CompressionConfig | list | str | os.PathLike | None = None,
    preset: str | None = None,
    budget: float | str | None = None,
    latency: float | str | None = None,
    calibration_data: Any = None,
    eval_data: Any = None,
    task_data: Any = None,
    metric: str = "accuracy",
    distill: bool | dict | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool | str = False,
    push_to_hub: str | None = None,
    private: bool = False,
    token: str | None = None,
    tokenizer: Any = None,
    auto_class: Any = None,
    measure: bool = True,
    card: bool = True,
    max_eval_texts: int = 64,
    reproduce_command: str | None = None,
    progress: bool = False,
    latency_rounds: int = 3,
    export: str | list[str] | None = None,
    sequential: bool | None = None,
) -> CompressionResult:
    """Compress a model in one call: load, apply the techniques in canonical order, measure, save, push.

    What to apply comes from exactly one of `configs`, `recipe`, `preset` or `budget`; with none of them the
    ``"int8"`` preset is used. Structural techniques (pruning, factorization) run first, then recovery
    distillation from the original when asked for, then quantization.

    Args:
        model_or_id (`PreTrainedModel`, `str` or `os.PathLike`):
            A model object (compressed in place), a local checkpoint folder or a Hub id. Folders and ids are loaded
            with the class in their ``config.json`` (`auto_class` overrides it).
        *configs (`TechniqueConfig`): technique configs, e.g. ``HeadPruningConfig(fraction=1/3)``.
        recipe (`CompressionConfig`, `list[dict]` or path, *optional*): a recipe object, its technique dicts, or a
            JSON file holding that list (``hf_compress_request.json`` of a compressed folder), or a compressed folder / its
            ``config.json`` (its resolved recipe).
        preset (`str`, *optional*): one of `hf_compress.pipeline.presets.PRESETS` (``int8``, ``int4``, ``distil``, ``max``).
        budget (`float` or `str`, *optional*): a target size: megabytes (``12`` or ``"12MB"``) or a reduction
            factor (``"10x"``). Searches settings that fit with the best measured fidelity (needs calibration data;
            see `hf_compress.pipeline.budget`). Recovery distillation runs after its structural steps by default.
        latency (`float` or `str`, *optional*): with `budget`, a speed target as a ratio to the original's latency
            (``"0.5x"``), measured here in the same run on the model's own shapes; the search also tries fewer layers
            (then the result is a new model object) and int8 activations (see `hf_compress.pipeline.budget`).
        calibration_data (`list[str]` or `datasets.Dataset`, *optional*): text for data-aware techniques; also the
            fidelity texts when `eval_data` is not given.
        eval_data (`list[str]` or `datasets.Dataset`, *optional*): texts for the fidelity measurement.
        task_data (`list[dict]` or `datasets.Dataset`, *optional*): labeled rows (``text``, ``label``) scored with
            `metric` before and after.
        metric (`str`, *optional*, defaults to `"accuracy"`): an `evaluate` metric: one shipped with hf_compress
            (``accuracy``, ``embedding_fidelity``), a path to a metric script, or a Hub metric name when online.
        distill (`bool` or `dict`, *optional*): recovery distillation after the structural techniques; a dict is
            passed to `hf_compress.pipeline.recovery.recover` (e.g. ``{"max_seconds": 300}``). Defaults to what the
            preset says; in budget mode to `DEFAULT_RECOVERY` (a wall-clock budget). Its data are the calibration
            texts plus, for a model with a classification head, the labeled `task_data` (4 of 5 rows, trained with
            the task loss and soft targets; the fifth is held out for the report's task metric).
        output_dir (`str` or `os.PathLike`, *optional*): save the model, tokenizer, report, card and plots here
            (atomically: a failure never leaves a half-written folder). It must be missing or empty unless
            `overwrite` allows more (checked before compressing); a symlink is followed.
        overwrite (`bool` or `"source"`, *optional*, defaults to `False`): `True` allows a non-empty `output_dir` (a
            previous output, or other files): only files hf_compress writes or wrote there (its manifest) are
            replaced, all others kept. ``"source"`` also allows the checkpoint the model was loaded from.
        push_to_hub (`str`, *optional*): ``"user/name"``: push the saved folder in one commit (needs `output_dir`,
            or a temporary folder is used).
        private (`bool`, *optional*): create the Hub repo as private.
        token (`str`, *optional*): Hub token; defaults to ``HF_TOKEN`` or the ``hf auth login`` one.
        measure (`bool`, *optional*, defaults to `True`): build the report (keeps a copy of the original meanwhile).
        card (`bool`, *optional*, defaults to `True`): write README.md (model card) and plots into `output_dir`.
        reproduce_command (`str`, *optional*): the command shown in the card's "Reproduce" section.
        progress (`bool`, *optional*, defaults to `False`): show a progress bar over the stages (the CLI sets it).
        latency_rounds (`int`, *optional*, defaults to `3`): timed rounds (after one warm-up) of the latency
            measurement, each one forward pass of both models on 32 x 128 tokens; 0 skips it.
        export (`str` or `list[str]`, *optional*): also export the saved folder for deployment engines
            (`hf_compress.export.TARGETS`: ``onnx``, ``openvino``, ``compressed-tensors``, ``transformers``), each
            into ``<output_dir>-<target>`` (needs `output_dir`); the folders are in ``result.exports``.
        sequential (`bool`, *optional*): calibrate GPTQ, low-rank factorization (`LowRankLinearConfig`) and
            activation-scored pruning (`HeadPruningConfig` / `FFNPruningConfig` with ``importance="activation"``,
            ``ranking="per_layer"``) layer by layer, each layer from the compressed layers' outputs, in bounded
            memory (default: GPTQ so when one pass would not fit).

    Returns:
        `CompressionResult` with ``.model``, ``.report`` (print ``.report.to_text()``), ``.output_dir``, ``.push``.

    ```py
    >>> import hf_compress
    >>> result = hf_compress.compress("sentence-transformers/all-MiniLM-L6-v2", preset="int8",
    ...                               calibration_data=texts, output_dir="minilm-int8")
    >>> print(result.report.to_text())
    ```
    """
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    sources = [name for name, given in (("configs", configs), ("recipe", recipe is not None),
                                        ("preset", preset is not None), ("budget", budget is not None)) if given]  # fmt: skip
    check_one_source(sources)
    if not sources:
        preset = DEFAULT_PRESET
    if preset is not None:
        configs, preset_distill = preset_configs(preset)
        distill = preset_distill if distill is None else distill
    elif recipe is not None:
        configs = tuple(recipe_configs(recipe))
    for config in configs:
        if not isinstance(config, TechniqueConfig):
            raise TypeError(f"Expected technique configs such as HeadPruningConfig(...), got {type(config).__name__}.")
    structural = any(get_technique(c.method).stage != "quantize" for c in configs)
    forms = check_compress_args(dict(preset=preset, budget=budget, latency=latency, calibration_data=calibration_data,
                                     eval_data=eval_data, task_data=task_data, metric=metric, distill=distill,
                                     output_dir=output_dir, push_to_hub=push_to_hub, token=token, measure=measure,
                                     card=card, private=private, progress=progress, max_eval_texts=max_eval_texts,
                                     latency_rounds=latency_rounds), structural)  # fmt: skip

    exports = export_targets(export, output_dir, configs)
    sequential = choose_sequential(sequential, model_or_id, configs, calibration_data)
    if output_dir is not None:  # refuse a folder before the work, not after it
        check_output_dir(output_dir, overwrite, source_folders(model_or_id, tokenizer))
    stages = ["load", "compress", *(["measure"] if measure else []), *(["save"] if output_dir or push_to_hub else []),
              *[f"export ({t})" for t in exports], *(["push"] if push_to_hub else [])]  # fmt: skip
    bar = _StageBar(stages, enabled=progress)
    try:
        bar.next("load")
        model, tokenizer, base_name = load_model(model_or_id, auto_class=auto_class, tokenizer=tokenizer,
                                                 supported_only=True)  # fmt: skip
        if distill and structural and budget is None and tokenizer is None:
            raise ValueError("Recovery distillation needs the model's tokenizer: pass tokenizer=... to compress().")
        seconds["load"] = time.perf_counter() - start
        lazy = sequential and isinstance(model_or_id, (str, os.PathLike))  # measure on a second (mmapped) load
        original = copy.deepcopy(model) if (measure or distill or budget is not None) and not lazy else None
        original = load_model(model_or_id, auto_class=auto_class)[0] if lazy and measure else original
        texts_from = "eval_data" if eval_data is not None else "calibration_data"
        eval_texts = texts_of(eval_data if eval_data is not None else calibration_data, forms[texts_from])
        eval_texts = eval_texts[:max_eval_texts] if eval_texts else None
        choice = recovery = None
        train_rows, report_rows = None, task_data
        if task_data is not None and (budget is not None or (distill and structural)) and hasattr(model, "classifier"):
            from .recovery import split_task_rows

            train_rows, report_rows = split_task_rows(task_data)

        t = time.perf_counter()
        bar.next("compress (budget search)" if budget is not None else "compress")
        if budget is not None:
            from .budget.run import run_budget

            model, configs, choice, recovery = run_budget(
                model, original, budget, latency=latency, distill=distill, calibration_data=calibration_data,
                eval_texts=eval_texts, task_rows=train_rows, tokenizer=tokenizer, latency_rounds=latency_rounds)
        else:
            recovery = _apply(model, list(configs), calibration_data, original, distill, tokenizer, train_rows, sequential)
        seconds["compress"] = time.perf_counter() - t

        report = None
        if measure:
            t = time.perf_counter()
            bar.next("measure")
            report = measure_report(original, model, tokenizer, base_name, eval_texts, report_rows, metric,
                                    latency_rounds=latency_rounds)  # fmt: skip
            report.choice, report.recovery = choice, recovery
            if report.task is not None and train_rows is not None:
                report.task["held_out"] = "every 5th row of task_data (the others trained the search and recovery)"
            seconds["measure"] = time.perf_counter() - t
        del original

        result = CompressionResult(model=model, report=report, tokenizer=tokenizer, configs=list(configs))
        if output_dir is None and push_to_hub:
            import tempfile

            output_dir = Path(tempfile.mkdtemp(prefix="hf_compress-")) / push_to_hub.split("/")[-1]
        if output_dir is not None:
            t = time.perf_counter()
            bar.next("save")
            result.output_dir = save_result(result, output_dir, base_name, repo_id=push_to_hub, card=card,
                                            reproduce_command=reproduce_command, overwrite=overwrite)  # fmt: skip
            seconds["save"] = time.perf_counter() - t
        for target in exports:
            from ..export import export as export_to

            bar.next(f"export ({target})")
            folder = f"{result.output_dir}-{target}"
            result.exports[target] = export_to(result.output_dir, to=target, output_dir=folder,
                                               overwrite=bool(overwrite), tokenizer=tokenizer)  # fmt: skip
        if push_to_hub:
            from ..hub import push_to_hub as push

            t = time.perf_counter()
            bar.next("push")
            result.push = push(result.output_dir, push_to_hub, private=private, token=token)
            seconds["push"] = time.perf_counter() - t
    finally:
        bar.close()
    if report is not None:
        report.seconds = {k: round(v, 2) for k, v in {**seconds, "total": time.perf_counter() - start}.items()}
    return result


class _StageBar:
    """One progress bar over the stages of `compress` (techniques show their own bars for long inner loops)."""

    def __init__(self, stages: list[str], enabled: bool) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(stages), desc="compress", unit="stage", leave=False)
        self.started = False

    def next(self, stage: str) -> None:
        if self.bar is None:
            return
        if self.started:
            self.bar.update(1)
        self.started = True
        self.bar.set_description(stage)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _apply(model, configs, calibration_data, original, distill, tokenizer, task_rows=None,
           sequential=False) -> dict | None:
    """Structure first, then recovery distillation, then quantization (the canonical order); returns what
    recovery ran (None without it)."""
    structural = [c for c in configs if get_technique(c.method).stage != "quantize"]
    quantize = [c for c in configs if get_technique(c.method).stage == "quantize"]
    _run_in_order(model, structural, calibration_data, tokenizer, sequential)
    if distill:
        if not structural:
            logger.warning("Recovery distillation skipped: no pruning or factorization ran, nothing to recover.")
        else:
            from .recovery import recover  # heavy (Trainer): imported only when asked for

            kwargs, stats = (distill if isinstance(distill, dict) else {}), {}
            recover(model, original, calibration_data, tokenizer=tokenizer, labeled_rows=task_rows, stats=stats,
                    **kwargs)  # fmt: skip
    _run_in_order(model, quantize, calibration_data, tokenizer, sequential)
    return stats if distill and structural else None


def _run_in_order(model, configs, calibration_data, tokenizer, sequential: bool) -> None:
    """Apply `configs` in their order; with `sequential`, those that have a layer-by-layer step (GPTQ, low-rank
    factorization of linears, activation-scored pruning) through `sequential_compress`, each run of the others in
    one `apply_compression`."""
    run = []
    for config in [*configs, None]:
        if config is not None and not (sequential and has_step(config)):
            run.append(config)
            continue
        if run:
            apply_compression(model, *run, calibration_data=calibration_data, tokenizer=tokenizer)
            run = []
        if config is not None:
            sequential_compress(model, config, calibration_data, tokenizer=tokenizer)


def save_result(result: CompressionResult, output_dir, base_name: str, repo_id: str | None = None, card: bool = True,
                reproduce_command: str | None = None, overwrite: bool | str = False) -> Path:  # fmt: skip
    """Save model, tokenizer, report JSON, the request, model card and plots atomically into `output_dir`.

    The resolved recipe is held once, in ``config.json`` (``quantization_config``); ``hf_compress_request.json`` is
    what was asked for (the technique configs before apply resolved them) and the report JSON refers to config.json.
    """

    def extra_files(saved: Path) -> dict[str, bytes | str]:
        extra: dict[str, bytes | str] = {
            REQUEST_FILE: json.dumps([c.to_dict() for c in result.configs], indent=2) + "\n",
        }
        report = result.report
        if report is None:
            return extra
        report.checkpoint_bytes = sum(p.stat().st_size for p in saved.glob("*.safetensors"))
        if card:
            from ..hub.card import build_card_files

            extra.update(build_card_files(report, repo_id=repo_id, reproduce_command=reproduce_command,
                                          head_importance=_head_importance(result.model)))  # fmt: skip
        stored = {**report.to_dict(), "recipe": RECIPE_REFERENCE}  # the resolved recipe is in config.json
        extra[REPORT_FILE] = json.dumps(stored, indent=2, default=str) + "\n"
        return extra

    return save_compressed(result.model, output_dir, tokenizer=result.tokenizer, extra_files=extra_files,
                           overwrite=overwrite)  # fmt: skip


def _head_importance(model) -> Any:
    """The head-pruning config of the recipe (importance scores and pruned heads), if heads were pruned."""
    from ..plugin import get_recipe

    recipe = get_recipe(model)
    found = recipe.find("head_pruning") if recipe is not None else []
    return found[0] if found else None
