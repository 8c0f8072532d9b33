"""Smoke test of `python -m bench.perplexity --quick`: a tiny GPT-2-style model trained on Debian train texts, its
held-out perplexity in fp32 and int8, and the training cache."""

from __future__ import annotations

import math

import pytest


pytest.importorskip("tokenizers")

from bench import perplexity as bench  # noqa: E402
from bench.lm import QUICK_SPECS, debian_texts, train_or_load  # noqa: E402


def test_quick_perplexity_bench(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_COMPRESS_BENCH_CACHE", str(tmp_path))
    rows = bench.main(["--quick", "--models", "gpt2", "--variants", "int8 rtn", "--no-progress", "--threads", "1"])
    by_name = {row["variant"]: row for row in rows}
    fp32, int8 = by_name["fp32"]["ppl"], by_name["int8 rtn"]["ppl"]
    assert isinstance(fp32, float) and math.isfinite(fp32) and isinstance(int8, float) and math.isfinite(int8)
    vocab = QUICK_SPECS[0].vocab
    assert fp32 < 0.6 * vocab, f"the quick model learned nothing: ppl {fp32} vs uniform {vocab}"
    assert fp32 / 1.05 < int8 < fp32 * 1.05
    assert by_name["int8 rtn"]["bytes vs fp32"] < 0.5
    out = capsys.readouterr().out
    assert "| gpt2 | int8 rtn |" in out and "Machine:" in out and "fp32 held-out ppl" in out

    # Cached: the second call finds the checkpoint and does not train again.
    folder, record = train_or_load(QUICK_SPECS[0], root=tmp_path / "perplexity", progress=False)
    assert (folder / "training.json").is_file() and record["spec"]["family"] == "gpt2"


def test_held_out_texts_never_in_train():
    train = set(debian_texts("train"))
    test = debian_texts("test")
    assert len(test) > 1000 and not any(text in train for text in test)
