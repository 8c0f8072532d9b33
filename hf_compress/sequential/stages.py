"""One layer calibrated stage by stage, against the float model's own activations (a step with `float_target`).

A layer's modules form *stages*: the modules fed the same input tensor (q/k/v, then o_proj, then gate/up, then
down_proj in a Llama layer), in the order the forward reaches them (`layer_stages`). Each stage's statistics are
collected with the stages before it already compressed, as their inputs will be in the compressed model: with one
collection pass for the whole layer, o_proj would be corrected for the error of float q/k/v on the compressed
stream, an error that the compressed q/k/v (corrected towards the float model themselves) no longer make, and it
would be counted twice. For each stage and batch, the float layer (compressed modules put back) runs on the float
stream first, as the reference of the cross moments, then the layer as it stands on the compressed stream; both
forwards stop once the stage's last module got its input. The last stage's float forward runs through: its output
is the float model's input to the next layer. This is the order GPTAQ (Li et al. 2025) quantizes a layer in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ..calibration import MomentCollector
from ..utils import replace_module
from .capture import BatchInputs, run_layer
from .offload import ActivationStore
from .steps import LayerStep


__all__ = ["layer_stages", "calibrate_in_stages"]


@torch.no_grad()
def layer_stages(layer: nn.Module, modules: dict[str, nn.Module], hidden: torch.Tensor, args: tuple, kwargs: dict,
                 device: torch.device | None = None) -> list[list[str]]:  # fmt: skip
    """`modules` grouped by the input tensor they receive, in the order one forward of `layer` reaches them."""
    order: list[tuple[str, torch.Tensor]] = []
    handles = [m.register_forward_pre_hook(lambda _, a, n=n: order.append((n, a[0]))) for n, m in modules.items()]
    try:
        run_layer(layer, hidden, args, kwargs, device)
    finally:
        for handle in handles:
            handle.remove()
    stages: list[list[str]] = []
    inputs: list[torch.Tensor] = []
    for name, x in order:
        if any(name in stage for stage in stages):
            continue  # a module called twice in one forward: its first input decides
        match = next((i for i, t in enumerate(inputs) if t is x), None)
        if match is None:
            stages.append([name])
            inputs.append(x)
        else:
            stages[match].append(name)
    missing = [n for n in modules if not any(n in stage for stage in stages)]
    if missing:
        raise ValueError(f"The calibration forward passes never reached {missing[:4]}; they cannot be calibrated.")
    return stages


@contextlib.contextmanager
def _put_back(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Temporarily put the float `modules` back in place of their compressed replacements."""
    current = {name: model.get_submodule(name) for name in modules}
    for name, module in modules.items():
        replace_module(model, name, module)
    try:
        yield
    finally:
        for name, module in current.items():
            replace_module(model, name, module)


@torch.no_grad()
def calibrate_in_stages(model: nn.Module, step: LayerStep, layer: nn.Module, modules: dict[str, nn.Module],
                        inputs: list[BatchInputs], index: int, store: ActivationStore, reference: ActivationStore,
                        identical: bool, device: torch.device | None, home: torch.device) -> list[torch.Tensor]:  # fmt: skip
    """Compress layer `index` stage by stage (see the module docstring); `reference[b]` becomes the float layer's
    output. `identical`: the two streams hold the same activations (the first layer), so the first stage needs no
    float forward. Returns the float tensors released by the step."""
    stages = layer_stages(layer, modules, store[0], *inputs[0].layer_args[index], device) if modules else []
    if not stages:  # nothing to compress here: the float stream still goes through the layer
        for b, batch in enumerate(inputs):
            reference[b] = run_layer(layer, reference[b], *batch.layer_args[index], device).to(home)
        return []
    float_modules: dict[str, nn.Module] = {}
    released: list[torch.Tensor] = []
    for number, stage in enumerate(stages):
        last, same = number == len(stages) - 1, identical and number == 0
        stop = None if last else modules[stage[-1]]  # the float forward of the last stage gives the layer's output
        stop_quantized = None if same and last else modules[stage[-1]]
        members = {name: modules[name] for name in stage}
        project = {} if same else step.cross_weights(members)
        with MomentCollector(members, float64=step.float64, project=project) as collector:
            for b, batch in enumerate(inputs):
                mask = None if batch.mask is None else batch.mask.to(device or batch.mask.device)
                args = batch.layer_args[index]
                if not same:
                    collector.set_mask(mask, reference=True)
                    with _put_back(model, float_modules):
                        out = run_layer(layer, reference[b], *args, device, stop_at=stop)
                    if last:
                        reference[b] = out.to(home)
                collector.set_mask(mask)
                out = run_layer(layer, store[b], *args, device, stop_at=stop_quantized)
                if same and last:  # a one-stage layer on identical streams: this was the float layer's forward
                    reference[b] = out.to(home)
                del out
        moments, cross = collector.moments(), collector.cross_moments()
        del collector
        float_modules.update({name: model.get_submodule(name) for name in stage})
        released += step.compress_modules(model, stage, moments, cross)
        del moments, cross
    return released
