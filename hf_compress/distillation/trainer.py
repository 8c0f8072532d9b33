"""`DistillationTrainer`: a `Trainer` whose loss is the weighted distillation loss against a frozen teacher."""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from torch import nn

from ..architectures import UnsupportedArchitectureError, get_adapter
from ..integrations.trainer import CheckpointExtrasTrainer, fsdp_version
from .config import DistillationArguments, resolve_layer_map
from .losses import (
    HiddenProjections,
    attention_kl_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    pooled_cosine_loss,
    soft_target_loss,
)


__all__ = ["DistillationTrainer", "PROJECTIONS_NAME"]

# Saved next to optimizer.pt in every checkpoint (not in the student's own weights).
PROJECTIONS_NAME = "distillation_projections.safetensors"
_TERMS = ("kl", "task", "cos", "mse", "attn", "pooled")


class DistillationTrainer(CheckpointExtrasTrainer):
    """A `Trainer` that trains `model` (the student) to imitate a frozen `teacher`.

    The loss is ``sum(alpha_x * loss_x)`` over the terms configured in `DistillationArguments` (soft targets, task
    loss, hidden-state cosine and MSE, attention KL, pooled-embedding cosine). Each term's weighted value is logged
    next to ``loss`` as ``loss_<term>`` (they add up to it), so one can see which term dominates.

    The teacher is put in eval mode, frozen (``requires_grad=False``) and run under `torch.no_grad`, optionally in
    `teacher_dtype`; it is moved to the accelerator's device of every process, so the trainer works unchanged under
    ``accelerate launch`` / ``torchrun`` with several processes. Terms that need logits are dropped (with a warning)
    for models without a head, such as a sentence-embedding `AutoModel`: those distil on hidden / pooled states.

    Any model hf_compress compressed (pruned, factorized, quantized for QAT) can be the student of its uncompressed
    original ("recovery distillation"); checkpoints then hold the compressed student with its recipe, and resuming
    from one continues the run exactly.

    Args:
        model (`PreTrainedModel`): the student.
        args (`DistillationArguments`): training arguments and loss settings.
        teacher (`nn.Module`): the teacher; same tokenizer (and, for the soft-target loss, same vocabulary or label
            set) as the student.
        **kwargs: every other `Trainer` argument (datasets, collator, processing_class, callbacks, ...).

    ```py
    >>> from hf_compress.distillation import DistillationArguments, DistillationTrainer, make_student
    >>> student = make_student(teacher, num_layers=3)
    >>> args = DistillationArguments("out", alpha_kl=1.0, alpha_task=0.5, alpha_cos=1.0, temperature=2.0)
    >>> trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=train, processing_class=tok)
    >>> trainer.train()
    ```
    """

    def __init__(self, model: nn.Module | None = None, args: DistillationArguments | None = None, *,
                 teacher: nn.Module, **kwargs: Any) -> None:  # fmt: skip
        if args is None:
            raise TypeError("DistillationTrainer needs args=DistillationArguments(output_dir=..., ...).")
        if not isinstance(args, DistillationArguments):
            raise TypeError(
                f"args must be DistillationArguments (TrainingArguments plus the loss weights), got "
                f"{type(args).__name__}. It takes every TrainingArguments field: DistillationArguments(output_dir=..., "
                "learning_rate=..., alpha_kl=1.0, temperature=2.0)."
            )
        if not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a torch model (PreTrainedModel), got {type(teacher).__name__}.")
        if teacher is model:
            raise ValueError("The teacher and the student are the same object; pass a separate (frozen) teacher.")
        super().__init__(model=model, args=args, **kwargs)
        # Our loss is a per-batch mean: let the Trainer divide it by the accumulation steps, never pass loss kwargs.
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False

        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher.to(self.accelerator.device)
        if args.teacher_torch_dtype is not None:
            self.teacher.to(args.teacher_torch_dtype)
        if args.alpha_attn > 0:  # sdpa and flash kernels never materialise attention maps
            for net in (self.model, self.teacher):
                if hasattr(net, "set_attn_implementation"):
                    net.set_attn_implementation("eager")
            _disable_attention_dropout(self.model)
        self.weights = self._effective_weights(self.model, self.teacher, args)
        self.layer_map = self._layer_map(self.model, self.teacher, args)
        self.projections = self._make_projections(self.model, self.teacher, args)
        self._check_dataset(kwargs.get("train_dataset"))
        self._component_sums: dict[str, torch.Tensor] = {}
        self._component_count = 0

    # -- checks made before any training step ------------------------------------------------------------------------
    @staticmethod
    def _effective_weights(student: nn.Module, teacher: nn.Module, args: DistillationArguments) -> dict[str, float]:
        weights = {term: getattr(args, f"alpha_{term}") for term in _TERMS}
        dropped = []
        if weights["kl"] > 0 and (_headless(student) or _headless(teacher)):
            dropped.append(f"alpha_kl (the {'student' if _headless(student) else 'teacher'} has no logits)")
            weights["kl"] = 0.0
        if weights["task"] > 0 and _headless(student):
            dropped.append("alpha_task (the student has no task head to compute a loss from labels)")
            weights["task"] = 0.0
        if dropped and any(weights.values()):
            warnings.warn(
                f"Ignoring {'; '.join(dropped)}: distilling {type(student).__name__} on hidden states only.",
                stacklevel=3,
            )
        if not any(weights.values()):
            raise ValueError(
                f"No distillation term applies to this student/teacher pair: {'; '.join(dropped) or 'all weights 0'}. "
                "For models without logits set alpha_cos and/or alpha_pooled (and alpha_mse, alpha_attn) > 0."
            )
        if weights["kl"] > 0:
            student_out, teacher_out = _output_size(student), _output_size(teacher)
            if student_out != teacher_out:
                raise ValueError(
                    f"The soft-target loss (alpha_kl={args.alpha_kl}) needs the same output space, but the student "
                    f"predicts over {student_out[1]} {student_out[0]} and the teacher over {teacher_out[1]} "
                    f"{teacher_out[0]}. Use a student built from the teacher (make_student) or with the teacher's "
                    "tokenizer / labels, or set alpha_kl=0 to distil on hidden states only."
                )
        return weights

    def _layer_map(self, student: nn.Module, teacher: nn.Module, args: DistillationArguments) -> dict[int, int]:
        if not (args.needs_hidden_states or args.alpha_attn > 0):
            return {}
        return resolve_layer_map(args.layer_map, _depth(student), _depth(teacher))

    def _make_projections(
        self, student: nn.Module, teacher: nn.Module, args: DistillationArguments
    ) -> HiddenProjections | None:
        student_dim, teacher_dim = _width(student), _width(teacher)
        if student_dim == teacher_dim or not args.needs_hidden_states:
            return None
        layers = sorted(set(self.layer_map) | ({_depth(student)} if self.weights["pooled"] > 0 else set()))
        # Fixed seed: the same projections in every process and in a resumed run before its checkpoint is loaded.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            projections = HiddenProjections(layers, student_dim, teacher_dim)
        return projections.to(self.accelerator.device)

    def _check_dataset(self, dataset: Any) -> None:
        columns = getattr(dataset, "column_names", None)
        if self.weights["task"] > 0 and columns is not None and not {"labels", "label", "label_ids"} & set(columns):
            raise ValueError(
                f"alpha_task={self.args.alpha_task} needs labels, but the training dataset has only columns {columns}. "
                "Set alpha_task=0 to distil on unlabeled text, or add a 'labels' column."
            )

    # -- the loss ----------------------------------------------------------------------------------------------------
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """The weighted distillation loss of one batch (and the student's outputs when `return_outputs`)."""
        weights, args = self.weights, self.args
        want = {"return_dict": True}
        if args.needs_hidden_states:
            want["output_hidden_states"] = True
        if weights["attn"] > 0:
            want["output_attentions"] = True
        teacher_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "label_ids")}
        student_inputs = inputs if weights["task"] > 0 else teacher_inputs
        student_out = model(**student_inputs, **want)
        if self.teacher.training:  # someone called .train() on it: dropout would make the targets noisy
            self.teacher.eval()
        with torch.no_grad():
            teacher_out = self.teacher(**teacher_inputs, **want)

        mask = inputs.get("attention_mask")
        terms: dict[str, torch.Tensor] = {}
        if weights["kl"] > 0:
            terms["kl"] = soft_target_loss(student_out.logits, teacher_out.logits, args.temperature, mask)
        if weights["task"] > 0:
            if student_out.get("loss") is None:
                raise ValueError(
                    f"alpha_task={args.alpha_task} but the student computed no loss: the batch has no 'labels' "
                    f"(keys: {sorted(inputs)}). Set alpha_task=0 for unlabeled data."
                )
            terms["task"] = student_out.loss
        if args.needs_hidden_states:
            terms.update(self._hidden_terms(student_out.hidden_states, teacher_out.hidden_states, mask))
        if weights["attn"] > 0:
            pairs = [(s, t) for s, t in self.layer_map.items() if s > 0 and t > 0]  # 0 = embeddings: no attention
            terms["attn"] = sum(
                attention_kl_loss(student_out.attentions[s - 1], teacher_out.attentions[t - 1], mask) for s, t in pairs
            ) / max(len(pairs), 1)
        loss = sum(weights[name] * value for name, value in terms.items())
        if model.training:
            for name, value in terms.items():
                weighted = (weights[name] * value).detach().float()
                self._component_sums[name] = self._component_sums.get(name, 0.0) + weighted
            self._component_count += 1
        if not return_outputs:
            return loss
        # Hand back what the student returns on its own: evaluation would otherwise gather every hidden state and
        # attention map we asked for, and pass them to compute_metrics as extra "logits".
        added = {key for key in ("hidden_states", "attentions") if f"output_{key}" in want}
        return loss, type(student_out)(**{k: v for k, v in student_out.items() if k not in added})

    def _hidden_terms(self, student_hidden, teacher_hidden, mask) -> dict[str, torch.Tensor]:
        weights, terms = self.weights, {}

        def project(index: int) -> torch.Tensor:
            hidden = student_hidden[index]
            return self.projections(index, hidden) if self.projections is not None else hidden

        if weights["cos"] > 0 or weights["mse"] > 0:
            projected = {s: project(s) for s in self.layer_map}
            if weights["cos"] > 0:
                terms["cos"] = sum(
                    hidden_cosine_loss(projected[s], teacher_hidden[t], mask) for s, t in self.layer_map.items()
                ) / len(self.layer_map)
            if weights["mse"] > 0:
                terms["mse"] = sum(
                    hidden_mse_loss(projected[s], teacher_hidden[t], mask) for s, t in self.layer_map.items()
                ) / len(self.layer_map)
        if weights["pooled"] > 0:
            terms["pooled"] = pooled_cosine_loss(project(len(student_hidden) - 1), teacher_hidden[-1], mask)
        return terms

    # -- projections: optimised with the student, synchronised across processes, saved with the optimizer ---------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        # FSDP2 swaps the model's parameters for sharded ones in `accelerator.prepare(model, optimizer)` and fails on
        # optimizer parameters it does not own: the projections join after that, in `create_scheduler`.
        if fsdp_version(self) != 2:
            self._add_projections(optimizer)
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        self._add_projections(optimizer or self.optimizer)  # before the scheduler records each group's lr
        return super().create_scheduler(num_training_steps, optimizer)

    def _add_projections(self, optimizer: torch.optim.Optimizer | None) -> None:
        if self.projections is None or optimizer is None:
            return
        present = {id(p) for group in optimizer.param_groups for p in group["params"]}
        params = [p for p in self.projections.parameters() if id(p) not in present]
        if params:
            lr = self.args.projection_lr or self.args.learning_rate
            optimizer.add_param_group({"params": params, "lr": lr, "weight_decay": 0.0})
            # The Trainer zeroes only the student's gradients (model.zero_grad()); clear ours after each step.
            inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
            inner.register_step_post_hook(lambda *_: self.projections.zero_grad(set_to_none=True))

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.projections is not None and self.accelerator.num_processes > 1:
            # The projections live outside the DDP/FSDP-wrapped student, so their gradients are averaged here.
            for param in self.projections.parameters():
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.accelerator.num_processes
        return loss

    def extra_parameters(self) -> list[nn.Parameter]:
        return [] if self.projections is None else list(self.projections.parameters())

    def save_extra_state(self, output_dir: str) -> None:
        """The projections go into each checkpoint next to the optimizer (see `CheckpointExtrasTrainer`)."""
        if self.projections is not None and self.args.should_save:
            from safetensors.torch import save_file

            state = {k: v.detach().contiguous().cpu() for k, v in self.projections.state_dict().items()}
            save_file(state, os.path.join(output_dir, PROJECTIONS_NAME))

    def load_extra_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None and self.projections is not None:
            path = os.path.join(checkpoint, PROJECTIONS_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {PROJECTIONS_NAME}: it was not written by a DistillationTrainer with the "
                    "same student/teacher widths, so the run cannot be resumed exactly from it."
                )
            from safetensors.torch import load_file

            device = self.accelerator.device  # "cpu:0" under accelerate's multi-CPU launch: safetensors wants "cpu"
            self.projections.load_state_dict(load_file(path, device="cpu" if device.type == "cpu" else str(device)))

    # -- logging -----------------------------------------------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the mean weighted value of each loss term since the last log (``loss_kl``, ``loss_cos``, ...)."""
        if "loss" in logs and self._component_count:
            names = sorted(self._component_sums)
            values = torch.stack([torch.as_tensor(self._component_sums[n]) for n in names]) / self._component_count
            if self.accelerator.num_processes > 1:
                values = self.accelerator.reduce(values.to(self.accelerator.device), reduction="mean")
            logs.update({f"loss_{n}": float(v) for n, v in zip(names, values.tolist())})
            self._component_sums, self._component_count = {}, 0
        super().log(logs, start_time)


def _disable_attention_dropout(model: nn.Module) -> None:
    """Switch off dropout on the student's attention probabilities while they are a distillation target.

    transformers returns the maps *after* dropout, so dropped entries are 0 and the KL against the teacher's
    (dropout-free) maps would be dominated by ``log(0)``. Residual and FFN dropout stay on.
    """
    try:
        adapter = get_adapter(model)
    except UnsupportedArchitectureError:
        return
    for layer in adapter.layer_modules(model):
        attention = adapter.sub(layer, adapter.attention)
        for name in ("dropout", "attn_dropout", "attention_dropout"):
            value = getattr(attention, name, None)
            if isinstance(value, nn.Dropout):
                value.p = 0.0
            elif isinstance(value, float):
                setattr(attention, name, 0.0)


def _headless(model: nn.Module) -> bool:
    """True for a bare backbone (``AutoModel``): it returns hidden states, no logits and no loss."""
    return getattr(model, "base_model", None) is model


def _output_size(model: nn.Module) -> tuple[str, int]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        return "tokens", int(model.config.get_text_config().vocab_size)
    return "labels", int(getattr(model.config, "num_labels", 0))


def _depth(model: nn.Module) -> int:
    try:
        return len(get_adapter(model).layer_modules(model))
    except UnsupportedArchitectureError:
        return int(model.config.get_text_config().num_hidden_layers)


def _width(model: nn.Module) -> int:
    return int(model.config.get_text_config().hidden_size)
