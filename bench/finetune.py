"""Fine-tuning figures: 2-process DDP vs 1 process on a head-pruned MiniLM, and LoRA on int4 vs full fp32.

    python -m bench.finetune --part ddp    # the accelerate run reloads and scores like a single-process run
    python -m bench.finetune --part lora   # LoRA on int4 MiniLM vs full fp32 fine-tuning: accuracy and memory
    python -m bench.finetune --fast        # a smoke run of both on little data

Every training run is a fresh process (the real examples, launched as a user would), so peak resident memory
(``ru_maxrss``) is per run; each final model is reloaded here with plain ``from_pretrained`` and scored again.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import hf_compress
from hf_compress.data import load_debian, minilm_path
from hf_compress.pruning import HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(script: str, args: list[str], output_dir: Path, processes: int = 1, threads: int = 2) -> dict:
    """Run an example script (under ``accelerate launch`` for several processes); its metrics plus wall time."""
    command = [sys.executable, str(EXAMPLES / script), "--output-dir", str(output_dir), *args]
    if processes > 1:
        accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
        command = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", *command[1:]]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_COMPRESS_QUIET": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    metrics = json.loads((output_dir / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - start
    return metrics


@torch.no_grad()
def score(model, tokenizer, rows: list[dict], max_length: int) -> float:
    """Accuracy of a reloaded classifier on `rows`."""
    model.eval()
    correct = 0
    for i in range(0, len(rows), 64):
        batch = rows[i : i + 64]
        inputs = tokenizer([r["text"] for r in batch], truncation=True, max_length=max_length, padding=True,
                           return_tensors="pt")  # fmt: skip
        predicted = model(**inputs).logits.argmax(-1)
        correct += (predicted == torch.tensor([r["label"] for r in batch])).sum().item()
    return correct / len(rows)


def pruned_minilm(workdir: Path, fraction: float, calibration: int) -> Path:
    """MiniLM with `fraction` of its heads removed by data-driven importance, saved with its tokenizer."""
    path = workdir / "minilm-pruned"
    model = AutoModel.from_pretrained(minilm_path())
    texts = [r["text"] for r in load_debian("train", per_section=max(1, calibration // 12))]
    hf_compress.apply_compression(model, HeadPruningConfig(fraction=fraction, max_samples=calibration),
                                  calibration_data=texts)  # fmt: skip
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(path)
    return path


def part_ddp(workdir: Path, fast: bool) -> str:
    per_section, test_per_section, epochs = (8, 4, 1) if fast else (100, 60, 3)
    max_length = 64
    model = pruned_minilm(workdir, fraction=1 / 3, calibration=32 if fast else 128)
    common = ["--model", str(model), "--per-section", str(per_section), "--test-per-section", str(test_per_section),
              "--epochs", str(epochs), "--max-length", str(max_length), "--learning-rate", "1e-4",
              "--save-steps", "100000"]  # fmt: skip
    test_rows = load_debian("test", per_section=test_per_section)
    runs = [("1 process, batch 32", 1, 32, 42), ("2 processes x batch 16 (accelerate, gloo)", 2, 16, 42),
            ("1 process, batch 32, seed 43 (noise)", 1, 32, 43)]  # fmt: skip
    lines = ["| run | test accuracy (run) | accuracy after reload | train time (s) | peak RSS per process (MiB) |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, processes, batch, seed in runs:
        out = workdir / f"ddp-{processes}-{seed}"
        metrics = run_example("finetune_text_classification.py",
                              [*common, "--per-device-batch-size", str(batch), "--seed", str(seed)], out,
                              processes=processes, threads=1)  # fmt: skip
        reloaded = AutoModelForSequenceClassification.from_pretrained(out / "final")
        accuracy = score(reloaded, AutoTokenizer.from_pretrained(out / "final"), test_rows, max_length)
        lines.append(f"| {name} | {metrics['eval_accuracy']:.4f} | {accuracy:.4f} | {metrics['train_runtime']:.0f} "
                     f"| {metrics['peak_rss_mb']:.0f} |")  # fmt: skip
    n = len(test_rows)
    lines.append(f"\nHead-pruned MiniLM (1/3 of heads removed), Debian sections: {12 * per_section} train / {n} test "
                 f"texts, {epochs} epochs, max length {max_length}, 1 thread per process. Binomial standard error of one accuracy at "
                 f"~0.8 on {n} texts: {((0.8 * 0.2) / n) ** 0.5:.4f}.")  # fmt: skip
    return "\n".join(lines)


def part_lora(workdir: Path, fast: bool) -> str:
    per_section, test_per_section = (8, 4) if fast else (100, 60)
    common = ["--per-section", str(per_section), "--test-per-section", str(test_per_section), "--max-length", "64",
              "--save-steps", "100000", "--per-device-batch-size", "32"]  # fmt: skip
    full_epochs, lora_epochs = ("1", "1") if fast else ("3", "3")
    runs = [
        ("full fine-tuning, fp32", "finetune_text_classification.py",
         ["--epochs", full_epochs, "--learning-rate", "1e-4"]),
        ("LoRA r=16 on int4 (g32) MiniLM", "lora_int4.py",
         ["--epochs", lora_epochs, "--learning-rate", "2e-3", "--bits", "4"]),
    ]  # fmt: skip
    lines = ["| run | test accuracy | trainable params | peak RSS (MiB) | RSS before training (MiB) | "
             "training memory = peak - before (MiB) | train time (s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, script, args in runs:
        out = workdir / f"lora-{script.split('.')[0]}"
        if script == "lora_int4.py":
            # Quantize beforehand (as a user would ship an int4 checkpoint): ru_maxrss is a high-water mark, and
            # quantizing inside the training process would count the fp32 model it starts from.
            model = AutoModel.from_pretrained(minilm_path())
            hf_compress.apply_compression(
                model, WeightQuantizationConfig(bits=4, group_size=32, compute_dtype="float32")
            )
            model.save_pretrained(out / "base-int4")
            AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out / "base-int4")
        metrics = run_example(script, [*common, *args], out, threads=1)
        trainable = metrics.get("trainable_parameters", "all")
        lines.append(f"| {name} | {metrics['eval_accuracy']:.4f} | {trainable} | {metrics['peak_rss_mb']:.0f} | "
                     f"{metrics['rss_before_training_mb']:.0f} | "
                     f"{metrics['peak_rss_mb'] - metrics['rss_before_training_mb']:.0f} | "
                     f"{metrics['train_runtime']:.0f} |")  # fmt: skip
    lines.append(f"\nMiniLM on the Debian sections: {12 * per_section} train texts, {12 * test_per_section} test "
                 "texts, batch 32, max length 64, 1 thread. Memory: peak resident set size (ru_maxrss) of each training "
                 "process over training and evaluation, which includes Python, torch and the data; the int4 backbone "
                 "is quantized beforehand, in another process.")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["ddp", "lora", "all"], default="all")
    parser.add_argument("--fast", action="store_true", help="Little data: a smoke run of the whole pipeline.")
    parser.add_argument("--workdir", default=None, help="Keep the trained models here (default: a temp folder).")
    args = parser.parse_args()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench-finetune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.part in ("ddp", "all"):
        print("## accelerate launch, 2 processes vs 1\n\n" + part_ddp(workdir, args.fast) + "\n", flush=True)
    if args.part in ("lora", "all"):
        print("## LoRA on int4 vs full fp32 fine-tuning\n\n" + part_lora(workdir, args.fast) + "\n", flush=True)


if __name__ == "__main__":
    main()
