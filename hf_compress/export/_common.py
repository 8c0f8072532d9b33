"""What every export target shares: loading the source, the float view, the graph's inputs, folder safety, README.

The *float view* is a copy of a compressed model in which every `QuantLinear` / `QuantEmbedding` is replaced by an
`nn.Linear` / `nn.Embedding` holding its dequantized float32 weight. Its shapes and structure are the compressed ones
(pruned heads, factorized embeddings, low-rank layers, dropped layers), so any tracer can export it; the ONNX writer
then puts our integers, scales and zero points back in place of those float weights.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

import hf_compress
from hf_compress.quantization import QuantEmbedding, QuantLinear


MANIFEST = "hf_compress_export.json"
REPORT = "hf_compress_report.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "merges.txt",
                   "vocab.json", "tokenizer.model", "added_tokens.json")  # fmt: skip


def load_source(model_or_dir: Any) -> tuple[nn.Module, Path | None]:
    """The model (eval mode) and the folder it came from (``None`` for a model object)."""
    if isinstance(model_or_dir, nn.Module):
        source = getattr(model_or_dir, "name_or_path", None) or getattr(
            getattr(model_or_dir, "config", None), "_name_or_path", None
        )
        folder = Path(source) if source and Path(source).is_dir() else None
        return model_or_dir.eval(), folder
    folder = Path(model_or_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model_or_dir={str(model_or_dir)!r}: expected a model object or a folder with config.json."
        )
    import transformers

    config = json.loads((folder / "config.json").read_text())
    architectures = config.get("architectures") or ["AutoModel"]
    cls = getattr(transformers, architectures[0], None) or transformers.AutoModel
    return cls.from_pretrained(folder).eval(), folder


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def float_view(model: nn.Module) -> nn.Module:
    """A float32 copy of `model` with every quantized module replaced by the float module it represents."""
    view = copy.deepcopy(model)
    for name, module in quantized_modules(view).items():
        weight = module.dequantize(torch.float32)
        if isinstance(module, QuantLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight = nn.Parameter(weight, requires_grad=False)
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach().float(), requires_grad=False)
            if module.activations == "int8_static":
                plain = StaticInputLinear(module, plain)
        else:
            plain = nn.Embedding(*weight.shape, padding_idx=module.padding_idx)
            plain.weight = nn.Parameter(weight, requires_grad=False)
        view.set_submodule(name, plain)
    # PreTrainedModel.float() refuses models with a quantizer attached; the view holds no quantized module any more.
    nn.Module.float(view)
    return view.eval()


class StaticInputLinear(nn.Module):
    """The float view of an ``"int8_static"`` layer: its smoothed input fake-quantized with constant uint8 scale and
    zero point, which the ONNX exporter writes as QuantizeLinear / DequantizeLinear (the pattern ONNX Runtime and
    OpenVINO run as an int8 x int8 matmul), then the linear layer."""

    def __init__(self, layer: QuantLinear, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("multiplier", layer.input_multiplier.detach().float().clone())
        self.scale, self.zero_point = float(layer.input_scale.float()), int(layer.input_zero_point.float().round())
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x * self.multiplier, self.scale, self.zero_point, 0, 255)
        return self.linear(x)


def input_names(model: nn.Module) -> list[str]:
    """The tokenizer outputs the graph takes: ids and mask, plus token types for models with a type embedding."""
    params = inspect.signature(model.forward).parameters
    if "pixel_values" in params and "input_ids" not in params:
        return ["pixel_values"]
    names = ["input_ids", "attention_mask"]
    # GPT-2 accepts token_type_ids too but looks them up in the token table: only BERT-like models get them.
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return names


class OutputOf(nn.Module):
    """Calls the model with named tensors and returns one tensor: ``logits`` when the model has a head."""

    def __init__(self, model: nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model, self.names = model, names
        self.decoder = "use_cache" in inspect.signature(model.forward).parameters

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        kwargs = dict(zip(self.names, tensors))
        if self.decoder:
            kwargs["use_cache"] = False
        out = self.model(**kwargs, return_dict=True)
        self.returned = "logits" if "logits" in out else "last_hidden_state"
        return out[self.returned]


def output_name(model: nn.Module, example: dict[str, torch.Tensor]) -> tuple[str, int]:
    """The graph's output (``logits`` for models with a head) and its number of dimensions."""
    wrapper = OutputOf(model, list(example))
    with torch.no_grad():
        tensor = wrapper(*example.values())
    return wrapper.returned, tensor.dim()


def example_inputs(model: nn.Module, names: list[str], batch: int = 2, seq: int = 8) -> dict[str, torch.Tensor]:
    if names == ["pixel_values"]:
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch, model.config.num_channels, size, size)}
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out["attention_mask"][1, -2:] = 0  # a padded row: the mask path is traced, not constant-folded
    if "token_type_ids" in names:
        out["token_type_ids"] = torch.zeros_like(ids)
    return {name: out[name] for name in names}


# -- output folder ---------------------------------------------------------------------------------------------------
def prepare_output(output_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Create or clear `output_dir`: only a new/empty folder or a previous export (whose listed files are removed).

    Any other non-empty folder needs ``overwrite=True``, and even then only files this export writes are replaced:
    nothing else is deleted.
    """
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir={str(out)!r} is a file, not a folder.")
    out.mkdir(parents=True, exist_ok=True)
    entries = set(os.listdir(out))
    manifest = out / MANIFEST
    if manifest.is_file():
        written = json.loads(manifest.read_text()).get("files", [])
        for name in written:
            target = out / name
            if target.is_file() and target.resolve().is_relative_to(out.resolve()):
                target.unlink()
        manifest.unlink(missing_ok=True)
    elif entries and not overwrite:
        raise ValueError(
            f"output_dir={str(out)!r} is not empty and holds no previous export ({MANIFEST} missing): pass "
            "overwrite=True to write the export there (files it does not write are kept), or choose a new folder."
        )
    return out


def copy_extras(source: Path | None, model: nn.Module, out: Path, tokenizer: Any = None) -> list[str]:
    """Tokenizer files and the hf_compress report of the source, when it has them; returns the names written."""
    written = []
    if tokenizer is not None:
        written += [Path(path).name for path in tokenizer.save_pretrained(out) if Path(path).is_file()]
    elif source is not None:
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, out / name)
                written.append(name)
    if source is not None and (source / REPORT).is_file() and REPORT not in written:
        shutil.copyfile(source / REPORT, out / REPORT)
        written.append(REPORT)
    return written


def finish(out: Path, target: str, files: list[str], readme: str, info: dict[str, Any]) -> Path:
    """Write README.md and the manifest (the list of files this export wrote, so a later export can replace them)."""
    (out / "README.md").write_text(readme)
    files = sorted({*files, "README.md", MANIFEST})
    meta = {"target": target, "hf_compress_version": hf_compress.__version__, "files": files, **info}
    (out / MANIFEST).write_text(json.dumps(meta, indent=2) + "\n")
    return out
