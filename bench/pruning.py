"""Head / FFN-neuron pruning figures on MiniLM (all-MiniLM-L6-v2, 6 layers x 12 heads) with Debian package texts.

    python -m bench.pruning             # full run (85 min on the shared 2-core machine at load ~15); locks for timing
    python -m bench.pruning --fast      # smoke run on little data, no latency

Table 1: at 1/3 of heads removed (24 of 72), data-driven importance (Michel et al. mask gradients, with the
self-supervised output-sensitivity proxy since MiniLM has no task head) against weight magnitude and random pruning
(3 seeds), on embedding fidelity to fp32 and Debian-section probe accuracy. No recovery training here: it compares
the rankings themselves.

Table 2: parameters and measured latency as the removed share grows (0, 1/6, 1/3, 1/2 of heads; 25 % and 50 % of FFN
neurons), each right after pruning and after a short recovery distillation (`hf_compress.distillation.
DistillationTrainer`, teacher = the original MiniLM, hidden-state cosine + pooled-embedding cosine on unlabeled
Debian train texts), plus gradual pruning (`GradualPruningCallback`) during the same distillation budget.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
from transformers import DataCollatorWithPadding

from bench.harness import BenchConfig, bench_lock, format_table, load_minilm, run_benchmark
from hf_compress import apply_compression
from hf_compress.data import load_debian
from hf_compress.distillation import DistillationArguments, DistillationTrainer
from hf_compress.pruning import (
    FFNPruningConfig,
    GradualPruningCallback,
    HeadPruningConfig,
    compute_importance,
    kept_heads,
)
from hf_compress.pruning.hooks import plan_heads


def calibration_texts(count: int) -> list[str]:
    """Balanced unlabeled train texts (the probe's test split is never used for scoring or recovery)."""
    rows = load_debian("train")
    return [r["text"] for r in rows[:: max(1, len(rows) // count)][:count]]


def pruned(base, calib, *configs):
    model = copy.deepcopy(base)
    start = time.perf_counter()
    apply_compression(model, *configs, calibration_data=calib)
    return model.eval(), time.perf_counter() - start


def recover(model, teacher, tokenizer, texts, steps: int, callbacks=()):
    """Short recovery distillation from the original model on unlabeled texts; returns seconds spent."""
    from datasets import Dataset

    data = Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=128)))
    args = DistillationArguments(
        output_dir=tempfile.mkdtemp(prefix="prune-recovery-"), max_steps=steps, per_device_train_batch_size=16,
        learning_rate=1e-4, warmup_steps=max(1, steps // 10), lr_scheduler_type="linear", alpha_kl=0.0,
        alpha_task=0.0, alpha_cos=1.0, alpha_pooled=1.0, report_to=[], save_strategy="no", logging_steps=10_000,
        disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    model.requires_grad_(True)
    trainer = DistillationTrainer(
        model=model.train(), teacher=teacher, args=args, train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer), callbacks=list(callbacks),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    return model.eval(), time.perf_counter() - start


def head_variant(base, fraction: float, scores=None, **kwargs):
    """`base` with `fraction` of its heads removed; `scores` (precomputed gradient importance) are reused across
    fractions, which is exactly what `apply_compression` would compute again for each one."""
    if scores is None:
        return pruned(base, None, HeadPruningConfig(fraction=fraction, **kwargs))
    model = copy.deepcopy(base)
    start = time.perf_counter()
    config = HeadPruningConfig(fraction=fraction, importance="gradient")
    plan = plan_heads(model, kept_heads(model), scores, round(fraction * heads_left(model)), config)
    apply_compression(model, HeadPruningConfig(heads_to_prune=plan, importance="gradient"))
    return model.eval(), time.perf_counter() - start


def heads_left(model) -> int:
    return sum(map(len, kept_heads(model)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="Smoke run: little data, few steps, no latency.")
    parser.add_argument("--calibration", type=int, default=64, help="Unlabeled train texts used for scoring.")
    parser.add_argument("--recovery-steps", type=int, default=24, help="Distillation steps (batch 16) per variant.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds of the random baseline.")
    parser.add_argument("--no-lock", action="store_true", help="Do not take the shared lock (already under flock).")
    args = parser.parse_args()
    if args.fast:
        args.calibration, args.recovery_steps, args.seeds = 32, 4, [0, 1]
    torch.set_num_threads(2)
    base, tokenizer = load_minilm()
    calib = calibration_texts(args.calibration)
    recovery_texts = calibration_texts(args.recovery_steps * 16)
    # Smaller evaluation sets than the harness default: 2 CPU cores are shared by several engineers.
    measure = BenchConfig(latency=False, disk=False, fidelity_per_section=25, probe_train_per_section=50)
    if args.fast:
        measure.fidelity_per_section, measure.probe_train_per_section = 8, 16

    # -- Table 1: rankings at 1/3 of heads -------------------------------------------------------------------------
    start = time.perf_counter()
    head_scores = compute_importance(base, "heads", "gradient", calib, max_samples=args.calibration)
    gradient_seconds = time.perf_counter() - start
    variants, seconds = [], {}
    for name, kwargs in [
        ("gradient (Michel, output proxy)", None),
        ("magnitude", {"importance": "magnitude"}),
        *[(f"random seed {s}", {"importance": "random", "seed": s}) for s in args.seeds],
    ]:
        if kwargs is None:
            model, spent = head_variant(base, 1 / 3, head_scores)
            spent += gradient_seconds
        else:
            model, spent = head_variant(base, 1 / 3, **kwargs)
        variants.append((name, model))
        seconds[name] = spent
    rows = run_benchmark(variants, measure, reference=("fp32 (72 heads)", base), tokenizer=tokenizer)
    for row in rows[1:]:
        row["heads kept"] = heads_left(dict(variants)[row["variant"]])
        row["ranking time (s)"] = seconds[row["variant"]]
    randoms = [r for r in rows if r["variant"].startswith("random")]
    rows.append(
        {"variant": f"random mean of {len(randoms)}"}
        | {k: statistics.mean(r[k] for r in randoms) for k in ("cos mean", "cos p5", "probe acc")}
    )
    keep = ("variant", "heads kept", "cos mean", "cos p5", "probe acc", "ranking time (s)")
    print(format_table([{k: r.get(k) for k in keep} for r in rows], "1/3 of heads removed: importance methods"))
    print()
    del variants, model

    # -- Table 2: removed share vs size and speed, before and after recovery -------------------------------------------
    teacher = copy.deepcopy(base)  # the trainer freezes its teacher in place: keep `base` trainable for the copies
    plans = [
        ("heads 1/6", lambda: head_variant(base, 1 / 6, head_scores)),
        ("heads 1/3", lambda: head_variant(base, 1 / 3, head_scores)),
        ("heads 1/2", lambda: head_variant(base, 1 / 2, head_scores)),
        ("FFN 25%", lambda: pruned(base, calib, FFNPruningConfig(fraction=0.25, max_samples=args.calibration))),
        ("FFN 50%", lambda: pruned(base, calib, FFNPruningConfig(fraction=0.5, max_samples=args.calibration))),
    ]
    variants, extra = [], {}
    for name, make in plans:
        model, _ = make()
        variants.append((name, model))
        extra[name] = {"heads kept": heads_left(model), "recovery (s)": None}
        recovered, spent = recover(copy.deepcopy(model), teacher, tokenizer, recovery_texts, args.recovery_steps)
        variants.append((name + " + recovery", recovered))
        extra[name + " + recovery"] = {"heads kept": heads_left(recovered), "recovery (s)": spent}
    gradual = copy.deepcopy(base)
    callback = GradualPruningCallback(HeadPruningConfig(fraction=1 / 3), num_pruning_steps=4)
    gradual, spent = recover(gradual, teacher, tokenizer, recovery_texts, args.recovery_steps, [callback])
    variants.append(("heads 1/3 gradual (callback)", gradual))
    extra["heads 1/3 gradual (callback)"] = {"heads kept": heads_left(gradual), "recovery (s)": spent}
    # Table 2 is about size and speed: fidelity on 240 test texts, no probe (table 1 has the probe).
    measure = BenchConfig(latency=not args.fast, probe=False, fidelity_per_section=20, extra_columns=extra)
    if args.fast:
        measure.fidelity_per_section, measure.probe_train_per_section = 8, 16
    with bench_lock(not args.no_lock and not args.fast):
        rows = run_benchmark(variants, measure, reference=("fp32 (0 removed)", base), tokenizer=tokenizer)
    rows[0]["heads kept"] = heads_left(base)
    keep = ("variant", "heads kept", "params (M)", "disk (MB)", "latency vs fp32", "cos mean", "cos p5",
            "recovery (s)")  # fmt: skip
    print(
        format_table(
            [{k: r.get(k) for k in keep} for r in rows],
            f"Removed share vs size and speed ({args.recovery_steps} recovery distillation steps of 16 texts)",
        )
    )


if __name__ == "__main__":
    main()
