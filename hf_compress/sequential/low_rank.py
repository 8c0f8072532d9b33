"""Data-aware low-rank factorization of linear layers (`LowRankLinearConfig`), layer by layer.

The one-pass path (`hf_compress.factorization.linear.apply_low_rank_linear`) whitens every targeted layer by the
input moments ``C = E[x x^T]`` of the *float* model and keeps the truncated SVD of ``W L`` (``L L^T = C``). Here each
layer's moments come from the outputs of the layers before it as already factorized (``x_c``), and, with the float
target (the default), the matrix cut is the float weight that best reproduces the *float model's* outputs on those
inputs, ``W_t = W + s W D C^-1`` with ``D = E[(x_f - x_c) x_c^T]`` (the least-squares solution of
``min E ||W x_f - W_t x_c||^2`` at ``s = 1``): the rank-r optimum of ``E ||W x_f - W' x_c||^2`` is then the whitened
truncated SVD of ``W_t``, so each layer also corrects what the layers before it lost, as sequential GPTQ does. The
layer is then calibrated stage by stage (an FFN's output projection sees its input projection already
factorized). Without it (``float_target=False``) each layer is cut from ``W`` on its actual inputs, in one pass.
The cut is built by the one-pass path's own code (`factorize_targets`); the first stage of layer 0 (all of it
without the float target) sees the float model's inputs, so its factors are exactly the one-pass path's.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..factorization.config import LowRankLinearConfig
from ..factorization.linear import (
    dense_message,
    factorize_targets,
    linear_shape,
    linear_weight,
    low_rank_targets,
    resolved_config,
    saves_too_little,
)
from ..quantization.mmap_pages import drop_pages, in_checkpoint_mmap
from .layer_step import LayerStep, target_strength


__all__ = ["LowRankStep", "LOW_RANK_FLOAT_TARGET"]

# The strength `s` of the low-rank step's float target by default. MiniLM, FFN linears, mean-pooled embeddings on
# 480 Debian test texts, 1 - cosine to fp32 for s = 0.25 / 0.5 / 0.75 / 1: rank 128 with 128 train texts
# 0.1284 / 0.1252 / 0.1236 / 0.1248, with 32 texts 0.1470 / 0.1474 / 0.1514 / 0.1595; rank 64 with 128 texts
# 0.2409 / 0.2248 / 0.2108 / 0.2051, with 32 texts 0.2557 / 0.2450 / 0.2346 / 0.2352. A cut loses far more than GPTQ's
# rounding, so more of the correction pays (GPTQ's default is 0.5), but a fit on few tokens needs some shrinkage.
LOW_RANK_FLOAT_TARGET = 0.75

# Damping of ``C`` in the float target's solve, a fraction of its mean diagonal: GPTQ's default damp.
_TARGET_DAMP = 0.01


class LowRankStep(LayerStep):
    """Activation-whitened low-rank factorization of the config's targeted linears, one layer at a time.

    Each layer's targeted linears (default: its FFN projections) are cut from their input moments, summed in float64
    on the CPU over the real (unpadded) tokens the factorized layers before them produce, then replaced by
    `LowRankLinear` layers; their float weights are released before the next layer runs. Targets outside the layers
    (a pooler, with `target_modules`) are cut last, from the last layer's outputs. `rank`, `energy` and `ranks` mean
    what they mean in the one-pass path; layers that would save less than `min_saving` stay dense, with the same
    warning (an error when none is left to factorize).

    A `param_budget` cannot be spread over the whole model's spectra, which never exist at once here: each layer
    (and the tail) gets an equal share instead, the budget fraction of its own targeted parameters, spent on the
    components with the most energy per parameter among that layer's linears. The total is the same fraction; what
    differs from the one-pass path is that a layer with a flatter spectrum cannot borrow from another.

    Args:
        config: the factorization; ``whiten`` must be ``"activation"`` or ``"auto"`` (the layer-by-layer moments are
            the point of it).
        float_target: True (cut ``W + s W D C^-1``, ``s`` = `LOW_RANK_FLOAT_TARGET`, see the module docstring;
            the float model's activations are carried beside the compressed ones: twice the activation memory,
            more layer forwards), a strength ``s`` in ``(0, 1]``, or False (cut ``W`` on the actual inputs).
    """

    float64 = True  # whitening wants exact moments: float32 sums of products, added into float64 on the CPU

    def __init__(self, config: LowRankLinearConfig, *, float_target: bool | float = True) -> None:
        if not isinstance(config, LowRankLinearConfig):
            raise TypeError(f"LowRankStep takes a LowRankLinearConfig, got {type(config).__name__}.")
        if config.whiten == "none":
            raise ValueError(
                "Sequential low-rank factorization whitens each layer by the inputs the factorized layers before it "
                "give it; got whiten='none', a data-free SVD, for which layer by layer changes nothing. Use "
                "whiten='activation' (or 'auto'), or drop sequential=True for whiten='none'."
            )
        self.strength = target_strength(float_target, LOW_RANK_FLOAT_TARGET, "the cut targets the float outputs")
        self.float_target = self.strength > 0
        self.config = config
        self.relative: dict[str, str] = {}  # full module name -> name relative to the base model (the recipe's)
        self.pending: list[str] = []  # full names of the targets not cut yet, in model order
        self.shapes: dict[str, tuple[int, int]] = {}  # by full name
        self.ranks: dict[str, int] = {}  # by relative name, as the recipe and the warning name them
        self.skipped: dict[str, int] = {}

    def prepare(self, model: nn.Module) -> None:
        relative = low_rank_targets(model, self.config)
        full = {id(module): name for name, module in model.named_modules()}
        self.relative = {full[id(module)]: name for name, module in relative.items()}
        self.pending = list(self.relative)
        self.shapes = {name: linear_shape(model.get_submodule(name)) for name in self.relative}
        fixed = self.config.ranks or (dict.fromkeys(relative, self.config.rank) if self.config.rank else None)
        if fixed:  # known before any data: refuse at once rather than after running every layer
            shapes = {rel: self.shapes[name] for name, rel in self.relative.items()}
            too_big = {rel: r for rel, r in fixed.items() if saves_too_little(shapes[rel], r, self.config.min_saving)}
            if too_big and len(too_big) == len(fixed):
                message = dense_message(too_big, shapes[next(iter(too_big))], self.config.min_saving)
                raise ValueError("No layer was factorized. " + message)

    def _factorize(self, model: nn.Module, names: list[str], moments: dict[str, torch.Tensor],
                   cross: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
        """Factorize the full-named `names` together (one share of a `param_budget`), with the float target where
        `cross` has their cross moments; return the float weights replaced. A target the calibration forwards never
        reached gets a zero moment, as in the one-pass path."""
        if not names:
            return []
        unknown = [name for name in names if name not in self.pending]
        if unknown:
            raise ValueError(f"{unknown[:4]} are not modules this low-rank step factorizes (or were cut already).")
        self.pending = [name for name in self.pending if name not in names]
        base = model.base_model
        modules = {self.relative[name]: model.get_submodule(name) for name in names}
        cross = cross if cross is not None else {}  # popped: each cross moment is freed after its last module
        weights = {}
        for name in names:
            d = cross.pop(name, None)
            if d is not None and name in moments:
                weights[self.relative[name]] = self._target_weight(model.get_submodule(name), moments[name], d)
            del d
        inputs = {}
        for name in names:
            moment = moments.pop(name, None)  # popped: each moment is freed once its layer is cut
            if moment is None:
                moment = torch.zeros(self.shapes[name][1], self.shapes[name][1], dtype=torch.float64)
            inputs[self.relative[name]] = moment
        ranks, skipped = factorize_targets(base, modules, inputs, self.config, weights)
        del inputs, weights
        self.ranks.update(ranks)
        self.skipped.update(skipped)
        return [modules[rel].weight for rel in ranks]

    def _target_weight(self, module: nn.Module, moment: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """``W + s W D (C + damp I)^-1`` in float64 where the moments are: the float weight that, on the compressed
        model's inputs, best reproduces the float model's outputs (at ``s = 1``)."""
        weight = linear_weight(module).detach().to(moment.device, torch.float64)
        if cross.shape != moment.shape:
            raise ValueError(f"The cross moment is {tuple(cross.shape)}, expected {tuple(moment.shape)}.")
        eye = torch.eye(moment.shape[0], dtype=moment.dtype, device=moment.device)
        chol = torch.linalg.cholesky(moment + _TARGET_DAMP * moment.diagonal().mean().clamp_min(1e-12) * eye)
        correction = (weight @ cross).mul_(self.strength)  # X C = correction, C symmetric: C X^T = correction^T
        return weight + torch.cholesky_solve(correction.t(), chol).t()

    def _in_layer(self, prefix: str) -> list[str]:
        return [name for name in self.pending if name.startswith(prefix + ".")]

    def layer_modules(self, model: nn.Module, prefix: str, layer: nn.Module) -> dict[str, nn.Module]:
        return {name: model.get_submodule(name) for name in self._in_layer(prefix)}

    def compress_layer(self, model: nn.Module, prefix: str, moments: dict[str, torch.Tensor],
                       cross: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
        return self._factorize(model, self._in_layer(prefix), moments)

    def compress_modules(self, model: nn.Module, names: list[str], moments: dict[str, torch.Tensor],
                         cross: dict[str, torch.Tensor] | None = None) -> list[torch.Tensor]:  # fmt: skip
        return self._factorize(model, names, moments, cross)

    def tail_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {name: model.get_submodule(name) for name in self.pending}

    def finish(self, model: nn.Module, moments: dict[str, torch.Tensor],
               cross: dict[str, torch.Tensor] | None = None) -> LowRankLinearConfig:  # fmt: skip
        for tensor in self._factorize(model, list(self.pending), moments, cross):
            if in_checkpoint_mmap(tensor):
                drop_pages(tensor)
        if self.skipped:
            first = next(name for name, rel in self.relative.items() if rel in self.skipped)
            message = dense_message(self.skipped, self.shapes[first], self.config.min_saving)
            if not self.ranks:
                raise ValueError("No layer was factorized. " + message)
            warnings.warn(message, stacklevel=2)
        order = list(self.relative.values())  # the one-pass path's order (the model's), whatever was cut first
        return resolved_config(self.config, {rel: self.ranks[rel] for rel in order if rel in self.ranks})
