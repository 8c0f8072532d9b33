"""Calibrated static int8 inputs (``activations="int8_static"``): smoothing and one uint8 scale per layer input.

Deployment engines (OpenVINO, ONNX Runtime) run a linear layer as an int8 x int8 matmul when its input arrives
through a QuantizeLinear / DequantizeLinear pair with a *constant* scale: no per-call reduction over the
activations, which is what makes their int8 mode fast. One scale for a whole input tensor is coarse where a few
channels carry outliers (LayerNorm outputs in BERT-like models reach 20-30 while most channels stay within 1-2), so
each layer's input is first divided per channel by smoothing factors ``s`` and its weight multiplied by them
(SmoothQuant, Xiao et al., 2023: the product is unchanged, the outliers move into the weight, which is quantized
per output channel and absorbs them better). The factors ``s_j = max|x_j|^a / max|W_j|^(1-a)`` depend on a
migration strength ``a``; instead of one global value, `calibrate_static_inputs` picks, per layer, the strength whose
fake-quantized output is closest to the float output on the calibration data (a weight rounded per channel stands
in for the final weight quantization). The range is the min/max of the smoothed input over every real token
(padding left out), with an asymmetric uint8 grid: inputs after GELU are almost never negative.

`smoothed_weights` then multiplies the float weights by ``s`` and divides the inputs by it while the weights are
quantized (GPTQ's Hessians are collected on the smoothed inputs), so any algorithm quantizes the smoothed weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..calibration import calibration_batches, real_tokens


__all__ = ["StaticInput", "calibrate_static_inputs", "smoothed_weights", "AUTO_ALPHAS"]

AUTO_ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8)  # 0: no smoothing
_SAMPLE_ROWS = 1024  # calibration rows per layer the strength search compares outputs on


@dataclasses.dataclass
class StaticInput:
    """One layer's input quantization: ``q = clamp(round(x * multiplier / scale) + zero_point, 0, 255)``."""

    multiplier: torch.Tensor  # 1 / s, per input feature
    scale: float
    zero_point: int
    alpha: float  # the smoothing strength chosen (0: none)


class _InputStats:
    """Per-channel min / max of each module's input over the real tokens, and a bounded sample of its rows."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules, self.mask = modules, None
        self.low: dict[str, torch.Tensor] = {}
        self.high: dict[str, torch.Tensor] = {}
        self.rows: dict[str, list[torch.Tensor]] = {}
        self._generator = torch.Generator().manual_seed(0)

    def _record(self, name: str):
        @torch.no_grad()
        def record(module, args):
            # padding positions never reach a real input: left out of the range
            x = real_tokens(args[0].detach(), self.mask).float().cpu()
            if name not in self.low:
                self.low[name], self.high[name], self.rows[name] = x.amin(0), x.amax(0), []
            else:
                torch.minimum(self.low[name], x.amin(0), out=self.low[name])
                torch.maximum(self.high[name], x.amax(0), out=self.high[name])
            self.rows[name].append(x)
            if sum(len(r) for r in self.rows[name]) > 4 * _SAMPLE_ROWS:  # keep memory bounded: subsample
                self.rows[name] = [self._subsample(torch.cat(self.rows[name]), 2 * _SAMPLE_ROWS)]

        return record

    def _subsample(self, rows: torch.Tensor, n: int) -> torch.Tensor:
        if len(rows) <= n:
            return rows
        return rows[torch.randperm(len(rows), generator=self._generator)[:n]]

    @contextlib.contextmanager
    def hooked(self) -> Iterator[_InputStats]:
        handles = [m.register_forward_pre_hook(self._record(n)) for n, m in self.modules.items()]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def sample(self, name: str) -> torch.Tensor:
        return self._subsample(torch.cat(self.rows[name]), _SAMPLE_ROWS)


def _weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` float weight (GPT-2's Conv1D stores ``[in, out]``)."""
    weight = module.weight.detach().float()
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def _grid(low: torch.Tensor, high: torch.Tensor, multiplier: torch.Tensor) -> tuple[float, int]:
    """uint8 scale and zero point covering ``[low, high] * multiplier`` (and 0, which padding and ReLU produce)."""
    lo = min(float((low * multiplier).min()), 0.0)
    hi = max(float((high * multiplier).max()), 0.0)
    scale = max(hi - lo, 1e-8) / 255.0
    return scale, int(min(max(round(-lo / scale), 0), 255))


def _fake_quantize(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def _per_channel_int8(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(weight / scale), -127, 127) * scale


def _smoothing(x_max: torch.Tensor, w_max: torch.Tensor, alpha: float) -> torch.Tensor:
    if alpha == 0:
        return torch.ones_like(x_max)
    s = x_max.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
    return s.clamp(min=1e-4, max=1e4)


def _choose(weight: torch.Tensor, low: torch.Tensor, high: torch.Tensor, rows: torch.Tensor,
            alphas: Iterable[float], dtype: torch.dtype) -> StaticInput:  # fmt: skip
    reference = rows @ weight.t()
    x_max, w_max = torch.maximum(low.abs(), high.abs()), weight.abs().amax(0)
    best: tuple[float, StaticInput] | None = None
    for alpha in alphas:
        # Rounded to the storage dtype first (the layer stores them so); the weight is then multiplied by the exact
        # inverse of what the input will be multiplied by.
        multiplier = (1.0 / _smoothing(x_max, w_max, alpha)).to(dtype).float()
        s = 1.0 / multiplier
        scale, zero = _grid(low, high, multiplier)
        scale = float(torch.tensor(scale).to(dtype).float())
        out = _fake_quantize(rows * multiplier, scale, zero) @ _per_channel_int8(weight * s).t()
        error = float((out - reference).pow(2).mean())
        if best is None or error < best[0]:
            best = (error, StaticInput(multiplier, scale, zero, alpha))
    return best[1]


@torch.no_grad()
def calibrate_static_inputs(model: nn.Module, names: list[str], calibration_data, *, smoothing: float | str = "auto",
                            max_samples: int | None = None, dtype: torch.dtype = torch.float32,
                            ) -> dict[str, StaticInput]:  # fmt: skip
    """The smoothing factors and uint8 input grid of each named linear module, from one calibration pass; `dtype`
    is what the layers store them in (values are rounded to it before anything is computed from them).

    Raises a `ValueError` naming the modules the calibration forward passes never reached.
    """
    if calibration_data is None:
        raise ValueError(
            "activations='int8_static' calibrates its input scales on real data: pass calibration_data=texts (a list "
            "of strings or a datasets.Dataset), or use activations='int8_dynamic', which needs none."
        )
    stats = _InputStats({name: model.get_submodule(name) for name in names})
    with stats.hooked():
        for batch in calibration_batches(model, calibration_data, max_samples=max_samples):
            mask = batch.get("attention_mask")
            stats.mask = mask.bool() if mask is not None else None
            model(**batch)
    missing = [name for name in names if name not in stats.low]
    if missing:
        raise ValueError(f"The calibration forward passes never reached {missing[:4]}: their input scales cannot be "
                         "calibrated. Exclude them (exclude_modules=[...]) or check the calibration data.")  # fmt: skip
    alphas = AUTO_ALPHAS if smoothing == "auto" else (float(smoothing),)
    plans = {}
    for name in names:
        weight = _weight(model.get_submodule(name))
        plans[name] = _choose(weight, stats.low[name], stats.high[name], stats.sample(name), alphas, dtype)
    return plans


@contextlib.contextmanager
def smoothed_weights(model: nn.Module, static: dict[str, StaticInput] | None) -> Iterator[None]:
    """Within the block, each module of `static` has its weight multiplied by ``s`` and its input divided by it
    (the float model computes the same function). Modules still in the model afterwards (an error, or modules the
    block did not replace) get their weight back."""
    if not static:
        yield
        return
    handles, modules = [], {}
    for name, plan in static.items():
        module = model.get_submodule(name)
        s = (1.0 / plan.multiplier).to(module.weight.device, module.weight.dtype)
        with torch.no_grad():
            module.weight.mul_(s.unsqueeze(1) if type(module).__name__ == "Conv1D" else s)
        multiplier = plan.multiplier.to(module.weight.device)
        handles.append(module.register_forward_pre_hook(lambda m, args, k=multiplier: (args[0] * k.to(args[0].dtype),)))
        modules[name] = (module, s)
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for name, (module, s) in modules.items():
            try:
                still_there = model.get_submodule(name) is module
            except AttributeError:
                still_there = False
            if still_there:
                with torch.no_grad():
                    module.weight.div_(s.unsqueeze(1) if type(module).__name__ == "Conv1D" else s)
