"""The evaluation report produced by every compression: sizes, latency, fidelity and task metrics, before and after.

Each measurement compares the compressed model with the original on the same inputs in the same process:
- sizes: parameters (as the uncompressed model would count them) and bytes held, split into embeddings,
  attention, FFN and other, so a user sees *where* the savings come from;
- latency: forward passes timed alternately (original, compressed, original, ...) on the current device and
  summarised as the median of per-round ratios, which cancels most of the drift of a shared machine;
- fidelity: cosine of mean-pooled last hidden states to the original's on the given texts, computed by the local
  ``embedding_fidelity`` `evaluate` module;
- task metrics: any `evaluate` metric (a local one shipped here, a path, or a Hub name when online) on a labeled
  dataset: argmax of the logits for a model with a task head, a logistic-regression probe otherwise.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import get_adapter
from ..calibration import calibration_batches, usable_length
from ..utils import count_parameters, model_bytes
from .report import CATEGORIES, CompressionReport


__all__ = [
    "CATEGORIES",
    "CompressionReport",
    "measure_report",
    "size_breakdown",
    "latency_ratio",
    "embedding_fidelity",
    "task_metrics",
    "load_metric",
    "latency_batch",
    "sentence_embeddings",
]

METRICS_DIR = Path(__file__).parent / "metrics"


def size_breakdown(model: nn.Module) -> dict[str, Any]:
    """Parameters and bytes of `model`, in total and split into embeddings / attention / FFN / other.

    Categories come from the architecture adapter: the input embedding (and every `nn.Embedding`, e.g. position
    and token-type tables) is "embeddings", the q/k/v/o projections "attention", the FFN projections "ffn"; whatever
    replaced one of those modules (a quantized or low-rank layer) keeps its category. Shared tensors count once, in
    the first category that holds them. Models without an adapter put everything but embeddings in "other".
    """
    prefixes: dict[str, list[str]] = {cat: [] for cat in CATEGORIES[:3]}
    names = {id(m): n for n, m in model.named_modules()}
    try:
        adapter = get_adapter(model)
    except ValueError:
        adapter = None
    if adapter is not None:
        if adapter.embeddings is not None:
            prefixes["embeddings"].append(names[id(adapter.input_embeddings(model))])
        for index in range(len(adapter.layer_modules(model))):
            base = adapter.layer_prefix(model, index)
            prefixes["attention"] += [f"{base}.{p}" for p in adapter.attention_projections()]
            prefixes["ffn"] += [f"{base}.{p}" for p in adapter.ffn_projections()]
    prefixes["embeddings"] += [n for n, m in model.named_modules() if isinstance(m, nn.Embedding)]

    seen: set[int] = set()
    result = {cat: {"params": 0, "bytes": 0} for cat in CATEGORIES}
    for name, module in model.named_modules():
        category = next((c for c, ps in prefixes.items() if any(_under(name, p) for p in ps)), None)
        if category is None:
            continue
        parent = name.rpartition(".")[0]
        if any(_under(parent, p) for p in prefixes[category]) and parent:
            continue  # counted with its top-level module of the same category
        params, nbytes = _own_size(module, seen)
        result[category]["params"] += params
        result[category]["bytes"] += nbytes
    total_params, total_bytes = count_parameters(model), model_bytes(model)
    result["other"]["params"] = max(total_params - sum(r["params"] for r in result.values()), 0)
    result["other"]["bytes"] = max(total_bytes - sum(r["bytes"] for r in result.values()), 0)
    return {"params": total_params, "bytes": total_bytes, "breakdown": result}


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _own_size(module: nn.Module, seen: set[int]) -> tuple[int, int]:
    """Parameters (logical) and bytes of a module and its children, skipping tensors already counted."""
    tensors = [t for t in module.state_dict(keep_vars=True).values() if _key(t) not in seen]
    seen.update(_key(t) for t in tensors)
    return count_parameters(module), sum(t.numel() * t.element_size() for t in tensors)


def _key(tensor: torch.Tensor) -> int:
    return tensor.data_ptr() if tensor.device.type != "meta" else id(tensor)


# -- latency -------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def latency_ratio(original: nn.Module, compressed: nn.Module, batch: dict[str, torch.Tensor], rounds: int = 5,
                  warmup: int = 1) -> dict[str, Any]:  # fmt: skip
    """Time forward passes of both models alternately on `batch`; the ratio is the median of per-round ratios."""
    times: dict[str, list[float]] = {"before": [], "after": []}
    models = {"before": original, "after": compressed}
    device = next(compressed.parameters()).device
    for round_index in range(warmup + rounds):
        for key, model in models.items():
            inputs = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            _sync(device)
            start = time.perf_counter()
            model(**inputs)
            _sync(device)
            if round_index >= warmup:
                times[key].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times["after"], times["before"])]
    shape = tuple(next(iter(batch.values())).shape)
    return {
        "ratio": statistics.median(ratios),
        "before_ms": 1000 * statistics.median(times["before"]),
        "after_ms": 1000 * statistics.median(times["after"]),
        "device": device.type,
        "threads": torch.get_num_threads(),
        "batch": list(shape),
        "rounds": rounds,
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- fidelity ------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def sentence_embeddings(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled last hidden states (padding excluded), one row per text, in fp32 on the CPU."""
    rows = []
    for batch in batches:
        inputs = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
        mask = inputs.get("attention_mask", torch.ones(hidden.shape[:2], device=hidden.device))
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        rows.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).float().cpu())
    return torch.cat(rows)


def embedding_fidelity(original: nn.Module, compressed: nn.Module, batches: list[dict[str, torch.Tensor]],
                       reference: torch.Tensor | None = None) -> dict[str, Any]:  # fmt: skip
    """Cosine of the compressed model's sentence embeddings to the original's (mean, 5th percentile, minimum)."""
    ref = sentence_embeddings(original, batches) if reference is None else reference
    new = sentence_embeddings(compressed, batches)
    scores = load_metric("embedding_fidelity").compute(predictions=new.tolist(), references=ref.tolist())
    return {**scores, "texts": int(ref.shape[0])}


# -- task metrics --------------------------------------------------------------------------------------------------
def load_metric(name: str) -> Any:
    """An `evaluate` metric: one shipped in ``hf_compress/metrics`` by name, a local path, or a Hub name."""
    import evaluate

    local = METRICS_DIR / name / f"{name}.py"
    if local.is_file():
        return evaluate.load(str(local))
    return evaluate.load(name)


def task_metrics(models: dict[str, nn.Module], dataset: Any, metric: str, tokenizer: Any, *, text_column: str = "text",
                 label_column: str = "label", batch_size: int = 32) -> dict[str, Any]:  # fmt: skip
    """Score each model of `models` on a labeled `dataset` with the `evaluate` metric `metric`.

    A model with a classification head predicts the argmax of its logits. A model without one (a sentence encoder)
    is scored with a logistic-regression probe on its sentence embeddings: fitted on the even rows, scored on the
    odd rows, the same split for every model, so the numbers compare representations.
    """
    rows = list(dataset) if not isinstance(dataset, list) else dataset
    if not rows or text_column not in rows[0] or label_column not in rows[0]:
        raise ValueError(
            f"The labeled dataset needs {text_column!r} and {label_column!r} columns; got "
            f"{sorted(rows[0]) if rows else 'no rows'}. Pass text_column=/label_column= to name yours."
        )
    texts, labels = [r[text_column] for r in rows], [int(r[label_column]) for r in rows]
    scorer = load_metric(metric)
    results, mode = {}, "logits"
    for key, model in models.items():
        batches = list(calibration_batches(model, texts, tokenizer=tokenizer, batch_size=batch_size, name="task_data"))
        if _has_logits(model, batches[0]):
            preds = _argmax_logits(model, batches)
            results[key] = scorer.compute(predictions=preds, references=labels)
        else:
            mode = "probe"
            from sklearn.linear_model import LogisticRegression

            emb = sentence_embeddings(model, batches).numpy()
            probe = LogisticRegression(max_iter=2000).fit(emb[0::2], labels[0::2])
            results[key] = scorer.compute(predictions=probe.predict(emb[1::2]).tolist(), references=labels[1::2])
    return {"metric": metric, "mode": mode, "examples": len(rows), **results}


@torch.inference_mode()
def _has_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> bool:
    out = model(**{k: v[:1] for k, v in batch.items()})
    logits = getattr(out, "logits", None)
    return logits is not None and logits.dim() == 2


@torch.inference_mode()
def _argmax_logits(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[int]:
    return [int(i) for b in batches for i in model(**b).logits.argmax(-1).tolist()]


# -- the whole report ----------------------------------------------------------------------------------------------
def measure_report(original, model, tokenizer, base_name, eval_texts, task_data=None, metric="accuracy",
                   latency_rounds: int = 3):  # fmt: skip
    """Build the `CompressionReport` of `model` against `original` (sizes, latency, fidelity, task metric)."""
    from ..plugin import get_recipe
    from ..validation import check_number

    check_number("latency_rounds", latency_rounds, low=0, integer=True, hint=" 0 skips the latency measurement.")
    recipe = get_recipe(model)
    report = CompressionReport(
        base_model=base_name,
        recipe=recipe.to_dict() if recipe else {},
        before=size_breakdown(original),
        after=size_breakdown(model),
    )
    batch = latency_batch(model, tokenizer, eval_texts) if latency_rounds > 0 else None
    if batch is not None:
        report.latency = latency_ratio(original, model, batch, rounds=latency_rounds)
    if eval_texts and tokenizer is not None:
        batches = list(calibration_batches(model, eval_texts, tokenizer=tokenizer, batch_size=32, name="eval_data"))
        report.fidelity = embedding_fidelity(original, model, batches)
    if task_data is not None and tokenizer is not None:
        report.task = task_metrics({"before": original, "after": model}, task_data, metric, tokenizer)
    return report


def latency_batch(model, tokenizer, texts, batch_size: int = 32, length: int = 128):
    """32 x 128 tokens (real text repeated when given, random ids otherwise), as the benchmarks use; fewer tokens
    for a model with fewer positions (`usable_length`)."""
    config = model.config.get_text_config()
    length = usable_length(model, tokenizer, length)
    if tokenizer is not None and texts:
        chosen = (texts * (batch_size // len(texts) + 1))[:batch_size]
        return dict(tokenizer(chosen, padding="max_length", truncation=True, max_length=length, return_tensors="pt"))
    vocab = getattr(config, "vocab_size", None)
    if vocab is None:
        return None
    ids = torch.randint(0, vocab, (batch_size, length), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
