"""Recovery distillation inside `compress`: the pruned/factorized model learns back the original's outputs.

A thin wrapper over `hf_compress.distillation.DistillationTrainer` with settings that suit recovery on unlabeled
calibration text: the original is the frozen teacher, the compressed model the student with the same depth (so
hidden states pair one to one), losses on hidden states and on mean-pooled sentence embeddings, plus the
soft-target loss when the model has a task head.

Choices made for recovery (MiniLM, r = 128 embeddings, see ``bench/factorization.py``):

* what trains: when only factorization ran, the rest of the network is still the original's, so only the factors
  are wrong and only they train (``train="auto"``). Measured at 40 steps: factors only at lr 1.5e-3 reached a
  cosine of 0.978, every weight at lr 1e-4 0.975 at 1.5x the time per step. After pruning every weight trains;
* no dropout: the teacher is deterministic and a short run gains nothing from extra gradient noise (a design
  choice, not measured separately);
* a budget in steps or wall-clock seconds, with warm-up and cosine decay over it.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..calibration import usable_length
from ..validation import check_bool, check_number, data_form, texts_of


__all__ = ["recover", "trainable_parameters", "TRAIN_CHOICES", "DEFAULT_RECOVERY", "split_task_rows"]

TRAIN_CHOICES = ("auto", "all", "factors")
# Recovery in budget mode and preset `max` when `distill` is not given: a wall-clock budget, so it costs the same
# minutes on any model; the report states it and what it bought (held-out cosine before and after).
DEFAULT_RECOVERY = {"max_seconds": 180.0}
_FACTORIZATION = ("embedding_factorization", "low_rank_linear")
# Adam learning rates per choice: the factors start from a (balanced) SVD and move far, the whole network little.
_DEFAULT_LR = {"factors": 1.5e-3, "all": 5e-5}


def trainable_parameters(model: nn.Module, train: str = "auto") -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs recovery distillation trains for a given `train` choice.

    Args:
        model: the compressed student.
        train (`str`): ``"all"`` (every floating-point parameter), ``"factors"`` (only the factors of
            `FactorizedEmbedding` / `LowRankLinear` modules) or ``"auto"`` (``"factors"`` when the model's recipe
            holds factorization only, ``"all"`` otherwise, e.g. after pruning).
    """
    from ..factorization import FactorizedEmbedding, LowRankLinear

    train = _resolve_train(model, train)
    if train == "all":
        return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    owners = [(n, m) for n, m in model.named_modules() if isinstance(m, (FactorizedEmbedding, LowRankLinear))]
    if not owners:
        raise ValueError(
            f"train='factors' trains the factors of factorized layers, but {type(model).__name__} has none. "
            "Apply EmbeddingFactorizationConfig or LowRankLinearConfig first, or use train='all'."
        )
    prefixes = tuple(f"{n}." for n, _ in owners)
    return [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes) and p.is_floating_point()]


def _resolve_train(model: nn.Module, train: str) -> str:
    """Check `train` and resolve ``"auto"`` for `model` to ``"factors"`` or ``"all"``."""
    if train not in TRAIN_CHOICES:
        raise ValueError(f"train must be one of {TRAIN_CHOICES}, got {train!r}.")
    if train == "auto":
        return "factors" if _factorization_only(model) else "all"
    return train


def _factorization_only(model: nn.Module) -> bool:
    """True when every structural technique in the model's recipe is a factorization (the rest is the original)."""
    from ..plugin import get_recipe
    from ..registry import get_technique

    recipe = get_recipe(model)
    methods = [t.method for t in recipe.techniques] if recipe is not None else []
    structural = [m for m in methods if get_technique(m).stage != "quantize"]
    return bool(structural) and all(m in _FACTORIZATION for m in structural)


@contextlib.contextmanager
def _without_dropout(model: nn.Module) -> Iterator[None]:
    """Switch the student's dropout off for the run (the Trainer puts it in train mode) and restore it after."""
    saved: list[tuple[Any, str, float]] = []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            saved.append((module, "p", module.p))
            module.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout_prob"):
            value = getattr(module, name, None)
            if isinstance(value, float) and not isinstance(module, nn.Dropout):
                saved.append((module, name, value))
                setattr(module, name, 0.0)
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


class _Schedule:
    """Warm-up then cosine decay over whichever budget runs out first: `max_steps` or `max_seconds` of wall clock.

    With a time budget the decay follows the clock, so the run ends at a low learning rate however fast the machine
    is (a step-based schedule cut by a time limit would stop at full learning rate, mid-way through its noise).
    """

    def __init__(self, max_steps: int | None, max_seconds: float | None, warmup: float) -> None:
        self.max_steps, self.max_seconds, self.warmup = max_steps, max_seconds, warmup
        self.start: float | None = None
        self.steps = 0

    def progress(self) -> float:
        done = [self.steps / self.max_steps] if self.max_steps else [0.0]
        if self.max_seconds and self.start is not None:
            done.append((time.perf_counter() - self.start) / self.max_seconds)
        return min(max(done), 1.0)

    def factor(self, step: int) -> float:
        self.steps = step
        progress = self.progress()
        if progress < self.warmup:
            return (progress + 1e-3) / (self.warmup + 1e-3)
        return 0.5 * (1 + math.cos(math.pi * (progress - self.warmup) / max(1 - self.warmup, 1e-9)))


def _budget_callback(schedule: _Schedule):
    from transformers import TrainerCallback

    class _Budget(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            schedule.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            schedule.steps = state.global_step
            if schedule.progress() >= 1.0:
                control.should_training_stop = True

    return _Budget()


def recover(student: nn.Module, teacher: nn.Module, texts: Any, *, tokenizer: Any, max_steps: int | None = None,
            max_seconds: float | None = None, learning_rate: float | None = None, train: str = "auto",
            batch_size: int = 16, max_length: int = 128, warmup: float = 0.1, dropout: bool = False,
            keep_better: bool = True, callbacks: list | None = None, labeled_rows: list[dict] | None = None,
            stats: dict | None = None, **kwargs: Any) -> nn.Module:  # fmt: skip
    """Distil `teacher` into `student` (in place) on unlabeled `texts`; returns `student` in eval mode.

    Args:
        student: the compressed model (pruned and/or factorized, not yet quantized).
        teacher: the original model.
        texts (`list[str]` or `datasets.Dataset` with a ``text`` column): recovery data (the calibration texts).
        tokenizer: the model's tokenizer.
        max_steps (`int`, *optional*): optimizer steps; with neither budget given, 200.
        max_seconds (`float`, *optional*): wall-clock budget; training stops (and the learning rate has decayed)
            when it is spent. With both budgets, whichever ends first.
        learning_rate (`float`, *optional*): peak Adam learning rate; defaults to 1.5e-3 when only the factors train
            (their initialisation is balanced for it) and 5e-5 when everything trains.
        train (`str`, *optional*, defaults to `"auto"`): what learns, see `trainable_parameters`.
        batch_size, max_length: texts per step and their token limit.
        warmup (`float`, *optional*, defaults to `0.1`): fraction of the budget spent warming the learning rate up.
        dropout (`bool`, *optional*, defaults to `False`): keep the student's dropout on while training.
        keep_better (`bool`, *optional*, defaults to `True`): hold out a few texts (10 %, at most 64) and measure the
            mean cosine of the student's mean-pooled sentence embeddings to the teacher's on them before and after
            training; if training made it worse (a short budget on a model that was already near-lossless), the
            trained weights are put back as they were and a warning says so. Needs at least 20 texts.
        callbacks (`list[TrainerCallback]`, *optional*): extra `Trainer` callbacks (progress, logging).
        labeled_rows (`list[dict]`, *optional*): task rows (``text``, ``label``) trained on too. With a task head
            the loss then adds the task loss on labels (``alpha_task=0.5``) to the teacher's soft targets
            (``alpha_kl=1``, ``temperature=2``); the unlabeled texts take the teacher's predicted class as label.
            Without a task head their texts join the unlabeled ones.
        stats (`dict`, *optional*): filled with what ran: budget, steps, seconds, texts, held-out cosine before and
            after (the report's ``recovery`` entry).
        **kwargs: go to `DistillationArguments` (e.g. ``alpha_mse=1.0``, ``alpha_cos=0.0``, ``seed``).
    """
    import datasets
    from transformers import DataCollatorWithPadding

    from ..distillation import DistillationArguments, DistillationTrainer

    if texts is None:
        raise ValueError(
            "Recovery distillation needs calibration texts: pass calibration_data=[...] (unlabeled text)."
        )
    if tokenizer is None:
        raise ValueError("Recovery distillation needs the model's tokenizer: pass tokenizer=... to compress().")
    for name, value, integer in (("max_steps", max_steps, True), ("max_seconds", max_seconds, False),
                                 ("learning_rate", learning_rate, False), ("warmup", warmup, False)):  # fmt: skip
        check_number(name, value, integer=integer, optional=name != "warmup")  # the type; ranges below
    for name, value in (("batch_size", batch_size), ("max_length", max_length)):
        check_number(name, value, low=1, integer=True)
    for name, value in (("dropout", dropout), ("keep_better", keep_better)):
        check_bool(name, value)
    for name, value in (("max_steps", max_steps), ("max_seconds", max_seconds), ("learning_rate", learning_rate)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0 (or None for no limit of that kind), got {value!r}.")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is a fraction of the budget in [0, 1), got {warmup!r}.")
    if max_steps is None and max_seconds is None:
        max_steps = 200
    train = _resolve_train(student, train)
    chosen = trainable_parameters(student, train)
    learning_rate = _DEFAULT_LR[train] if learning_rate is None else learning_rate
    rows = texts_of(texts, data_form("calibration_data", texts, batches=False))  # recovery trains on texts
    max_length = usable_length(student, tokenizer, max_length)  # a model with 64 positions takes 64 tokens
    has_logits = hasattr(student, "classifier") or hasattr(student, "lm_head")
    labels = None
    if labeled_rows:
        task_texts = [r["text"] for r in labeled_rows]
        if has_logits and hasattr(student, "classifier"):
            pseudo = _teacher_labels(teacher, tokenizer, rows, max_length)
            labels = pseudo + [int(r["label"]) for r in labeled_rows]
            kwargs = {"alpha_task": 0.5, "temperature": 2.0, **kwargs}
        rows = rows + task_texts
    held_out: list[str] = []
    if keep_better and len(rows) >= 20:
        count = min(64, max(4, len(rows) // 10))
        step = max(len(rows) // count, 1)  # spread over the texts (calibration and task rows alike)
        held = set(range(0, len(rows), step)[:count])
        held_out = [t for i, t in enumerate(rows) if i in held]
        labels = None if labels is None else [y for i, y in enumerate(labels) if i not in held]
        rows = [t for i, t in enumerate(rows) if i not in held]
    check = _FidelityCheck(student, teacher, tokenizer, held_out, max_length, [p for _, p in chosen])
    columns = {"text": rows, **({"labels": labels} if labels is not None else {})}
    encoded = datasets.Dataset.from_dict(columns).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True,
        remove_columns=["text"],
    )
    settings = dict(
        alpha_kl=1.0 if has_logits else 0.0, alpha_task=0.0, alpha_cos=1.0, alpha_pooled=1.0,
        logging_steps=max((max_steps or 100) // 10, 1), dataloader_pin_memory=False,
        disable_tqdm=max_steps is None,  # a time budget has no step total: the bar would count to 10**9
        train_sampling_strategy="group_by_length",  # less padding: more text per second
    )  # fmt: skip
    settings.update(kwargs)
    schedule = _Schedule(max_steps, max_seconds, warmup)
    trained = {id(p) for _, p in chosen}
    was_trainable = {id(p): p.requires_grad for p in student.parameters()}
    for param in student.parameters():
        param.requires_grad_(id(param) in trained)
    optimizer = torch.optim.AdamW([p for _, p in chosen], lr=learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule.factor)
    try:
        with tempfile.TemporaryDirectory(prefix="hf_compress-recovery-") as scratch, contextlib.ExitStack() as stack:
            if not dropout:
                stack.enter_context(_without_dropout(student))
            args = DistillationArguments(
                output_dir=scratch, max_steps=max_steps or 10**9, learning_rate=learning_rate,
                per_device_train_batch_size=batch_size, save_strategy="no", report_to=[], **settings,
            )  # fmt: skip
            trainer = DistillationTrainer(model=student, args=args, teacher=teacher, train_dataset=encoded,
                                          data_collator=DataCollatorWithPadding(tokenizer),
                                          optimizers=(optimizer, scheduler), callbacks=[_budget_callback(schedule), *(callbacks or [])])  # fmt: skip
            started = time.perf_counter()
            trainer.train()
    finally:
        for param in student.parameters():
            param.requires_grad_(was_trainable.get(id(param), True))
    check.keep_better()
    if stats is not None:
        stats.update(max_steps=max_steps, max_seconds=max_seconds, steps=trainer.state.global_step,
                     seconds=round(time.perf_counter() - started, 1), texts=len(rows), batch_size=batch_size,
                     labeled_rows=len(labeled_rows or []), task_loss=labels is not None, train=train,
                     learning_rate=learning_rate, held_out_texts=len(held_out),
                     held_out_cosine_before=getattr(check, "before", None),
                     held_out_cosine_after=getattr(check, "after", None), kept_trained=check.kept)  # fmt: skip
    return student.eval()


@torch.inference_mode()
def _teacher_labels(teacher: nn.Module, tokenizer: Any, texts: list[str], max_length: int) -> list[int]:
    """The teacher's predicted class of each text: the label of unlabeled texts when training on task labels."""
    labels: list[int] = []
    for start in range(0, len(texts), 32):
        enc = tokenizer(texts[start : start + 32], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")  # fmt: skip
        labels += teacher(**enc).logits.argmax(-1).tolist()
    return labels


def split_task_rows(task_data: Any, every: int = 5) -> tuple[list[dict], list[dict]]:
    """Labeled rows as ``(train, held_out)``: every `every`-th row is held out for the report's task metric, so
    the number before/after is measured on rows neither the search nor recovery trained on."""
    rows = list(task_data)
    return [r for i, r in enumerate(rows) if i % every], rows[::every]


class _FidelityCheck:
    """Held-out fidelity before and after recovery; restores the trained weights when training made it worse."""

    def __init__(self, student, teacher, tokenizer, texts: list[str], max_length: int, params: list) -> None:
        self.student, self.params, self.batches, self.kept = student, params, [], True
        if not texts:
            return
        for start in range(0, len(texts), 32):
            chunk = texts[start : start + 32]
            enc = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
            self.batches.append(dict(enc))
        self.reference = self._embed(teacher)
        self.before = self._cosine()
        self.saved = [p.detach().clone() for p in params]

    @torch.no_grad()
    def _embed(self, model) -> torch.Tensor:
        from ..evaluation.measure import sentence_embeddings

        training = model.training
        model.eval()
        try:
            return sentence_embeddings(model, self.batches)
        finally:
            model.train(training)

    def _cosine(self) -> float:
        return torch.nn.functional.cosine_similarity(self._embed(self.student), self.reference).mean().item()

    @torch.no_grad()
    def keep_better(self) -> None:
        if not self.batches:
            return
        self.after = self._cosine()
        if self.after < self.before:
            self.kept = False
            for param, saved in zip(self.params, self.saved):
                param.copy_(saved)
            warnings.warn(
                f"Recovery distillation lowered the held-out cosine to the original ({self.before:.5f} -> "
                f"{self.after:.5f}); the weights were put back as they were. Give it a longer budget (max_seconds / "
                "max_steps) or a lower learning_rate.",
                stacklevel=3,
            )
        self.saved = []
