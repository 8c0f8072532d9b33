"""Combined compression on MiniLM: smaller, faster and faithful at once, on Debian texts and on another domain.

    python -m bench.budget                          # every variant, then the table (takes the lock for timing)
    python -m bench.budget --only budget-10x-0.5x   # one variant (cached models are reused)
    python -m bench.budget --classifier             # the Debian 12-section classifier figure instead

Each variant is made by `hf_compress.compress` exactly as a user would (calibration: 256 Debian train texts;
the search's own fidelity texts: 64 Debian test texts), saved to the bench cache and measured here against fp32 in
one run: size, CPU latency (batch 32 x 128, variants timed alternately, median of per-round ratios, under the
machine-wide benchmark lock) and the mean / 5th-percentile cosine of mean-pooled sentence embeddings on two held-
out text sets: 240 Debian test descriptions (20 per section) and 240 sentences from the manual pages installed on
this machine (`hf_compress.data.manpages`, another domain; nothing is tuned on it). The budget search times its
candidates too (alternately against fp32, so load on the machine shifts the ratios less than the times); with
``--lock-builds`` those builds hold the benchmark lock as well (minutes, recovery included).

The classifier figure fine-tunes MiniLM on the Debian sections (`bench.distillation`'s teacher, cached), compresses
it with ``budget="10x", latency="0.5x"`` and the labeled train rows as task data (task-aware search and recovery),
and reports test accuracy against the fine-tuned model's, with latency measured alternately.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from bench.harness import bench_lock, embed, format_table, load_minilm, time_alternately
from hf_compress import compress
from hf_compress.data import load_debian, minilm_path
from hf_compress.data.manpages import load_man_sentences
from hf_compress.pruning import HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig
from hf_compress.utils import model_bytes


CACHE = Path.home() / ".cache/hf_compress/bench/budget"
# name -> (compress keyword arguments, whether building it times candidates: then it runs under the lock, the CLI)
VARIANTS = {
    "budget-10x-0.5x": ({"budget": "10x", "latency": "0.5x"}, True,
                        "hf-compress compress --budget 10x --latency 0.5x"),
    "preset-max": ({"preset": "max"}, False, "hf-compress compress --preset max"),
    "heads-1/3+recovery": ({"configs": (HeadPruningConfig(fraction=1 / 3), WeightQuantizationConfig(bits=8)),
                            "distill": {"max_seconds": 180.0}}, False,
                           "hf-compress compress --head-pruning-fraction 0.333 --weight-quantization-bits 8 "
                           "--distill"),
    "budget-10x": ({"budget": "10x"}, True, "hf-compress compress --budget 10x"),
}  # fmt: skip


def _folder(name: str) -> Path:
    return CACHE / name.replace("/", "_").replace("+", "_")


LOCK_BUILDS = False


def build(name: str, calibration: list[str], eval_texts: list[str], task_rows=None, source=None) -> Path:
    """Compress once into the cache (a rerun reuses it); returns the folder with the model and its report."""
    folder = _folder(name)
    if (folder / "hf_compress_report.json").is_file():
        return folder
    kwargs, timed, command = VARIANTS[name] if name in VARIANTS else CLASSIFIER
    kwargs = dict(kwargs)
    configs = kwargs.pop("configs", ())
    lock = bench_lock() if timed and LOCK_BUILDS else contextlib.nullcontext()
    start = time.perf_counter()
    with lock:
        compress(str(source or minilm_path()), *configs, calibration_data=calibration, eval_data=eval_texts,
                 task_data=task_rows, output_dir=folder, overwrite=True, reproduce_command=command,
                 latency_rounds=3, **kwargs)  # fmt: skip
    (folder / "bench_build.json").write_text(json.dumps({"seconds": time.perf_counter() - start}))
    return folder


def _cosine(model, reference: torch.Tensor, tokenizer, texts) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(embed(model, tokenizer, texts), reference, dim=-1).numpy()
    return float(cos.mean()), float(np.percentile(cos, 5))


def _report(folder: Path) -> dict:
    return json.loads((folder / "hf_compress_report.json").read_text())


def embeddings_table(names: list[str], args) -> None:
    base, tokenizer = load_minilm()
    calibration = [r["text"] for r in load_debian("train", per_section=22)][:256]
    eval_texts = [r["text"] for r in load_debian("test", per_section=6)][:64]
    folders = {name: build(name, calibration, eval_texts) for name in names}
    if args.build_only:
        return
    debian = [r["text"] for r in load_debian("test", per_section=20)]
    man = load_man_sentences(240)
    refs = {"debian": embed(base, tokenizer, debian), "man": embed(base, tokenizer, man)}
    models = {name: AutoModel.from_pretrained(folder).eval() for name, folder in folders.items()}
    rows = []
    for name, model in models.items():
        report = _report(folders[name])
        deb, mp = _cosine(model, refs["debian"], tokenizer, debian), _cosine(model, refs["man"], tokenizer, man)
        rec = report.get("recovery") or {}
        rows.append({"variant": name, "command": VARIANTS[name][2],
                     "size (MB)": model_bytes(model) / 1e6, "smaller": model_bytes(base) / model_bytes(model),
                     "cos Debian": deb[0], "cos p5 Debian": deb[1], "cos man pages": mp[0], "cos p5 man pages": mp[1],
                     "recovery": f"{rec.get('steps')} steps / {rec.get('seconds')} s" if rec else "none",
                     "latency in report": report["latency"]["ratio"] if report.get("latency") else None})  # fmt: skip
    enc = tokenizer((debian * 2)[:32], padding="max_length", truncation=True, max_length=128, return_tensors="pt")
    with bench_lock(not args.no_lock), torch.inference_mode():
        ratios = time_alternately({"fp32": lambda: base(**enc), **{n: (lambda m=m: m(**enc)) for n, m in
                                   models.items()}}, rounds=args.rounds, reference="fp32")  # fmt: skip
    for row in rows:
        row["latency vs fp32"] = ratios[row["variant"]]
    print(format_table(rows, f"MiniLM, combined compression (fidelity on {len(debian)} Debian test texts and "
                             f"{len(man)} man-page sentences; latency batch 32 x 128, {args.rounds} rounds)"))  # fmt: skip
    for name in names:
        choice = _report(folders[name]).get("choice")
        if choice:
            from hf_compress.pipeline.budget import candidates_table

            print(f"\n{name}: {choice['summary']}\n\n{candidates_table(choice)}")


CLASSIFIER = ({"budget": "10x", "latency": "0.5x"}, True, "hf-compress compress --budget 10x --latency 0.5x "
              "--task-data train.jsonl")  # fmt: skip


def classifier_table(args) -> None:
    from bench.distillation import _folder as distil_folder
    from bench.distillation import accuracy, finetune_teacher, splits, tokenized

    opts = argparse.Namespace(max_length=64, batch_size=32, teacher_epochs=2.0, fast=False)
    data = splits()
    teacher_dir = finetune_teacher(data, opts, distil_folder("teacher", opts))
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    calibration = [r["text"] for r in load_debian("train", per_section=22)][:256]
    eval_texts = [r["text"] for r in data["val"][:64]]
    task_rows = [{"text": r["text"], "label": r["label"]} for r in data["train"][:1200]]
    folder = build("classifier-10x-0.5x", calibration, eval_texts, task_rows, source=teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    student = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    test = tokenized(tokenizer, data["test"], opts.max_length)
    acc = {"teacher": accuracy(teacher, test, tokenizer), "compressed": accuracy(student, test, tokenizer)}
    enc = tokenizer(["x"] * 32, padding="max_length", max_length=128, return_tensors="pt")
    with bench_lock(not args.no_lock), torch.inference_mode():
        ratios = time_alternately({"teacher": lambda: teacher(**enc), "compressed": lambda: student(**enc)},
                                  rounds=args.rounds, reference="teacher")  # fmt: skip
    report = _report(folder)
    rows = [{"model": "fine-tuned MiniLM (fp32)", "size (MB)": model_bytes(teacher) / 1e6, "test acc": acc["teacher"],
             "acc vs fine-tuned": 1.0, "latency vs fine-tuned": 1.0},
            {"model": f"compressed ({CLASSIFIER[2]})", "size (MB)": model_bytes(student) / 1e6,
             "test acc": acc["compressed"], "acc vs fine-tuned": acc["compressed"] / acc["teacher"],
             "latency vs fine-tuned": ratios["compressed"],
             "smaller": model_bytes(teacher) / model_bytes(student)}]  # fmt: skip
    print(format_table(rows, f"Debian 12 sections: {len(test)} test rows, task data {len(task_rows)} train rows"))
    print(f"\n{report['choice']['summary']}\nrecovery: {report.get('recovery')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="Only these variants.")
    parser.add_argument("--classifier", action="store_true", help="The Debian classifier figure instead.")
    parser.add_argument("--rounds", type=int, default=7, help="Latency rounds of the final timing.")
    parser.add_argument("--no-lock", action="store_true", help="The caller holds the benchmark lock already.")
    parser.add_argument("--lock-builds", action="store_true", help="Hold the lock while a budget search times.")
    parser.add_argument("--build-only", action="store_true", help="Build (cache) the variants, print nothing.")
    args = parser.parse_args()
    global LOCK_BUILDS
    LOCK_BUILDS = args.lock_builds
    torch.set_num_threads(2)
    if args.classifier:
        return classifier_table(args)
    return embeddings_table(args.only or list(VARIANTS), args)


if __name__ == "__main__":
    main()
