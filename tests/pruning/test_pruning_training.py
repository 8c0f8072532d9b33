"""Pruning in training workflows: gradual pruning in a real Trainer run, LoRA on a pruned model, the heatmap."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, Trainer, TrainingArguments

from hf_compress import apply_compression, get_recipe
from hf_compress.distillation import DistillationArguments, DistillationTrainer
from hf_compress.pruning import (
    FFNPruningConfig,
    GradualPruningCallback,
    HeadPruningConfig,
    kept_heads,
    plot_head_importance,
)
from hf_compress.pruning.plot import head_importance_table
from hf_compress.pruning.surgery import ffn_size


def _dataset(n=48, seq=10, labels=True):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 128, (n, seq), generator=generator)
    data = {"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()}
    if labels:
        data["labels"] = (ids[:, 0] > 64).long().tolist()  # learnable: depends on the first token
    return Dataset.from_dict(data)


def _args(tmp_path, cls=TrainingArguments, **extra):
    return cls(
        output_dir=str(tmp_path / "run"), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_steps=100, use_cpu=True, disable_tqdm=True, **extra,
    )  # fmt: skip


def test_gradual_pruning_in_a_trainer_run(tmp_path):
    model = tiny_model("bert", auto_class=AutoModelForSequenceClassification, num_labels=2).train()
    callback = GradualPruningCallback(
        HeadPruningConfig(fraction=0.5), FFNPruningConfig(fraction=0.25), end_step=8, num_pruning_steps=3
    )
    trainer = Trainer(model=model, args=_args(tmp_path), train_dataset=_dataset(), callbacks=[callback])
    trainer.train()
    # The cubic schedule gated more units at every event, reaching the target (4 of 8 heads, 32 of 128 neurons).
    steps = [step for step, _ in callback.history]
    heads = [gated["heads"] for _, gated in callback.history]
    neurons = [gated["ffn"] for _, gated in callback.history]
    assert steps == sorted(steps) and len(steps) == 3 and steps[-1] == 8
    assert heads == sorted(heads) and heads[-1] == 4 and heads[0] < 4
    assert neurons == sorted(neurons) and neurons[-1] == 32
    # Training ended: the gated units are physically gone and recorded in the recipe.
    assert sum(map(len, kept_heads(model))) == 4
    assert sum(ffn_size(model, layer) for layer in model.bert.encoder.layer) == 96
    recipe = get_recipe(model)
    assert [t.method for t in recipe.techniques] == ["head_pruning", "ffn_pruning"]
    assert all(not m._forward_pre_hooks for m in model.modules())
    model.eval()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        logits = model(**inputs).logits
    trainer.save_model(str(tmp_path / "pruned"))
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, logits)


def test_gradual_pruning_while_distilling(tmp_path):
    teacher = tiny_model("bert")
    student = tiny_model("bert").train()
    args = _args(tmp_path, DistillationArguments, alpha_kl=0.0, alpha_task=0.0, alpha_cos=1.0)
    callback = GradualPruningCallback(HeadPruningConfig(num_heads_to_prune=3), num_pruning_steps=2)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=_dataset(labels=False), callbacks=[callback]
    )
    trainer.train()
    assert callback.end_step == 8  # 70% of 12 steps by default
    assert sum(map(len, kept_heads(student))) == 5
    assert get_recipe(student).find("head_pruning")[0].importance == "gradient"


def test_lora_on_a_pruned_model_has_pruned_shapes_and_reloads(tmp_path):
    model = tiny_model("bert", auto_class=AutoModelForSequenceClassification, num_labels=2)
    apply_compression(model, HeadPruningConfig(heads_to_prune={0: [1, 2], 1: [3]}), FFNPruningConfig(
        intermediate_sizes={0: 40, 1: 24}))  # fmt: skip
    model.save_pretrained(tmp_path / "base")
    lora = get_peft_model(
        model, LoraConfig(r=4, target_modules=["query", "value", "intermediate.dense"], modules_to_save=["classifier"])
    )
    trainer = Trainer(model=lora, args=_args(tmp_path), train_dataset=_dataset())
    trainer.train()
    layer = lora.base_model.model.bert.encoder.layer[0]
    assert layer.attention.self.query.lora_B["default"].weight.shape == (16, 4)  # 2 heads x 8
    assert layer.intermediate.dense.lora_B["default"].weight.shape == (40, 4)
    assert lora.base_model.model.bert.encoder.layer[1].attention.self.value.lora_B["default"].weight.shape == (24, 4)
    assert any(p.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)  # really trained
    lora.eval()
    inputs = tiny_inputs("bert")
    with torch.no_grad():
        expected = lora(**inputs).logits
    lora.save_pretrained(tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
    # The silent failure this guards against: the adapter on the *unpruned* model must fail loudly, not load.
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(
            tiny_model("bert", auto_class=AutoModelForSequenceClassification), tmp_path / "adapter"
        )


def test_heatmap_is_saved_next_to_the_model(tmp_path):
    model = tiny_model("bert", num_hidden_layers=3)
    batches = [tiny_inputs("bert", batch=4, seed=s) for s in range(2)]
    apply_compression(model, HeadPruningConfig(fraction=1 / 3), calibration_data=batches)
    model.save_pretrained(tmp_path)
    path = plot_head_importance(AutoModel.from_pretrained(tmp_path), tmp_path)  # scores travel in config.json
    assert path == tmp_path / "head_importance.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    scores, removed, heads = head_importance_table(model)
    assert len(removed) == 4 and heads == 4 and all(scores[layer][head] is not None for layer, head in removed)


def test_heatmap_without_scores_and_from_a_config(tmp_path):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match="No head pruning found"):
        plot_head_importance(model)
    apply_compression(model, HeadPruningConfig(heads_to_prune={0: [1]}))
    assert plot_head_importance(model, tmp_path).stat().st_size > 1000  # explicit heads: layout only
    scores, removed, heads = head_importance_table(model)
    assert scores is None and removed == {(0, 1)} and heads == 4
    config = HeadPruningConfig(heads_to_prune={1: [0]}, head_importance=[[0.1, 0.2], [None, 0.9]])
    assert head_importance_table(config) == ([[0.1, 0.2], [None, 0.9]], {(1, 0)}, 2)
    assert plot_head_importance(config) is not None  # a figure, for notebooks and the model card
