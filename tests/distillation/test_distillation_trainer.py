"""DistillationTrainer on tiny models: frozen teacher, per-term logs, checks before training, projections."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import tiny_model
from datasets import Dataset
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, TrainingArguments

from hf_compress.distillation import DistillationArguments, DistillationTrainer, make_student
from hf_compress.distillation.trainer import PROJECTIONS_NAME


pytestmark = pytest.mark.usefixtures("one_thread")


def dataset(labels: bool = True, n: int = 48, seq: int = 10, pad: bool = True) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 128, (n, seq), generator=generator)
    mask = torch.ones_like(ids)
    if pad:
        mask[::3, seq // 2 :] = 0
    columns = {"input_ids": ids.tolist(), "attention_mask": mask.tolist()}
    if labels:
        columns["labels"] = (ids[:, 0] % 3).tolist()
    return Dataset.from_dict(columns)


def classifier_teacher(**overrides):
    teacher = tiny_model("bert", AutoModelForSequenceClassification, num_labels=3, num_hidden_layers=4, **overrides)
    with torch.no_grad():  # peaked outputs, so the soft targets carry information
        teacher.classifier.weight.mul_(30)
    return teacher


def args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=2e-3, logging_steps=4,
        report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    return DistillationArguments(**{**defaults, **kwargs})


def test_teacher_frozen_loss_decreases_and_terms_are_logged(tmp_path):
    teacher = classifier_teacher()
    before = copy.deepcopy(teacher.state_dict())
    student = make_student(teacher, num_layers=2)
    with torch.no_grad():  # start away from the teacher
        student.classifier.weight.normal_()
    data = dataset()
    with torch.no_grad():  # labels the teacher agrees with, so the task and soft-target terms pull the same way
        predicted = teacher(input_ids=torch.tensor(data["input_ids"])).logits.argmax(-1)
    data = data.remove_columns("labels").add_column("labels", predicted.tolist())
    trainer = DistillationTrainer(
        model=student, teacher=teacher, train_dataset=data,
        args=args(tmp_path, max_steps=24, alpha_mse=0.5, alpha_attn=0.5, alpha_pooled=0.5),
    )  # fmt: skip
    trainer.train()
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    logs = [h for h in trainer.state.log_history if "loss" in h]
    for log in logs:
        terms = [log[f"loss_{t}"] for t in ("kl", "task", "cos", "mse", "attn", "pooled")]
        assert sum(terms) == pytest.approx(log["loss"], rel=1e-4)  # weighted terms add up to the loss
    assert logs[-1]["loss_kl"] < logs[0]["loss_kl"] and logs[-1]["loss"] < logs[0]["loss"]
    assert logs[0]["loss_attn"] < 1.0  # attention dropout is off: no log(0) blow-up
    assert student.config._attn_implementation == "eager"


def test_sentence_embedding_student_distils_on_hidden_states(tmp_path):
    teacher = tiny_model("bert", AutoModel, num_hidden_layers=4)
    student = make_student(teacher, layers=[0])
    with pytest.warns(UserWarning, match="Ignoring alpha_kl .*no logits.*alpha_task"):
        trainer = DistillationTrainer(
            model=student, teacher=teacher, train_dataset=dataset(labels=False),
            args=args(tmp_path, alpha_pooled=1.0, layer_map="last"),
        )  # fmt: skip
    assert trainer.weights["kl"] == 0 and trainer.weights["task"] == 0 and trainer.layer_map == {1: 4}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert set(k for k in logs[0] if k.startswith("loss_")) == {"loss_cos", "loss_pooled"}
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_checks_before_training(tmp_path):
    teacher = classifier_teacher()
    student = make_student(teacher, num_layers=2)
    with pytest.raises(TypeError, match="args must be DistillationArguments"):
        DistillationTrainer(model=student, teacher=teacher, args=TrainingArguments(str(tmp_path), report_to=[]))
    with pytest.raises(ValueError, match="same object"):
        DistillationTrainer(model=student, teacher=student, args=args(tmp_path))
    with pytest.raises(ValueError, match=r"layer_map pairs \{3: 4\} are out of range"):
        DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path, layer_map={3: 4}))
    with pytest.raises(ValueError, match="alpha_task=1.0 needs labels"):
        DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path), train_dataset=dataset(labels=False))
    other = tiny_model("bert", AutoModelForSequenceClassification, num_labels=5)
    with pytest.raises(ValueError, match="student predicts over 5 labels and the teacher over 3 labels"):
        DistillationTrainer(model=other, teacher=teacher, args=args(tmp_path))
    headless = tiny_model("bert", AutoModel)
    with warnings.catch_warnings(), pytest.raises(ValueError, match="No distillation term applies"):
        warnings.simplefilter("ignore")
        DistillationTrainer(model=headless, teacher=teacher, args=args(tmp_path, alpha_cos=0))


def test_different_vocabularies_rejected_for_the_logit_loss(tmp_path):
    teacher = tiny_model("llama", AutoModelForCausalLM)
    student = tiny_model("llama", AutoModelForCausalLM, vocab_size=96)
    with pytest.raises(ValueError, match="96 tokens and the teacher over 128 tokens"):
        DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path))
    # Without the logit loss a different vocabulary is fine (hidden states only).
    DistillationTrainer(model=student, teacher=teacher, args=args(tmp_path, alpha_kl=0, alpha_task=0))


def test_causal_lm_distillation(tmp_path):
    teacher = tiny_model("gpt2", AutoModelForCausalLM, num_hidden_layers=4)
    student = make_student(teacher, num_layers=2)
    data = dataset(labels=False, pad=False).map(lambda row: {"labels": row["input_ids"]})
    trainer = DistillationTrainer(model=student, teacher=teacher, train_dataset=data, args=args(tmp_path))
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["loss_task"] < logs[0]["loss_task"] and "loss_kl" in logs[0]


def test_width_projections_are_trained_and_kept_out_of_the_student(tmp_path):
    teacher = classifier_teacher()
    student = tiny_model(
        "bert", AutoModelForSequenceClassification, num_labels=3, hidden_size=16, intermediate_size=32
    )
    trainer = DistillationTrainer(
        model=student, teacher=teacher, train_dataset=dataset(),
        args=args(tmp_path, save_strategy="steps", save_steps=12, alpha_pooled=1.0, layer_map={1: 2, 2: 4}),
    )  # fmt: skip
    assert set(trainer.projections.maps) == {"1", "2"}
    initial = copy.deepcopy(trainer.projections.state_dict())
    trainer.train()
    assert any(not torch.equal(v, trainer.projections.state_dict()[k]) for k, v in initial.items())
    checkpoint = tmp_path / "checkpoint-12"
    saved = load_file(checkpoint / PROJECTIONS_NAME)
    assert set(saved) == {"maps.1.weight", "maps.2.weight"} and saved["maps.1.weight"].shape == (32, 16)
    student_keys = load_file(checkpoint / "model.safetensors").keys()
    assert not any("maps." in key for key in student_keys)


def test_evaluate_returns_plain_logits_to_compute_metrics(tmp_path):
    teacher = classifier_teacher()
    student = make_student(teacher, num_layers=2)
    seen = {}

    def compute_metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}

    trainer = DistillationTrainer(
        model=student, teacher=teacher, train_dataset=dataset(), eval_dataset=dataset(n=16),
        compute_metrics=compute_metrics, args=args(tmp_path, alpha_attn=0.5, per_device_eval_batch_size=8),
    )  # fmt: skip
    metrics = trainer.evaluate()
    assert seen["shape"] == (16, 3)  # only the logits, not the hidden states / attention maps the loss used
    assert "eval_accuracy" in metrics and metrics["eval_loss"] > 0
