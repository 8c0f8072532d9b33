"""Recovery distillation: MiniLM with 1/3 of its heads pruned and r = 128 embeddings, distilled from the original.

    python -m bench.distillation --recovery [--fast]

The compressed model is trained to reproduce the original's hidden states and sentence embeddings on unlabeled
Debian package descriptions (no labels are used). Fidelity is the harness's: cosine between mean-pooled sentence
embeddings of the compressed and the original model on Debian test texts (max_length 128). The compression and
the training each run under the shared benchmark lock (one hold per phase), with 2 threads.
"""

from __future__ import annotations

import copy
import tempfile
import time

import numpy as np
import torch
from transformers import AutoModel

from bench.harness import bench_lock, embed, format_table, load_minilm
from hf_compress import apply_compression
from hf_compress.data import load_debian
from hf_compress.distillation import DistillationArguments, DistillationTrainer
from hf_compress.factorization import EmbeddingFactorizationConfig
from hf_compress.pruning import HeadPruningConfig
from hf_compress.utils import count_parameters


def _fidelity(model, reference: torch.Tensor, tokenizer, texts) -> tuple[float, float]:
    cos = torch.nn.functional.cosine_similarity(embed(model.eval(), tokenizer, texts), reference, dim=-1).numpy()
    return float(cos.mean()), float(np.percentile(cos, 5))


def main(fast: bool = False, steps: int = 120, batch_size: int = 16, max_length: int = 64, lock=bench_lock) -> None:
    from datasets import Dataset

    teacher, tokenizer = load_minilm()
    train_texts = [r["text"] for r in load_debian("train")]
    test_texts = [r["text"] for r in load_debian("test", per_section=8 if fast else 40)]
    reference = embed(teacher, tokenizer, test_texts)

    with lock():
        start = time.perf_counter()
        student = apply_compression(
            copy.deepcopy(teacher),
            HeadPruningConfig(fraction=1 / 3),
            EmbeddingFactorizationConfig(rank=128),
            calibration_data=train_texts[:256],
        )
        compress_s = time.perf_counter() - start
    rows = [{"model": "original MiniLM", "params (M)": f"{count_parameters(teacher) / 1e6:.2f}",
             "cos mean": "1.00000", "cos p5": "1.00000", "time (min)": "-"}]  # fmt: skip
    before = _fidelity(student, reference, tokenizer, test_texts)
    params = f"{count_parameters(student) / 1e6:.2f}"
    rows.append({"model": "1/3 heads pruned + r=128 embeddings", "params (M)": params,
                 "cos mean": f"{before[0]:.5f}", "cos p5": f"{before[1]:.5f}", "time (min)": f"{compress_s / 60:.1f}"})  # fmt: skip
    print(f"before distillation: cos mean {before[0]:.5f}, p5 {before[1]:.5f}", flush=True)

    unlabeled = train_texts[256 : 256 + (64 if fast else steps * batch_size)]  # texts not used for calibration
    data = Dataset.from_dict(dict(tokenizer(unlabeled, truncation=True, max_length=max_length)))
    with tempfile.TemporaryDirectory() as out:
        args = DistillationArguments(
            output_dir=out, max_steps=4 if fast else steps, per_device_train_batch_size=batch_size,
            learning_rate=2e-4, warmup_steps=0.1, logging_steps=10, save_strategy="no", report_to=[],
            disable_tqdm=True, seed=0, alpha_kl=0.0, alpha_task=0.0, alpha_cos=1.0, alpha_pooled=1.0,
        )  # fmt: skip
        trainer = DistillationTrainer(
            model=student, teacher=teacher, args=args, train_dataset=data, processing_class=tokenizer
        )
        with lock():
            start = time.perf_counter()
            trainer.train()
            train_s = time.perf_counter() - start
        student.save_pretrained(out + "/student")
        reloaded = AutoModel.from_pretrained(out + "/student")  # the recovered model reloads with its recipe
    after = _fidelity(reloaded, reference, tokenizer, test_texts)
    rows.append({"model": f"... + distilled ({args.max_steps} steps x {batch_size} unlabeled texts)", "params (M)": params,
                 "cos mean": f"{after[0]:.5f}", "cos p5": f"{after[1]:.5f}", "time (min)": f"{train_s / 60:.1f}"})  # fmt: skip
    title = (
        f"Recovery distillation on MiniLM ({len(test_texts)} Debian test texts, mean-pooled embeddings vs original)"
    )
    print(format_table(rows, title=title))
