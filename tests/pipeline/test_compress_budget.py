"""Budget mode (target size -> settings with the best measured fidelity) and the distil preset end to end."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel

from hf_compress import compress
from hf_compress.pipeline.budget import parse_budget, search_budget
from hf_compress.plugin import get_recipe


@given(st.floats(min_value=1.01, max_value=1e3), st.integers(min_value=10**3, max_value=10**10))
def test_reduction_factor(factor, original):
    assert parse_budget(f"{factor}x", original) == int(original / float(f"{factor}"))


@pytest.mark.parametrize("text, expected", [("12", 12_000_000), ("12MB", 12_000_000), ("2.5 mb", 2_500_000), (7, 7e6)])
def test_megabytes(text, expected):
    assert parse_budget(text, 10**9) == expected


@pytest.mark.parametrize("text", ["", "ten", "-3", "0", "0.5x", "1x", "12GB"])
def test_bad_budgets(text):
    with pytest.raises(ValueError, match="budget|reduction factor"):
        parse_budget(text, 10**9)


@pytest.fixture(scope="module")
def small_bert(minilm_tokenizer):
    """A small random BERT with MiniLM's vocabulary, so real text and the embedding table matter as in MiniLM."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=256, vocab_size=minilm_tokenizer.vocab_size)  # fmt: skip
    return AutoModel.from_config(config).eval()


def test_budget_search_meets_the_target_and_explains_its_choice(small_bert, minilm_tokenizer, debian_texts):
    configs, choice = search_budget(small_bert, "6x", calibration_data=debian_texts[:32], eval_texts=debian_texts[:16],
                                    tokenizer=minilm_tokenizer, max_measured=2)  # fmt: skip
    assert choice["target_bytes"] == int(choice["original_bytes"] / 6)
    assert len(choice["candidates"]) == 2
    best = max((c for c in choice["candidates"] if c["fits"]), key=lambda c: c["cosine"])
    assert choice["chosen"] == best["name"] and best["bytes"] <= choice["target_bytes"]
    for cand in choice["candidates"]:  # the size estimate follows the real storage format
        assert cand["estimated_bytes"] == pytest.approx(cand["bytes"], rel=0.05)
    assert "chose" in choice["summary"] and [c.method for c in configs][-1] == "weight_quantization"


def test_impossible_budget_is_explained(small_bert, minilm_tokenizer, debian_texts):
    with pytest.raises(ValueError, match="No setting reaches"):
        search_budget(small_bert, "1000x", calibration_data=debian_texts[:8], eval_texts=None,
                      tokenizer=minilm_tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="calibration_data"):
        search_budget(small_bert, "2x", calibration_data=None, eval_texts=None, tokenizer=minilm_tokenizer)


def test_distil_preset_prunes_factorizes_distils_and_quantizes(small_bert, minilm_tokenizer, debian_texts, tmp_path):
    import copy

    model = copy.deepcopy(small_bert)
    result = compress(model, preset="distil", tokenizer=minilm_tokenizer, calibration_data=debian_texts[:16],
                      eval_data=debian_texts[:8], distill={"max_steps": 1, "batch_size": 8}, latency_rounds=0,
                      output_dir=tmp_path / "out")  # fmt: skip
    methods = [t.method for t in get_recipe(result.model).techniques]
    assert methods == ["head_pruning", "embedding_factorization", "weight_quantization"]
    assert result.report.after["bytes"] < 0.25 * result.report.before["bytes"]
    assert (tmp_path / "out" / "plots" / "head_importance.png").is_file()
    assert "![head importance](plots/head_importance.png)" in (tmp_path / "out" / "README.md").read_text()
