"""compressed-tensors ``pack-quantized`` checkpoints: int8 / int4 weights plain transformers loads without hf_compress.

transformers loads them with the `compressed-tensors` package installed (``AutoModelForCausalLM.from_pretrained``,
no plugin). Each quantized ``nn.Linear`` gets ``weight_packed`` (our centred integers, packed eight 4-bit or four
8-bit values per int32 by compressed-tensors' own ``pack_to_int32``), ``weight_scale`` (ours, unchanged, per group or
per channel) and ``weight_shape``; the dequantized weight is ``(q - zero_point) * scale`` with an *integer* zero
point. What the format cannot hold is refused with the option that makes the model exportable:

- the structure must be a plain checkpoint's (uniform heads and FFN widths, nothing factorized; see
  `transformers_plain`);
- quantized embeddings (compressed-tensors quantizes Linear layers) and GPT-2's ``Conv1D`` layers;
- asymmetric layers whose zero offsets are not integer multiples of their scales: hf_compress's searches place
  offsets freely unless quantized with ``WeightQuantizationConfig(zero_point="integer")``, which constrains them to
  ``-zp * scale`` exactly in the stored dtype (rounding free offsets afterwards would move every weight of a group
  by up to half a step).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_compress.quantization import QuantEmbedding

from ._common import quantized_modules
from .onnx import _integers
from .transformers_plain import plain_config, plain_model


__all__ = ["export_compressed_tensors"]

WEIGHTS = "model.safetensors"


def _zero_points(module: nn.Module, scale: torch.Tensor, zero: torch.Tensor | None) -> torch.Tensor | None:
    """Integer zero points (int8) with ``-zp * scale == zero`` exactly (float32 of the stored values) and ``zp`` in
    the integer range; None for a symmetric layer; False when the offsets are free floats."""
    if zero is None:
        return None
    zp = torch.round(-zero / scale)
    lo, hi = -(1 << (module.bits - 1)), (1 << (module.bits - 1)) - 1
    if not torch.equal(-zp * scale, zero) or zp.min() < lo or zp.max() > hi:
        return False
    return zp.to(torch.int8)


def _float_offsets(modules: dict[str, nn.Module]) -> list[str]:
    names = []
    for name, module in modules.items():
        _, scale, zero = _integers(module)
        if _zero_points(module, torch.from_numpy(scale), None if zero is None else torch.from_numpy(zero)) is False:
            names.append(name)
    return names


def _options_error(embeddings: list[str], float_zero: list[str]) -> ValueError:
    """One error naming every quantization option the model lacks, so one re-run fixes them all."""
    reasons, options = [], []
    if embeddings:
        names = ", ".join(embeddings[:3])
        reasons.append(f"compressed-tensors quantizes Linear layers only, and {names} are quantized embeddings")
        options.append("quantize_embeddings=False")
    if float_zero:
        names = ", ".join(float_zero[:3])
        reasons.append(f"compressed-tensors stores integer zero points (w = (q - zp) * scale), and {names} have free "
                       "float offsets (w = q * scale + zero, not integer multiples of their scales)")  # fmt: skip
        options.append("zero_point='integer'")
    return ValueError(
        f"{'; '.join(reasons)}. Quantize with WeightQuantizationConfig({', '.join(options)}, ...) to export to "
        "compressed-tensors (with compress(), pass that config instead of a preset: the presets quantize embeddings "
        "with float offsets), or export to='onnx' / 'openvino', which hold the model as it is."
    )


def check_configs(configs) -> None:
    """Refuse, before any work, quantization configs that would give asymmetric layers free float offsets (for
    ``compress(..., export="compressed-tensors")``, so the error comes before the compression, not after it).

    Only the offsets are judged here: whether embeddings end up quantized depends on the model (tied ones are not),
    so `check` judges them on the compressed model.
    """
    from hf_compress.quantization import WeightQuantizationConfig

    for config in configs:
        if not isinstance(config, WeightQuantizationConfig) or config.zero_point == "integer":
            continue
        settings = [{"bits": config.bits, "symmetric": config.symmetric}, *(config.overrides or {}).values()]
        if any(s.get("symmetric", config.symmetric) is False
               or (s.get("symmetric", config.symmetric) is None and s.get("bits", config.bits) == 4)
               for s in settings):  # fmt: skip
            raise _options_error([], ["the asymmetric layers"])


def check(model: nn.Module) -> None:
    modules = quantized_modules(model)
    if not modules:
        raise ValueError("The model has no quantized layer: use to='transformers' for a plain checkpoint.")
    embeddings = [n for n, m in modules.items() if isinstance(m, QuantEmbedding)]
    float_zero = _float_offsets({n: m for n, m in modules.items() if n not in embeddings})
    if embeddings or float_zero:
        raise _options_error(embeddings, float_zero)
    static = [n for n, m in modules.items() if getattr(m, "activations", None) == "int8_static"]
    if static:  # its input smoothing has no slot in the format's static activation scheme
        raise ValueError(
            f"{static[:3]} use activations='int8_static' (smoothed, calibrated uint8 inputs), which compressed-tensors "
            "cannot hold. Export them to='onnx' / 'openvino' (which run them as int8 matmuls), or quantize with "
            "activations=None for compressed-tensors."
        )
    config = plain_config(model, allow_quantized=True)
    with torch.device("meta"):  # the compressed model holds QuantLinear there: ask the plain architecture
        skeleton = type(model)(config)
    conv = [n for n in modules if type(skeleton.get_submodule(n)).__name__ == "Conv1D"]
    if conv:
        raise ValueError(
            f"{conv[:3]} are GPT-2 Conv1D layers, which compressed-tensors does not quantize: exclude them "
            "(WeightQuantizationConfig(exclude_modules=...)) or use to='onnx' / 'openvino'."
        )


def _scheme(module: nn.Module) -> dict[str, Any]:
    grouped = module.group_size < module.in_features
    return {
        "num_bits": module.bits,
        "type": "int",
        "symmetric": module.symmetric,
        "strategy": "group" if grouped else "channel",
        "group_size": module.group_size if grouped else None,
        "dynamic": False,
        "actorder": None,
        "observer": "minmax",
    }


def export_compressed_tensors(model: nn.Module, out: Path) -> dict[str, Any]:
    """Write ``config.json`` (with a compressed-tensors ``quantization_config``) and ``model.safetensors``."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from safetensors.torch import save_file

    check(model)
    modules = quantized_modules(model)
    plain = plain_model(model, allow_quantized=True)
    state = {}
    seen: dict[int, str] = {}
    for key, tensor in plain.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():  # tied weights: transformers ties them again on load
            continue
        seen[tensor.data_ptr()] = key
        owner, _, leaf = key.rpartition(".")
        if owner in modules and leaf == "weight":
            module = modules[owner]
            q, scale, zero = (None if a is None else torch.from_numpy(a) for a in _integers(module))
            dtype = module.state_dict()["weight_scale"].dtype
            state[f"{owner}.weight_packed"] = pack_to_int32(q.contiguous(), module.bits)
            state[f"{owner}.weight_scale"] = scale.to(dtype)
            state[f"{owner}.weight_shape"] = torch.tensor(list(q.shape))
            zp = _zero_points(module, scale, zero)
            assert zp is not False, owner  # `check` refused float offsets
            if zp is not None:
                state[f"{owner}.weight_zero_point"] = pack_to_int32(zp.contiguous(), module.bits, packed_dim=0)
        else:
            state[key] = tensor.contiguous()
    save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
    groups: dict[str, list[str]] = defaultdict(list)
    schemes: dict[str, dict] = {}
    for name, module in modules.items():
        scheme = _scheme(module)
        key = json.dumps(scheme, sort_keys=True)
        schemes[key] = scheme
        groups[key].append(name)
    config = plain.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            f"group_{i}": {
                "targets": names,
                "weights": schemes[key],
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
            for i, (key, names) in enumerate(groups.items())
        },  # fmt: skip
        "ignore": [],
        "kv_cache_scheme": None,
    }
    if any(not m.symmetric for m in modules.values()):
        # transformers (5.23, compressed-tensors 0.20) cannot run asymmetric packed layers compressed: it builds
        # them on the meta device with an unpacked zero point, so the packed one in the file does not fit, and
        # an unpacked one fails to unpack on the first forward. Loading with dequantize works (and is what this
        # key asks for); vLLM reads the packed tensors and does not look at it.
        config["quantization_config"]["dequantize"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    files = [WEIGHTS, "config.json"]
    if getattr(plain, "generation_config", None) is not None and plain.can_generate():
        plain.generation_config.save_pretrained(out)
        files.append("generation_config.json")
    readme = f"""# compressed-tensors checkpoint (hf_compress)

int8 / int4 weights in the `pack-quantized` format. Loads with plain transformers once `compressed-tensors` is
installed (no hf_compress needed):

```python
from transformers import {type(model).__name__}, AutoTokenizer

model = {type(model).__name__}.from_pretrained(".")
tokenizer = AutoTokenizer.from_pretrained(".")
```
"""
    return {"model_files": files, "readme": readme}


export_compressed_tensors.check = check
export_compressed_tensors.check_configs = check_configs
