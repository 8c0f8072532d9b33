"""Full fine-tuning of compressed models with plain `Trainer`: the structure survives training, checkpoints,
resuming and `save_pretrained`."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import hf_compress
from hf_compress import get_recipe
from hf_compress.factorization import EmbeddingFactorizationConfig, LowRankLinearConfig
from hf_compress.pruning import EmptyAttention, FFNPruningConfig, HeadPruningConfig


NUM_LABELS = 3


pytestmark = pytest.mark.usefixtures("one_thread")


def _dataset(n: int = 48, seed: int = 0):
    """A learnable task: the label is which of three marker tokens the sequence contains."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, 9), generator=generator)
    labels = torch.arange(n) % NUM_LABELS
    ids[:, 4] = labels
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


class _StopAt(TrainerCallback):
    """Simulates a crash right after the checkpoint of step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _compressed(seed: int = 0):
    """A tiny BERT classifier with heads (one layer entirely), FFN neurons and the embedding all compressed."""
    model = tiny_model("bert", AutoModelForSequenceClassification, seed=seed, num_labels=NUM_LABELS)
    hf_compress.apply_compression(
        model,
        HeadPruningConfig(heads_to_prune={0: [1, 2], 1: [0, 1, 2, 3]}),
        FFNPruningConfig(fraction=0.5, importance="magnitude"),
        EmbeddingFactorizationConfig(rank=8),
    )
    return model.train()


def _args(output_dir, **overrides) -> TrainingArguments:
    defaults = dict(
        output_dir=str(output_dir), per_device_train_batch_size=8, num_train_epochs=2, learning_rate=3e-3,
        save_steps=6, logging_steps=6, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    return TrainingArguments(**{**defaults, **overrides})


def _shapes(model) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def _logits(model, n: int = 6):
    ids = torch.tensor(_dataset(n, seed=1)["input_ids"])
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_trainer_trains_the_compressed_structure_and_saves_it(tmp_path):
    model = _compressed()
    shapes, recipe = _shapes(model), get_recipe(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = Trainer(model=model, args=_args(tmp_path / "run", num_train_epochs=8), train_dataset=_dataset())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < 0.8 * losses[0], f"the compressed model did not learn: {losses}"
    assert _shapes(model) == shapes, "training changed the compressed shapes"
    assert get_recipe(model) == recipe
    assert isinstance(model.bert.encoder.layer[1].attention.self, EmptyAttention)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert any("query" in n for n in changed) and any("classifier" in n for n in changed)

    trainer.save_model(tmp_path / "final")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    assert _shapes(reloaded) == shapes
    assert get_recipe(reloaded) == recipe
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)


def test_every_checkpoint_is_a_loadable_compressed_model(tmp_path):
    model = _compressed()
    Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset()).train()
    checkpoint = get_last_checkpoint(str(tmp_path))
    assert checkpoint.endswith("checkpoint-12")
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert get_recipe(reloaded) == get_recipe(model)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)


def test_resume_from_checkpoint_reaches_the_uninterrupted_result(tmp_path):
    straight = _compressed()
    Trainer(model=straight, args=_args(tmp_path / "straight"), train_dataset=_dataset()).train()

    # An interrupted run: it stops right after the checkpoint of step 6 (of 12)...
    interrupted = _compressed()
    Trainer(
        model=interrupted, args=_args(tmp_path / "resumed"), train_dataset=_dataset(), callbacks=[_StopAt(6)]
    ).train()
    assert get_last_checkpoint(str(tmp_path / "resumed")).endswith("checkpoint-6")
    # ...then a new process rebuilds the compressed model from the checkpoint on disk and resumes.
    checkpoint = tmp_path / "resumed" / "checkpoint-6"
    resumed = AutoModelForSequenceClassification.from_pretrained(checkpoint).train()
    Trainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=_dataset()).train(
        resume_from_checkpoint=str(checkpoint)
    )
    for (name, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{name} differs after resuming")


def test_low_rank_layers_train_as_two_factors(tmp_path):
    model = tiny_model("bert", AutoModelForSequenceClassification, num_labels=NUM_LABELS)
    hf_compress.apply_compression(model, LowRankLinearConfig(rank=4, target_modules=["intermediate.dense"]))
    factor_names = [n for n, _ in model.named_parameters() if "intermediate.dense" in n]
    assert factor_names and not any(n.endswith("intermediate.dense.weight") for n in factor_names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(model=model.train(), args=_args(tmp_path, max_steps=4), train_dataset=_dataset()).train()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in factor_names)
    model.save_pretrained(tmp_path / "final")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "final")
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)
