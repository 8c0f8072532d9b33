"""A minimal technique used to test the recipe and plugin machinery on its own (not shipped).

It keeps the first `keep` FFN neurons of every layer: enough to change shapes, so a reload that skipped
`restructure` would fail on mismatched tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from hf_compress.architectures import get_adapter
from hf_compress.config import TechniqueConfig
from hf_compress.registry import Technique, register_technique, registered_techniques


@dataclass
class ToyFFNSliceConfig(TechniqueConfig):
    method = "toy_ffn_slice"
    keep: int = field(default=8, metadata={"help": "FFN neurons kept per layer."})

    def __post_init__(self):
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}.")


def _slice(model, config, copy_weights):
    adapter = get_adapter(model)
    for layer in adapter.layer_modules(model):
        for path in adapter.ffn_in:
            old = adapter.sub(layer, path)
            new = nn.Linear(old.in_features, config.keep, bias=old.bias is not None, device=old.weight.device,
                            dtype=old.weight.dtype)  # fmt: skip
            if copy_weights:
                with torch.no_grad():
                    new.weight.copy_(old.weight[: config.keep])
                    if old.bias is not None:
                        new.bias.copy_(old.bias[: config.keep])
            parent, _, child = path.rpartition(".")
            setattr(adapter.sub(layer, parent), child, new)
        old = adapter.sub(layer, adapter.ffn_out)
        new = nn.Linear(config.keep, old.out_features, bias=old.bias is not None, device=old.weight.device,
                        dtype=old.weight.dtype)  # fmt: skip
        if copy_weights:
            with torch.no_grad():
                new.weight.copy_(old.weight[:, : config.keep])
                if old.bias is not None:
                    new.bias.copy_(old.bias)
        parent, _, child = adapter.ffn_out.rpartition(".")
        setattr(adapter.sub(layer, parent), child, new)


def apply(model, config, calibration_data=None):
    _slice(model, config, copy_weights=True)
    return config


def restructure(model, config):
    _slice(model, config, copy_weights=False)


if "toy_ffn_slice" not in registered_techniques():
    register_technique(
        Technique(
            name="toy_ffn_slice", config_cls=ToyFFNSliceConfig, stage="prune", apply=apply, restructure=restructure
        )
    )
