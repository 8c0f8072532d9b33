"""The layer-by-layer (sequential) calibration pipeline: memory of one layer plus the calibration activations.

As in the GPTQ paper and llm-compressor's sequential pipeline: the calibration batches run through the embeddings
only, and what the first layer receives is recorded (`capture.capture_inputs`). Then, for each layer in order: its
weights are read (from the mmapped checkpoint: a model loaded by `from_pretrained` holds zero-copy views of its
safetensors files, so a layer's float pages become resident only when it runs), the activations go through it
while the technique's input statistics are collected (padding left out), the technique compresses it, the
activations go through the *compressed* layer to become the next layer's inputs, and the layer's float pages are
dropped. Finished layers can be moved to a mapped temporary file (`offload_layer`), activations spill to disk past a
memory bound (`ActivationStore`). The modules after the layers (LM head, pooler) get their statistics from the last
layer's outputs (`capture.run_tail`), embeddings are quantized last, calibration-free.

A step with `float_target` (GPTQ's default) also gets the float model's activations: a second store carries them,
and each layer is calibrated stage by stage (`stages.calibrate_in_stages`: q/k/v, then o_proj with q/k/v already
quantized, ...), each stage's cross moments taken against the float layer's forward on the float stream, whose
output becomes the float model's next activations. Both stores share the activation memory bound.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architectures import get_adapter
from ..calibration import Calibration, MomentCollector
from ..config import CompressionConfig, TechniqueConfig, check_canonical_order
from ..plugin import attach_recipe, get_recipe
from ..validation import check_supported
from .capture import capture_inputs, run_layer, run_tail
from .offload import ActivationStore, offload_layer, release_weights
from .stages import calibrate_in_stages
from .steps import LayerStep, step_for


__all__ = [
    "sequential_compress",
    "run_sequential",
    "available_memory",
    "needs_sequential",
    "choose_sequential",
    "has_step",
]

logger = logging.getLogger(__name__)

# Without an explicit bound, activations may use this fraction of the memory available when the pipeline starts.
_AUTO_ACTIVATION_FRACTION = 0.25


def available_memory() -> int:
    """Bytes of memory available to a new allocation now (``MemAvailable`` on Linux, else free physical pages)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: assume it fits


def _weights_bytes(model_or_path: Any) -> int:
    if isinstance(model_or_path, nn.Module):
        return sum(p.numel() * p.element_size() for p in model_or_path.parameters())
    folder = Path(model_or_path)
    files = [*folder.glob("*.safetensors"), *folder.glob("*.bin")] if folder.is_dir() else []
    return sum(f.stat().st_size for f in files)


def needs_sequential(model_or_path: Any, factor: float = 3.0) -> bool:
    """Whether one-pass calibration would not fit: it holds the float model, a copy of it for measuring and every
    layer's statistics at once (about `factor` times the weights), more than the memory available now. Only local
    folders and model objects are sized (a Hub id is not downloaded to find out)."""
    return _weights_bytes(model_or_path) * factor > available_memory()


def sequential_compress(
    model_or_path: Any,
    config: TechniqueConfig,
    calibration_data: Any,
    *,
    tokenizer: Any = None,
    batch_size: int = 16,
    max_samples: int | None = None,
    max_activation_bytes: int | str | None = "auto",
    offload_dir: str | os.PathLike | None = None,
    offload_layers: bool | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    float_target: bool | float = True,
) -> nn.Module:
    """Compress a model layer by layer with calibration data, in memory of about one layer plus the activations.

    Args:
        model_or_path (`PreTrainedModel`, `str` or `os.PathLike`): a model (compressed in place) or a local folder,
            loaded with its own class; its weights are read from the mmapped checkpoint one layer at a time.
        config (`TechniqueConfig`): the technique: `WeightQuantizationConfig` with ``algorithm="gptq"`` (or
            ``"auto"``), or `LowRankLinearConfig` (activation-whitened, each layer from the factorized layers'
            outputs; see `low_rank.LowRankStep`, also for how a ``param_budget`` is shared), or
            `HeadPruningConfig` / `FFNPruningConfig` with ``importance="activation"`` and ``ranking="per_layer"``
            (each layer scored on the pruned layers' outputs; see `pruning.PruningStep`).
        calibration_data: texts, a `datasets.Dataset`, token batches or a `Calibration`.
        tokenizer (*optional*): tokenizes texts (default: the one saved with the model).
        batch_size (`int`, defaults to 16): calibration texts per forward.
        max_samples (`int`, *optional*): calibration texts used (default: the config's ``calibration_samples``, or
            ``max_calibration_texts`` for low-rank factorization, ``max_samples`` for pruning).
        max_activation_bytes (`int`, ``"auto"`` or None): memory bound of the stored activations, spilled to a
            temporary folder past it (``0``: always on disk; None: no bound; ``"auto"``: a quarter of the memory
            available at the start).
        offload_dir (*optional*): where temporary files go (default: the system temp dir); all are removed.
        offload_layers (`bool`, *optional*): move each finished layer to a mapped temporary file, so the compressed
            model does not stay resident either (default: True for a folder, False for a model object).
        device (*optional*): run each layer there (e.g. ``"cuda"``), moving it back afterwards.
        progress (`bool`, defaults to True): a progress bar over the layers.
        float_target (`bool` or `float`, defaults to True): each module minimises its error to the *float
            model's* outputs on its own inputs, ``||X_f W^T - X_c W'^T||``, so that a layer also corrects what the
            layers before it got wrong; each layer is then calibrated stage by stage (q/k/v, o_proj, ...), and the
            float model's activations are carried beside the compressed ones (twice the activation memory, more
            layer forwards). A number in ``(0, 1]`` sets how much of that least-squares correction is applied (True:
            the step's default, GPTQ's `steps.DEFAULT_FLOAT_TARGET` 0.5, low-rank's `low_rank.LOW_RANK_FLOAT_TARGET`
            0.75). False: the float weights on the compressed inputs, ``||X_c W^T - X_c W'^T||`` (the GPTQ paper's
            target), each layer in one pass. Pruning has no float target: leave it at its default.

    Returns:
        The compressed model; ``model.config.quantization_config`` holds the recipe, as after `apply_compression`,
        so ``save_pretrained`` writes the same checkpoint format.

    ```py
    >>> from hf_compress.sequential import sequential_compress
    >>> from hf_compress.quantization import WeightQuantizationConfig
    >>> model = sequential_compress("llama-fp32/", WeightQuantizationConfig(bits=4, algorithm="gptq"), texts)
    >>> model.save_pretrained("llama-int4")
    ```
    """
    from_folder = isinstance(model_or_path, (str, os.PathLike))
    if from_folder:
        from ..pipeline.loading import load_model

        model, loaded_tokenizer, _ = load_model(model_or_path, supported_only=True)
        tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
    elif isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        raise TypeError(f"sequential_compress takes a model or a local folder, got {type(model_or_path).__name__}.")
    if not isinstance(config, TechniqueConfig):
        raise TypeError(f"Expected a technique config such as WeightQuantizationConfig(...), got {type(config).__name__}.")
    calibration = Calibration.of(calibration_data, tokenizer)
    if calibration is None:
        raise ValueError(
            "Sequential calibration needs calibration_data: a list of texts, a datasets.Dataset or token batches."
        )
    check_supported(model)
    previous = get_recipe(model)
    done = list(previous.techniques) if previous is not None else []
    check_canonical_order([*done, config])
    step = step_for(config, float_target=float_target)
    names = ("calibration_samples", "max_calibration_texts", "max_samples")
    default = next((getattr(config, name) for name in names if hasattr(config, name)), None)
    samples = max_samples if max_samples is not None else default
    resolved = run_sequential(
        model, step, calibration, batch_size=batch_size, max_samples=samples,
        max_activation_bytes=max_activation_bytes, offload_dir=offload_dir,
        offload_layers=from_folder if offload_layers is None else offload_layers, device=device, progress=progress,
    )  # fmt: skip
    attn = previous.attn_implementation if previous is not None else None
    attach_recipe(model, CompressionConfig([*done, resolved], attn_implementation=attn))
    return model


def _bound(value: int | str | None) -> int | None:
    if value == "auto":
        return int(available_memory() * _AUTO_ACTIVATION_FRACTION)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ValueError(f"max_activation_bytes must be 'auto', None or an integer >= 0, got {value!r}.")
    return value


@torch.no_grad()
def run_sequential(model: nn.Module, step: LayerStep, calibration: Calibration, *, batch_size: int = 16,
                   max_samples: int | None = None, max_activation_bytes: int | str | None = "auto",
                   offload_dir: str | os.PathLike | None = None, offload_layers: bool = False,
                   device: torch.device | str | None = None, progress: bool = True) -> TechniqueConfig:  # fmt: skip
    """Run `step` over `model` layer by layer (see the module docstring); returns the step's resolved config."""
    from tqdm.auto import tqdm

    adapter = get_adapter(model)
    layers = adapter.layer_modules(model)
    device = torch.device(device) if device is not None else None
    model.eval()
    step.prepare(model)
    bound = _bound(max_activation_bytes)
    float_target = step.float_target
    # With a float target, the float model's stream is stored too; the two share the activation memory bound.
    half = None if bound is None or not float_target else bound // 2
    store = ActivationStore(half if float_target else bound, offload_dir)
    reference = ActivationStore(half, offload_dir) if float_target else None
    try:
        batches = list(calibration.batches(model, batch_size=batch_size, max_samples=max_samples))
        inputs = capture_inputs(model, layers, batches, store)
        if reference is not None:
            for b in range(len(store)):
                reference.append(store[b])
        embedding = getattr(model.get_input_embeddings(), "weight", None) if adapter.embeddings else None
        release_weights([embedding] if embedding is not None else [])  # its looked-up pages; read again at the end
        home = store[0].device
        identical = True  # both streams are the embeddings' outputs until a layer is compressed
        for index in tqdm(range(len(layers)), desc="sequential calibration", unit="layer", disable=not progress):
            prefix, layer = adapter.layer_prefix(model, index), layers[index]
            where = next((p.device for p in layer.parameters()), None)
            if device is not None:
                layer.to(device)
            modules = step.layer_modules(model, prefix, layer)
            if reference is not None:  # stage by stage, against the float model's activations
                released = calibrate_in_stages(model, step, layer, modules, inputs, index, store, reference,
                                               identical, device, home)  # fmt: skip
            else:
                with MomentCollector(modules, float64=step.float64, channels=step.channels) as collector:
                    for b, batch in enumerate(inputs):
                        collector.set_mask(None if batch.mask is None else batch.mask.to(device or batch.mask.device))
                        run_layer(layer, store[b], *batch.layer_args[index], device)
                moments = collector.moments()
                del collector  # its sums: a down_proj Hessian alone is in^2 x 4 bytes (268 MB at 8192 features)
                released = step.compress_layer(model, prefix, moments)
                del moments
            identical = identical and not released
            for b, batch in enumerate(inputs):  # the next layer's inputs: this layer's outputs, as compressed
                store[b] = run_layer(layer, store[b], *batch.layer_args[index], device).to(home)
            release_weights(released)
            del released
            if device is not None and where is not None:
                layer.to(where)
            if offload_layers:
                offload_layer(layer, offload_dir)
        tail = step.tail_modules(model)
        moments, cross = {}, {}
        if tail:
            with MomentCollector(tail, float64=step.float64, channels=step.channels) as collector:
                run_tail(model, layers, batches, store, tail,
                         lambda batch, ref: collector.set_mask(batch.get("attention_mask"), reference=ref),
                         reference=None if identical else reference)  # fmt: skip
            moments, cross = collector.moments(), collector.cross_moments()
        return step.finish(model, moments, cross if float_target else None)
    finally:
        store.close()
        if reference is not None:
            reference.close()


def choose_sequential(sequential: bool | None, model_or_path: Any, configs: Any, calibration_data: Any) -> bool:
    """`compress`'s choice: layer by layer when asked (``True``, checked: GPTQ, low-rank factorization of linears or
    activation-scored pruning, with calibration data), or, by default (``None``), when GPTQ with calibration data
    would not fit in memory in one pass (`needs_sequential`; a Hub id is not sized)."""
    if sequential is not None and not isinstance(sequential, bool):
        raise TypeError(f"sequential must be True, False or None (decide by memory), got {sequential!r}.")
    gptq = [c for c in configs if is_gptq(c)]
    if sequential:
        if calibration_data is None or not any(has_step(c) for c in configs):
            received = [type(c).__name__ for c in configs]
            raise ValueError(
                "sequential=True calibrates layer by layer: it needs calibration_data=texts and, among the configs, "
                "WeightQuantizationConfig(algorithm='gptq'), LowRankLinearConfig(...) (activation-whitened) or "
                "HeadPruningConfig / FFNPruningConfig(importance='activation', ranking='per_layer'); got configs "
                f"{received} and {'no' if calibration_data is None else 'some'} calibration_data."
            )
        return True
    sized = not isinstance(model_or_path, (str, os.PathLike)) or os.path.isdir(model_or_path)
    if sequential is None and gptq and calibration_data is not None and sized and needs_sequential(model_or_path):
        logger.warning("One-pass calibration would not fit in memory: calibrating layer by layer (sequential=True).")
        return True
    return False


def is_gptq(config: Any) -> bool:
    """Whether `config` is GPTQ weight quantization (``algorithm="gptq"`` or ``"auto"``, which calibrates)."""
    from ..quantization import WeightQuantizationConfig

    return isinstance(config, WeightQuantizationConfig) and config.algorithm in ("gptq", "auto")


def has_step(config: Any) -> bool:
    """Whether `config` runs layer by layer under ``sequential=True``: GPTQ, activation-whitened low-rank
    factorization of linear layers (``whiten="none"`` is refused by its step, with the fix), or head / FFN pruning
    scored by ``importance="activation"`` (a global ranking is refused by its step, with the fix)."""
    from ..factorization.config import LowRankLinearConfig
    from ..pruning.config import FFNPruningConfig, HeadPruningConfig

    pruning = isinstance(config, (HeadPruningConfig, FFNPruningConfig)) and config.importance == "activation"
    return is_gptq(config) or isinstance(config, LowRankLinearConfig) or pruning
