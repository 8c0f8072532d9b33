"""ONNX export with hf_compress's own int8 / int4 weights, scales and zero points, kept exactly.

1. The float view of the compressed model (see `_common.float_view`) is traced by ``torch.onnx.export`` (the
   TorchScript exporter: fast and reliable on transformers 5 models of every supported family, pruned, factorized or
   distilled: their structure is already the compressed one).
2. Each initializer holding the dequantized weight of a quantized module (found by content, so whatever name and
   layout, ``[out, in]`` or transposed, the exporter chose) is replaced by a standard opset-21 subgraph:
   ``DequantizeLinear(q, scale, axis, block_size=group)`` on our integers (``INT8``, or ``INT4`` packed two per
   byte). Asymmetric layers keep our float zero offsets exactly (ONNX zero points live in the integer domain,
   which cannot hold a float offset without rounding): a weight only MatMuls read stays ``q * s`` and each MatMul
   adds ``(x summed per group) @ z`` (so ONNX Runtime still fuses DequantizeLinear + MatMul: 4x faster than
   dequantizing every call, measured on int4 MiniLM); other weights (embeddings) add ``z`` broadcast per group.
   Scales and offsets are stored in their own dtype (bf16 by default), widened to float32 by a ``Cast``.

The result runs in ONNX Runtime and converts to OpenVINO, which both recognise DequantizeLinear on constant
integer weights as compressed weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ._common import OutputOf, example_inputs, float_view, input_names, output_name, quantized_modules
from .decoder import WithPast, cache_layout, example_with_past


__all__ = ["export_onnx", "MODEL_FILE", "OPSET"]

MODEL_FILE = "model.onnx"
OPSET = 21  # block-wise DequantizeLinear and INT4 tensors
_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's 2 GB limit, with a margin


def _integers(module: nn.Module) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Centred integers ``[rows, cols]`` (int8), scales and zero offsets ``[rows, groups]`` (float32).

    Read from the state dict, which always holds the portable layout (a layer may hold the CPU int4 kernel's
    order in memory).
    """
    state = module.state_dict()
    packed = state["weight_packed"]
    if module.bits == 8:
        q = packed.to(torch.int8)
    else:
        q = torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2).to(torch.int8) - 8
    zero = state.get("weight_zero")
    return (q.numpy(), state["weight_scale"].float().numpy(),
            None if zero is None else zero.float().numpy())  # fmt: skip


def _int_tensor(name: str, q: np.ndarray, bits: int):
    import onnx

    if bits == 8:
        return onnx.numpy_helper.from_array(np.ascontiguousarray(q, dtype=np.int8), name)
    nibbles = (np.ascontiguousarray(q).reshape(-1).astype(np.int16) & 15).astype(np.uint8)
    raw = (nibbles[0::2] | (nibbles[1::2] << 4)).tobytes()  # ONNX INT4: first element in the low nibble
    return onnx.helper.make_tensor(name, onnx.TensorProto.INT4, list(q.shape), raw, raw=True)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _weight_subgraph(name: str, module: nn.Module, transposed: bool, correction: bool = False) -> tuple[list, list]:
    """Nodes and initializers computing the initializer `name` (``[out, in]``, or ``[in, out]`` if `transposed`).

    With `correction` (an asymmetric ``[in, out]`` weight that only MatMuls read), the subgraph is the symmetric
    part ``q * s`` and ``{name}.zero`` (``[groups, out]``) is left for `_add_zero_corrections`.
    """
    from onnx import helper, numpy_helper

    q, scale, zero = _integers(module)
    rows, cols = q.shape
    groups = scale.shape[1]
    group = cols // groups
    axis = 1
    if transposed:  # groups then run along axis 0
        q, scale, zero = q.T, scale.T, None if zero is None else zero.T
        axis = 0
    if zero is not None and not correction:
        return _asymmetric_subgraph(name, module.bits, q, scale, zero, group, transposed)
    inits = [_int_tensor(f"{name}.q", q, module.bits)]
    if zero is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(zero), f"{name}.zero"))
    attrs: dict[str, Any] = {}
    if groups == 1:  # per output channel: the per-axis form, whose scale is 1-D along the output axis
        inits.append(numpy_helper.from_array(np.ascontiguousarray(scale.reshape(-1)), f"{name}.scale"))
        attrs["axis"] = 1 - axis
    else:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(scale), f"{name}.scale"))
        attrs.update(axis=axis, block_size=group)
    nodes = [helper.make_node("DequantizeLinear", [f"{name}.q", f"{name}.scale"], [name], name=f"{name}.DQ", **attrs)]
    return nodes, inits


def _asymmetric_subgraph(name, bits, q, scale, zero, group, transposed) -> tuple[list, list]:
    """``w = q * s + z`` with the groups as their own axis: ``[rows, groups, group]`` (``[groups, group, rows]``
    transposed), so the zero offsets broadcast from ``[.., groups, 1, ..]`` and nothing constant is expanded to the
    weight's size (OpenVINO folds constant subgraphs when converting: an expanded offset became a float32 copy)."""
    from onnx import helper, numpy_helper

    full = list(q.shape)
    if transposed:
        cols, rows = full
        q3, groups_shape = q.reshape(cols // group, group, rows), (cols // group, 1, rows)
    else:
        rows, cols = full
        q3, groups_shape = q.reshape(rows, cols // group, group), (rows, cols // group, 1)
    inits = [
        _int_tensor(f"{name}.q", q3, bits),
        numpy_helper.from_array(np.ascontiguousarray(scale).reshape(groups_shape), f"{name}.scale"),
        numpy_helper.from_array(np.ascontiguousarray(zero).reshape(groups_shape), f"{name}.zero"),
        numpy_helper.from_array(np.array(full, np.int64), f"{name}.shape"),
    ]
    attrs = dict(axis=1 if transposed else 2, block_size=group)
    nodes = [
        helper.make_node(
            "DequantizeLinear", [f"{name}.q", f"{name}.scale"], [f"{name}.dq"], name=f"{name}.DQ", **attrs
        ),
        helper.make_node("Add", [f"{name}.dq", f"{name}.zero"], [f"{name}.dqz"], name=f"{name}.AddZero"),
        helper.make_node("Reshape", [f"{name}.dqz", f"{name}.shape"], [name], name=f"{name}.Reshape"),
    ]
    return nodes, inits


def _bf16_storage(name: str, nodes: list, inits: list) -> tuple[list, list]:
    """Store scales and zero offsets in bf16, as hf_compress does, widened to float32 by a ``Cast`` (exact; both
    engines fold it into a constant on load): int4 g32 MiniLM's file is 17.2 MB with float32 ones, 14.4 with bf16."""
    from onnx import TensorProto, helper, numpy_helper

    out_inits, casts = [], []
    for init in inits:
        if init.name in (f"{name}.scale", f"{name}.zero"):
            values = torch.from_numpy(numpy_helper.to_array(init).copy()).to(torch.bfloat16)
            raw = values.view(torch.int16).numpy().tobytes()
            out_inits.append(helper.make_tensor(f"{init.name}.bf16", TensorProto.BFLOAT16, list(init.dims), raw, True))
            casts.append(helper.make_node("Cast", [f"{init.name}.bf16"], [init.name], to=TensorProto.FLOAT))
        else:
            out_inits.append(init)
    return casts + nodes, out_inits


def compress_weights(graph, modules: dict[str, nn.Module], zero_correction: bool = True) -> dict[str, str]:
    """Replace the float initializers of quantized `modules` in `graph`; returns ``{initializer: module name}``.

    Raises a `RuntimeError` naming the modules whose weight the exporter did not keep as one initializer (the
    export would otherwise silently hold float weights).
    """
    from onnx import numpy_helper

    wanted: dict[tuple[tuple[int, ...], str], tuple[str, bool]] = {}
    for name, module in modules.items():
        weight = module.dequantize(torch.float32).numpy()
        wanted[(weight.shape, _digest(weight))] = (name, False)
        wanted.setdefault((weight.T.shape, _digest(weight.T)), (name, True))
    shapes = {shape for shape, _ in wanted}
    readers: dict[str, list] = {}
    for node in graph.node:
        for position, value in enumerate(node.input):
            readers.setdefault(value, []).append((node.op_type, position))
    replaced: dict[str, str] = {}
    corrected: dict[str, tuple[int, int]] = {}
    new_nodes, keep = [], []
    for init in graph.initializer:
        key = None
        if init.data_type == 1 and tuple(init.dims) in shapes:  # FLOAT
            key = (tuple(init.dims), _digest(numpy_helper.to_array(init)))
        if key in wanted:
            module_name, transposed = wanted[key]
            module = modules[module_name]
            # x @ (q s + z) = x @ (q s) + (x summed per group) @ z: the weight stays a plain DequantizeLinear, which
            # ONNX Runtime fuses with its MatMul (MatMulNBits for int4), instead of dequantizing every call.
            correction = (zero_correction and transposed and not module.symmetric
                          and all(r == ("MatMul", 1) for r in readers.get(init.name, [None])))  # fmt: skip
            nodes, inits = _weight_subgraph(init.name, module, transposed, correction)
            if correction:
                corrected[init.name] = (module.in_features // module.group_size, module.group_size)
            if modules[module_name].state_dict()["weight_scale"].dtype == torch.bfloat16:
                nodes, inits = _bf16_storage(init.name, nodes, inits)
            new_nodes += nodes
            keep += inits
            replaced[init.name] = module_name
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(new_nodes + _add_zero_corrections(nodes, corrected))  # weight subgraphs: constants only, first
    return replaced


def _add_zero_corrections(nodes: list, corrected: dict[str, tuple[int, int]]) -> list:
    """After each MatMul reading a corrected weight: ``y += ReduceSum(reshape(x, [..., groups, group])) @ zero``."""
    from onnx import helper

    out = []
    for node in nodes:
        out.append(node)
        if node.op_type != "MatMul" or node.input[1] not in corrected:
            continue
        groups, group = corrected[node.input[1]]
        x, w, y = node.input[0], node.input[1], node.output[0]
        p = f"{y}.zc"
        node.output[0] = f"{p}.main"
        out += [
            helper.make_node("Constant", [], [f"{p}.gg"], value_ints=[groups, group]),
            helper.make_node("Constant", [], [f"{p}.axes"], value_ints=[-1]),
            helper.make_node("Shape", [x], [f"{p}.shape"], end=-1),
            helper.make_node("Concat", [f"{p}.shape", f"{p}.gg"], [f"{p}.grouped_shape"], axis=0),
            helper.make_node("Reshape", [x, f"{p}.grouped_shape"], [f"{p}.grouped"]),
            helper.make_node("ReduceSum", [f"{p}.grouped", f"{p}.axes"], [f"{p}.sums"], keepdims=0),
            helper.make_node("MatMul", [f"{p}.sums", f"{w}.zero"], [f"{p}.offset"]),
            helper.make_node("Add", [f"{p}.main", f"{p}.offset"], [y]),
        ]
    return out


def export_onnx(
    model: nn.Module, out: Path, zero_correction: bool = True, with_past: bool | None = None
) -> dict[str, Any]:
    """Write ``out/model.onnx`` for `model` (compressed or not); returns the manifest fields (inputs, output).

    `zero_correction`: apply asymmetric layers' zero offsets after their MatMuls (best for ONNX Runtime); without
    it they are added to the dequantized weight per group, the form OpenVINO's compressed-weight kernels take.
    `with_past`: a causal LM's graph takes and returns its key/value cache (`decoder`); default: every causal LM.
    """
    import onnx

    layout = cache_layout(model) if with_past is not False else None
    if with_past and layout is None:
        raise ValueError(f"with_past=True: {type(model).__name__} is not a causal LM; it has no cache to export.")
    view = float_view(model)
    if layout is not None:
        args, names, outputs, axes = example_with_past(model, layout)
        module, output = WithPast(view, len(layout)), "logits"
    else:
        names = input_names(model)
        example = example_inputs(model, names)
        output, ndim = output_name(view, example)
        axes = {name: {0: "batch"} if name == "pixel_values" else {0: "batch", 1: "sequence"} for name in names}
        axes[output] = {0: "batch"} if ndim == 2 else {0: "batch", 1: "sequence"}  # classifier heads: no sequence
        module, args, outputs = OutputOf(view, names), tuple(example[n] for n in names), [output]
    path = out / MODEL_FILE
    with torch.no_grad():
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=OPSET, input_names=names,
            output_names=outputs, dynamic_axes=axes,
        )  # fmt: skip
    del view
    proto = onnx.load(str(path))
    modules = quantized_modules(model)
    replaced = compress_weights(proto.graph, modules, zero_correction) if modules else {}
    _check_no_float_copies(proto.graph, model, replaced)
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx"):
            opset.version = max(opset.version, OPSET)
    proto.producer_name = "hf_compress"
    large = proto.ByteSize() > _EXTERNAL_DATA_BYTES
    files = [MODEL_FILE]
    if large:
        onnx.save(proto, str(path), save_as_external_data=True, location=MODEL_FILE + ".data")
        files.append(MODEL_FILE + ".data")
    else:
        onnx.save(proto, str(path))
    info = {"model_files": files, "inputs": names, "output": output, "quantized_initializers": len(replaced)}
    if layout is not None:  # what the runner needs to feed an empty cache and carry it between steps
        info.update(outputs=outputs, cache=[list(shape) for shape in layout])
    return info


def _check_no_float_copies(graph, model: nn.Module, replaced: dict[str, str]) -> None:
    """Refuse a graph holding more float weights than the model's float parameters: a quantized weight the tracer
    folded into another constant would otherwise ship as float32 silently. (Layers outside the exported output,
    such as BERT's pooler under ``last_hidden_state``, are simply absent from the graph.)"""
    ours = {f"{name}.{part}" for name in replaced for part in ("scale", "zero")}
    float_bytes = sum(init.ByteSize() for init in graph.initializer if init.data_type == 1 and init.name not in ours)
    allowed = sum(4 * p.numel() for p in model.parameters() if p.is_floating_point()) * 1.02 + 1_000_000
    if float_bytes > allowed:
        raise RuntimeError(
            f"The ONNX graph holds {float_bytes / 1e6:.1f} MB of float constants, more than the model's float "
            f"parameters ({allowed / 1e6:.1f} MB): the exporter folded some quantized weights into other constants. "
            "Refusing to write float copies of quantized layers; please report the model family."
        )
