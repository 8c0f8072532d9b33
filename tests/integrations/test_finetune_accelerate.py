"""`examples/finetune_text_classification.py` under a real 2-process `accelerate launch` (CPU, gloo DDP).

Every optimizer step sees the whole (small) training set, split over the processes, and dropout is off, so the
2-process run must reach the same model as a 1-process run with the same global batch: DDP averages the two
half-batch gradients into the full-batch gradient. That is a much sharper check than comparing accuracies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import hf_compress
from hf_compress import get_recipe
from hf_compress.data import load_debian
from hf_compress.pruning import EmptyAttention, HeadPruningConfig


EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "finetune_text_classification.py"
TRAIN_ROWS = 48  # --per-section 4 over 12 sections
COMMON = ["--per-section", "4", "--test-per-section", "4", "--epochs", "6", "--max-length", "48",
          "--learning-rate", "3e-3", "--save-steps", "3", "--seed", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory, minilm_dir) -> Path:
    """A small BERT with MiniLM's vocabulary, heads pruned (layer 1 entirely), dropout off, saved with its tokenizer."""
    path = tmp_path_factory.mktemp("pruned")
    config = AutoConfig.for_model(
        "bert", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        vocab_size=30522, max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModel.from_config(config)
    hf_compress.apply_compression(model, HeadPruningConfig(heads_to_prune={0: [2], 1: [0, 1, 2, 3]}))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir).save_pretrained(path)
    return path


def _run(command: list[str], output_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_COMPRESS_QUIET": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return json.loads((output_dir / "metrics.json").read_text())


def _launch(checkpoint: Path, output_dir: Path, processes: int, per_device_batch: int) -> dict:
    script = [str(EXAMPLE), "--model", str(checkpoint), "--output-dir", str(output_dir),
              "--per-device-batch-size", str(per_device_batch), *COMMON]  # fmt: skip
    if processes == 1:
        return _run([sys.executable, *script], output_dir)
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    launch = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517"]  # fmt: skip
    return _run([*launch, *script], output_dir)


def _test_inputs(tokenizer) -> dict:
    texts = [row["text"] for row in load_debian("test", per_section=4)]
    return tokenizer(texts, truncation=True, max_length=48, padding=True, return_tensors="pt")


def test_two_process_run_matches_one_process_run(pruned_checkpoint, tmp_path):
    one = _launch(pruned_checkpoint, tmp_path / "one", processes=1, per_device_batch=TRAIN_ROWS)
    two = _launch(pruned_checkpoint, tmp_path / "two", processes=2, per_device_batch=TRAIN_ROWS // 2)
    assert (one["num_processes"], two["num_processes"]) == (1, 2)
    assert one["recipe"] == two["recipe"] == [t.to_dict() for t in get_recipe(
        AutoModel.from_pretrained(pruned_checkpoint)).techniques]  # fmt: skip

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "two" / "final")
    inputs = _test_inputs(tokenizer)
    labels = torch.tensor([row["label"] for row in load_debian("test", per_section=4)])
    logits, models = {}, {}
    for name, metrics in (("one", one), ("two", two)):
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / name / "final").eval()
        assert isinstance(model.bert.encoder.layer[1].attention.self, EmptyAttention)
        assert model.bert.encoder.layer[0].attention.self.query.out_features == 3 * 8
        with torch.no_grad():
            logits[name] = model(**inputs).logits
        models[name] = model
        # the reloaded model scores what the training run reported
        accuracy = (logits[name].argmax(-1) == labels).float().mean().item()
        assert accuracy == pytest.approx(metrics["eval_accuracy"])

    # DDP over gloo reproduces single-process training up to float summation order.
    torch.testing.assert_close(logits["two"], logits["one"], rtol=1e-3, atol=1e-3)
    assert one["eval_accuracy"] == two["eval_accuracy"]
    # ...and training did move the weights (6 full-batch steps at a high learning rate).
    initial = AutoModel.from_pretrained(pruned_checkpoint)
    moved = (models["two"].bert.encoder.layer[0].attention.self.query.weight
             - initial.encoder.layer[0].attention.self.query.weight).abs().max()  # fmt: skip
    assert moved > 1e-3
    # checkpoints written during the 2-process run (main process only) are complete compressed models
    checkpoint = AutoModelForSequenceClassification.from_pretrained(tmp_path / "two" / "checkpoint-3")
    assert get_recipe(checkpoint) == get_recipe(models["two"])
    assert isinstance(checkpoint.bert.encoder.layer[1].attention.self, EmptyAttention)
