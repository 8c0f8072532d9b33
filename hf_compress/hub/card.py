"""Model cards for compressed models, written with `huggingface_hub.ModelCard` / `ModelCardData`.

The card is rendered only from the saved report (``hf_compress_report.json``), so regenerating it from a folder
gives the same bytes every time (`regenerate_card`); plots are written with fixed metadata for the same reason.
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

from ..evaluation.report import CATEGORIES, CompressionReport
from ..registry import registered_techniques


__all__ = ["build_card_files", "render_card", "regenerate_card", "size_plot"]

REPORT_FILE = "hf_compress_report.json"
REQUEST_FILE = "hf_compress_request.json"  # the technique configs asked for, before apply resolved them
RECIPE_REFERENCE = {"see": "config.json", "key": "quantization_config"}  # the report's recipe: held once, there
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
_TAGS = {
    "head_pruning": "head-pruning",
    "ffn_pruning": "ffn-pruning",
    "embedding_factorization": "low-rank",
    "low_rank_linear": "low-rank",
    "weight_quantization": None,  # tagged by bit width below
}


def hub_base_model(base_name: str) -> str | None:
    """The Hub id of the base model, or None for a local folder that is not one (the bundled MiniLM maps to its id)."""
    try:
        from ..data import minilm_path

        if Path(base_name).resolve() == minilm_path().resolve():
            return MINILM_HUB_ID
    except (ImportError, OSError):
        pass
    if os.path.exists(base_name) or not re.fullmatch(r"[\w.-]+/[\w.-]+", base_name):
        return None
    return base_name


def _techniques(report: CompressionReport) -> list[dict[str, Any]]:
    return list(report.recipe.get("techniques", []))


def _tags(report: CompressionReport) -> list[str]:
    tags = {"hf_compress", "compressed"}
    for t in _techniques(report):
        if t["method"] == "weight_quantization":
            tags.update({"quantized", f"int{t.get('bits', 8)}"})
        tag = _TAGS.get(t["method"], t["method"].replace("_", "-"))
        if tag:
            tags.add(tag)
    return sorted(tags)


def _card_data(report: CompressionReport, repo_id: str | None) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    base = hub_base_model(report.base_model)
    stages = {registered_techniques()[t["method"]].stage for t in _techniques(report)
              if t["method"] in registered_techniques()}  # fmt: skip
    name = repo_id.split("/")[-1] if repo_id else f"{Path(base or report.base_model).name}-hf_compress"
    results = []
    if report.fidelity:
        results.append(EvalResult(task_type="feature-extraction", dataset_type="text", dataset_name="evaluation texts",
                                  metric_type="cosine_similarity", metric_name="mean cosine to the original",
                                  metric_value=round(report.fidelity["cosine_mean"], 5)))  # fmt: skip
    if report.task:
        for key, value in report.task["after"].items():
            results.append(EvalResult(task_type="text-classification", dataset_type="text",
                                      dataset_name="labeled evaluation data", metric_type=key,
                                      metric_name=f"{key} ({report.task['mode']})", metric_value=round(value, 5)))  # fmt: skip
    return ModelCardData(
        base_model=base,
        base_model_relation="quantized" if base and "quantize" in stages else None,
        library_name="hf_compress",
        tags=_tags(report),
        model_name=name,
        eval_results=results or None,
    )


def render_card(report: CompressionReport, repo_id: str | None = None, reproduce_command: str | None = None,
                plots: list[str] = ()) -> str:  # fmt: skip
    """The README.md text (YAML metadata + body) of a compressed model."""
    from huggingface_hub import ModelCard

    data = _card_data(report, repo_id)
    base = data.base_model or report.base_model
    load_id = repo_id or "path/to/this/folder"
    recipe = json.dumps(report.recipe.get("techniques", []), indent=2, sort_keys=True)
    if len(recipe) > 4000:  # resolved configs can list every module; the card keeps the gist
        recipe = json.dumps([{k: v for k, v in t.items() if not isinstance(v, (dict, list))}
                             for t in report.recipe.get("techniques", [])], indent=2, sort_keys=True)  # fmt: skip
    steps = ", ".join(t["method"] for t in _techniques(report)) or "none"
    command = reproduce_command or f"hf-compress compress {base} --recipe {REQUEST_FILE}"
    lines = [
        f"# {data.model_name}",
        "",
        f"A compressed version of [{base}]({_link(base)}) made with hf_compress (`pip install hf-compress`): "
        f"{steps}. It is {1 / report.size_ratio:.1f}x smaller than the original in memory.",
        "",
        "## How to load",
        "",
        "```python",
        "import hf_compress  # registers the loader of compressed checkpoints",
        "from transformers import AutoModel, AutoTokenizer",
        "",
        f'model = AutoModel.from_pretrained("{load_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{load_id}")',
        "```",
        "",
        "Install with `pip install hf-compress`. Loading without `import hf_compress` fails with an error that says so.",
        "",
        "## Before and after",
        "",
        report.to_markdown(),
        "",
        _notes(report),
        "",
        *[f"![{Path(p).stem.replace('_', ' ')}]({p})" for p in plots],
        "",
        "## Recipe",
        "",
        "The resolved recipe (every data-dependent choice made explicit) is stored in `config.json` under "
        f"`quantization_config`; the requested one is in `{REQUEST_FILE}`.",
        "",
        "```json",
        recipe,
        "```",
        "",
    ]
    if report.choice:
        lines += ["## Budget search", "", report.choice.get("summary", ""), "", *_choice_table(report.choice), ""]
    lines += ["## Reproduce", "", "```bash", command, "```", ""]
    text = "\n".join(lines)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}"))


def _link(base: str) -> str:
    return f"https://huggingface.co/{base}" if re.fullmatch(r"[\w.-]+/[\w.-]+", base) else base


def _notes(report: CompressionReport) -> str:
    notes = []
    if report.latency:
        lat = report.latency
        notes.append(f"Latency: forward pass of a {'x'.join(map(str, lat['batch']))} batch on {lat['device']} "
                     f"({lat['threads']} threads), original and compressed timed alternately, median of "
                     f"{lat['rounds']} per-round ratios.")  # fmt: skip
    if report.fidelity:
        notes.append(f"Fidelity: cosine similarity of mean-pooled last hidden states to the original's on "
                     f"{report.fidelity['texts']} texts (mean; 5th percentile).")  # fmt: skip
    if report.task:
        notes.append(f"Task metric: `{report.task['metric']}` on {report.task['examples']} labeled examples "
                     f"({'logistic-regression probe on sentence embeddings' if report.task['mode'] == 'probe' else 'argmax of the logits'}).")  # fmt: skip
    return " ".join(notes)


def _choice_table(choice: dict[str, Any]) -> list[str]:
    rows = choice.get("candidates", [])
    if not rows:
        return []
    out = ["| candidate | size (MB) | fits | mean cosine |", "|---|---|---|---|"]
    for row in rows:
        cos = "" if row.get("cosine") is None else f"{row['cosine']:.4f}"
        out.append(f"| {row['name']} | {row['bytes'] / 1e6:.2f} | {'yes' if row['fits'] else 'no'} | {cos} |")
    return out


def size_plot(report: CompressionReport) -> bytes:
    """PNG bar chart of megabytes per category (embeddings / attention / FFN / other), before and after."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.subplots()
    xs = range(len(CATEGORIES))
    for offset, (label, side) in zip((-0.2, 0.2), (("before", report.before), ("after", report.after))):
        ax.bar([x + offset for x in xs], [side["breakdown"][c]["bytes"] / 1e6 for c in CATEGORIES], width=0.4,
               label=f"{label} ({side['bytes'] / 1e6:.1f} MB)")  # fmt: skip
    ax.set_xticks(list(xs), list(CATEGORIES))
    ax.set_ylabel("MB")
    ax.set_title("Model size by part")
    ax.legend()
    fig.tight_layout()
    return _png(fig)


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})  # no version string: identical bytes each time
    return buffer.getvalue()


def head_plot(head_config: Any) -> bytes | None:
    """PNG head-importance heatmap (pruned heads marked) from the pruning package, when heads were pruned."""
    if head_config is None:
        return None
    try:
        from ..pruning import plot_head_importance
    except ImportError:
        return None
    fig = plot_head_importance(head_config)
    if fig is None:
        return None
    png = _png(fig)
    import matplotlib.pyplot as plt

    plt.close(fig)  # pyplot keeps every figure it made alive until closed
    return png


def build_card_files(report: CompressionReport, repo_id: str | None = None, reproduce_command: str | None = None,
                     head_importance: Any = None) -> dict[str, bytes | str]:  # fmt: skip
    """README.md plus the PNG plots it shows, as ``{relative path: content}``."""
    files: dict[str, bytes | str] = {"plots/size_breakdown.png": size_plot(report)}
    heatmap = head_plot(head_importance)
    if heatmap is not None:
        files["plots/head_importance.png"] = heatmap
    report.card_info = {"repo_id": repo_id, "reproduce_command": reproduce_command}
    files["README.md"] = render_card(report, repo_id=repo_id, reproduce_command=reproduce_command,
                                     plots=sorted(p for p in files if p.endswith(".png")))  # fmt: skip
    return files


def regenerate_card(
    folder: str | os.PathLike, repo_id: str | None = None, reproduce_command: str | None = None
) -> Path:
    """Rewrite README.md and the size plot of a compressed folder from its ``hf_compress_report.json``.

    Idempotent: running it twice, or on a folder just written by `compress`, leaves the same bytes. `repo_id` and
    `reproduce_command` default to the ones the card was first written with.
    """
    folder = Path(folder)
    path = folder / "hf_compress_report.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} has no hf_compress_report.json: it was not written by hf_compress.compress."
        )
    stored = json.loads(path.read_text())
    if stored.get("recipe") == RECIPE_REFERENCE:  # the resolved recipe is held once, in config.json
        stored["recipe"] = json.loads((folder / "config.json").read_text()).get("quantization_config", {})
    report = CompressionReport(**stored)
    repo_id = repo_id or report.card_info.get("repo_id")
    reproduce_command = reproduce_command or report.card_info.get("reproduce_command")
    plots = sorted(p.relative_to(folder).as_posix() for p in (folder / "plots").glob("*.png"))
    (folder / "plots").mkdir(exist_ok=True)
    (folder / "plots/size_breakdown.png").write_bytes(size_plot(report))
    plots = sorted(set(plots) | {"plots/size_breakdown.png"})
    (folder / "README.md").write_text(render_card(report, repo_id, reproduce_command, plots), encoding="utf-8")
    return folder / "README.md"
