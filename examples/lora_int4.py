"""LoRA on an int4 model (the QLoRA idea on hf_compress's own packed layers), then merge for deployment.

The backbone is quantized to packed int4 (or int8) and frozen; PEFT LoRA adapters (float32) and the new
classification head are the only trained tensors, so training needs far less memory than full fine-tuning.
``import hf_compress`` is all PEFT needs to wrap our quantized layers: `get_peft_model` works as usual.

    python examples/lora_int4.py --output-dir out                      # MiniLM, Debian sections
    python examples/lora_int4.py --model minilm-pruned --output-dir out --merge

``--model`` may already be compressed (e.g. head-pruned): it is quantized on top, and the adapter then has the
pruned shapes. ``--merge`` loads the trained adapter onto the float (unquantized) version of ``--model``, merges it
exactly, saves that model (a plain compressed checkpoint) and, unless ``--no-requantize``, quantizes it again for
deployment. Runs under ``accelerate launch`` like ``finetune_text_classification.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

import hf_compress
from hf_compress.data import DEBIAN_SECTIONS, load_debian, minilm_path
from hf_compress.integrations.trainer import CheckpointExtrasTrainer  # Trainer + FSDP fixes for compressed models
from hf_compress.quantization import WeightQuantizationConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="Float checkpoint, compressed or not (default: MiniLM).")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--bits", type=int, default=4, choices=[4, 8])
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--compute-dtype", default="float32", help="float32 is fastest on CPUs without bf16 units.")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank r.")
    parser.add_argument("--alpha", type=int, default=32, help="LoRA alpha (scaling = alpha / r).")
    parser.add_argument("--target-modules", nargs="+", default=["query", "key", "value", "dense"])
    parser.add_argument("--per-section", type=int, default=None, help="Debian train rows per section.")
    parser.add_argument("--test-per-section", type=int, default=None, help="Debian test rows per section.")
    parser.add_argument("--epochs", type=float, default=6.0)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--per-device-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--save-steps", type=int, default=500)
    parser.add_argument("--merge", action="store_true", help="Merge the adapter into the float model afterwards.")
    parser.add_argument("--no-requantize", action="store_true", help="With --merge: keep the merged model float.")
    parser.add_argument("--seed", type=int, default=42)
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def quantized_checkpoint(args: argparse.Namespace, source: str) -> Path:
    """Quantize `source` once (main process) into output-dir/base-int{bits}; other processes load the result."""
    target = Path(args.output_dir) / f"base-int{args.bits}"
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process and not (target / "config.json").is_file():
            model = AutoModel.from_pretrained(source)
            config = WeightQuantizationConfig(bits=args.bits, group_size=args.group_size if args.bits == 4 else None,
                                              compute_dtype=args.compute_dtype)  # fmt: skip
            hf_compress.apply_compression(model, config)
            model.save_pretrained(target)
            AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


def classifier(path: str | Path, dtype: torch.dtype | None = None):
    labels = list(DEBIAN_SECTIONS)
    return AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        **({"dtype": dtype} if dtype is not None else {}),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    set_seed(args.seed)
    source = args.model or str(minilm_path())
    quantized = quantized_checkpoint(args, source)
    tokenizer = AutoTokenizer.from_pretrained(quantized)

    from datasets import Dataset

    def encode(rows: list[dict]) -> Dataset:
        data = Dataset.from_list([{"text": r["text"], "label": r["label"]} for r in rows])
        return data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length), batched=True,
                        remove_columns=["text"])  # fmt: skip

    train_data = encode(load_debian("train", per_section=args.per_section))
    test_data = encode(load_debian("test", per_section=args.test_per_section))

    # The classification head is new: it stays float and trains fully (PEFT's modules_to_save for SEQ_CLS).
    model = classifier(quantized, dtype=getattr(torch, args.compute_dtype))
    lora = LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=args.alpha, lora_dropout=0.05,
                      target_modules=args.target_modules)  # fmt: skip
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rss_before_training = peak_rss_mb()

    training_args = TrainingArguments(
        output_dir=args.output_dir, per_device_train_batch_size=args.per_device_batch_size,
        per_device_eval_batch_size=64, num_train_epochs=args.epochs, learning_rate=args.learning_rate,
        warmup_steps=0.1, weight_decay=0.01, save_steps=args.save_steps, save_total_limit=2, logging_steps=10,
        seed=args.seed, report_to=[], use_cpu=not torch.cuda.is_available(), average_tokens_across_devices=False,
        disable_tqdm=os.environ.get("HF_COMPRESS_QUIET") == "1",
    )  # fmt: skip

    def accuracy(prediction) -> dict:
        return {"accuracy": float((np.argmax(prediction.predictions, -1) == prediction.label_ids).mean())}

    trainer = CheckpointExtrasTrainer(model=model, args=training_args, train_dataset=train_data,
                                      eval_dataset=test_data, data_collator=DataCollatorWithPadding(tokenizer),
                                      compute_metrics=accuracy)  # fmt: skip
    train_result = trainer.train()
    metrics = {**train_result.metrics, **trainer.evaluate()}
    metrics.update(peak_rss_mb=peak_rss_mb(), rss_before_training_mb=rss_before_training,
                   trainable_parameters=trainable, bits=args.bits)  # fmt: skip

    state = PartialState()
    adapter_dir = Path(args.output_dir) / "adapter"
    # adapter weights + the head (a few MB), written by the main process; every process joins: under FSDP the
    # shards are gathered first
    trainer.save_model(str(adapter_dir))
    if state.is_main_process:
        if args.merge:
            metrics.update(merge(args, source, adapter_dir, test_data, DataCollatorWithPadding(tokenizer)))
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(metrics, indent=2))
        print(f"LoRA on int{args.bits}: test accuracy {metrics['eval_accuracy']:.4f}, {trainable} trainable "
              f"parameters, peak RSS {metrics['peak_rss_mb']:.0f} MiB; adapter saved to {adapter_dir}")  # fmt: skip
    return metrics


def merge(args: argparse.Namespace, source: str, adapter_dir: Path, test_data, collator) -> dict:
    """Merge the adapter into the float model of the same (compressed) shapes, save it, re-quantize it."""
    merged = PeftModel.from_pretrained(classifier(source), adapter_dir).merge_and_unload()
    out = Path(args.output_dir) / "merged"
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(source).save_pretrained(out)
    result = {"merged_accuracy": score(merged, test_data, collator)}
    if not args.no_requantize:
        config = WeightQuantizationConfig(bits=args.bits, group_size=args.group_size if args.bits == 4 else None,
                                          compute_dtype=args.compute_dtype)  # fmt: skip
        hf_compress.apply_compression(merged, config)
        merged.save_pretrained(out.with_name(f"merged-int{args.bits}"))
        AutoTokenizer.from_pretrained(source).save_pretrained(out.with_name(f"merged-int{args.bits}"))
        result[f"merged_int{args.bits}_accuracy"] = score(merged, test_data, collator)
    print(f"merged into the float model: {result}; saved to {out}")
    return result


@torch.no_grad()
def score(model: torch.nn.Module, data, collator) -> float:
    """Accuracy of `model` on the whole tokenized `data` (in this process alone)."""
    model.eval()
    correct = total = 0
    for batch in torch.utils.data.DataLoader(data, batch_size=64, collate_fn=collator):
        labels = batch.pop("labels")
        predicted = model(**{k: v.to(model.device) for k, v in batch.items()}).logits.argmax(-1).cpu()
        correct += (predicted == labels.cpu()).sum().item()
        total += labels.numel()
    return correct / total


if __name__ == "__main__":
    main()
