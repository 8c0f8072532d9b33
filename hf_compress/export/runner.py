"""Run an exported folder with its engine behind the interface of a transformers model.

``load_exported(folder)`` returns an `nn.Module` (no parameters of its own) that takes tokenizer outputs as
tensors or arrays (``input_ids``, ``attention_mask``, ``token_type_ids``; extra ones the graph does not take are
ignored) and returns an object with ``last_hidden_state`` (or ``logits``) as a float32 torch tensor, so the same
fidelity and latency code measures PyTorch, ONNX Runtime and OpenVINO side by side (see ``bench/deploy.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from torch import nn

from ._common import MANIFEST


__all__ = ["load_exported", "ExportedModel"]


class ExportedModel(nn.Module):
    """A compiled ONNX Runtime session or OpenVINO model, called like a transformers model (eval only)."""

    def __init__(self, run, inputs: list[str], output: str, target: str, folder: Path) -> None:
        super().__init__()
        self._run, self.inputs, self.output, self.target, self.folder = run, inputs, output, target, folder

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        feeds = {}
        for name in self.inputs:
            value = kwargs.get(name)
            if value is None and name == "token_type_ids":
                value = torch.zeros_like(torch.as_tensor(kwargs["input_ids"]))
            if value is None:
                raise ValueError(f"The exported model needs `{name}` (it takes {self.inputs}).")
            array = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            feeds[name] = array.astype(np.float32 if name == "pixel_values" else np.int64, copy=False)
        return SimpleNamespace(**{self.output: torch.from_numpy(np.asarray(self._run(feeds)))})

    def disk_bytes(self) -> int:
        """Bytes of the engine's model files (graph and weights)."""
        info = json.loads((self.folder / MANIFEST).read_text())
        return sum((self.folder / name).stat().st_size for name in info.get("model_files", []))


def load_exported(folder: str | Path, threads: int | None = None, device: str = "CPU", exact: bool = True):
    """Load an ``onnx`` or ``openvino`` export written by `hf_compress.export.export`.

    Args:
        folder: the export folder (holding ``hf_compress_export.json``).
        threads: intra-op threads of the engine (default: the engine's own choice).
        device: OpenVINO device name (``"CPU"``, ``"GPU"``, ...).
        exact: keep float32 activations, so the output matches the PyTorch model to float rounding (default).
            Both engines' defaults quantize activations to int8 on the fly for compressed weights (ONNX Runtime's
            ``MatMulNBits`` accuracy level 4 after fusing DequantizeLinear + MatMul, OpenVINO's dynamic
            quantization; measured 1e-2 off on a tiny Llama), and OpenVINO computes in bf16 on AMX CPUs:
            ``exact=False`` keeps those defaults (faster, less exact).
    """
    folder = Path(folder)
    info = json.loads((folder / MANIFEST).read_text())
    target = info["target"]
    if target == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if exact:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        session = ort.InferenceSession(
            str(folder / info["model_files"][0]), options, providers=["CPUExecutionProvider"]
        )

        def run(feeds):
            return session.run([info["output"]], feeds)[0]

    elif target == "openvino":
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if device == "CPU" and exact:
            # f32 like the PyTorch model, no on-the-fly int8 quantization of activations
            config.update(INFERENCE_PRECISION_HINT="f32", DYNAMIC_QUANTIZATION_GROUP_SIZE=0)
        compiled = ov.Core().compile_model(str(folder / info["model_files"][0]), device, config)
        request = compiled.create_infer_request()

        def run(feeds):
            return request.infer(feeds)[compiled.output(0)]

    else:
        raise ValueError(
            f"{folder}: a {target!r} export is loaded by its own library (see its README.md); load_exported runs "
            "'onnx' and 'openvino' exports."
        )
    return ExportedModel(run, info["inputs"], info["output"], target, folder)
