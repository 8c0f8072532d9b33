"""Run by tests/distillation/test_distillation_fsdp.py: once as one plain process, once under ``accelerate launch``.

Three short runs on tiny BERT models, all dropout-free so a 2-process run (global batch split over the processes)
must reproduce the 1-process run with the same global batch:

- ``distill``: `DistillationTrainer`, a 32-wide teacher into a 16-wide student (learned width projections);
- ``pruned``: full fine-tuning of a compressed classifier (non-uniform head pruning, one layer emptied, and a
  factorized word embedding) with `CheckpointExtrasTrainer`;
- ``lora``: PEFT LoRA on an int8-quantized classifier (packed integer buffers, frozen).

Each run saves its model with ``trainer.save_model`` (under FSDP: the full state dict gathered on rank 0) and rank
0 writes ``<out>/<run>.json`` with the logged losses and what it saw (FSDP version, parameter types).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification, TrainingArguments

import hf_compress
from hf_compress.distillation import DistillationArguments, DistillationTrainer
from hf_compress.factorization import EmbeddingFactorizationConfig
from hf_compress.integrations.trainer import CheckpointExtrasTrainer, fsdp_version
from hf_compress.pruning import HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig


GLOBAL_BATCH = 16
# None: FSDP (if any) comes from the accelerate config of the launch; else TrainingArguments(fsdp=..., fsdp_config=...).
FSDP_ARGUMENTS: dict | None = None


def tiny(hidden: int, seed: int):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "bert", hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
        vocab_size=128, num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return AutoModelForSequenceClassification.from_config(config)


def dataset() -> Dataset:
    ids = torch.randint(5, 128, (64, 10), generator=torch.Generator().manual_seed(0))
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist()})


def arguments(out: Path, name: str, world: int, cls=TrainingArguments, **kwargs) -> TrainingArguments:
    common = dict(
        output_dir=str(out / name / "run"), max_steps=6, per_device_train_batch_size=GLOBAL_BATCH // world,
        learning_rate=3e-3, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
        seed=0, average_tokens_across_devices=False, lr_scheduler_type="linear", warmup_steps=1,
    )  # fmt: skip
    if FSDP_ARGUMENTS:
        common.update(FSDP_ARGUMENTS)
    return cls(**{**common, **kwargs})


def run(trainer, out: Path, name: str) -> None:
    trainer.train()
    trainer.save_model(str(out / name / "final"))
    if trainer.accelerator.is_main_process:
        params = list(trainer.model.named_parameters())
        record = {
            "world_size": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "fsdp_version": fsdp_version(trainer),
            "param_types": sorted({type(p).__name__ for _, p in params}),
            "logs": [h for h in trainer.state.log_history if "loss" in h],
        }
        if isinstance(trainer, DistillationTrainer):
            record["teacher_frozen"] = all(
                not p.requires_grad and p.grad is None for p in trainer.teacher.parameters()
            )
            record["teacher_type"] = type(trainer.teacher).__name__
            record["projections"] = torch.cat(
                [p.detach().flatten() for p in trainer.projections.parameters()]
            ).tolist()
        (out / f"{name}.json").write_text(json.dumps(record))


def distill(out: Path, world: int) -> None:
    teacher = tiny(32, seed=1).eval()
    with torch.no_grad():  # peaked outputs, so the soft targets carry information
        teacher.classifier.weight.mul_(20)
    losses = dict(alpha_kl=1.0, alpha_task=0.5, alpha_cos=1.0, temperature=2.0)
    args = arguments(out, "distill", world, DistillationArguments, save_strategy="steps", save_steps=3, **losses)
    run(
        DistillationTrainer(model=tiny(16, seed=2), teacher=teacher, args=args, train_dataset=dataset()),
        out,
        "distill",
    )
    # Resume a fresh student from the step-3 checkpoint (sharded model, optimizer, projections and their state).
    args = arguments(out, "distill-resumed", world, DistillationArguments, **losses)
    trainer = DistillationTrainer(model=tiny(16, seed=5), teacher=teacher, args=args, train_dataset=dataset())
    trainer.train(resume_from_checkpoint=str(out / "distill" / "run" / "checkpoint-3"))
    if trainer.accelerator.is_main_process:
        logs = [h for h in trainer.state.log_history if "loss" in h]
        (out / "distill-resumed.json").write_text(json.dumps({"logs": logs}))


def pruned(out: Path, world: int) -> None:
    model = tiny(32, seed=3)
    hf_compress.apply_compression(
        model, HeadPruningConfig(heads_to_prune={0: [2], 1: [0, 1, 2, 3]}), EmbeddingFactorizationConfig(rank=8)
    )
    args = arguments(out, "pruned", world, save_strategy="steps", save_steps=6)  # a checkpoint with optimizer
    run(CheckpointExtrasTrainer(model=model, args=args, train_dataset=dataset()), out, "pruned")


def lora(out: Path, world: int) -> None:
    from peft import LoraConfig, get_peft_model

    model = tiny(32, seed=4)
    hf_compress.apply_compression(model, WeightQuantizationConfig(bits=8, compute_dtype="float32"))
    model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["query", "value"]))  # fmt: skip
    args = arguments(out, "lora", world, learning_rate=1e-2)
    try:
        trainer = CheckpointExtrasTrainer(model=model, args=args, train_dataset=dataset())
    except ValueError as error:  # FSDP1 refuses PEFT adapters it could not save: the test reads the message
        (out / "lora.json").write_text(json.dumps({"error": str(error)}))
        return
    run(trainer, out, "lora")


def main(out: Path, modes: list[str]) -> None:
    """`modes`: ``one`` (a single process), ``fsdp2`` (the accelerate config's FSDP2), ``fsdp1`` (FSDP1 requested
    through TrainingArguments, transformers' route; sync_module_states left at its default True, which hf_compress
    turns off on CPU). Each writes its runs under ``out/<mode>``."""
    global FSDP_ARGUMENTS
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for index, mode in enumerate(modes):
        if index:  # a new FSDP setup in the same processes: accelerate keeps one state per process
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=True)
        FSDP_ARGUMENTS = (
            {"fsdp": True, "fsdp_config": {"version": 1, "use_orig_params": True}} if mode == "fsdp1" else None
        )
        for run_name in (distill, pruned, lora):
            run_name(out / mode, world)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2].split(","))
