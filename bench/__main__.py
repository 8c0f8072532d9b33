"""The baseline benchmark: fp32 MiniLM (and a bf16 cast, the reference every technique must beat).

python -m bench            # full run (a few minutes on 2 CPU cores)
python -m bench --fast     # smoke run on less data
"""

from __future__ import annotations

import argparse
import copy

import torch

from bench.harness import BenchConfig, format_table, load_minilm, run_benchmark


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="less data and fewer timing rounds (smoke run)")
    parser.add_argument("--no-bf16", action="store_true", help="only the fp32 row")
    args = parser.parse_args(argv)
    config = BenchConfig()
    if args.fast:
        config = BenchConfig(fidelity_per_section=8, probe_train_per_section=16, latency_rounds=3)
    model, tokenizer = load_minilm()
    variants = [] if args.no_bf16 else [("bf16 cast", lambda: copy.deepcopy(model).to(torch.bfloat16))]
    rows = run_benchmark(variants, config, reference=("fp32", model), tokenizer=tokenizer)
    print(format_table(rows, title="MiniLM-L6 baseline (batch 32 x 128, 2 threads)"))


if __name__ == "__main__":
    main()
