"""Distillation figures: a 3-layer MiniLM student distilled from a 6-layer MiniLM fine-tuned on Debian sections.

    python -m bench.distillation --variant teacher      # fine-tune the teacher (cached; one lock hold)
    python -m bench.distillation --variant distilled    # train one student (cached; one lock hold)
    python -m bench.distillation                        # whatever is not cached yet, then the table
    python -m bench.distillation --ablation             # the validation-accuracy table of the loss terms
    python -m bench.distillation --fast                 # smoke run on a little data
    python -m bench.distillation --recovery             # recovery distillation of a pruned + factorized MiniLM

Every model trains on the Debian train split minus a stratified 10 % validation split; choices (epochs, loss
weights, temperature) are made on validation accuracy, and the test split is only used for the final table.
Each training run and the final measurements take the shared benchmark lock (/tmp/hf_compress_bench.lock)
themselves, one hold per phase, so do not wrap this command in `flock` (it would wait for itself).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from bench.harness import bench_lock, format_table, time_alternately
from hf_compress.data import DEBIAN_SECTIONS, load_debian, minilm_path
from hf_compress.distillation import DistillationArguments, DistillationTrainer, make_student
from hf_compress.utils import count_parameters


CACHE = Path(os.environ.get("HF_COMPRESS_BENCH_CACHE", Path.home() / ".cache/hf_compress/bench"))
TEACHER = {"epochs": 2.0, "lr": 2e-4}
# The recipe of the headline student; the ablation variants change one thing each.
RECIPE = {"alpha_kl": 1.0, "temperature": 2.0, "alpha_task": 0.5, "alpha_cos": 1.0}
VARIANTS = {  # name -> (initialisation, distillation settings or None for labels only, learning rate)
    "distilled": ("make_student", RECIPE, 2e-4),
    "labels only": ("make_student", None, 2e-4),
    "random init, distilled": ("random", RECIPE, 5e-4),
}
ABLATION = {
    "no hidden cosine": ("make_student", {**RECIPE, "alpha_cos": 0.0}, 2e-4),
    "no labels (teacher only)": ("make_student", {**RECIPE, "alpha_task": 0.0}, 2e-4),
    "no soft targets": ("make_student", {**RECIPE, "alpha_kl": 0.0}, 2e-4),
    "T = 4": ("make_student", {**RECIPE, "temperature": 4.0}, 2e-4),
    "T = 1": ("make_student", {**RECIPE, "temperature": 1.0}, 2e-4),
}
ALL_VARIANTS = {**VARIANTS, **ABLATION}


def splits(limit: int | None = None, val_fraction: float = 0.1) -> dict[str, list[dict]]:
    """Debian rows as ``train`` / ``val`` (a stratified, seeded ``val_fraction`` of the train split) / ``test``."""
    train, val = [], []
    for label in range(len(DEBIAN_SECTIONS)):
        rows = [r for r in load_debian("train") if r["label"] == label]
        random.Random(label).shuffle(rows)
        cut = max(1, round(len(rows) * val_fraction))
        val += rows[:cut]
        train += rows[cut:]
    random.Random(0).shuffle(train)
    test = load_debian("test")
    if limit is not None:  # keep every section in a small subset: take rows spread over each list
        train, val, test = (rows[:: max(1, len(rows) // limit)][:limit] for rows in (train, val, test))
    return {"train": train, "val": val, "test": test}


def tokenized(tokenizer, rows: list[dict], max_length: int):
    """Rows as a tokenized `datasets.Dataset` with ``labels`` (dynamic padding happens in the collator)."""
    from datasets import Dataset

    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    return Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})


@torch.inference_mode()
def accuracy(model, dataset, tokenizer, batch_size: int = 64) -> float:
    """Accuracy of a sequence classifier on a tokenized dataset."""
    model.eval()
    collator = DataCollatorWithPadding(tokenizer)
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(dataset)


class _EpochAccuracy:
    """Trainer callback: validation accuracy after every epoch (to see whether a run has converged)."""

    def __init__(self, dataset, tokenizer):
        from transformers import TrainerCallback

        outer = self
        self.history: list[float] = []

        class Callback(TrainerCallback):
            def on_epoch_end(self, args, state, control, model=None, **kwargs):
                outer.history.append(round(accuracy(model, dataset, tokenizer), 4))
                model.train()

        self.callback = Callback()


def _training_args(cls, out: Path, epochs: float, lr: float, batch_size: int, **extra):
    return cls(
        output_dir=str(out / "run"), per_device_train_batch_size=batch_size, learning_rate=lr,
        num_train_epochs=epochs, warmup_steps=0.06, weight_decay=0.01, logging_steps=20, save_strategy="no",
        report_to=[], disable_tqdm=True, seed=0, **extra,
    )  # fmt: skip


@contextlib.contextmanager
def _clock(into: dict):
    """Wall-clock, this process's CPU seconds and the load average over a phase (others' work shows in the load)."""
    import threading

    samples, stop = [], threading.Event()

    def sample() -> None:  # every 15 s until the phase ends
        while not stop.wait(15):
            samples.append(os.getloadavg()[0])

    sampler = threading.Thread(target=sample, daemon=True)
    wall, cpu = time.perf_counter(), time.process_time()
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join()
    into.update(train_s=time.perf_counter() - wall, cpu_s=time.process_time() - cpu,
                mean_load=round(sum(samples) / max(len(samples), 1), 1))  # fmt: skip


def _write(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=1))


def finetune_teacher(data: dict, opts, out: Path) -> Path:
    """Fine-tune MiniLM (all 6 layers) on the Debian sections once; later runs reuse the saved folder."""
    if (out / "result.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(),
        num_labels=len(DEBIAN_SECTIONS),
        id2label=dict(enumerate(DEBIAN_SECTIONS)),
        label2id={s: i for i, s in enumerate(DEBIAN_SECTIONS)},
    )
    train, val = (tokenized(tokenizer, data[s], opts.max_length) for s in ("train", "val"))
    epoch_acc = _EpochAccuracy(val, tokenizer)
    args = _training_args(TrainingArguments, out, opts.teacher_epochs, TEACHER["lr"], opts.batch_size)
    timing: dict = {}
    with bench_lock(), _clock(timing):
        Trainer(model=model, args=args, train_dataset=train, processing_class=tokenizer,
                callbacks=[epoch_acc.callback]).train()  # fmt: skip
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _write(out, {**timing, "val_acc_per_epoch": epoch_acc.history, "lr": TEACHER["lr"]})
    return out


def train_student(name: str, teacher_dir: Path, data: dict, opts, out: Path) -> Path:
    """Train one student variant once (cached in `out`): 3 of the teacher's 6 layers, distilled or labels only."""
    if (out / "result.json").is_file():
        return out
    init, recipe, lr = ALL_VARIANTS[name]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    torch.manual_seed(0)
    if init == "make_student":
        student = make_student(teacher, num_layers=3)
    else:
        config = AutoConfig.from_pretrained(teacher_dir, num_hidden_layers=3)
        student = AutoModelForSequenceClassification.from_config(config)
    train, val = (tokenized(tokenizer, data[s], opts.max_length) for s in ("train", "val"))
    epoch_acc = _EpochAccuracy(val, tokenizer)
    common = {"train_dataset": train, "processing_class": tokenizer, "callbacks": [epoch_acc.callback]}
    if recipe is not None:
        args = _training_args(DistillationArguments, out, opts.student_epochs, lr, opts.batch_size, **recipe)
        trainer = DistillationTrainer(model=student, teacher=teacher, args=args, **common)
    else:
        args = _training_args(TrainingArguments, out, opts.student_epochs, lr, opts.batch_size)
        trainer = Trainer(model=student, args=args, **common)
    timing: dict = {}
    with bench_lock(), _clock(timing):
        trainer.train()
    student.save_pretrained(out)
    logs = [h for h in trainer.state.log_history if "loss" in h or "train_loss" in h]
    _write(out, {**timing, "val_acc_per_epoch": epoch_acc.history, "recipe": recipe, "lr": lr,
                 "logs": logs})  # fmt: skip
    return out


def _folder(name: str, opts) -> Path:
    tag = f"len{opts.max_length}-bs{opts.batch_size}{'-fast' if opts.fast else ''}"
    if name == "teacher":
        return CACHE / f"v2-teacher-{tag}-ep{opts.teacher_epochs}-lr{TEACHER['lr']}"
    init, recipe, lr = ALL_VARIANTS[name]
    settings = "labels" if recipe is None else "-".join(f"{k.removeprefix('alpha_')}{v:g}" for k, v in recipe.items())
    return CACHE / f"v2-student-{init}-{settings}-lr{lr:g}-{tag}-ep{opts.student_epochs}-t{opts.teacher_epochs}"


def _result(folder: Path) -> dict:
    return json.loads((folder / "result.json").read_text())


def _test_accuracy(model, folder: Path, test, tokenizer) -> tuple[float, float]:
    """Test accuracy and the seconds it took, cached next to the model (reruns print the same table)."""
    path = folder / f"test-accuracy-{len(test)}.json"
    if not path.is_file():
        start = time.perf_counter()
        value = accuracy(model, test, tokenizer)
        path.write_text(json.dumps({"accuracy": value, "seconds": time.perf_counter() - start}))
    cached = json.loads(path.read_text())
    return cached["accuracy"], cached["seconds"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distillation", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="little data, few steps (smoke run)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per training/test text")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-epochs", type=float, default=TEACHER["epochs"])
    parser.add_argument("--student-epochs", type=float, default=1.0)
    parser.add_argument("--variant", choices=["teacher", *ALL_VARIANTS], help="only train this model, print nothing")
    parser.add_argument("--ablation", action="store_true", help="also train the ablation variants; validation table")
    parser.add_argument("--recovery", action="store_true", help="the recovery-distillation figure instead")
    parser.add_argument("--recovery-steps", type=int, default=120, help="training steps of the recovery run")
    parser.add_argument("--threads", type=int, default=2, help="threads for training and timing")
    parser.add_argument("--no-lock", action="store_true", help="the caller holds the benchmark lock already (flock)")
    opts = parser.parse_args(argv)
    torch.set_num_threads(opts.threads)
    if opts.no_lock:
        global bench_lock
        bench_lock = contextlib.nullcontext
    if opts.recovery:
        from bench.distillation_recovery import main as recovery_main

        return recovery_main(fast=opts.fast, steps=opts.recovery_steps, lock=bench_lock)
    if opts.fast:
        opts.teacher_epochs, opts.student_epochs = 0.5, 1.0
    data = splits(256 if opts.fast else None)
    teacher_dir = finetune_teacher(data, opts, _folder("teacher", opts))
    if opts.variant == "teacher":
        return None
    names = [opts.variant] if opts.variant else list(ABLATION if opts.ablation else VARIANTS)
    dirs = {name: train_student(name, teacher_dir, data, opts, _folder(name, opts)) for name in names}
    if opts.variant:
        return None
    if opts.ablation:
        dirs = {"distilled": train_student("distilled", teacher_dir, data, opts, _folder("distilled", opts)), **dirs}
        dirs["labels only"] = train_student("labels only", teacher_dir, data, opts, _folder("labels only", opts))
        return _ablation_table(teacher_dir, dirs, opts)
    return _main_table(teacher_dir, dirs, data, opts)


def _main_table(teacher_dir: Path, dirs: dict[str, Path], data: dict, opts) -> None:
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    test = tokenized(tokenizer, data["test"], opts.max_length)
    teacher_name = "teacher (6 layers)"
    folders = {teacher_name: teacher_dir, **{f"student: {n}": d for n, d in dirs.items()}}
    models = {name: AutoModelForSequenceClassification.from_pretrained(f).eval() for name, f in folders.items()}
    batch = tokenizer(["x"] * 32, padding="max_length", max_length=128, return_tensors="pt")
    with bench_lock(), torch.inference_mode():
        start = time.perf_counter()
        acc = {name: _test_accuracy(model, folders[name], test, tokenizer) for name, model in models.items()}
        latency = time_alternately(
            {n: (lambda m=m: m(**batch)) for n, m in models.items()},
            rounds=3 if opts.fast else 9,
            reference=teacher_name,
        )
        measure_s = time.perf_counter() - start
    rows = []
    for name, model in models.items():
        result = _result(folders[name])
        rows.append({
            "model": name,
            "params (M)": count_parameters(model) / 1e6,
            "val acc / epoch": " ".join(f"{a:.4f}" for a in result["val_acc_per_epoch"]),
            "test acc": f"{acc[name][0]:.4f}",
            "acc vs teacher": f"{acc[name][0] / acc[teacher_name][0]:.3f}",
            "latency vs teacher": f"{latency[name]:.3f}",
            "train (min)": f"{result['train_s'] / 60:.1f}",
            "train CPU (min)": f"{result.get('cpu_s', float('nan')) / 60:.1f}",
            "mean load": result.get("mean_load", "n/a"),
            "test eval (s)": f"{acc[name][1]:.0f}",
        })  # fmt: skip
    train = sum(_result(f)["train_s"] for f in folders.values())
    print(format_table(rows, title=(
        f"Debian sections, MiniLM teacher vs 3-layer students ({len(data['train'])} train / {len(data['val'])} val / "
        f"{len(test)} test texts, max_length {opts.max_length}, batch {opts.batch_size}, teacher "
        f"{opts.teacher_epochs:g} epochs, students {opts.student_epochs:g} epochs, {opts.threads} threads; latency: "
        "batch 32 x 128, median of per-round ratios)"
    )))  # fmt: skip
    print(
        f"\nwall-clock: training {train / 60:.1f} min in all (per model above; cached runs count their original time), "
        f"test accuracy + latency timing {measure_s / 60:.1f} min. train CPU: this process's CPU time; mean load: the "
        "machine's load average during the run (2 cores: above 2, other work shared the CPU)."
    )


def _ablation_table(teacher_dir: Path, dirs: dict[str, Path], opts) -> None:
    rows = [{"student (make_student init)": "teacher (6 layers)", "recipe": "-",
             "val acc / epoch": " ".join(f"{a:.4f}" for a in _result(teacher_dir)["val_acc_per_epoch"]),
             "train (min)": f"{_result(teacher_dir)['train_s'] / 60:.1f}",
             "mean load": _result(teacher_dir).get("mean_load", "n/a")}]  # fmt: skip
    for name, folder in dirs.items():
        result = _result(folder)
        recipe = result["recipe"]
        rows.append({
            "student (make_student init)": name,
            "recipe": "labels only" if recipe is None else ", ".join(f"{k}={v:g}" for k, v in recipe.items()),
            "val acc / epoch": " ".join(f"{a:.4f}" for a in result["val_acc_per_epoch"]),
            "train (min)": f"{result['train_s'] / 60:.1f}",
            "mean load": result.get("mean_load", "n/a"),
        })  # fmt: skip
    print(format_table(rows, title=(
        f"Ablation on the validation split (stratified 10 % of Debian train; students {opts.student_epochs:g} "
        f"epochs, lr 2e-4, max_length {opts.max_length}; train minutes depend on the load, see mean load)"
    )))  # fmt: skip


if __name__ == "__main__":
    main()
