"""Distillation figures: a 3-layer MiniLM student distilled from a 6-layer MiniLM fine-tuned on Debian sections.

    python -m bench.distillation                      # teacher (cached), the three students, the table
    python -m bench.distillation --variant distilled  # train one student only (variants can run in parallel)
    python -m bench.distillation --fast               # smoke run on a little data
    python -m bench.distillation --recovery           # recovery distillation of a pruned + factorized MiniLM

Training runs with 1 thread (on a busy 2-core machine oversubscribed OpenMP threads make 2 threads 3-4x slower);
latency is timed with 2 threads under the shared benchmark lock (/tmp/hf_compress_bench.lock).
"""

from __future__ import annotations

import argparse
import json
import os
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
# name -> (initialisation, distil from the teacher?)
VARIANTS = {
    "distilled": ("make_student", True),
    "labels only": ("make_student", False),
    "random init, distilled": ("random", True),
}


def tokenized(tokenizer, split: str, max_length: int, limit: int | None = None):
    """The Debian split as a tokenized `datasets.Dataset` with ``labels`` (dynamic padding happens in the collator)."""
    from datasets import Dataset

    rows = load_debian(split)
    if limit is not None:  # keep every section in a small subset: take rows spread over the file
        rows = rows[:: max(1, len(rows) // limit)][:limit]
    enc = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
    return Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})


@torch.inference_mode()
def accuracy(model, dataset, tokenizer, batch_size: int = 64) -> float:
    """Test accuracy of a sequence classifier on a tokenized dataset."""
    model.eval()
    collator = DataCollatorWithPadding(tokenizer)
    correct = 0
    for start in range(0, len(dataset), batch_size):
        batch = collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
    return correct / len(dataset)


def cached_accuracy(model, dataset, tokenizer, folder: Path) -> float:
    """`accuracy`, stored next to the model so a rerun (e.g. for the latency table) does not recompute it."""
    path = folder / f"accuracy-{len(dataset)}.json"
    if path.is_file():
        return json.loads(path.read_text())["accuracy"]
    value = accuracy(model, dataset, tokenizer)
    path.write_text(json.dumps({"accuracy": value}))
    return value


def _training_args(cls, out: Path, epochs: float, lr: float, **extra):
    return cls(
        output_dir=str(out / "run"), per_device_train_batch_size=32, learning_rate=lr, num_train_epochs=epochs,
        warmup_steps=0.06, weight_decay=0.01, logging_steps=20, save_strategy="no", report_to=[], disable_tqdm=True,
        seed=0, **extra,
    )  # fmt: skip


def finetune_teacher(max_length: int, epochs: float, limit: int | None, out: Path) -> Path:
    """Fine-tune MiniLM (all 6 layers) on the Debian sections once; later runs reuse the saved folder."""
    if (out / "config.json").is_file():
        return out
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    model = AutoModelForSequenceClassification.from_pretrained(
        minilm_path(),
        num_labels=len(DEBIAN_SECTIONS),
        id2label=dict(enumerate(DEBIAN_SECTIONS)),
        label2id={s: i for i, s in enumerate(DEBIAN_SECTIONS)},
    )
    start = time.perf_counter()
    train = tokenized(tokenizer, "train", max_length, limit)
    Trainer(model=model, args=_training_args(TrainingArguments, out, epochs, 1e-4), train_dataset=train,
            processing_class=tokenizer).train()  # fmt: skip
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "time.json").write_text(json.dumps({"train_s": time.perf_counter() - start}))
    return out


def train_student(name: str, teacher_dir: Path, max_length: int, epochs: float, limit: int | None, out: Path) -> Path:
    """Train one student variant once (cached in `out`): 3 of the teacher's 6 layers, distilled or labels only."""
    if (out / "result.json").is_file():
        return out
    init, distil = VARIANTS[name]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    torch.manual_seed(0)
    if init == "make_student":
        student = make_student(teacher, num_layers=3)
    else:
        config = AutoConfig.from_pretrained(teacher_dir, num_hidden_layers=3)
        student = AutoModelForSequenceClassification.from_config(config)
    train = tokenized(tokenizer, "train", max_length, limit)
    lr = 2e-4 if init == "make_student" else 5e-4
    start = time.perf_counter()
    if distil:
        args = _training_args(DistillationArguments, out, epochs, lr, alpha_kl=1.0, temperature=2.0,
                              alpha_task=0.5, alpha_cos=1.0, layer_map="uniform")  # fmt: skip
        trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=train,
                                      processing_class=tokenizer)  # fmt: skip
    else:
        args = _training_args(TrainingArguments, out, epochs, lr)
        trainer = Trainer(model=student, args=args, train_dataset=train, processing_class=tokenizer)
    trainer.train()
    seconds = time.perf_counter() - start
    student.save_pretrained(out)
    logs = [h for h in trainer.state.log_history if "loss" in h or "train_loss" in h]
    (out / "result.json").write_text(json.dumps({"train_s": seconds, "logs": logs}))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.distillation", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="little data, few steps (smoke run)")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per training/test text")
    parser.add_argument("--teacher-epochs", type=float, default=1.0)
    parser.add_argument("--student-epochs", type=float, default=1.0)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="only train this student, print nothing")
    parser.add_argument("--recovery", action="store_true", help="the recovery-distillation figure instead")
    parser.add_argument("--recovery-steps", type=int, default=120, help="training steps of the recovery run")
    parser.add_argument("--train-threads", type=int, default=1, help="threads for training (1: busy machine)")
    args = parser.parse_args(argv)
    if args.recovery:
        from bench.distillation_recovery import main as recovery_main

        return recovery_main(fast=args.fast, steps=args.recovery_steps)
    torch.set_num_threads(args.train_threads)
    limit = 256 if args.fast else None
    tag = f"len{args.max_length}{'-fast' if args.fast else ''}"
    teacher_epochs = 0.5 if args.fast else args.teacher_epochs
    teacher_dir = finetune_teacher(args.max_length, teacher_epochs, limit, CACHE / f"teacher-{tag}-ep{teacher_epochs}")
    names = [args.variant] if args.variant else list(VARIANTS)
    student_dirs = {
        name: train_student(
            name, teacher_dir, args.max_length, args.student_epochs, limit,
            CACHE / f"student-{name.replace(' ', '_').replace(',', '')}-{tag}-ep{args.student_epochs}",
        )
        for name in names
    }  # fmt: skip
    if args.variant:
        return None

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    test = tokenized(tokenizer, "test", args.max_length, 128 if args.fast else None)
    models = {"teacher (6 layers)": AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()}
    for name, folder in student_dirs.items():
        models[f"student: {name}"] = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    folders = {"teacher (6 layers)": teacher_dir, **{f"student: {n}": d for n, d in student_dirs.items()}}
    acc = {name: cached_accuracy(model, test, tokenizer, folders[name]) for name, model in models.items()}

    torch.set_num_threads(2)
    batch = tokenizer(["x"] * 32, padding="max_length", max_length=128, return_tensors="pt")

    def forward(model):
        return lambda: model(**batch)

    with bench_lock(), torch.inference_mode():
        latency = time_alternately(
            {n: forward(m) for n, m in models.items()}, rounds=3 if args.fast else 9, reference="teacher (6 layers)"
        )
    teacher_name = "teacher (6 layers)"
    rows = []
    for name, model in models.items():
        folder = student_dirs.get(name.removeprefix("student: "))
        train_s = json.loads((folder or teacher_dir).joinpath("result.json" if folder else "time.json").read_text())
        rows.append({
            "model": name,
            "params (M)": count_parameters(model) / 1e6,
            "test acc": f"{acc[name]:.4f}",
            "acc vs teacher": f"{acc[name] / acc[teacher_name]:.3f}",
            "latency vs teacher": f"{latency[name]:.3f}",
            "train (min)": f"{train_s['train_s'] / 60:.1f}",
        })  # fmt: skip
    title = (
        f"Debian sections, MiniLM teacher vs 3-layer students ({len(test)} test texts, max_length {args.max_length}; "
        "latency: batch 32 x 128, 2 threads, median of per-round ratios)"
    )
    print(format_table(rows, title=title))


if __name__ == "__main__":
    main()
