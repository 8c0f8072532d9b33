"""Held-out perplexity of compressed decoders: GPT-2- and Llama-style (GQA) models trained on Debian descriptions.

    python -m bench.perplexity                 # full run: both models, every variant (trains once, then cached)
    python -m bench.perplexity --quick         # smoke run: tiny models, a few variants, little data
    python -m bench.perplexity --models llama --variants "fp32,int4 g32 gptq"   # a subset (names: --list)

The models (`bench/lm.py`) are trained here from configs on the *train* split and cached; perplexity is measured
on non-overlapping 128-token windows of the *test* split (texts joined with end-of-text tokens; by default 256
windows, 33k tokens, evenly spread over it), every variant on the same windows. GPTQ calibration and recovery
distillation use train texts only. hf_compress rows and peers (the ``bench`` extra: hqq, bitsandbytes, torchao)
quantize the same modules, every linear projection (not the embeddings nor the tied output head; one row shows the
library default, which also quantizes GPT-2's position embedding), and peers compute in the dtype hf_compress picks
on this machine; a peer or variant that cannot run here is a row with the exact reason. Perplexity barely moves at
4 bits on models this small, so each row also gives the mean KL divergence of its next-token distribution from
fp32's on 64 test windows (the finer measure of the damage). Perplexity needs no timing lock; build times are
indicative only.
"""

from __future__ import annotations

import argparse
import math
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.harness import disk_bytes, format_table
from bench.lm import (
    QUICK_SPECS,
    SPECS,
    LMSpec,
    debian_texts,
    kl_to_reference,
    log_probs,
    perplexity,
    token_stream,
    train_or_load,
    windows,
)
from hf_compress import apply_compression
from hf_compress.pruning import HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig
from hf_compress.quantization.kernels import preferred_compute_dtype


class Unavailable(Exception):
    """A variant that cannot run on this machine or install (the row says why)."""


class Context:
    """What every variant builder gets: the checkpoint, its tokenizer, calibration and recovery texts."""

    def __init__(self, folder: Path, calibration: list[str], recovery: list[str], recovery_steps: int) -> None:
        self.folder, self.calibration, self.recovery, self.recovery_steps = folder, calibration, recovery, recovery_steps
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def load(self) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32).eval()


def _quantized(bits: int, group: int | None, algorithm: str, embeddings: bool = False) -> Callable[[Context], nn.Module]:
    """hf_compress weight quantization; by default of the linear layers only, the modules the peers quantize too
    (GPT-2's int4 position embedding alone more than doubles its KL to fp32: 2.3e-4 vs 0.8e-4 nats with GPTQ g32)."""

    def build(ctx: Context) -> nn.Module:
        config = WeightQuantizationConfig(bits=bits, group_size=group, algorithm=algorithm,
                                          quantize_embeddings=embeddings,
                                          calibration_samples=len(ctx.calibration))  # fmt: skip
        data = ctx.calibration if algorithm == "gptq" else None
        return apply_compression(ctx.load(), config, calibration_data=data, tokenizer=ctx.tokenizer)

    return build


def _sequential(bits: int, group: int | None) -> Callable[[Context], nn.Module]:
    def build(ctx: Context) -> nn.Module:
        try:
            from hf_compress.sequential import sequential_compress
        except ImportError as err:
            raise Unavailable(f"not available (hf_compress.sequential: {err})") from None
        config = WeightQuantizationConfig(bits=bits, group_size=group, algorithm="gptq", quantize_embeddings=False,
                                          calibration_samples=len(ctx.calibration))  # fmt: skip
        return sequential_compress(ctx.load(), config, ctx.calibration, tokenizer=ctx.tokenizer, progress=False)

    return build


def _pruned(fraction: float, recover: bool) -> Callable[[Context], nn.Module]:
    def build(ctx: Context) -> nn.Module:
        student = apply_compression(ctx.load(), HeadPruningConfig(fraction=fraction),
                                    calibration_data=ctx.calibration, tokenizer=ctx.tokenizer)  # fmt: skip
        if recover:
            from hf_compress.pipeline.recovery import recover as distil

            distil(student, ctx.load(), ctx.recovery, tokenizer=ctx.tokenizer, max_steps=ctx.recovery_steps,
                   learning_rate=5e-4, batch_size=16, max_length=128, logging_strategy="no")  # fmt: skip
        return student

    return build


def _as_linear(model: nn.Module) -> nn.Module:
    """GPT-2's `Conv1D` projections as equivalent `nn.Linear`s, so peers that only know `nn.Linear` see them."""
    from transformers.pytorch_utils import Conv1D

    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], dtype=module.weight.dtype)
            linear.weight.data.copy_(module.weight.data.t())
            linear.bias.data.copy_(module.bias.data)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, linear)
    return model


def _body_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    head = model.get_output_embeddings()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head]


def _hqq(bits: int, group: int) -> Callable[[Context], nn.Module]:
    def build(ctx: Context) -> nn.Module:
        from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

        HQQLinear.set_backend(HQQBackend.PYTORCH)
        compute = preferred_compute_dtype("cpu")
        model = _as_linear(ctx.load()).to(compute)
        for name, linear in _body_linears(model):
            parent, _, child = name.rpartition(".")
            quantized = HQQLinear(linear, BaseQuantizeConfig(nbits=bits, group_size=group), compute_dtype=compute,
                                  device="cpu")  # fmt: skip
            setattr(model.get_submodule(parent), child, quantized)
        return model

    return build


def _bnb_nf4(ctx: Context) -> nn.Module:
    from transformers import BitsAndBytesConfig

    compute = preferred_compute_dtype("cpu")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    return AutoModelForCausalLM.from_pretrained(ctx.folder, quantization_config=config, device_map="cpu",
                                                dtype=compute).eval()  # fmt: skip


def _torchao_int4(group: int) -> Callable[[Context], nn.Module]:
    """torchao's `Int4WeightOnlyConfig`, each packing format tried in turn (all of them are reported if none runs)."""

    def build(ctx: Context) -> nn.Module:
        import torchao.quantization as tq
        from torchao.quantization.quantize_.workflows import Int4PackingFormat

        errors = []
        for packing in Int4PackingFormat:
            model = _as_linear(ctx.load()).to(torch.bfloat16)  # its int4 kernels take bf16
            body = {id(m) for _, m in _body_linears(model)}
            try:
                tq.quantize_(model, tq.Int4WeightOnlyConfig(group_size=group, int4_packing_format=packing),
                             filter_fn=lambda module, fqn, body=body: id(module) in body)  # fmt: skip
                model(input_ids=torch.zeros(1, 4, dtype=torch.long))
                return model
            except Exception as err:  # noqa: BLE001
                errors.append(f"{packing.value}: {_reason(err)}")
        raise Unavailable("cannot run here, no int4 packing format works on this CPU: " + "; ".join(errors))

    return build


def _torchao_intx(group: int) -> Callable[[Context], nn.Module]:
    """torchao's `IntxWeightOnlyConfig` with int4 values (asymmetric, per group): its CPU int4 weight-only path."""

    def build(ctx: Context) -> nn.Module:
        import torchao.quantization as tq
        from torchao.quantization.granularity import PerGroup
        from torchao.quantization.quant_primitives import MappingType

        model = _as_linear(ctx.load()).to(preferred_compute_dtype("cpu"))
        body = {id(m) for _, m in _body_linears(model)}
        config = tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group),
                                         mapping_type=MappingType.ASYMMETRIC)  # fmt: skip
        tq.quantize_(model, config, filter_fn=lambda module, fqn: id(module) in body)
        return model

    return build


def variants(quick: bool) -> dict[str, Callable[[Context], nn.Module]]:
    table: dict[str, Callable[[Context], nn.Module]] = {
        "fp32": lambda ctx: ctx.load(),
        "bf16 cast": lambda ctx: ctx.load().to(torch.bfloat16),
        "int8 rtn": _quantized(8, None, "rtn"),
        "int8 mse": _quantized(8, None, "mse"),
    }
    groups = (32,) if quick else (32, 64)
    for group in groups:
        for algorithm in ("rtn", "mse", "hqq", "gptq"):
            table[f"int4 g{group} {algorithm}"] = _quantized(4, group, algorithm)
        table[f"int4 g{group} gptq sequential"] = _sequential(4, group)
    table["int4 g32 gptq + embeddings (library default)"] = _quantized(4, 32, "gptq", embeddings=True)
    table["int8 gptq"] = _quantized(8, None, "gptq")
    table["int8 gptq sequential"] = _sequential(8, None)
    table["heads -25%"] = _pruned(0.25, recover=False)
    table["heads -25% + recovery"] = _pruned(0.25, recover=True)
    table["peer: hqq 4-bit g64"] = _hqq(4, 64)
    if not quick:
        table["peer: hqq 4-bit g32"] = _hqq(4, 32)
    table["peer: bitsandbytes nf4 (blocks of 64)"] = _bnb_nf4
    table["peer: torchao int4 weight-only g32"] = _torchao_int4(32)
    table["peer: torchao intx int4 g32 (int8 storage)"] = _torchao_intx(32)
    return table


def _tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a tensor holds; a wrapper subclass (torchao's quantized weights) is sized by its inner tensors."""
    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
        names, _ = tensor.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def _model_bytes(model: nn.Module) -> int:
    """`hf_compress.utils.model_bytes`, but sizing tensor subclasses by what they store."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        if torch.is_tensor(tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += _tensor_bytes(tensor.data if isinstance(tensor, nn.Parameter) else tensor)
    return total


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:200] if text else ''}"


def run_model(spec: LMSpec, names: list[str], table: dict, quick: bool, eval_windows: int | None,
              calibration_samples: int, progress: bool = True, kl_windows: int = 64) -> tuple[list[dict[str, Any]], dict]:  # fmt: skip
    """Train (or load) one model and measure every variant in `names`; rows for `format_table`."""
    folder, record = train_or_load(spec, progress=progress)
    train = debian_texts("train")
    calibration = train[:calibration_samples]
    recovery = train[calibration_samples : calibration_samples + (64 if quick else 1600)]
    ctx = Context(folder, calibration, recovery, recovery_steps=4 if quick else 100)
    data = windows(token_stream(ctx.tokenizer, debian_texts("test")), spec.seq, eval_windows)
    kl_data = windows(token_stream(ctx.tokenizer, debian_texts("test")), spec.seq, kl_windows)
    rows, reference, ref_bytes, ref_logp = [], None, None, None
    bar = tqdm(names, desc=spec.family, disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        row: dict[str, Any] = {"model": spec.family, "variant": name}
        start = time.perf_counter()
        try:
            model = table[name](ctx)
            built = time.perf_counter() - start
            ppl = perplexity(model, data, progress=progress)
            if name == "fp32":
                ref_logp = log_probs(model, kl_data)
            kl = kl_to_reference(model, kl_data, ref_logp) if ref_logp is not None else None
        except Unavailable as err:
            rows.append({**row, "ppl": f"n/a ({err})"})
            continue
        except Exception as err:  # noqa: BLE001  (a variant or peer that fails here is a row, not a crash)
            traceback.print_exc(limit=2)
            rows.append({**row, "ppl": f"n/a (cannot run here: {_reason(err)})"})
            continue
        size = _model_bytes(model)
        if name == "fp32":
            reference, ref_bytes = ppl, size
        disk = disk_bytes(model) if not name.startswith("peer") or "bitsandbytes" in name else None
        row.update({"ppl": ppl, "ppl vs fp32": ppl / reference if reference else None,
                    "KL to fp32 (nats/token)": f"{kl:.3g}" if kl is not None else None,
                    "memory (MB)": size / 1e6, "bytes vs fp32": size / ref_bytes if ref_bytes else None,
                    "disk (MB)": disk / 1e6 if disk else None, "build (s)": built})  # fmt: skip
        rows.append(row)
        del model
    record = {**record, "test_tokens": int(data.numel()), "fp32_ppl": reference, "uniform_ppl": len(ctx.tokenizer)}
    return rows, record


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m bench.perplexity", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, a few variants, little data (smoke run)")
    parser.add_argument("--models", default="gpt2,llama", help="comma-separated: gpt2, llama")
    parser.add_argument("--variants", default=None, help="comma-separated variant names (default: all; see --list)")
    parser.add_argument("--list", action="store_true", help="print the variant names and exit")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="test windows to score (default 256 x 128 tokens; 0: the whole test split; --quick: 24)")
    parser.add_argument("--calibration-samples", type=int, default=None, help="GPTQ / pruning texts (default 128)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    table = variants(args.quick)
    if args.list:
        print("\n".join(table))
        return []
    names = list(table) if args.variants is None else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from: {', '.join(table)}")
    if "fp32" not in names:
        names.insert(0, "fp32")  # every ratio is to fp32
    specs = {s.family: s for s in (QUICK_SPECS if args.quick else SPECS)}
    families = [m.strip() for m in args.models.split(",") if m.strip()]
    if any(f not in specs for f in families):
        raise SystemExit(f"--models takes gpt2 and/or llama, got {args.models!r}")
    torch.set_num_threads(args.threads)
    eval_windows = args.eval_windows if args.eval_windows is not None else (24 if args.quick else 256)
    eval_windows = eval_windows or None  # 0: every window
    calibration = args.calibration_samples or (16 if args.quick else 128)
    all_rows, notes = [], []
    for family in families:
        rows, record = run_model(specs[family], names, table, args.quick, eval_windows, calibration,
                                 progress=not args.no_progress, kl_windows=8 if args.quick else 64)  # fmt: skip
        all_rows.extend(rows)
        notes.append(
            f"- {specs[family].name}: {record['spec']['steps']} steps x {record['spec']['batch']} x "
            f"{record['spec']['seq']} tokens trained in {record['train_seconds'] / 60:.1f} min "
            f"({record['threads']} threads, final train loss {record['final_loss']:.3f}); fp32 held-out ppl "
            f"{record['fp32_ppl']:.2f} on {record['test_tokens']} test tokens (uniform: {record['uniform_ppl']}, "
            f"bits/token {math.log2(record['fp32_ppl']):.2f})"
        )
    title = f"Held-out perplexity on Debian test descriptions ({'quick' if args.quick else 'full'} run)"
    print(format_table(all_rows, title=title))
    print("\n".join(notes))
    return all_rows


if __name__ == "__main__":
    main()
