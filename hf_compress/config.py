"""Technique configs and the `CompressionConfig` recipe that is stored in `config.json`.

A recipe is an ordered list of technique configs (head pruning, embedding factorization, weight quantization, ...).
It is registered with transformers' quantizer plugin API under ``quant_method: "hf_compress"``, so
`save_pretrained` writes it into ``config.json`` and `from_pretrained` hands it back to our quantizer, which rebuilds
the compressed structure on the empty skeleton before the weights are loaded (see `hf_compress.plugin`).

Every technique config stored in a recipe is *resolved*: it names exactly what was changed (which heads, which
rank, which modules), so rebuilding the structure needs no data and no weights.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from transformers.quantizers import register_quantization_config
from transformers.utils.quantization_config import QuantizationConfigMixin

from .registry import get_technique, registered_techniques


__version__ = "0.1.0"


__all__ = ["CompressionConfig", "TechniqueConfig", "QUANT_METHOD", "FORMAT_VERSION"]

QUANT_METHOD = "hf_compress"
# Bumped when the layout of the recipe itself changes; each technique has its own `version` too.
FORMAT_VERSION = 1


@dataclass
class TechniqueConfig:
    """Base class of every technique config.

    Subclasses are dataclasses whose fields carry ``metadata={"help": ...}`` (the CLI is generated from them) and
    set the class variable `method` to the name they register under (`hf_compress.registry.register_technique`).
    Values are checked in `__post_init__`, so a bad config fails when it is built, not halfway through compression.
    """

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def model_dtype(self, device: Any = None) -> Any:
        """The float dtype a checkpoint holding this technique reloads in on `device` (``"cpu"`` or ``"cuda"``), or
        None when the technique has no say (the plugin then keeps the dtype ``from_pretrained`` was asked for)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, tagged with ``method`` and ``version``."""
        return {"method": self.method, "version": self.version, **_jsonable(asdict(self))}

    @staticmethod
    def from_dict(data: dict[str, Any]) -> TechniqueConfig:
        """Rebuild the right technique config from `to_dict` output.

        Keys this version does not know (written by a newer hf_compress) are dropped with a warning; an unknown
        technique raises a `ValueError` naming the registered ones.
        """
        data = dict(data)
        method = data.pop("method", None)
        stored_version = data.pop("version", 1)
        technique = get_technique(method)
        cls = technique.config_cls
        if stored_version > cls.version:
            warnings.warn(
                f"The recipe was written with version {stored_version} of the {method!r} technique; this hf_compress "
                f"({__version__}) knows version {cls.version}. Upgrade hf_compress (`pip install -U hf-compress`) "
                "if the model does not load correctly.",
                stacklevel=2,
            )
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            warnings.warn(
                f"Ignoring unknown keys {unknown} in the {method!r} config (written by a newer hf_compress?). "
                "Upgrade hf_compress (`pip install -U hf-compress`) to use them.",
                stacklevel=2,
            )
        return cls(**{k: v for k, v in data.items() if k in known})


def _jsonable(value: Any) -> Any:
    """Turn tuples into lists and dict keys into strings, as JSON will anyway (so round trips compare equal)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def int_keys(mapping: dict | None) -> dict[int, Any] | None:
    """JSON turns integer dict keys into strings; technique configs call this to turn them back."""
    if mapping is None:
        return None
    try:
        return {int(k): v for k, v in mapping.items()}
    except (TypeError, ValueError) as err:
        raise ValueError(f"Expected a mapping with integer (layer index) keys, got {mapping!r}.") from err


@register_quantization_config(QUANT_METHOD)
class CompressionConfig(QuantizationConfigMixin):
    """The recipe of a compressed model: an ordered list of technique configs.

    It is what `model.config.quantization_config` holds for a model compressed by hf_compress, and what
    ``config.json`` stores under ``"quantization_config"``. Passing one to `from_pretrained` of an uncompressed
    checkpoint compresses while loading, for the techniques that support it (weight quantization).

    Args:
        techniques (`list[TechniqueConfig | dict]`, *optional*):
            The technique configs, in the order they were (or are to be) applied. Dicts are rebuilt with
            `TechniqueConfig.from_dict`, so the JSON of a saved model round-trips.
        hf_compress_version (`str`, *optional*):
            The hf_compress version that wrote the recipe; defaults to the running one.
        format_version (`int`, *optional*, defaults to `1`):
            Version of the recipe layout.
        attn_implementation (`str`, *optional*):
            The attention implementation chosen when the model was compressed (transformers does not save it),
            restored on load unless `from_pretrained` is given one.

    Example:

    ```py
    >>> from hf_compress import CompressionConfig
    >>> from hf_compress.quantization import WeightQuantizationConfig
    >>> recipe = CompressionConfig([WeightQuantizationConfig(bits=8)])
    >>> model = AutoModel.from_pretrained("bert-base-uncased", quantization_config=recipe)  # quantize on load
    ```
    """

    def __init__(
        self,
        techniques: list[TechniqueConfig | dict] | tuple = (),
        hf_compress_version: str | None = None,
        format_version: int = FORMAT_VERSION,
        attn_implementation: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        if isinstance(techniques, TechniqueConfig):
            techniques = [techniques]
        if not isinstance(techniques, (list, tuple)):
            raise TypeError(
                f"`techniques` must be a list of technique configs, got {type(techniques).__name__}. "
                "Example: CompressionConfig([WeightQuantizationConfig(bits=8)])."
            )
        self.techniques: list[TechniqueConfig] = []
        for item in techniques:
            if isinstance(item, dict):
                item = TechniqueConfig.from_dict(item)
            if not isinstance(item, TechniqueConfig):
                raise TypeError(
                    f"Each technique must be a TechniqueConfig or its dict, got {type(item).__name__}. "
                    f"Registered techniques: {sorted(registered_techniques())}."
                )
            self.techniques.append(item)
        self.hf_compress_version = hf_compress_version or __version__
        self.format_version = int(format_version)
        self.attn_implementation = attn_implementation
        if self.format_version > FORMAT_VERSION:
            warnings.warn(
                f"This recipe uses format version {self.format_version}, newer than the {FORMAT_VERSION} this "
                f"hf_compress ({__version__}) reads. Upgrade with `pip install -U hf-compress`.",
                stacklevel=2,
            )
        if kwargs:
            warnings.warn(
                f"Ignoring unknown recipe keys {sorted(kwargs)} (written by hf_compress {self.hf_compress_version}, "
                f"this is {__version__}). Upgrade with `pip install -U hf-compress` if loading fails.",
                stacklevel=2,
            )
        check_canonical_order(self.techniques)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": self.quant_method,
            "format_version": self.format_version,
            "hf_compress_version": self.hf_compress_version,
            "attn_implementation": self.attn_implementation,
            "techniques": [t.to_dict() for t in self.techniques],
        }

    def find(self, method: str) -> list[TechniqueConfig]:
        """The technique configs of one method, in recipe order."""
        return [t for t in self.techniques if t.method == method]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompressionConfig) and self.to_dict() == other.to_dict()


def check_canonical_order(techniques: list[TechniqueConfig]) -> None:
    """Structure-changing techniques must come before quantization: a quantized layer cannot be pruned or factorized.

    Raises a `ValueError` that names the order received and the order expected.
    """
    stages = [get_technique(t.method).order for t in techniques]
    if stages != sorted(stages):
        received = [t.method for t in techniques]
        expected = [t.method for t in sorted(techniques, key=lambda t: get_technique(t.method).order)]
        raise ValueError(
            f"Techniques are applied in this order: prune, factorize, quantize. Received {received}; "
            f"reorder them as {expected}."
        )
