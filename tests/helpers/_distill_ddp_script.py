"""Run by tests/distillation/test_distillation_multiprocess.py under ``accelerate launch --num_processes 2 --cpu`` (gloo).

Each process distils a tiny BERT classifier teacher into a narrower student (so the learned width projections are
exercised too) and writes what it saw to ``<out>/rank<k>.json``; rank 0 also saves the student.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from datasets import Dataset
from transformers import AutoConfig, AutoModelForSequenceClassification

import hf_compress  # noqa: F401
from hf_compress.distillation import DistillationArguments, DistillationTrainer


def tiny(hidden: int, seed: int):
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "bert", hidden_size=hidden, num_hidden_layers=2, num_attention_heads=4, intermediate_size=2 * hidden,
        vocab_size=128, num_labels=3,
    )  # fmt: skip
    return AutoModelForSequenceClassification.from_config(config)


def main(out: Path) -> None:
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 128, (64, 10), generator=generator)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 3).tolist()})
    teacher = tiny(32, seed=1).eval()
    with torch.no_grad():  # peaked outputs, so the soft targets carry information
        teacher.classifier.weight.mul_(20)
    student = tiny(16, seed=2)
    args = DistillationArguments(
        output_dir=str(out / "run"), max_steps=30, per_device_train_batch_size=8, learning_rate=3e-3,
        logging_steps=5, report_to=[], save_strategy="no", use_cpu=True, ddp_backend="gloo", disable_tqdm=True,
        alpha_kl=1.0, alpha_task=0.0, alpha_cos=1.0, temperature=2.0, seed=0,
    )  # fmt: skip
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data)
    trainer.train()
    rank = dist.get_rank()
    projections = torch.cat([p.detach().flatten() for p in trainer.projections.parameters()])
    weights = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    record = {
        "rank": rank,
        "world_size": dist.get_world_size(),
        "backend": dist.get_backend(),
        "projections": projections[:64].tolist(),
        "student": weights[:64].tolist(),
        "teacher_frozen": all(p.grad is None and not p.requires_grad for p in teacher.parameters()),
        "teacher_eval": not teacher.training,
        "logs": [h for h in trainer.state.log_history if "loss" in h],
    }
    if rank == 0:
        trainer.save_model(str(out / "student"))
        probe = torch.arange(5, 15).reshape(1, 10)
        record["probe_logits"] = trainer.model.eval()(input_ids=probe).logits[0].tolist()
    (out / f"rank{rank}.json").write_text(json.dumps(record))
    # Leave together and tear the group down: a rank that exits while gloo's threads still serve the other one
    # (rank 0 saving) was seen to abort with "terminate called without an active exception".
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
