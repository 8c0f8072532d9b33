"""Budget mode with a latency target, recovery by default, and task-aware recovery (issue #17)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

from hf_compress import compress
from hf_compress.cli import main
from hf_compress.pipeline.budget import candidates_table, parse_latency, search_budget


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("value, expected", [("0.5x", 0.5), ("0.5", 0.5), (0.25, 0.25), (" .8X ", 0.8), (1, 1.0)])
def test_latency_targets(value, expected):
    assert parse_latency(value) == expected


def _bert(tokenizer, cls=AutoModel, layers: int = 3, hidden: int = 64):
    torch.manual_seed(0)
    config = AutoConfig.for_model("bert", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=256, vocab_size=tokenizer.vocab_size, num_labels=3)  # fmt: skip
    return cls.from_config(config).eval()


def test_search_tries_fewer_layers_and_times_every_candidate(minilm_tokenizer, debian_texts):
    model = _bert(minilm_tokenizer)
    configs, choice = search_budget(model, "3x", calibration_data=debian_texts[:16], eval_texts=debian_texts[:8],
                                    tokenizer=minilm_tokenizer, latency="1x", latency_rounds=1,
                                    max_measured=2)  # fmt: skip
    assert choice["target_latency"] == 1.0 and set(choice["speed_probes"]) >= {"int8", "int8 + int8 activations"}
    assert all(c["latency"] > 0 and c["estimated_latency"] > 0 for c in choice["candidates"])
    chosen = next(c for c in choice["candidates"] if c["name"] == choice["chosen"])
    assert chosen["fits"] and chosen["latency"] <= 1.0 and chosen["bytes"] <= choice["target_bytes"]
    table = candidates_table(choice)
    assert table.count("\n") == len(choice["candidates"]) + 1 and "| chosen |" in table
    # the grid holds 2 of 3 and 1 of 3 layers (make_student) only with a speed target
    _, plain = search_budget(model, "3x", calibration_data=debian_texts[:16], eval_texts=debian_texts[:8],
                             tokenizer=minilm_tokenizer, max_measured=1, latency_rounds=0)  # fmt: skip
    assert choice["grid_size"] > 2 * plain["grid_size"] and plain["candidates"][0]["latency"] is None


def test_impossible_latency_names_the_best_found(minilm_tokenizer, debian_texts):
    with pytest.raises(ValueError, match=r"reaches latency 0.001x by estimate: the fastest is .*speed probes"):
        search_budget(_bert(minilm_tokenizer), "2x", calibration_data=debian_texts[:8], eval_texts=None,
                      tokenizer=minilm_tokenizer, latency="0.001x", latency_rounds=1)  # fmt: skip


def test_budget_mode_recovers_by_default_and_drops_layers_when_chosen(minilm_tokenizer, debian_texts, monkeypatch):
    import hf_compress.pipeline.budget.run as run
    import hf_compress.pipeline.recovery as recovery

    monkeypatch.setattr(recovery, "DEFAULT_RECOVERY", {"max_steps": 2, "batch_size": 8})
    real = run.search_budget

    def two_layers(*args, **kwargs):  # force the choice of fewer layers: timing a tiny model decides nothing
        configs, choice = real(*args, **kwargs)
        choice["chosen_settings"]["layers_kept"] = 2
        return configs, choice

    monkeypatch.setattr(run, "search_budget", two_layers)
    model = _bert(minilm_tokenizer)
    result = compress(model, budget="3x", latency="1x", tokenizer=minilm_tokenizer,
                      calibration_data=debian_texts[:24], eval_data=debian_texts[:8], latency_rounds=1)  # fmt: skip
    assert result.model is not model and result.model.config.num_hidden_layers == 2
    rec = result.report.recovery
    assert rec["max_steps"] == 2 and rec["steps"] == 2 and rec["train"] == "all" and rec["texts"] > 0
    assert "recovery (2 steps budget: 2 steps" in result.report.to_text()
    assert result.report.latency["ratio"] > 0 and result.report.choice["target_latency"] == 1.0


def test_task_data_trains_recovery_with_labels_and_reports_on_held_out_rows(minilm_tokenizer, debian_texts):
    rows = [{"text": t, "label": i % 3} for i, t in enumerate(debian_texts[:40])]
    teacher = _bert(minilm_tokenizer, AutoModelForSequenceClassification, layers=2, hidden=128)
    result = compress(copy.deepcopy(teacher), budget="8x", tokenizer=minilm_tokenizer, task_data=rows,
                      calibration_data=debian_texts[:16], eval_data=debian_texts[:8], latency_rounds=0,
                      distill={"max_steps": 2, "batch_size": 8})  # fmt: skip
    rec, task = result.report.recovery, result.report.task
    assert rec["task_loss"] and rec["labeled_rows"] == 32  # 4 of 5 rows train, the 5th is held out
    assert task["examples"] == 8 and "held_out" in task and "accuracy" in task["before"]
    assert result.report.choice["chosen_by"].startswith("task accuracy")
    assert all(c["task"] is not None for c in result.report.choice["candidates"])


def test_cli_latency_needs_a_budget(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["compress", "--preset", "int8", "--latency", "0.5x", "--calibration", "none", "--eval-texts", "none"])
    assert code == 2 and "latency='0.5x' is a target of budget mode" in capsys.readouterr().err
