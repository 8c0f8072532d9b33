"""Deployment exports of compressed (or plain) models: ONNX Runtime, OpenVINO, compressed-tensors, plain transformers.

```py
>>> from hf_compress.export import export, load_exported
>>> export("minilm-int4", to="onnx", output_dir="minilm-int4-onnx")     # a folder or a model object
>>> model = load_exported("minilm-int4-onnx", threads=2)                  # ONNX Runtime behind a transformers-like call
>>> model(**tokenizer(texts, padding=True, return_tensors="pt")).last_hidden_state
```

Each export folder holds what the engine loads with its own public API, the tokenizer (when the source folder has
one), a README.md on how to run it, the source's ``hf_compress_report.json`` if any, and ``hf_compress_export.json``
(the target and the files written, so a later export into the same folder replaces exactly those).
"""

from __future__ import annotations

import os
from typing import Any

from ._common import copy_extras, finish, load_source, prepare_output
from .runner import ExportedModel, load_exported


__all__ = ["export", "load_exported", "ExportedModel", "TARGETS"]

TARGETS = ("onnx", "openvino", "compressed-tensors", "transformers")

_README = {
    "onnx": """# ONNX export (hf_compress)

`model.onnx` (opset 21) takes {inputs} and returns `{output}`. Quantized weights are stored as our exact INT8 / INT4
integers with float32 scales (`DequantizeLinear`, block-wise for grouped scales), plus float zero offsets for
asymmetric layers. Layers quantized with `activations="int8_static"` take their input through a per-channel `Mul`
(the smoothing) and a `QuantizeLinear` / `DequantizeLinear` pair with calibrated constant uint8 scales: ONNX Runtime
runs them as int8 matmuls.

```python
import onnxruntime as ort
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(".")
options = ort.SessionOptions()
# ORT fuses DequantizeLinear + MatMul into MatMulNBits; level 1 keeps float32 activations (level 4, the default,
# quantizes them to int8: faster, less exact).
options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
session = ort.InferenceSession("model.onnx", options, providers=["CPUExecutionProvider"])
enc = tokenizer(["some text"], padding=True, return_tensors="np")
(out,) = session.run(None, {{name: enc[name] for name in {inputs}}})
```

Or `hf_compress.export.load_exported(".")`, which wraps the same session.
""",
    "openvino": """# OpenVINO export (hf_compress)

`openvino_model.xml` / `.bin` take {inputs} and return `{output}`. Quantized weights are OpenVINO compressed
weights (i8 / i4 constants with float32 scales); other constants are float32. Layers quantized with
`activations="int8_static"` have calibrated uint8 inputs (FakeQuantize): the CPU plugin runs them as u8 x i8
matmuls, with or without the hints below.

```python
import openvino as ov
from transformers import AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained(".")
# f32 and no dynamic int8 activations: matches the PyTorch model to float rounding (drop both for speed)
config = {{"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}}
compiled = ov.Core().compile_model("openvino_model.xml", "CPU", config)
enc = tokenizer(["some text"], padding=True, return_tensors="np")
out = compiled({{name: enc[name] for name in {inputs}}})[compiled.output(0)]
```

Or `hf_compress.export.load_exported(".")`. Faster settings: `{{"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}}` alone
(float activations at the CPU's default precision: bf16 where the CPU has it), or no config at all (int8 activations
quantized on the fly in groups of 32; `16` is finer); `load_exported(".", exact=False, engine_config={{...}})` takes
the same properties.
""",
}


_GENERATION = """
## Generation with the key/value cache

The graph also takes `position_ids` and the cache of the tokens before, `past_key_values.{{i}}.key` / `.value` for
each of its {layers} layers (`[batch, kv_heads, past_tokens, head_dim]`, float32; zero tokens for the prompt), and
returns it updated as `present.{{i}}.key` / `.value` after `logits`: feed the presents back as the next step's past,
with the attention mask grown by one column per step. Layers may differ in head count (pruned heads).
`hf_compress.export.load_exported(".").generate(input_ids, attention_mask, max_new_tokens=...)` does exactly that
(greedy).
"""


def _exporter(to: str):
    if to == "onnx":
        from .onnx import export_onnx

        return export_onnx
    if to == "openvino":
        from .openvino import export_openvino

        return export_openvino
    if to == "compressed-tensors":
        from .compressed_tensors import export_compressed_tensors

        return export_compressed_tensors
    if to == "transformers":
        from .transformers_plain import export_transformers

        return export_transformers
    raise ValueError(f"to={to!r}: expected one of {list(TARGETS)}.")


def export(model_or_dir: Any, to: str = "onnx", output_dir: str | os.PathLike | None = None, overwrite: bool = False,
           tokenizer: Any = None, with_past: bool | None = None) -> str:  # fmt: skip
    """Export a model (compressed by hf_compress or plain) for a deployment engine; returns the output folder.

    Args:
        model_or_dir: a model object or a folder `from_pretrained` loads (with the class in its ``config.json``).
        to: ``"onnx"`` (ONNX Runtime), ``"openvino"`` (OpenVINO IR), ``"compressed-tensors"`` (int8/int4 weights in
            the ``pack-quantized`` format plain transformers loads with the `compressed-tensors` package) or
            ``"transformers"`` (a plain checkpoint for a uniform, unquantized model).
        output_dir: the folder to write; it must be new, empty or a previous export (whose files are replaced).
        overwrite: write into a non-empty folder that is not a previous export; files this export does not write
            are kept, never deleted.
        tokenizer: saved into the folder; by default the source folder's tokenizer files are copied, if any.
        with_past: ``"onnx"`` / ``"openvino"`` only: whether a causal LM's graph takes and returns its key/value
            cache (``past_key_values.{i}.key`` ... in, ``present.{i}.key`` ... out, plus ``position_ids``), so that
            each generated token costs one token's compute; default: yes for causal LMs, no for other models.
            `load_exported(...).generate(...)` decodes greedily with it.

    Raises:
        ValueError: an unknown target, a folder that would need ``overwrite=True``, or a model the target cannot
            hold (the message says which option makes it exportable).
    """
    if to not in TARGETS:
        raise ValueError(f"to={to!r}: expected one of {list(TARGETS)}.")
    if output_dir is None:
        raise ValueError("output_dir is required: the folder the export is written to.")
    exporter = _exporter(to)
    if with_past is not None and to not in ("onnx", "openvino"):
        raise ValueError(f"with_past={with_past!r} applies to the 'onnx' and 'openvino' targets, not to to={to!r}.")
    model, source = load_source(model_or_dir)
    check = getattr(exporter, "check", None)
    if check is not None:
        check(model)  # refuse before touching the folder
    out = prepare_output(output_dir, overwrite)
    info = exporter(model, out) if with_past is None else exporter(model, out, with_past=with_past)
    files = [*info.get("model_files", []), *info.pop("extra_files", []), *copy_extras(source, model, out, tokenizer)]
    readme = info.pop("readme", None) or _README[to].format(inputs=info.get("inputs"), output=info.get("output"))
    if info.get("cache"):
        readme += _GENERATION.format(layers=len(info["cache"]))
    finish(out, to, files, readme, info)
    return str(out)
