"""Fine-tune a compressed model for text classification, on one CPU or many processes/GPUs.

The compressed structure (pruned heads, factorized layers, ...) is part of the checkpoint's recipe, so every
process rebuilds it on load, `Trainer` trains the smaller model as it is, its checkpoints hold the recipe, and the
result reloads with plain ``AutoModelForSequenceClassification.from_pretrained`` after ``import hf_compress``.

Single process:

    python examples/finetune_text_classification.py --model minilm-pruned --output-dir out

Several processes (DDP; on a machine without GPUs each process trains on the CPU with the gloo backend):

    accelerate launch --multi_gpu --num_processes 2 examples/finetune_text_classification.py \\
        --model minilm-pruned --output-dir out

Sharded with FSDP2 (each process holds a shard of the weights, gradients and optimizer state; on GPUs use
``examples/accelerate/fsdp2_gpu.yaml``):

    accelerate launch --config_file examples/accelerate/fsdp2_cpu.yaml \\
        examples/finetune_text_classification.py --model minilm-pruned --output-dir out

``--per-device-batch-size`` is per process: keep ``processes x per-device batch`` fixed to reproduce a run made with
another number of processes. The default data is the labeled Debian package descriptions bundled for the tests
(12 sections); pass ``--train-file``/``--test-file`` (csv, json or jsonl) for your own. ``--recipe recipe.json``
compresses an uncompressed ``--model`` first (on the main process, then every process loads the saved result); the
recipe is a list of technique dicts as in ``config.json``, e.g. ``[{"method": "head_pruning", "fraction": 0.33}]``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

import hf_compress
from hf_compress import TechniqueConfig, get_recipe
from hf_compress.data import minilm_path
from hf_compress.integrations.trainer import CheckpointExtrasTrainer  # Trainer + FSDP fixes for compressed models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Checkpoint path or Hub id (default: the bundled MiniLM).")
    parser.add_argument("--recipe", default=None, help="JSON file (or inline JSON) of technique dicts to apply first.")
    parser.add_argument("--output-dir", required=True, help="Where checkpoints, the final model and metrics go.")
    parser.add_argument("--train-file", default=None, help="csv/json/jsonl with text and label columns.")
    parser.add_argument("--test-file", default=None, help="csv/json/jsonl with text and label columns.")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--per-section", type=int, default=None, help="Debian data: train rows per section.")
    parser.add_argument("--test-per-section", type=int, default=None, help="Debian data: test rows per section.")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="Stop after this many optimizer steps.")
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    parser.add_argument("--per-device-batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--save-steps", type=int, default=500)
    parser.add_argument("--resume", default=None, help="A checkpoint folder, or 'auto' for the latest in output-dir.")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def load_rows(args: argparse.Namespace) -> tuple[list[dict], list[dict], list[str]]:
    """(train rows, test rows, label names); rows are ``{"text", "label"}`` with integer labels."""
    if args.train_file is None:
        from hf_compress.data import DEBIAN_SECTIONS, load_debian

        train = load_debian("train", per_section=args.per_section)
        test = load_debian("test", per_section=args.test_per_section)
        keep = [[{"text": r["text"], "label": r["label"]} for r in rows] for rows in (train, test)]
        return keep[0], keep[1], list(DEBIAN_SECTIONS)
    if args.test_file is None:
        raise SystemExit("--train-file needs --test-file too (the held-out split that is scored).")
    from datasets import load_dataset

    def read(path: str) -> list[dict]:
        kind = {".jsonl": "json", ".json": "json", ".csv": "csv"}.get(Path(path).suffix)
        if kind is None:
            raise SystemExit(f"{path}: expected a .csv, .json or .jsonl file.")
        data = load_dataset(kind, data_files=path, split="train")
        for column in (args.text_column, args.label_column):
            if column not in data.column_names:
                raise SystemExit(f"{path} has no column {column!r}; its columns are {data.column_names}.")
        return [{"text": t, "label": y} for t, y in zip(data[args.text_column], data[args.label_column])]

    train, test = read(args.train_file), read(args.test_file)
    names = sorted({str(r["label"]) for r in train + test})
    index = {name: i for i, name in enumerate(names)}
    keep = [[{"text": r["text"], "label": index[str(r["label"])]} for r in rows] for rows in (train, test)]
    return keep[0], keep[1], names


def compressed_checkpoint(args: argparse.Namespace, calibration_texts: list[str]) -> str:
    """The checkpoint to fine-tune: `--model` itself, or `--model` compressed by `--recipe` into output-dir.

    Only the main process compresses (data-aware choices such as head importance are then made once); the others
    wait and load the saved result, so every process starts from the same structure and weights.
    """
    model_path = args.model or str(minilm_path())
    if args.recipe is None:
        return model_path
    recipe = json.loads(Path(args.recipe).read_text() if Path(args.recipe).is_file() else args.recipe)
    configs = [TechniqueConfig.from_dict(item) for item in recipe]
    target = Path(args.output_dir) / "compressed"
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not (target / "config.json").is_file():
            from transformers import AutoModel

            model = AutoModel.from_pretrained(model_path)
            hf_compress.apply_compression(model, *configs, calibration_data=calibration_texts)
            model.save_pretrained(target)
            AutoTokenizer.from_pretrained(model_path).save_pretrained(target)
    return str(target)


def check_full_finetuning_possible(model: torch.nn.Module) -> None:
    """Packed integer weights cannot take gradients: full fine-tuning would silently train only the fp rest."""
    frozen = [name for name, module in model.named_modules() if hasattr(module, "logical_numel")]
    if frozen:
        raise SystemExit(
            f"{len(frozen)} modules hold quantized (packed integer) weights, e.g. {frozen[0]!r}: they cannot be "
            "fully fine-tuned. Fine-tune before quantizing, or train LoRA adapters on top of the quantized model "
            "(examples/lora_int4.py)."
        )


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)  # same classifier initialisation in every process
    train_rows, test_rows, label_names = load_rows(args)
    checkpoint = compressed_checkpoint(args, [r["text"] for r in train_rows[:256]])

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(
        checkpoint,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: i for i, name in enumerate(label_names)},
    )
    check_full_finetuning_possible(model)

    from datasets import Dataset

    def encode(rows: list[dict]) -> Dataset:
        data = Dataset.from_list(rows)
        return data.map(
            lambda batch: tokenizer(batch["text"], truncation=True, max_length=args.max_length),
            batched=True,
            remove_columns=["text"],
        )

    train_data, test_data = encode(train_rows), encode(test_rows)
    rss_before_training = _peak_rss_mb()
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=64,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        warmup_steps=0.1,  # a float below 1 is a fraction of the total steps
        weight_decay=0.01,
        save_steps=args.save_steps,
        save_total_limit=2,
        logging_steps=10,
        seed=args.seed,
        report_to=[],
        # No GPU: train on the CPU; under `accelerate launch` accelerate then runs DDP over gloo by itself.
        use_cpu=not torch.cuda.is_available(),
        # Classification heads average their loss per process; with the default (True) transformers 5 multiplies
        # that mean by the number of processes, so the loss and gradients would grow with the process count.
        average_tokens_across_devices=False,
        disable_tqdm=os.environ.get("HF_COMPRESS_QUIET") == "1",
    )

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = CheckpointExtrasTrainer(
        model=model,
        args=training_args,
        train_dataset=train_data,
        eval_dataset=test_data,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=accuracy,
    )
    resume = args.resume
    if resume == "auto":
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(args.output_dir)
    train_result = trainer.train(resume_from_checkpoint=resume)
    metrics = {**train_result.metrics, **trainer.evaluate()}

    final = Path(args.output_dir) / "final"
    trainer.save_model(final)  # main process only; writes the recipe with the weights
    state = PartialState()
    metrics.update(peak_rss_mb=_peak_rss_mb(), rss_before_training_mb=rss_before_training)
    metrics.update(num_processes=state.num_processes, recipe=[t.to_dict() for t in get_recipe(model).techniques]
                   if get_recipe(model) else [])  # fmt: skip
    if state.is_main_process:
        tokenizer.save_pretrained(final)
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"test accuracy {metrics['eval_accuracy']:.4f} on {len(test_rows)} texts, {state.num_processes} "
              f"process(es); model saved to {final}")  # fmt: skip
    return metrics


if __name__ == "__main__":
    main()
