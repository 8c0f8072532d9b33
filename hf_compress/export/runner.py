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
from .decoder import position_ids


__all__ = ["load_exported", "ExportedModel"]


class ExportedModel(nn.Module):
    """A compiled ONNX Runtime session or OpenVINO model, called like a transformers model (eval only).

    A causal LM exported with its key/value cache (`hf_compress.export.decoder`) also takes ``past_key_values`` (the
    ``past_key_values`` of the previous call's output: a list of arrays) and ``position_ids``, both derived when
    absent as transformers does (an empty cache; the positions after the cached tokens), and has a greedy `generate`.
    """

    def __init__(self, run, info: dict[str, Any], folder: Path) -> None:
        super().__init__()
        self._run, self.folder, self.target = run, folder, info["target"]
        self.inputs, self.output = info["inputs"], info["output"]
        self.outputs, self.cache = info.get("outputs", [self.output]), info.get("cache")

    def _feeds(self, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        def array(value, dtype):
            value = value.numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            return value.astype(dtype, copy=False)

        if self.cache is not None:
            ids = array(kwargs["input_ids"], np.int64)
            past = kwargs.get("past_key_values")
            cached = 0 if past is None else past[0].shape[2]
            mask = kwargs.get("attention_mask")
            mask = np.ones((ids.shape[0], cached + ids.shape[1]), np.int64) if mask is None else array(mask, np.int64)
            if mask.shape[1] != cached + ids.shape[1]:
                raise ValueError(f"attention_mask has {mask.shape[1]} columns; with {cached} cached tokens and "
                                 f"{ids.shape[1]} new ones it needs {cached + ids.shape[1]} (cached + new).")  # fmt: skip
            if past is None:
                past = [np.zeros((ids.shape[0], heads, 0, dim), np.float32) for heads, dim in self.cache for _ in "kv"]
            positions = kwargs.get("position_ids")
            if positions is None:  # as transformers' forward: the cache positions (`generate` passes mask-based ones)
                positions = np.broadcast_to(np.arange(cached, cached + ids.shape[1]), ids.shape)
            kwargs = {**kwargs, "input_ids": ids, "attention_mask": mask, "position_ids": positions,
                      **dict(zip(self.inputs[3:], past))}  # fmt: skip
        feeds = {}
        for name in self.inputs:
            value = kwargs.get(name)
            if value is None and name == "token_type_ids":
                value = torch.zeros_like(torch.as_tensor(kwargs["input_ids"]))
            if value is None:
                raise ValueError(f"The exported model needs `{name}` (it takes {self.inputs}).")
            floats = name == "pixel_values" or name.startswith("past_key_values.")
            feeds[name] = array(value, np.float32 if floats else np.int64)
        return feeds

    def forward(self, **kwargs: Any) -> SimpleNamespace:
        results = self._run(self._feeds(kwargs))
        out = {self.output: torch.from_numpy(np.asarray(results[0]))}
        if self.cache is not None:
            out["past_key_values"] = [np.asarray(r) for r in results[1:]]
        return SimpleNamespace(**out)

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int = 20, eos_token_id: int | None = None,
                 pad_token_id: int | None = None) -> torch.Tensor:  # fmt: skip
        """Greedy decoding with the exported cache; returns prompt + new tokens ``[batch, prompt + new]``, as
        ``model.generate(..., do_sample=False)`` does (rows that produced `eos_token_id` continue with
        `pad_token_id`, default the eos id; stops once every row has)."""
        if self.cache is None:
            raise ValueError(f"{self.folder} was exported without a key/value cache: export a causal LM with "
                             "with_past=True (the default) to generate.")  # fmt: skip
        ids = torch.as_tensor(input_ids).long()
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask).long()
        pad = eos_token_id if pad_token_id is None else pad_token_id
        tokens, step, past = ids, ids, None
        done = torch.zeros(ids.shape[0], dtype=torch.bool)
        for _ in range(max_new_tokens):
            # positions counted over real tokens, as generate() does for left-padded rows
            out = self(input_ids=step, attention_mask=mask, past_key_values=past,
                       position_ids=position_ids(mask, step.shape[1]))  # fmt: skip
            chosen = out.logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
                done |= chosen == eos_token_id
            step, past = chosen[:, None], out.past_key_values
            tokens = torch.cat([tokens, step], 1)
            mask = torch.cat([mask, torch.ones_like(step)], 1)
            if eos_token_id is not None and bool(done.all()):
                break
        return tokens

    def disk_bytes(self) -> int:
        """Bytes of the engine's model files (graph and weights)."""
        info = json.loads((self.folder / MANIFEST).read_text())
        return sum((self.folder / name).stat().st_size for name in info.get("model_files", []))


def load_exported(
    folder: str | Path,
    threads: int | None = None,
    device: str = "CPU",
    exact: bool = True,
    engine_config: dict[str, Any] | None = None,
):
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
        engine_config: engine options applied last, over ``exact``: OpenVINO ``compile_model`` properties (e.g.
            ``{"DYNAMIC_QUANTIZATION_GROUP_SIZE": 0}``: the CPU's default precision, bf16 where it is native, with
            float activations; ``16``: finer on-the-fly int8 groups than the default 32), or ONNX Runtime session
            config entries (``{"session.qdq_matmulnbits_accuracy_level": "4"}``).
    """
    folder = Path(folder)
    info = json.loads((folder / MANIFEST).read_text())
    target, outputs = info["target"], info.get("outputs", [info["output"]])
    if target == "onnx":
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        if exact:
            options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "1")
        for key, value in (engine_config or {}).items():
            options.add_session_config_entry(str(key), str(value))
        session = ort.InferenceSession(
            str(folder / info["model_files"][0]), options, providers=["CPUExecutionProvider"]
        )

        def run(feeds):
            return session.run(outputs, feeds)

    elif target == "openvino":
        import openvino as ov

        config = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if device == "CPU" and exact:
            # f32 like the PyTorch model, no on-the-fly int8 quantization of activations
            config.update(INFERENCE_PRECISION_HINT="f32", DYNAMIC_QUANTIZATION_GROUP_SIZE=0)
        config.update(engine_config or {})
        compiled = ov.Core().compile_model(str(folder / info["model_files"][0]), device, config)
        request = compiled.create_infer_request()

        def run(feeds):
            result = request.infer(feeds)
            return [result[compiled.output(name)] for name in outputs]

    else:
        raise ValueError(
            f"{folder}: a {target!r} export is loaded by its own library (see its README.md); load_exported runs "
            "'onnx' and 'openvino' exports."
        )
    return ExportedModel(run, info, folder)
