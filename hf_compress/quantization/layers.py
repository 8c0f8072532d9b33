"""`QuantLinear` and `QuantEmbedding`: modules that really hold packed int8 / int4 weights.

Both own their tensors under names a plain model has no slot for (``weight_packed``, ``weight_scale``,
``weight_zero``), so a checkpoint can never be loaded into float layers by mistake, and transformers loads the
tensors straight into these modules without any key conversion.
"""

from __future__ import annotations

import torch
from torch import nn

from ..utils import aligned
from .algorithms import QuantizedWeight
from .int4_layout import PORTABLE, layout_of, portable_state, to_portable_
from .kernels import dequantized_weight, quantized_matmul
from .packing import dequantize_groups, pack, unpack


__all__ = ["QuantLinear", "QuantEmbedding"]


class _QuantizedBuffers(nn.Module):
    """Shared storage logic: allocate, fill, re-align and count the packed tensors."""

    bits: int
    group_size: int
    in_features: int
    # Set while `weight_packed` holds the CPU int4 decoding kernel's own order instead of the portable one
    # (`int4_layout.to_cpu_kernel_`): the kernel's layout is kept instead of a second copy of the weights.
    _int4_converted = None

    def _allocate(self, rows: int, cols: int, symmetric: bool, dtype: torch.dtype, device=None, compute_dtype=None):
        # Scales are stored in `dtype`; the forward pass computes in `compute_dtype`, a plain attribute set by
        # hf_compress to the machine's fast dtype (see `kernels.preferred_compute_dtype`) and kept by `.to(dtype)`.
        self.compute_dtype = compute_dtype or dtype
        packed_shape = (rows, cols) if self.bits == 8 else (rows, cols // 2)
        packed_dtype = torch.int8 if self.bits == 8 else torch.uint8
        self.register_buffer("weight_packed", torch.zeros(packed_shape, dtype=packed_dtype, device=device))
        groups = cols // self.group_size
        self.register_buffer("weight_scale", torch.ones(rows, groups, dtype=dtype, device=device))
        zero = None if symmetric else torch.zeros(rows, groups, dtype=dtype, device=device)
        self.register_buffer("weight_zero", zero)
        self._kernel_cache: dict = {}
        self._unsupported: set = set()

    @property
    def symmetric(self) -> bool:
        return self.weight_zero is None

    @torch.no_grad()
    def load_quantized(self, quantized: QuantizedWeight) -> None:
        """Fill the buffers from `algorithms.quantize_weight` output (shapes are checked by `copy_`)."""
        self._int4_converted = None  # every buffer is replaced by a portable one below
        self.weight_packed = pack(quantized.q, self.bits).to(self.weight_packed.device)
        self.weight_scale = quantized.scale.to(self.weight_scale.device, self.weight_scale.dtype)
        if self.weight_zero is not None:
            if quantized.zero is None:
                raise ValueError("An asymmetric module needs zero offsets; got a symmetric quantization.")
            self.weight_zero = quantized.zero.to(self.weight_zero.device, self.weight_zero.dtype)
        self._kernel_cache.clear()

    @property
    def _layout(self) -> str:
        """``"portable"`` or ``"cpu_int4pack"``: the order `weight_packed` holds (state_dict is always portable)."""
        return layout_of(self)

    def realign_(self) -> None:
        """Give each packed tensor its own aligned memory (after an mmap load) and drop kernel-layout caches."""
        if self._layout == PORTABLE:  # the kernel layout is allocated by torch, aligned
            self.weight_packed = aligned(self.weight_packed)
        self._kernel_cache.clear()
        self._unsupported.clear()

    def logical_numel(self) -> int:
        """Weights represented (``out x in``) plus the bias: what the float module would count."""
        rows = self.weight_scale.shape[0]
        bias = getattr(self, "bias", None)
        return rows * self.in_features + (bias.numel() if bias is not None else 0)

    def _apply(self, fn, recurse=True):
        # `.to(device)` / `.to(bfloat16)` must not invalidate kernel layouts silently: rebuild them lazily. A float
        # cast of the module (`model.half()`, `.to(torch.bfloat16)`) also changes the compute dtype. A layer in the
        # CPU kernel layout goes back to the portable one first, unless `fn` changes nothing (e.g. `.to("cpu")`):
        # other devices build their own layout from it, and a cast would separate its scales from the kernel table.
        if self._layout != PORTABLE:
            device = self.weight_packed.device
            probes = [torch.empty(0, dtype=dtype, device=device) for dtype in (torch.uint8, self.weight_scale.dtype)]
            if any(fn(probe) is not probe for probe in probes):
                to_portable_(self)
        out = super()._apply(fn, recurse)
        self._kernel_cache = {}
        probe = fn(torch.empty(0, dtype=self.compute_dtype))
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return out

    # Checkpoints, copies and pickles always hold the portable layout: the kernel's order depends on the CPU build
    # of torch that ran the model, and `to_portable_` / `portable_state` invert it exactly.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._layout != PORTABLE:
            destination.update({prefix + name: tensor for name, tensor in portable_state(self).items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        to_portable_(self)  # incoming tensors are portable: copied into the kernel order they would be scrambled
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._kernel_cache.clear()  # derived from the weights just replaced (other devices' layouts, integer sums)

    def __getstate__(self):
        state = self.__dict__.copy()
        if self._layout != PORTABLE:
            state["_buffers"] = {**self._buffers, **portable_state(self)}
            state["_int4_converted"] = None
        return state


class _QuantMatmul(torch.autograd.Function):
    """``x @ W^T`` with a frozen packed weight; the backward pass returns the input gradient (for LoRA/QAT)."""

    @staticmethod
    def forward(ctx, x2: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return quantized_matmul(layer, x2, fake_quantized=True)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weight = dequantized_weight(ctx.layer, grad_out.dtype)
        return grad_out @ weight, None


class QuantLinear(_QuantizedBuffers):
    """A linear layer whose weight is stored as packed int8 or int4 with group-wise scales.

    The forward pass computes in `compute_dtype` (float32 or bf16, whichever is fast on the machine; see
    `kernels.preferred_compute_dtype`) and returns the input's dtype. The weight is
    frozen; gradients flow to the input and to the bias, so adapters (LoRA) can be trained on top of it.

    Args:
        in_features (`int`), out_features (`int`): the shape of the represented ``[out, in]`` weight.
        bias (`bool`, *optional*, defaults to `True`): whether the layer has a (float) bias.
        bits (`int`, *optional*, defaults to `8`): 8 or 4.
        group_size (`int`, *optional*): input features per scale; the whole row when omitted.
        symmetric (`bool`, *optional*, defaults to `True`): without zero offsets.
        activations (`str`, *optional*): ``"int8_dynamic"`` for int8 x int8 matmuls with per-token scales;
            ``"int8_static"`` for calibrated uint8 inputs: the layer then holds ``input_multiplier`` (per input
            feature, the inverse of the smoothing factors its weight was multiplied by), ``input_scale`` and
            ``input_zero_point`` (one each), and fake-quantizes its input with them (`set_static_input`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.bfloat16`): dtype of the scales.
        compute_dtype (`torch.dtype`, *optional*): dtype of the matmuls and of the bias; defaults to `dtype`.
        device (`torch.device`, *optional*): where to allocate (``"meta"`` for a skeleton).

    Example:

    ```py
    >>> layer = QuantLinear.from_float(nn.Linear(384, 1536), bits=4, group_size=32, symmetric=False)
    >>> layer(torch.randn(2, 384, dtype=torch.bfloat16)).shape
    torch.Size([2, 1536])
    ```
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        activations: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size or in_features
        self.activations = activations
        self._allocate(out_features, in_features, symmetric, dtype, device, compute_dtype)
        if activations == "int8_static":
            # In the scales' dtype, like `weight_scale` (transformers loads float buffers in the model's dtype).
            self.register_buffer("input_multiplier", torch.ones(in_features, dtype=dtype, device=device))
            self.register_buffer("input_scale", torch.ones(1, dtype=dtype, device=device))
            self.register_buffer("input_zero_point", torch.zeros(1, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=self.compute_dtype, device=device)) if bias else None

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        algorithm: str = "mse",
        activations: str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        name: str = "linear",
        quantized: QuantizedWeight | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> QuantLinear:
        """Quantize an `nn.Linear` (or a GPT-2 ``Conv1D``, whose weight is stored ``[in, out]``)."""
        weight = module.weight.detach()
        if type(module).__name__ == "Conv1D":
            weight = weight.t()
        out_features, in_features = weight.shape
        layer = cls(
            in_features,
            out_features,
            module.bias is not None,
            bits,
            group_size,
            symmetric,
            activations,
            dtype,
            device=weight.device,
            compute_dtype=compute_dtype,
        )
        if quantized is None:
            from .algorithms import quantize_weight

            quantized = quantize_weight(weight, bits, layer.group_size, symmetric, algorithm, dtype, name)
        layer.load_quantized(quantized)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias.detach().to(layer.compute_dtype))
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float ``[out, in]`` weight this layer stores (in `dtype`, default the compute dtype). With
        ``activations="int8_static"`` it multiplies the smoothed input ``x * input_multiplier``."""
        return dequantized_weight(self, dtype)

    @torch.no_grad()
    def set_static_input(self, multiplier: torch.Tensor, scale: float, zero_point: int) -> None:
        """The calibrated input quantization of an ``"int8_static"`` layer: ``x * multiplier`` is rounded to
        ``clamp(round(. / scale) + zero_point, 0, 255)`` and back (what ONNX QuantizeLinear/DequantizeLinear do)."""
        if self.activations != "int8_static":
            raise ValueError(f"set_static_input needs activations='int8_static'; this layer has {self.activations!r}.")
        if not 0 <= zero_point <= 255 or not scale > 0:
            raise ValueError(f"Static input quantization needs scale > 0 and 0 <= zero_point <= 255; got "
                             f"scale={scale}, zero_point={zero_point}.")  # fmt: skip
        self.input_multiplier.copy_(multiplier)
        self.input_scale.fill_(float(scale))
        self.input_zero_point.fill_(int(zero_point))

    def quantize_input(self, x2: torch.Tensor) -> torch.Tensor:
        """The input as the int8 matmul sees it: smoothed and fake-quantized (``"int8_static"``), else unchanged."""
        if self.activations != "int8_static":
            return x2
        smoothed = x2.float() * self.input_multiplier.float()
        zero = self.input_zero_point.round().to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(smoothed, self.input_scale.float(), zero, 0, 255).to(x2.dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, for code that reads ``.weight`` (e.g. to find the dtype or shape). Not stored."""
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = self.compute_dtype
        x2 = x.reshape(-1, self.in_features).to(compute)
        bias = None if self.bias is None else self.bias.to(compute)
        if torch.is_grad_enabled() and (x2.requires_grad or (bias is not None and bias.requires_grad)):
            # training (LoRA, QAT): the fake-quantized input, differentiable straight through the grid
            out = _QuantMatmul.apply(self.quantize_input(x2), self)
            out = out if bias is None else out + bias
        else:
            out = quantized_matmul(self, x2, bias)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        mode = "symmetric" if self.symmetric else "asymmetric"
        act = f", activations={self.activations}" if self.activations else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"bits={self.bits}, group_size={self.group_size}, {mode}{act}"
        )


class QuantEmbedding(_QuantizedBuffers):
    """An embedding table stored as packed int8 / int4 rows; only the looked-up rows are dequantized.

    Args:
        num_embeddings (`int`), embedding_dim (`int`): the table's shape.
        bits, group_size, symmetric, dtype, device: as for `QuantLinear` (groups run along `embedding_dim`).
        padding_idx (`int`, *optional*): kept for code that reads it; the row itself is quantized like the others.
        compute_dtype (`torch.dtype`, *optional*): dtype of the looked-up rows; defaults to `dtype`.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        padding_idx: int | None = None,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.in_features = num_embeddings, embedding_dim, embedding_dim
        self.bits, self.group_size = bits, group_size or embedding_dim
        self.padding_idx = padding_idx
        self._allocate(num_embeddings, embedding_dim, symmetric, dtype, device, compute_dtype)

    @classmethod
    def from_float(
        cls,
        module: nn.Embedding,
        bits: int = 8,
        group_size: int | None = None,
        symmetric: bool = True,
        algorithm: str = "mse",
        dtype: torch.dtype = torch.bfloat16,
        name: str = "embedding",
    ) -> QuantEmbedding:
        """Quantize an `nn.Embedding` row by row."""
        from .algorithms import quantize_weight

        layer = cls(*module.weight.shape, bits, group_size, symmetric, dtype, module.weight.device, module.padding_idx)
        layer.load_quantized(quantize_weight(module.weight, bits, layer.group_size, symmetric, algorithm, dtype, name))
        return layer

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float ``[num_embeddings, embedding_dim]`` table (in `dtype`, default the compute dtype)."""
        q = unpack(self.weight_packed, self.bits)
        return dequantize_groups(q, self.weight_scale, self.weight_zero, dtype or self.compute_dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (computed on access; not stored)."""
        return self.dequantize()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        zero = None if self.weight_zero is None else self.weight_zero[ids]
        q = unpack(self.weight_packed[ids], self.bits)
        return dequantize_groups(q, self.weight_scale[ids], zero, self.compute_dtype)

    def extra_repr(self) -> str:
        mode = "symmetric" if self.symmetric else "asymmetric"
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}, {mode}"
