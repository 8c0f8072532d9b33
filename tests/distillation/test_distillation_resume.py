"""Recovery distillation of a compressed student, and exact resumption from a Trainer checkpoint."""

from __future__ import annotations

import copy
import json

import _toy_technique
import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from transformers import AutoModelForSequenceClassification

from hf_compress import apply_compression, get_recipe
from hf_compress.distillation import DistillationArguments, DistillationTrainer


pytestmark = pytest.mark.usefixtures("one_thread")


def teacher_model(**overrides):
    teacher = tiny_model("bert", AutoModelForSequenceClassification, num_labels=3, num_hidden_layers=2, seed=1,
                         **overrides)  # fmt: skip
    with torch.no_grad():  # make the FFNs matter, so slicing them (the toy compression) really costs fidelity
        for layer in teacher.bert.encoder.layer:
            layer.output.dense.weight.mul_(8)
    return teacher


def student_model(kind: str, teacher):
    if kind == "recovery":  # the teacher itself, compressed: it must win back what compression lost
        return apply_compression(copy.deepcopy(teacher).train(), _toy_technique.ToyFFNSliceConfig(keep=8))
    # A narrower student: the learned width projections must be checkpointed too.
    return tiny_model("bert", AutoModelForSequenceClassification, num_labels=3, hidden_size=16, intermediate_size=32)


def data() -> Dataset:
    ids = torch.randint(5, 128, (40, 9), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist()})


def run(kind: str, output_dir, resume=None, teacher_overrides=None, **overrides):
    teacher = teacher_model(**(teacher_overrides or {}))
    student = student_model(kind, teacher)
    settings = dict(
        output_dir=str(output_dir), max_steps=10, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=2,
        save_strategy="steps", save_steps=4, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        alpha_kl=1.0, alpha_task=0.5, alpha_cos=1.0, alpha_mse=0.5,
    )  # fmt: skip
    args = DistillationArguments(**{**settings, **overrides})
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize("kind", ["recovery", "projections"])
def test_resume_continues_to_the_same_result(tmp_path, kind):
    full = run(kind, tmp_path / "full")
    checkpoint = tmp_path / "full" / "checkpoint-4"
    resumed = run(kind, tmp_path / "resumed", resume=str(checkpoint))
    assert resumed.state.global_step == full.state.global_step == 10
    full_state, resumed_state = full.model.state_dict(), resumed.model.state_dict()
    assert full_state.keys() == resumed_state.keys()
    for name, tensor in full_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    if kind == "projections":
        for name, tensor in full.projections.state_dict().items():
            torch.testing.assert_close(resumed.projections.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)
    # Same logged losses (and per-term values) after the checkpoint as in the uninterrupted run.
    tail = {h["step"]: h for h in full.state.log_history if "loss" in h and h["step"] > 4}
    resumed_tail = {h["step"]: h for h in resumed.state.log_history if "loss" in h and h["step"] > 4}
    assert resumed_tail.keys() == tail.keys() == {6, 8, 10}
    for step, log in tail.items():
        for key in ("loss", "loss_kl", "loss_task", "loss_cos", "loss_mse"):
            assert resumed_tail[step][key] == pytest.approx(log[key], rel=1e-4), (step, key)


def test_recovery_checkpoint_holds_the_compressed_student_and_its_recipe(tmp_path):
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    trainer = run(
        "recovery",
        tmp_path,
        teacher_overrides=no_dropout,
        alpha_task=0.0,
        alpha_mse=0.0,
        learning_rate=2e-3,
        max_steps=40,
        save_steps=40,
    )
    checkpoint = tmp_path / "checkpoint-40"
    config = json.loads((checkpoint / "config.json").read_text())
    assert [t["method"] for t in config["quantization_config"]["techniques"]] == ["toy_ffn_slice"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    assert get_recipe(reloaded) == get_recipe(trainer.model)
    assert reloaded.bert.encoder.layer[0].intermediate.dense.out_features == 8
    probe = torch.arange(5, 14).reshape(1, 9)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=probe).logits, trainer.model.eval()(input_ids=probe).logits)
    # Distilling brought the compressed student closer to its teacher than it was right after compression.
    teacher = teacher_model(**no_dropout).eval()
    compressed = student_model("recovery", teacher).eval()
    batch = torch.tensor(data()["input_ids"])
    with torch.no_grad():
        target = teacher(input_ids=batch, output_hidden_states=True).hidden_states[-1]

        def distance(model):
            hidden = model(input_ids=batch, output_hidden_states=True).hidden_states[-1]
            return (1 - torch.nn.functional.cosine_similarity(hidden, target, dim=-1)).mean()

        assert distance(reloaded) < 0.8 * distance(compressed)
