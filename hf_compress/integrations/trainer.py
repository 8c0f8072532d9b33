"""The `transformers.Trainer` and `accelerate` internals hf_compress relies on, in one place.

Checked on transformers 5.23 and 5.24, accelerate 1.15, torch 2.13:

- `PreTrainedModel.save_pretrained(state_dict=...)` ignores the given state dict when the model has an
  ``hf_quantizer`` (every hf_compress model has one): `CheckpointExtrasTrainer._save` makes it keep the full state
  dict gathered under FSDP.
- `Trainer._save_optimizer_and_scheduler(output_dir)` runs when a checkpoint is written and
  `Trainer._load_optimizer_and_scheduler(checkpoint)` when training resumes from one; both are private and may
  change. Subclasses get two public hooks instead (`save_extra_state` / `load_extra_state`).
- FSDP without a GPU. torch 2.13 runs FSDP1 and FSDP2 (`fully_shard`) on CPU over gloo, but accelerate 1.15 turns
  FSDP on only for GPU-like distributed types (`AcceleratorState.__init__` checks MULTI_GPU, MULTI_XPU, ...): on
  CPU, ``accelerate launch`` with an FSDP config (or ``TrainingArguments(fsdp=True)``) *silently trains with DDP*,
  every process holding the whole model. `CheckpointExtrasTrainer` switches accelerate's state to FSDP there (the
  same two assignments accelerate makes for GPUs), so the FSDP code paths run, and are tested, on CPU too. Two more
  CPU gaps of accelerate 1.15 are bridged: `FullyShardedDataParallelPlugin(sync_module_states=True)` raises "There
  are currently no available devices found" without an accelerator (turned off on CPU: every process loads the
  same weights), and FSDP1 gets ``device_id=cpu:0`` while torch's compute device is ``cpu`` ("Inconsistent compute
  device and `device_id`"). FSDP1's full state dict is gathered without ``offload_to_cpu`` there: on CPU the
  "offloaded" tensors alias memory FSDP frees right after, and rank 0 dies with a segmentation fault.
- FSDP2 auto wrap: with TRANSFORMER_BASED_WRAP and no class names accelerate wraps every ``_no_split_modules``
  class, BERT's ``BertEmbeddings`` too, then shards the input embedding inside it a second time (torch: "Invariant
  encountered: value was None"); `CheckpointExtrasTrainer` wraps the transformer layers only.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from torch import nn
from transformers import Trainer


__all__ = ["CheckpointExtrasTrainer", "EXTRA_OPTIMIZER_NAME", "check_fsdp_compatible", "fsdp_version"]

# Under FSDP: the optimizer state of `CheckpointExtrasTrainer.extra_parameters`, next to optimizer.bin.
EXTRA_OPTIMIZER_NAME = "extra_optimizer_state.pt"


class CheckpointExtrasTrainer(Trainer):
    """A Trainer for hf_compress models: checkpoints can hold extra state, and FSDP works on CPU as on GPUs.

    Override `save_extra_state` / `load_extra_state` to put more state into checkpoints. Under FSDP the model is
    checked first (`check_fsdp_compatible`): what cannot be sharded gets an error that says which setting can.
    Use it (or `DistillationTrainer`) in place of `Trainer` to fine-tune compressed models.
    """

    def save_extra_state(self, output_dir: str) -> None:
        """Write extra state into the checkpoint folder `output_dir` (after the optimizer and scheduler)."""

    def load_extra_state(self, checkpoint: str | None) -> None:
        """Read it back when resuming from `checkpoint` (before the optimizer and scheduler; None: a fresh run)."""

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters outside the model that the optimizer trains too (e.g. distillation projections)."""
        return []

    # transformers 5.23/5.24: private; called from `_save_checkpoint`.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        with self._optimizer_without_extras() as extras:
            if self._fsdp1_full_state_dict_on_cpu():
                # The FSDP copy of the model for resuming: accelerate's save_fsdp_model forces offload_to_cpu=True
                # (see save_model); transformers calls it by its name in transformers.trainer.
                import transformers.trainer as trainer_module

                original = trainer_module.save_fsdp_model
                trainer_module.save_fsdp_model = _save_fsdp1_model_on_cpu
                try:
                    super()._save_optimizer_and_scheduler(output_dir)
                finally:
                    trainer_module.save_fsdp_model = original
            else:
                super()._save_optimizer_and_scheduler(output_dir)
        if extras is not None and self.args.should_save:
            torch.save(extras, os.path.join(output_dir, EXTRA_OPTIMIZER_NAME))
        self.save_extra_state(output_dir)

    # transformers 5.23/5.24: private; called from `train(resume_from_checkpoint=...)`.
    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        self.load_extra_state(checkpoint)
        with self._optimizer_without_extras() as extras:
            super()._load_optimizer_and_scheduler(checkpoint)
        if extras is not None and checkpoint is not None:
            path = os.path.join(checkpoint, EXTRA_OPTIMIZER_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {EXTRA_OPTIMIZER_NAME} (the optimizer state of the parameters outside the "
                    "FSDP model): it was not written by this trainer under FSDP, so the run cannot resume exactly."
                )
            saved = torch.load(path, map_location="cpu", weights_only=True)
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            extras = {id(p) for p in self.extra_parameters()}
            groups = [g for g in inner.param_groups if any(id(p) in extras for p in g["params"])]
            for group, hyperparameters in zip(groups, saved["groups"]):
                group.update(hyperparameters)  # the lr the schedule had reached, not the one at creation
            for param, state in zip(self.extra_parameters(), saved["state"]):
                # moments go to the parameter's device; "step" stays on CPU, as Optimizer.load_state_dict does
                if state:
                    inner.state[param] = {k: v.to(param.device) if k != "step" else v for k, v in state.items()}

    @contextlib.contextmanager
    def _optimizer_without_extras(self):
        """Under FSDP, hide `extra_parameters` from the optimizer while it is saved or loaded.

        torch's FSDP optimizer state dicts name every parameter by its place in the model and fail on any other
        (a bare ``KeyError: <index>``); these are saved beside, in ``EXTRA_OPTIMIZER_NAME``. Yields their state.
        """
        extras = {id(p) for p in self.extra_parameters()}
        if not (self.is_fsdp_enabled and extras and self.optimizer is not None):
            yield None
            return
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        groups = [g for g in inner.param_groups if any(id(p) in extras for p in g["params"])]
        if any(id(p) not in extras for g in groups for p in g["params"]):
            raise ValueError("Parameters outside the model must be in optimizer param groups of their own.")
        state = {p: inner.state.pop(p) for p in list(inner.state) if id(p) in extras}
        inner.param_groups[:] = [g for g in inner.param_groups if g not in groups]
        try:
            hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in groups]  # lr, betas, ...
            yield {"state": [state.get(p, {}) for p in self.extra_parameters()], "groups": hyperparameters}
        finally:
            inner.param_groups.extend(groups)
            inner.state.update(state)

    def _fsdp1_full_state_dict_on_cpu(self) -> bool:
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        return (plugin is not None and plugin.fsdp_version == 1 and self.accelerator.device.type == "cpu"
                and "FULL_STATE_DICT" in str(plugin.state_dict_type))  # fmt: skip

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if not self._fsdp1_full_state_dict_on_cpu():
            return super().save_model(output_dir, _internal_call=_internal_call)
        # FSDP1 on CPU: accelerate 1.15 gathers with offload_to_cpu=True, and on CPU the "offloaded" tensors alias
        # the unsharded flat parameter FSDP frees right after (rank 0 then crashes with a segmentation fault).
        self._save(output_dir or self.args.output_dir, state_dict=_fsdp1_full_state_dict(self.model))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # transformers 5.23/5.24: private; `save_model` calls it with the full state dict it gathered under FSDP.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        model = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
        quantizer = getattr(model, "hf_quantizer", None)
        if state_dict is None or quantizer is None:
            return super()._save(output_dir, state_dict=state_dict)
        # `PreTrainedModel.save_pretrained` replaces the state dict it was given by
        # `hf_quantizer.get_state_dict_and_metadata(model)`, and (None, {}) means "the model's own": under FSDP those
        # are the local DTensor shards, which safetensors cannot write. Hand it the gathered one instead.
        quantizer.get_state_dict_and_metadata = lambda _model: (state_dict, {})
        try:
            return super()._save(output_dir, state_dict=state_dict)
        finally:
            del quantizer.get_state_dict_and_metadata

    # transformers 5.23/5.24: public, called once from `__init__` (self.model is set by then).
    def create_accelerator_and_postprocess(self) -> None:
        fsdp_on_cpu = _no_accelerator(self.args) and _fsdp_requested(self.args)
        if fsdp_on_cpu:
            _cpu_plugin_args(self.args.fsdp_plugin_args)
        super().create_accelerator_and_postprocess()
        if fsdp_on_cpu:
            _enable_fsdp_on_cpu(self)
        if self.is_fsdp_enabled and self.model is not None:
            _fsdp2_layer_classes(self.model, self.accelerator.state.fsdp_plugin)
            check_fsdp_compatible(self.model, self.accelerator.state.fsdp_plugin)


def fsdp_version(trainer: Trainer) -> int | None:
    """1 or 2 when `trainer` shards its model with FSDP, None otherwise."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) if trainer.is_fsdp_enabled else None
    return None if plugin is None else int(plugin.fsdp_version)


def check_fsdp_compatible(model: nn.Module, plugin) -> None:
    """Raise a clear error for a model FSDP `plugin` cannot shard; say which setting can.

    hf_compress keeps packed int8/int4 weights as buffers, which FSDP never flattens or shards: they stay whole
    (and frozen) on every process, and only floating-point parameters are sharded. What fails: FSDP1 and FSDP2 both
    need one dtype per wrapped unit (each transformer layer, and the rest of the model), FSDP1 also (unless
    ``use_orig_params``) one ``requires_grad`` (LoRA adapters next to frozen weights), and PEFT adapters under FSDP1.
    """
    version = int(getattr(plugin, "fsdp_version", 1))
    params = [(name, p) for name, p in model.named_parameters()]
    if not params:
        raise ValueError(f"{type(model).__name__} has no parameters for FSDP to shard.")
    for unit, unit_params in _wrapped_units(model, plugin):
        dtypes = sorted({str(p.dtype) for _, p in unit_params})
        if len(dtypes) > 1:
            examples = {str(p.dtype): name for name, p in unit_params}
            raise ValueError(
                f"FSDP{version} needs one parameter dtype per wrapped unit, but {unit} mixes {dtypes} (e.g. "
                f"{examples}). Quantized layers keep their bias in their compute dtype: load the model in that dtype "
                "(from_pretrained(..., dtype=torch.bfloat16)) or cast it (model.to(torch.bfloat16)); FSDP's "
                "mixed_precision then sets the compute dtype."
            )
    if version != 1:
        return
    if hasattr(model, "peft_config"):
        # peft 0.21.2 finds the adapter's tensors by module name; nested FSDP1 units rename the modules
        # (`..._fsdp_wrapped_module...`), so `save_model` would write an adapter without its LoRA weights.
        raise ValueError(
            "PEFT adapters cannot be saved correctly under FSDP1 (the saved adapter would lack its LoRA weights: "
            "peft 0.21.2 looks them up under FSDP1's wrapped module names). Use FSDP2: fsdp_version: 2 in the "
            "accelerate config, or fsdp_config={'version': 2} in TrainingArguments."
        )
    trainable = {p.requires_grad for _, p in params}
    if len(trainable) > 1 and not getattr(plugin, "use_orig_params", False):
        frozen = next(name for name, p in params if not p.requires_grad)
        trained = next(name for name, p in params if p.requires_grad)
        raise ValueError(
            f"This model trains some parameters ({trained!r}) and freezes others ({frozen!r}), e.g. LoRA on a "
            "quantized or frozen backbone; FSDP1 with use_orig_params=False cannot flatten both into one "
            "parameter. Set fsdp_use_orig_params: true (fsdp_config={'use_orig_params': True}), or use FSDP2 "
            "(fsdp_version: 2)."
        )


def _wrapped_units(model: nn.Module, plugin) -> list[tuple[str, list]]:
    """(description, named parameters) of each FSDP unit: one per transformer layer and the rest, as auto-wrapped."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    names = set()
    if getattr(plugin, "auto_wrap_policy", None) is transformer_auto_wrap_policy:
        names = set(plugin.transformer_cls_names_to_wrap or getattr(base, "_no_split_modules", None) or [])
    units, inside = [], set()
    for name, module in model.named_modules():
        if type(module).__name__ in names and not any(name.startswith(f"{u}.") for u in inside):
            inside.add(name)
            units.append((f"the unit {name!r} ({type(module).__name__})", list(module.named_parameters(name))))
    owned = {id(p) for _, unit in units for _, p in unit}
    rest = [(n, p) for n, p in model.named_parameters() if id(p) not in owned]
    return [*units, ("the model outside its wrapped layers" if units else "the model", rest)]


def _fsdp2_layer_classes(model: nn.Module, plugin) -> None:
    """Wrap each transformer layer, never a module that holds the input embedding (accelerate 1.15, FSDP2).

    With TRANSFORMER_BASED_WRAP and no class names, accelerate wraps every class of ``model._no_split_modules``
    (BERT: ``BertEmbeddings`` too) and then shards the input embedding once more, which torch rejects with
    "Invariant encountered: value was None when it should not be" (the weight is already a DTensor).
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if int(plugin.fsdp_version) != 2 or plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    embedding = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    names = plugin.transformer_cls_names_to_wrap or list(getattr(base, "_no_split_modules", None) or [])
    holders = {type(m).__name__ for m in base.modules() if embedding is not None and embedding in set(m.modules())}
    clash = [name for name in names if name in holders]
    if not clash:
        return
    if plugin.transformer_cls_names_to_wrap:
        raise ValueError(
            f"fsdp_transformer_layer_cls_to_wrap={names} includes {clash}, which holds the input embedding that "
            "accelerate's FSDP2 shards on its own. Name only the transformer layer class (e.g. "
            f"{[n for n in names if n not in holders] or ['BertLayer']})."
        )
    plugin.transformer_cls_names_to_wrap = [name for name in names if name not in holders]


# -- FSDP on CPU (accelerate 1.15) -------------------------------------------------------------------------------
def _fsdp1_full_state_dict(model: nn.Module) -> dict:
    """The full state dict of an FSDP1 model on rank 0 (empty elsewhere), gathered without a CPU "offload"."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        return model.state_dict()


def _save_fsdp1_model_on_cpu(fsdp_plugin, accelerator, model, output_dir, model_index=0, **kwargs) -> None:
    """accelerate 1.15's `save_fsdp_model` for FULL_STATE_DICT (the file it writes), without offload_to_cpu."""
    from accelerate.utils.constants import FSDP_MODEL_NAME

    os.makedirs(output_dir, exist_ok=True)
    state_dict = _fsdp1_full_state_dict(model)
    if accelerator.process_index == 0:
        name = f"{FSDP_MODEL_NAME}.bin" if model_index == 0 else f"{FSDP_MODEL_NAME}_{model_index}.bin"
        torch.save(state_dict, os.path.join(output_dir, name))


def _no_accelerator(args) -> bool:
    """True when training runs on CPU: use_cpu, or no CUDA/XPU device (accelerate then picks MULTI_CPU + gloo)."""
    if args.use_cpu:
        return True
    xpu = getattr(torch, "xpu", None)
    return not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


def _fsdp_requested(args) -> bool:
    return args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _cpu_plugin_args(plugin_args: dict | None) -> None:
    """sync_module_states broadcasts rank 0's weights from an accelerator device: accelerate 1.15 raises on CPU."""

    def flag(key: str) -> bool:
        value = (plugin_args or {}).get(key, os.environ.get(f"FSDP_{key.upper()}", "false"))
        return str(value).lower() in ("1", "true")

    if flag("cpu_ram_efficient_loading"):
        raise ValueError(
            "FSDP cpu_ram_efficient_loading loads the weights on rank 0 only and broadcasts them from a GPU "
            "(sync_module_states), which accelerate cannot do on CPU. Set fsdp_cpu_ram_efficient_loading: false and "
            "fsdp_sync_module_states: false (every process then loads the checkpoint itself)."
        )
    if flag("sync_module_states"):  # every process loaded the same checkpoint: nothing to broadcast
        if plugin_args is not None:
            plugin_args["sync_module_states"] = False
        os.environ["FSDP_SYNC_MODULE_STATES"] = "false"


def _enable_fsdp_on_cpu(trainer: Trainer) -> None:
    """Make accelerate shard with FSDP on CPU instead of silently falling back to DDP (see the module docstring)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        return  # one process (nothing to shard), or accelerate already chose FSDP
    plugin_args = trainer.args.fsdp_plugin_args
    plugin = FullyShardedDataParallelPlugin(**plugin_args) if plugin_args else FullyShardedDataParallelPlugin()
    # What AcceleratorState.__init__ does for GPUs; PartialState too, since every later AcceleratorState() copies
    # PartialState's shared state back over its own.
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    if plugin.fsdp_version == 1:
        # torch's FSDP1 compares device_id (accelerate passes its device, cpu:0) with torch.device("cpu").
        PartialState._shared_state["device"] = state.device = torch.device("cpu")
        if "FULL_STATE_DICT" in str(plugin.state_dict_type):
            # Gathering "to CPU" on CPU aliases the flat parameter FSDP1 frees right after (segmentation fault).
            from torch.distributed.fsdp import FullOptimStateDictConfig

            plugin.optim_state_dict_config = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)
    trainer.is_fsdp_enabled = True
    if trainer.accelerator.process_index == 0:
        warnings.warn(
            f"hf_compress: running FSDP{plugin.fsdp_version} on CPU over gloo (accelerate alone would train with DDP "
            "here).",
            stacklevel=3,
        )
