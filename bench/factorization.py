"""Low-rank factorization figures on MiniLM (all-MiniLM-L6-v2: 30522 x 384 token embedding, 6 FFNs 384 <-> 1536).

    python -m bench.factorization              # full run; takes the shared bench lock for the latency table
    python -m bench.factorization --fast       # smoke run: little data, two ranks, a few recovery steps

Table 1 (embedding factorization, no latency: the table lookup is not where time goes): for r in {64, 128, 192, 256},
parameters, bytes, mean / 5th-percentile cosine of mean-pooled sentence embeddings to fp32 and Debian probe accuracy,
for plain truncated SVD (no data), the data-aware initialisation (token-frequency-weighted SVD from unlabeled Debian
train texts) and data-aware + recovery distillation (`hf_compress.distillation.DistillationTrainer`, teacher = the
original MiniLM, hidden-state cosine + pooled-embedding cosine on unlabeled Debian train texts; only the two factors
train, everything else is frozen), with a wall-clock budget per rank.

Table 2 (low-rank FFN): activation-whitened factorization of every FFN projection at several retained-energy levels:
parameters, bytes, latency (batch 32 x 128, 2 threads, alternating rounds) and cosine.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
import warnings

import torch
from transformers import DataCollatorWithPadding, TrainerCallback

from bench.harness import BenchConfig, bench_lock, format_table, load_minilm, run_benchmark
from hf_compress import apply_compression
from hf_compress.data import load_debian
from hf_compress.factorization import EmbeddingFactorizationConfig, FactorizedEmbedding, LowRankLinearConfig


class _WallClockBudget(TrainerCallback):
    """Stop training once `seconds` of wall-clock time have passed (the budget the figures are quoted at)."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.start, self.steps = seconds, 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.steps = state.global_step
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True


def recover(student, teacher, tokenizer, texts, seconds: float, lr: float, max_length: int):
    """Recovery distillation of the factors only; returns (student, seconds spent, steps)."""
    from datasets import Dataset

    from hf_compress.distillation import DistillationArguments, DistillationTrainer

    for name, param in student.named_parameters():
        param.requires_grad_(".token_factor." in name or ".projection." in name)
    data = Dataset.from_dict(dict(tokenizer(texts, truncation=True, max_length=max_length)))
    args = DistillationArguments(
        output_dir=tempfile.mkdtemp(prefix="factorization-recovery-"), max_steps=100_000,
        per_device_train_batch_size=16, learning_rate=lr, warmup_steps=5, lr_scheduler_type="constant_with_warmup",
        weight_decay=0.0, alpha_kl=0.0, alpha_task=0.0, alpha_cos=1.0, alpha_pooled=1.0, report_to=[],
        save_strategy="no", logging_steps=100_000, disable_tqdm=True, use_cpu=True, seed=0,
    )  # fmt: skip
    budget = _WallClockBudget(seconds)
    trainer = DistillationTrainer(
        model=student.train(), teacher=teacher, args=args, train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer), callbacks=[budget],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.train()
    student.requires_grad_(True)
    return student.eval(), time.perf_counter() - start, budget.steps


def embedding_params(model) -> int:
    embedding = model.get_input_embeddings()
    if isinstance(embedding, FactorizedEmbedding):
        return sum(p.numel() for p in embedding.parameters())
    return embedding.weight.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="Smoke run: little data, two ranks, no latency.")
    parser.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 192, 256])
    parser.add_argument("--calibration", type=int, default=3000, help="Unlabeled train texts for token counts.")
    parser.add_argument("--recovery-seconds", type=float, default=100.0, help="Distillation budget per rank.")
    parser.add_argument("--recovery-lr", type=float, default=2e-3)
    parser.add_argument("--energies", type=float, nargs="+", default=[0.95, 0.99, 0.999])
    parser.add_argument("--no-ffn", action="store_true", help="Skip the low-rank FFN table.")
    parser.add_argument("--no-lock", action="store_true", help="Do not take the shared lock (already under flock).")
    args = parser.parse_args()
    config = BenchConfig(latency=False, disk=False)
    if args.fast:
        args.ranks, args.calibration, args.recovery_seconds, args.energies = [64, 128], 300, 15.0, [0.99]
        config = BenchConfig(latency=False, disk=False, fidelity_per_section=8, probe_train_per_section=16)
    torch.set_num_threads(2)
    base, tokenizer = load_minilm()
    train_texts = [row["text"] for row in load_debian("train")]
    calibration = train_texts[-args.calibration :]  # the probe trains on the first texts of each section
    recovery_texts = train_texts[-args.calibration :]

    variants, extra = [], {}
    for rank in args.ranks:
        plain = apply_compression(copy.deepcopy(base), EmbeddingFactorizationConfig(rank=rank, init="svd"))
        aware = apply_compression(
            copy.deepcopy(base), EmbeddingFactorizationConfig(rank=rank), calibration_data=calibration
        )
        recovered, seconds, steps = recover(
            copy.deepcopy(aware), base, tokenizer, recovery_texts, args.recovery_seconds, args.recovery_lr, 64
        )
        for name, model in (("SVD", plain), ("data-aware", aware), ("data-aware + recovery", recovered)):
            variants.append((f"r={rank} {name}", model))
            extra[f"r={rank} {name}"] = {
                "emb params (M)": embedding_params(model) / 1e6,
                "recovery": f"{steps} steps, {seconds:.0f} s" if "recovery" in name else "-",
            }
    config.extra_columns = extra
    rows = run_benchmark(variants, config, reference=("fp32", base), tokenizer=tokenizer)
    rows[0]["emb params (M)"] = embedding_params(base) / 1e6
    print(format_table(rows, title="Embedding factorization on MiniLM (Debian test texts)"), flush=True)

    if args.no_ffn:
        return
    ffn = []
    for energy in args.energies:
        model = copy.deepcopy(base)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            apply_compression(model, LowRankLinearConfig(energy=energy), calibration_data=calibration[:256])
        ranks = model.config.quantization_config.techniques[0].ranks
        note = f"{len(ranks)}/12 layers, ranks {min(ranks.values())}-{max(ranks.values())}"
        if caught:
            note += f" ({12 - len(ranks)} kept dense)"
        ffn.append((f"FFN energy {energy}", model, note))
    config = (
        BenchConfig(disk=False, probe=False) if not args.fast else BenchConfig(fidelity_per_section=8, probe=False)
    )
    config.extra_columns = {name: {"layers": note} for name, _, note in ffn}
    with bench_lock(not args.no_lock and not args.fast):
        rows = run_benchmark([(n, m) for n, m, _ in ffn], config, reference=("fp32", base), tokenizer=tokenizer)
    print(format_table(rows, title="Low-rank FFN (activation-whitened) on MiniLM, batch 32 x 128, 2 threads"))


if __name__ == "__main__":
    main()
