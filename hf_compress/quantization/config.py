"""`WeightQuantizationConfig`: what to quantize, to how many bits, and how the scales are chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import TechniqueConfig
from ..validation import WrongTypeError, check_bool, check_number, check_patterns, describe
from .algorithms import ZERO_POINTS


__all__ = ["WeightQuantizationConfig", "ALGORITHMS", "ZERO_POINTS", "ModuleSpec"]

ALGORITHMS = ("auto", "rtn", "hqq", "mse", "gptq")
_ACTIVATIONS = (None, "int8_dynamic", "int8_static")
_DTYPES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class ModuleSpec:
    """The resolved quantization of one module: ``kind`` is ``"linear"``, ``"conv1d"`` or ``"embedding"``;
    ``zero_point`` is ``"integer"`` only for asymmetric modules whose offsets are integer multiples of the scale."""

    kind: str
    bits: int
    group_size: int
    symmetric: bool
    zero_point: str = "float"

    def to_list(self) -> list:
        # The fifth entry only when it is not the default, so float-offset recipes read the same as before it existed.
        tail = [self.zero_point] if self.zero_point != "float" else []
        return [self.kind, self.bits, self.group_size, self.symmetric, *tail]

    @classmethod
    def from_value(cls, value: Any) -> ModuleSpec:
        if isinstance(value, ModuleSpec):
            return value
        if isinstance(value, dict):
            return cls(**value)
        kind, bits, group_size, symmetric, *tail = value
        return cls(str(kind), int(bits), int(group_size), bool(symmetric), str(tail[0]) if tail else "float")


@dataclass
class WeightQuantizationConfig(TechniqueConfig):
    """Weight-only quantization to packed int8 or int4 (two values per byte), embeddings included.

    Each output row is split into groups of `group_size` input features; every group has its own scale (and, when
    not symmetric, its own zero offset), stored in `scale_dtype`. Scales are chosen by an error-minimising
    algorithm instead of plain round-to-nearest.

    Args:
        bits (`int`, *optional*, defaults to `8`):
            4 or 8.
        group_size (`int`, *optional*):
            Input features sharing one scale. Must divide the input features of every quantized module (the
            embedding dimension for embeddings). Defaults to 32 for 4 bits (where 32 does not divide the features,
            e.g. 312, the largest even divisor below it); for 8 bits to 128 where it divides the
            features (mean cosine 0.99985 vs 0.99968 per channel on MiniLM), else the whole row. Decoder models and
            ``activations="int8_dynamic"`` get the whole row (one scale per output channel) for 8 bits: that is what
            the packed decoding kernel and the int8 x int8 matmul take. ``-1`` asks for the whole row everywhere
            (one scale per output channel, GPTQ tools' convention), e.g. for engines that are fastest per channel.
        symmetric (`bool`, *optional*):
            Scale only (``True``) or scale plus zero offset (``False``). Defaults to ``True`` for 8 bits and
            ``False`` for 4 bits, the most accurate choice measured for each.
        algorithm (`str`, *optional*, defaults to `"auto"`):
            How scales are chosen. ``"auto"`` (the best measured) is ``"gptq"`` when calibration data is given and
            ``"mse"`` otherwise. ``"rtn"`` (min/max round-to-nearest), ``"hqq"`` (calibration-free half-quadratic
            optimisation of the zero offset under a sparsity-promoting error), ``"mse"`` (calibration-free: per-group
            clipping search, then alternating least squares on scale and offset) or ``"gptq"`` (needs calibration
            data; compensates each column's rounding error on the columns not yet quantized).
        zero_point (`str`, *optional*, defaults to `"float"`):
            How asymmetric layers store their offsets. ``"float"``: a free offset per group, ``w = q * scale +
            zero``. ``"integer"``: every algorithm constrains the offset to an integer multiple of the (stored)
            scale, ``zero = -zp * scale`` with ``zp`` in the integer range, which is the ``(q - zp) * scale`` form
            compressed-tensors (vLLM) stores: needed to export asymmetric layers with ``to="compressed-tensors"``.
            Symmetric layers have no offset and ignore it.
        target_modules (`list[str] | str`, *optional*):
            Modules to quantize, in PEFT's vocabulary (suffixes or a full-match regex). Default: every linear layer
            (and GPT-2 `Conv1D`), plus embeddings when `quantize_embeddings`.
        exclude_modules (`list[str] | str`, *optional*):
            Modules to leave in floating point.
        quantize_embeddings (`bool`, *optional*, defaults to `True`):
            Quantize `nn.Embedding` modules too (half of MiniLM's parameters). Input embeddings tied to an output
            head are left in floating point.
        overrides (`dict[str, dict]`, *optional*):
            Mixed precision: ``{pattern: {"bits": 8}}``, where a pattern is a module-name suffix or a full-match
            regex and the dict may set ``bits``, ``group_size`` and ``symmetric``. The first matching pattern wins.
        activations (`str`, *optional*):
            ``"int8_dynamic"`` quantizes the activations of 8-bit symmetric linear layers per token at run time and
            multiplies in int8 (`torch._int_mm`): fastest on CPU, slightly less accurate. ``"int8_static"`` (needs
            calibration data) calibrates one uint8 scale and zero point per layer input, after a per-channel
            smoothing of the input (SmoothQuant's migration of activation outliers into the weights, with the
            migration strength chosen per layer by output error on the calibration data, see `smoothing`). PyTorch
            runs it as fake-quantized inputs (int8-weight speed); it is the mode ONNX Runtime and OpenVINO run as
            int8 x int8 matmuls with static scales once exported (`hf_compress.export`).
        smoothing (`float` or `str`, *optional*, defaults to `"auto"`):
            ``activations="int8_static"`` only: the migration strength alpha in ``s_j = max|x_j|^alpha /
            max|W_j|^(1 - alpha)`` (inputs divided by ``s``, weights multiplied by it), 0 for none. ``"auto"``
            picks, per layer, the alpha in {0, 0.25, 0.4, 0.5, 0.6, 0.7, 0.8} whose quantized output is closest
            to the float one on the calibration data.
        compute_dtype (`str`, *optional*, defaults to `"auto"`):
            Dtype of the matmuls and of every remaining floating-point weight of the model. ``"auto"`` picks it on
            the machine that *runs* the model, when it is compressed or loaded: bfloat16 on CUDA and on CPUs with
            native bf16 matmuls (AVX512-BF16 / AMX), float32 on other CPUs, where bf16 GEMMs are emulated and ~4x
            slower than fp32 ones. Scales are stored in bfloat16 with ``"auto"`` (so the checkpoint is the same
            whatever machine made it) and in the compute dtype otherwise.
        damp (`float`, *optional*, defaults to `0.01`):
            GPTQ only: diagonal damping, as a fraction of the mean Hessian diagonal.
        calibration_samples (`int`, *optional*, defaults to `128`):
            GPTQ only: texts used from the calibration data.
        modules (`dict`, *optional*):
            Filled in by hf_compress: the exact modules quantized and how (names relative to ``model.base_model``;
            heads outside it are prefixed with ``"head:"``). Leave it unset.

    Example:

    ```py
    >>> from hf_compress import apply_compression
    >>> from hf_compress.quantization import WeightQuantizationConfig
    >>> apply_compression(model, WeightQuantizationConfig(bits=4, group_size=32))
    >>> model.save_pretrained("minilm-int4")
    ```
    """

    method: ClassVar[str] = "weight_quantization"
    version: ClassVar[int] = 1

    bits: int = field(default=8, metadata={"help": "Bits per weight: 8 or 4."})
    group_size: int | None = field(
        default=None,
        metadata={"help": "Input features per scale, -1 for the whole row (default: 32 for 4 bits; 8 bits: 128, whole "
                          "row for decoders)."},
    )
    symmetric: bool | None = field(
        default=None,
        metadata={"help": "Scale only (True) or scale and zero offset (default: 8-bit True, 4-bit False)."},
    )
    algorithm: str = field(default="auto", metadata={"help": f"How scales are chosen: one of {ALGORITHMS}."})
    zero_point: str = field(
        default="float",
        metadata={"help": "Asymmetric offsets: 'float' (free) or 'integer' (zp * scale, for compressed-tensors)."},
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module-name suffixes or a full-match regex (default: all linear layers)."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module-name suffixes or a full-match regex left in floating point."}
    )
    quantize_embeddings: bool = field(default=True, metadata={"help": "Quantize nn.Embedding modules too."})
    overrides: dict[str, dict] | None = field(
        default=None, metadata={"help": 'Mixed precision: {"pattern": {"bits": 8, "group_size": 64}}.'}
    )
    activations: str | None = field(
        default=None,
        metadata={"help": "'int8_dynamic' (per-token, at run time) or 'int8_static' (calibrated) int8 activations."},
    )
    smoothing: float | str = field(
        default="auto", metadata={"help": "int8_static: input smoothing strength alpha in [0, 1], or 'auto'."}
    )
    compute_dtype: str = field(
        default="auto",
        metadata={"help": f"Compute dtype, one of {_DTYPES} ('auto': bf16 where it is fast, else fp32)."},
    )
    damp: float = field(default=0.01, metadata={"help": "GPTQ: Hessian damping (fraction of its mean diagonal)."})
    calibration_samples: int = field(default=128, metadata={"help": "GPTQ: number of calibration texts used."})
    modules: dict[str, list] | None = field(
        default=None, metadata={"help": "Resolved by hf_compress: the modules quantized and how. Leave unset."}
    )

    def __post_init__(self) -> None:
        self.bits = _check_bits(self.bits, "bits")
        if self.group_size is not None:
            _check_group_size(self.group_size, "group_size")
        if self.symmetric is not None and not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be True, False or None, got {self.symmetric!r}.")
        if not isinstance(self.algorithm, str) or self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {self.algorithm!r}.")
        if not isinstance(self.zero_point, str) or self.zero_point not in ZERO_POINTS:
            raise ValueError(
                f"zero_point must be one of {ZERO_POINTS}, got {describe(self.zero_point)}. Use 'integer' to export "
                "asymmetric layers to compressed-tensors (vLLM), 'float' (the default) otherwise."
            )
        if not isinstance(self.activations, (str, type(None))) or self.activations not in _ACTIVATIONS:
            raise ValueError(
                f"activations must be None, 'int8_dynamic' or 'int8_static', got {describe(self.activations)}."
            )
        if self.activations is not None and (self.bits != 8 or self.symmetric is False):
            raise ValueError(
                f"activations={self.activations!r} multiplies int8 by int8, so it needs bits=8 with symmetric "
                f"scales; got bits={self.bits}, symmetric={self.symmetric}."
            )
        if self.smoothing != "auto":
            check_number("smoothing", self.smoothing, low=0.0, high=1.0,
                         hint=" Use 'auto' (chosen per layer) or an alpha such as 0.5; 0 turns smoothing off.")  # fmt: skip
        if not isinstance(self.compute_dtype, str) or self.compute_dtype not in _DTYPES:
            raise ValueError(f"compute_dtype must be one of {_DTYPES}, got {self.compute_dtype!r}.")
        damp_hint = " It is GPTQ's damping, a fraction of the mean Hessian diagonal (default 0.01)."
        check_number("damp", self.damp, low=0, high=1, low_open=True, high_open=True, hint=damp_hint)
        check_number("calibration_samples", self.calibration_samples, low=1, integer=True)
        check_bool("quantize_embeddings", self.quantize_embeddings)
        check_patterns("target_modules", self.target_modules)
        check_patterns("exclude_modules", self.exclude_modules)
        if self.overrides is not None:
            if not isinstance(self.overrides, dict):
                raise TypeError(f"overrides must be a dict of pattern -> dict, got {type(self.overrides).__name__}.")
            for pattern, override in self.overrides.items():
                if not isinstance(pattern, str) or not isinstance(override, dict):
                    raise WrongTypeError(
                        f"overrides maps module patterns (str) to settings (dict), e.g. {{'value': {{'bits': 8}}}}; "
                        f"got {describe(pattern)}: {describe(override)}."
                    )
                check_patterns(f"overrides pattern {pattern!r}", pattern)
                unknown = set(override) - {"bits", "group_size", "symmetric"}
                if unknown:
                    raise ValueError(
                        f"overrides[{pattern!r}] has unknown keys {sorted(unknown)}; allowed: bits, group_size, "
                        "symmetric."
                    )
                if "bits" in override:
                    _check_bits(override["bits"], f"overrides[{pattern!r}]['bits']")
                if override.get("group_size") is not None:
                    _check_group_size(override["group_size"], f"overrides[{pattern!r}]['group_size']")
                if override.get("symmetric") is not None:
                    check_bool(f"overrides[{pattern!r}]['symmetric']", override["symmetric"], optional=True)
        if self.modules is not None:
            self.modules = {name: ModuleSpec.from_value(v).to_list() for name, v in self.modules.items()}

    @property
    def scale_dtype(self) -> torch.dtype:
        """The dtype scales and zero offsets are stored in (bfloat16 for ``compute_dtype="auto"``)."""
        return torch.bfloat16 if self.compute_dtype == "auto" else getattr(torch, self.compute_dtype)

    def compute_dtype_for(self, device: torch.device | str | None = None) -> torch.dtype:
        """The compute dtype on `device` (``"auto"`` resolved there; see `kernels.preferred_compute_dtype`)."""
        if self.compute_dtype != "auto":
            return getattr(torch, self.compute_dtype)
        from .kernels import preferred_compute_dtype

        return preferred_compute_dtype(device)

    def model_dtype(self, device: torch.device | str | None = None) -> torch.dtype:
        """The dtype the model's float weights are loaded in on `device` (read by the quantizer plugin)."""
        return self.compute_dtype_for(device)

    def spec_for(self, name: str, kind: str, in_features: int, decoder: bool = False) -> ModuleSpec:
        """The bits, group size and symmetry for module `name` (overrides applied), checked against its shape.

        `decoder` (a generative model, where few-row decoding speed matters) keeps 8-bit scales per output channel.
        """
        from ..utils import matches

        bits, group_size, symmetric = self.bits, self.group_size, self.symmetric
        for pattern, override in (self.overrides or {}).items():
            if matches(name, [pattern]) or matches(name, pattern):
                bits = override.get("bits", bits)
                group_size = override.get("group_size", group_size)
                symmetric = override.get("symmetric", symmetric)
                break
        if group_size == -1:  # per output channel, whatever the width
            group_size = in_features
        if group_size is None and bits == 4:
            group_size = min(32, in_features)
            if in_features % group_size:  # e.g. TinyBERT's 312: the largest even divisor below 32 (26), not an error
                group_size = next((g for g in range(32, 1, -1) if in_features % g == 0 and g % 2 == 0), None)
            if group_size is None:
                raise ValueError(
                    f"4-bit packing needs an even group size that divides the {in_features} input features of "
                    f"{name!r}, and {in_features} is odd. Keep it in 8 bits (overrides={{{name!r}: {{'bits': 8}}}}) "
                    f"or exclude it (exclude_modules=[{name!r}])."
                )
        elif group_size is None:
            per_channel = decoder or self.activations is not None or in_features <= 128 or in_features % 128
            group_size = in_features if per_channel else 128
        if symmetric is None:
            symmetric = bits == 8
        if in_features % group_size:
            divisors = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
            raise ValueError(
                f"group_size={group_size} does not divide the {in_features} input features of {name!r}. Use a "
                f"divisor such as {divisors or [in_features]}, or exclude the module (exclude_modules=[{name!r}])."
            )
        if bits == 4 and group_size % 2:
            raise ValueError(
                f"4-bit packing stores two values per byte, so group_size must be even; got {group_size}."
            )
        return ModuleSpec(kind, bits, group_size, symmetric, "float" if symmetric else self.zero_point)


def _check_bits(bits: Any, what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or bits not in (4, 8):
        error = ValueError if isinstance(bits, (int, float)) and not isinstance(bits, bool) else WrongTypeError
        raise error(f"{what} must be 4 or 8, got {describe(bits)}. Use bits=8 (near lossless) or bits=4 (smallest).")
    return int(bits)


def _check_group_size(group_size: Any, what: str) -> None:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 2 and group_size != -1):
        error = ValueError if isinstance(group_size, int) and not isinstance(group_size, bool) else WrongTypeError
        raise error(
            f"{what} must be an integer >= 2 (e.g. 32, 64, 128) or -1 (one scale per output channel), got "
            f"{describe(group_size)}."
        )
