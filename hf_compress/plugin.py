"""The transformers quantizer plugin: how plain `AutoModel.from_pretrained(path)` rebuilds a compressed model.

`from_pretrained` finds ``"quant_method": "hf_compress"`` in ``config.json``, rebuilds our `CompressionConfig` and
creates `HfCompressQuantizer`. Its `_process_model_before_weight_loading` replays every technique's `restructure` on
the empty (meta) skeleton, so the module types and shapes match the saved tensors exactly before they are read; no
fp32 weight of a compressed module is ever materialised.

Two checks keep a wrong model from ever loading:

- Without ``import hf_compress``, plain transformers must fail: ``config.json`` carries a load guard that makes
  every transformers entry point raise an error saying to ``import hf_compress`` (see
  `hf_compress.integrations.transformers`, which also removes the guard again when the plugin is imported).
- With the plugin, the checkpoint must match the recipe: before any weight is read, `_check_checkpoint` compares the
  tensor names and shapes in the weights files with the restructured skeleton and raises a `ValueError` naming
  every module that does not match (transformers itself would only warn and initialise those tensors at random).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import torch
from transformers.quantizers import HfQuantizer, register_quantizer

from .config import QUANT_METHOD, CompressionConfig
from .integrations import transformers as integrations_transformers
from .integrations.transformers import LOAD_GUARD
from .registry import get_technique


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = ["HfCompressQuantizer", "attach_recipe", "get_recipe", "LOAD_GUARD"]

# The guard that checkpoints written before the `id2label` guard carry as `attn_implementation`: still undone on load.
_LEGACY_ATTN_GUARD = (
    "hf_compress-checkpoint: run `import hf_compress` before from_pretrained (pip install hf-compress)"
)
_MAX_REPORTED_MODULES = 20

integrations_transformers.install()


@register_quantizer(QUANT_METHOD)
class HfCompressQuantizer(HfQuantizer):
    """Rebuilds (pre-quantized path) or creates (quantize-on-load path) an hf_compress model inside `from_pretrained`."""

    requires_calibration = False
    quantization_config: CompressionConfig

    def __init__(self, quantization_config: CompressionConfig, **kwargs: Any) -> None:
        super().__init__(quantization_config, **kwargs)
        self._on_load_handlers: list[Any] = []
        self._target_device = "cpu"  # where the model will run, from `update_device_map`

    # -- before the model exists -------------------------------------------------------------------------------------
    def update_attn_implementation(self, config):
        # The recipe restores an attention implementation chosen at compression time, unless the caller picked one.
        # (Older checkpoints stored `_LEGACY_ATTN_GUARD` in its place: it is replaced the same way.)
        for sub in {id(config): config, id(config.get_text_config()): config.get_text_config()}.values():
            if getattr(sub, "_attn_implementation", None) in (None, _LEGACY_ATTN_GUARD):
                sub._attn_implementation = self.quantization_config.attn_implementation
            sub.__dict__.pop("attn_implementation", None)
        return config

    def update_device_map(self, device_map):
        # Remembered for `update_dtype`: "auto" compute dtypes depend on where the model will run.
        placed = device_map.values() if isinstance(device_map, dict) else [device_map]
        on_cpu = all(d is None or str(d) in ("cpu", "disk") for d in placed)
        self._target_device = "cpu" if on_cpu else "cuda"
        return device_map

    def update_dtype(self, dtype):
        # A quantized checkpoint is rebuilt in its technique's compute dtype for the target device: the leftover float
        # weights follow it (scales keep the dtype they were saved in, see `QuantLinear`).
        if self.pre_quantized:
            for technique_config in self.quantization_config.techniques:
                model_dtype = technique_config.model_dtype(self._target_device)
                if model_dtype is not None:
                    return model_dtype
        return dtype

    # -- on the empty skeleton ---------------------------------------------------------------------------------------
    def _process_model_before_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        if self.pre_quantized:
            plain = _tensor_shapes(model)
            for technique_config in self.quantization_config.techniques:
                get_technique(technique_config.method).restructure(model, technique_config)
            _check_checkpoint(model, plain, kwargs.get("checkpoint_files"), self)
            return model
        # Quantize-on-load: each technique that supports it prepares the skeleton and hands back per-weight ops.
        for technique_config in self.quantization_config.techniques:
            technique = get_technique(technique_config.method)
            if technique.quantize_on_load is None:
                raise ValueError(
                    f"The {technique.name!r} technique cannot run inside from_pretrained (it needs the whole model "
                    "or calibration data). Load the model first, then call hf_compress.compress(model, ...)."
                )
            handler = technique.quantize_on_load(technique_config)
            handler.prepare(model, device=self._target_device)
            self._on_load_handlers.append(handler)
        return model

    def param_needs_quantization(self, model: PreTrainedModel, param_name: str, **kwargs: Any) -> bool:
        return any(h.param_needs_quantization(model, param_name) for h in self._on_load_handlers)

    def get_quantize_ops(self):
        if len(self._on_load_handlers) != 1:
            raise ValueError("Quantize-on-load takes exactly one quantization technique in the recipe.")
        return self._on_load_handlers[0].quantize_ops(self)

    # -- once the weights are in -------------------------------------------------------------------------------------
    def _process_model_after_weight_loading(self, model: PreTrainedModel, **kwargs: Any) -> PreTrainedModel:
        if self._on_load_handlers:
            resolved = [handler.resolved_config(model) for handler in self._on_load_handlers]
            self.quantization_config = CompressionConfig(
                resolved, attn_implementation=self.quantization_config.attn_implementation
            )
        for technique_config in self.quantization_config.techniques:
            after_load = get_technique(technique_config.method).after_load
            if after_load is not None:
                after_load(model, technique_config)
        attach_recipe(model, self.quantization_config, quantizer=self)
        return model

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True


def attach_recipe(
    model: PreTrainedModel, recipe: CompressionConfig, quantizer: HfCompressQuantizer | None = None
) -> PreTrainedModel:
    """Mark `model` as compressed by `recipe`, so `save_pretrained` writes the recipe and the load guard.

    Called by `compress` after the techniques ran, and by the quantizer after loading.
    """
    if recipe.attn_implementation is None:
        current = getattr(model.config, "_attn_implementation", None)
        # Only an explicit user choice is worth restoring; transformers picks the default itself on load.
        recipe.attn_implementation = current if current not in (None, _LEGACY_ATTN_GUARD, "sdpa") else None
    model.config.quantization_config = recipe
    # The load guard is added when config.json is written (see `hf_compress.integrations.transformers`).
    model.config.__dict__.pop("attn_implementation", None)
    model.hf_quantizer = quantizer or HfCompressQuantizer(recipe, pre_quantized=True)
    model.hf_quantizer.quantization_config = recipe
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD
    for module in model.modules():
        if hasattr(module, "config") and module.config is not model.config and hasattr(module.config, "to_dict"):
            module.config._is_quantized = True
    model.config._is_quantized = True
    return model


def get_recipe(model: PreTrainedModel) -> CompressionConfig | None:
    """The `CompressionConfig` of a model compressed by hf_compress, or `None` for an uncompressed model."""
    recipe = getattr(getattr(model, "config", None), "quantization_config", None)
    return recipe if isinstance(recipe, CompressionConfig) else None


# -- does the checkpoint match the recipe? ----------------------------------------------------------------------------
def _tensor_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor `model` saves and loads (works on the meta skeleton: no data is touched)."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _checkpoint_shapes(files: list[str]) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of every tensor in the weights files, from their headers; `None` for a format we cannot read."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        file = str(file)
        if file.endswith(".safetensors"):
            with safe_open(file, framework="pt") as handle:
                shapes.update({key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()})
        elif file.endswith(".bin"):
            state = torch.load(file, map_location="meta", weights_only=True)
            shapes.update({key: tuple(value.shape) for key, value in state.items()})
        else:  # e.g. GGUF: its names and shapes are converted by transformers, nothing to compare here
            return None
    return shapes


def _check_checkpoint(
    model: PreTrainedModel, plain: dict[str, tuple[int, ...]], files: list[str] | None, quantizer: HfQuantizer
) -> None:
    """Raise a `ValueError` naming each module whose tensors in the checkpoint disagree with the recipe.

    `plain` holds the skeleton's tensor shapes before the recipe restructured it: the modules the recipe changed are
    the owners of the names and shapes that differ. Checkpoint names are first renamed exactly as transformers will
    rename them (its per-model conversion mapping, then adding or removing ``base_model_prefix``). Then:

    - every tensor of a module the recipe changed must be in the checkpoint, with the expected shape, and no other;
    - a module that exists in the skeleton may not get tensors it lacks (e.g. ``weight_packed`` for a layer whose
      recipe entry was deleted), nor miss some of its tensors while others are there;
    - a tensor of the base model's body may not change shape (a pruned layer that the recipe no longer lists).

    Modules missing from the checkpoint as a whole (a new task head), extra modules (another head), task-head shapes
    (``ignore_mismatched_sizes=True`` re-initialises them) and tied weights are left to transformers, as always.
    """
    # The renaming functions transformers' own loader calls (checked on 5.24.0), so names compare as it will load them.
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    if not files:
        return  # `from_pretrained(None, state_dict=...)`: no files to compare
    stored = _checkpoint_shapes(files)
    if stored is None:
        return
    expected = _tensor_shapes(model)
    changed = {_owner(k) for k in plain.keys() ^ expected.keys()}
    changed |= {_owner(k) for k in plain.keys() & expected.keys() if plain[k] != expected[k]}
    changed.discard("")  # a tensor of the model itself must not make every stray checkpoint key an error
    modules = {name for name, _ in model.named_modules()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    has_body = bool(prefix) and prefix in modules  # a task model: its base model lives under `prefix.`
    conversions = get_model_conversion_mapping(model, hf_quantizer=quantizer)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    found, converted = {}, set()
    for key, shape in stored.items():  # the same two tries as transformers' `convert_and_load_state_dict_in_model`
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if renamed not in expected and key in expected:
            renamed, pattern = rename_source_key(key, [], [], prefix, expected)
        found[renamed] = shape
        if pattern is not None:  # several tensors merged into one by a converter: shapes are not comparable
            converted.add(renamed)
    owners = {_owner(k) for k in expected}
    present = {k.rsplit(".", depth)[0] for k in found for depth in range(1, k.count(".") + 1)}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    ignore_missing = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_missing", None) or []]
    ignore_unexpected = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []]

    problems: dict[str, dict[str, list[str]]] = {}  # module -> kind of problem -> tensor names (relative)

    def report(module: str, key: str, kind: str) -> None:
        group = next((m for m in _ancestors(module) if m and m in changed), module)  # the module the recipe replaced
        name = key[len(group) + 1 :] if group else key
        if kind == _RESHAPED:
            name = f"{name} {list(found[key])} (recipe: {list(expected[key])})"
        problems.setdefault(group or "<root>", {}).setdefault(kind, []).append(name)

    for key, shape in found.items():
        if key in expected:
            body = not has_body or key.startswith(prefix + ".")
            if key not in converted and shape != expected[key] and (_owner(key) in changed or body):
                report(_owner(key), key, _RESHAPED)
        elif not any(p.search(key) for p in ignore_unexpected):
            if has_body and key.split(".", 1)[0] not in modules:
                key = f"{prefix}.{key}"  # a base-model checkpoint: place the extra tensor inside the body
            holder = next(m for m in reversed(_ancestors(_owner(key))) if m in modules)  # deepest existing module
            if holder in changed or (holder and holder in owners):
                report(holder, key, _UNEXPECTED)
    for key in expected.keys() - found.keys():
        if key in tied or any(p.search(key) for p in ignore_missing):
            continue
        if any(source == key and target in found for target, source in tied.items()):
            continue  # transformers ties the other way round
        owner = _owner(key)
        if owner in changed or (owner and owner in present):
            report(owner, key, _MISSING)
    if problems:
        raise ValueError(_mismatch_message(problems, files))


def _owner(key: str) -> str:
    return key.rpartition(".")[0]


def _ancestors(module: str) -> list[str]:
    """`module` and the modules above it, outermost first: "a.b.c" -> ["", "a", "a.b", "a.b.c"]."""
    parts = module.split(".") if module else []
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


_MISSING, _UNEXPECTED, _RESHAPED = "missing", "not in the recipe", "other shape"


def _mismatch_message(problems: dict[str, dict[str, list[str]]], files: list[str]) -> str:
    lines = [
        f"  {module}: " + "; ".join(f"{kind}: {', '.join(sorted(names))}" for kind, names in sorted(kinds.items()))
        for module, kinds in sorted(problems.items())
    ]
    if len(lines) > _MAX_REPORTED_MODULES:
        lines = lines[:_MAX_REPORTED_MODULES] + [f"  ... and {len(lines) - _MAX_REPORTED_MODULES} more modules"]
    folder = os.path.dirname(str(files[0])) or "."
    return (
        f"The weights in {folder} do not match the hf_compress recipe in its config.json (quantization_config): "
        f"loading them would leave {len(problems)} module{'s' if len(problems) > 1 else ''} wrong or randomly "
        "initialised. The checkpoint's tensors, by module:\n"
        + "\n".join(lines)
        + "\nExpected: every tensor of each compressed module, with the shape the recipe gives, and nothing else. "
        "config.json and the weights were edited or come from different saves: restore both from the same "
        "save_pretrained (or hf_compress.compress) output, or compress the original model again."
    )
