"""OpenVINO IR export: the ONNX export (with our integer weights) converted by ``openvino.convert_model``.

OpenVINO's ONNX frontend turns ``DequantizeLinear`` on constant INT8 / INT4 weights into its compressed-weight
subgraph (an ``i8``/``i4`` constant, ``Convert``, ``Multiply`` by the scale), which the CPU plugin runs without
materialising float weights. ``save_model(..., compress_to_fp16=False)`` keeps the remaining float constants in float32
(the default would round them to fp16); float32 constants that fp16 (else bf16) holds *exactly* (our bf16 scales and
zero offsets) are stored so with a ``Convert``, the form OpenVINO's own compressed models use: int4 g32
MiniLM's ``.bin`` went from 17.4 MB (float32 scales and offsets) to the ONNX file's 14.4 MB, with the same values.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from .onnx import MODEL_FILE, export_onnx


__all__ = ["export_openvino", "XML_FILE", "BIN_FILE"]

XML_FILE, BIN_FILE = "openvino_model.xml", "openvino_model.bin"


def _half_exact_constants(model, min_elements: int = 64) -> int:
    """Store each float32 constant whose every value fp16 (else bf16) represents exactly in that type, widened by a
    ``Convert``; returns how many. Nothing is rounded: a constant that neither holds exactly stays float32."""
    import numpy as np
    import openvino as ov
    import torch

    changed = 0
    for op in model.get_ops():
        if op.get_type_name() != "Constant" or op.get_element_type() != ov.Type.f32:
            continue
        values = op.get_data()
        if values.size < min_elements:  # shapes and scalars: nothing to gain
            continue
        half = values.astype(np.float16)
        if np.array_equal(half.astype(np.float32), values):
            narrow = ov.opset13.constant(half)
        else:  # bf16 scales with values below fp16's normal range (tiny zero offsets)
            as_bf16 = torch.from_numpy(np.ascontiguousarray(values)).to(torch.bfloat16)
            if not torch.equal(as_bf16.float(), torch.from_numpy(values)):
                continue
            tensor = ov.Tensor(ov.Type.bf16, ov.Shape(list(values.shape)))
            tensor.data[...] = as_bf16.view(torch.int16).numpy().view(tensor.data.dtype)  # raw 16-bit patterns
            narrow = ov.op.Constant(tensor)
        widened = ov.opset13.convert(narrow, ov.Type.f32)
        for target in list(op.output(0).get_target_inputs()):
            target.replace_source_output(widened.output(0))
        changed += 1
    return changed


def export_openvino(model: nn.Module, out: Path, with_past: bool | None = None) -> dict[str, Any]:
    """Write ``out/openvino_model.xml`` / ``.bin`` for `model`; returns the manifest fields (`with_past`: as for
    `export_onnx`, a causal LM's key/value cache as inputs and outputs)."""
    import openvino as ov

    with tempfile.TemporaryDirectory() as tmp:
        # zero offsets on the weight (Convert, Multiply, Add per group): the x-side correction that suits ONNX
        # Runtime measured 1.6x slower in OpenVINO on int4 MiniLM (batch 32 x 128, engine defaults)
        info = export_onnx(model, Path(tmp), zero_correction=False, with_past=with_past)
        converted = ov.convert_model(str(Path(tmp) / MODEL_FILE))
        _half_exact_constants(converted)
        ov.save_model(converted, str(out / XML_FILE), compress_to_fp16=False)
    return {**info, "model_files": [XML_FILE, BIN_FILE]}
