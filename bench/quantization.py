"""Weight quantization on MiniLM: hf_compress int8 / int4 / dynamic int8 next to the peers, in one run.

    python -m bench.quantization            # full run
    python -m bench.quantization --fast     # smoke run on less data
    python -m bench.quantization --no-compile   # without the torch.compile rows
    flock /tmp/hf_compress_bench.lock python -m bench.quantization   # timings others do not disturb

Peers come from the ``bench`` extra (torchao, optimum-quanto, hqq, bitsandbytes); a peer that cannot be installed or
run on this machine is listed under the table with the reason. Peers compute in the same dtype hf_compress picks for
this machine (`preferred_compute_dtype`: bf16 where it is native, else float32), so nobody is slowed down by an
emulated dtype; the "bf16 cast" row is the plain bf16 model whatever the machine.

The "+ torch.compile" rows compile the whole model (default inductor mode), fp32 included so the gain of compiling
alone is visible; their build time includes the first compilation, and every row's latency is still relative to
eager fp32.
"""

from __future__ import annotations

import argparse
import copy
import time
import traceback
from collections.abc import Callable

import torch
from torch import nn

from bench.harness import BenchConfig, format_table, load_minilm, run_benchmark
from hf_compress import apply_compression
from hf_compress.data import load_debian
from hf_compress.quantization import WeightQuantizationConfig
from hf_compress.quantization.kernels import preferred_compute_dtype


def _replace_linears(model: nn.Module, make: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, make(module))
    return model


def hf_compress_variant(base, calibration, **kwargs) -> Callable[[], nn.Module]:
    def build():
        model = copy.deepcopy(base)
        apply_compression(model, WeightQuantizationConfig(**kwargs), calibration_data=calibration)
        return model

    return build


def sequential_variant(base, calibration, **kwargs) -> Callable[[], nn.Module]:
    """GPTQ calibrated layer by layer (`hf_compress.sequential`), each layer on the quantized layers' outputs."""

    def build():
        from hf_compress.sequential import sequential_compress

        model = copy.deepcopy(base)
        sequential_compress(model, WeightQuantizationConfig(algorithm="gptq", **kwargs), calibration, progress=False)
        return model

    return build


def compiled(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build():
        return torch.compile(factory())

    return build


def peers(base) -> dict[str, Callable[[], nn.Module]]:
    compute = preferred_compute_dtype("cpu")

    def bf16():
        return copy.deepcopy(base).to(torch.bfloat16)

    def in_compute_dtype():
        return copy.deepcopy(base).to(compute)

    def torch_ao_dynamic():
        model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8)
        # Its state dict holds packed params and dtypes, which the harness's byte count cannot size: keep the
        # tensors only (so its memory column leaves out the packed int8 linear weights).
        full = type(model).state_dict
        model.state_dict = lambda *a, **k: {n: t for n, t in full(model, *a, **k).items() if torch.is_tensor(t)}
        return model

    def torchao(config_name: str, **kwargs):
        def build():
            import torchao.quantization as tq

            model = bf16() if config_name.startswith("Int4") else in_compute_dtype()  # its int4 kernel wants bf16
            tq.quantize_(model, getattr(tq, config_name)(**kwargs))
            return model

        return build

    def quanto(bits: int):
        def build():
            from optimum.quanto import freeze, qint4, qint8, quantize

            model = in_compute_dtype()
            quantize(model, weights=qint8 if bits == 8 else qint4)
            freeze(model)
            return model

        return build

    def hqq(bits: int, group: int):
        def build():
            from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

            HQQLinear.set_backend(HQQBackend.PYTORCH)
            config = BaseQuantizeConfig(nbits=bits, group_size=group)
            make = lambda lin: HQQLinear(lin, config, compute_dtype=compute, device="cpu")  # noqa: E731
            return _replace_linears(in_compute_dtype(), make)

        return build

    def bnb_nf4():
        from transformers import AutoModel, BitsAndBytesConfig

        from hf_compress.data import minilm_path

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
        return AutoModel.from_pretrained(minilm_path(), quantization_config=config, device_map="cpu").eval()

    return {
        "bf16 cast": bf16,
        "torch.ao dynamic int8": torch_ao_dynamic,
        "torchao int8 weight-only": torchao("Int8WeightOnlyConfig"),
        "torchao int4 g32": torchao("Int4WeightOnlyConfig", group_size=32, int4_packing_format="opaque"),
        "quanto int8": quanto(8),
        "quanto int4": quanto(4),
        "hqq 8-bit": hqq(8, 64),
        "hqq 4-bit g64": hqq(4, 64),
        "bitsandbytes nf4": bnb_nf4,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quantization", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="less data and fewer timing rounds (smoke run)")
    parser.add_argument("--no-peers", action="store_true", help="only hf_compress variants and the bf16 cast")
    parser.add_argument("--no-compile", action="store_true", help="leave out the whole-model torch.compile rows")
    parser.add_argument("--rounds", type=int, default=None, help="latency rounds (default: harness default)")
    args = parser.parse_args(argv)
    config = BenchConfig()
    if args.fast:
        config = BenchConfig(fidelity_per_section=8, probe_train_per_section=16, latency_rounds=3)
    if args.rounds:
        config.latency_rounds = args.rounds
    base, tokenizer = load_minilm()
    calibration = [row["text"] for row in load_debian("train", per_section=11)][:128]
    factories = {
        "hf_compress int8": hf_compress_variant(base, calibration, bits=8),
        "hf_compress int8 (no calibration)": hf_compress_variant(base, None, bits=8),
        "hf_compress int4 g32": hf_compress_variant(base, calibration, bits=4),
        "hf_compress int4 g32 (no calibration)": hf_compress_variant(base, None, bits=4),
        "hf_compress int4 g32 GPTQ sequential": sequential_variant(base, calibration, bits=4),
    }
    factories["hf_compress int8 dynamic act."] = hf_compress_variant(
        base, calibration, bits=8, activations="int8_dynamic"
    )
    if not args.no_compile:
        # The compiled models share BertModel's code objects: room for each one's shapes before dynamo gives up.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        factories["fp32 + torch.compile"] = compiled(lambda: copy.deepcopy(base))
        factories["hf_compress int8 + torch.compile"] = compiled(factories["hf_compress int8 (no calibration)"])
        factories["hf_compress int8 dynamic act. + torch.compile"] = compiled(
            factories["hf_compress int8 dynamic act."]
        )
    candidates = peers(base)
    if args.no_peers:
        candidates = {"bf16 cast": candidates["bf16 cast"]}
    factories = {**candidates, **factories}
    variants, failed, extra = [], [], {}
    for name, factory in factories.items():
        start = time.perf_counter()
        try:
            model = factory()
            with torch.inference_mode():  # a peer that builds but cannot run is reported too
                model(**tokenizer(["smoke test"], return_tensors="pt"))
        except Exception as err:  # noqa: BLE001  (any peer failure is reported, not fatal)
            failed.append((name, f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"))
            traceback.print_exc(limit=1)
            continue
        extra[name] = {"build (s)": time.perf_counter() - start}
        variants.append((name, model))
    config.extra_columns = extra
    rows = run_benchmark(variants, config, reference=("fp32", base), tokenizer=tokenizer)
    title = f"MiniLM-L6 weight quantization (batch {config.latency_batch} x {config.latency_seq}, {config.threads} threads)"
    print(format_table(rows, title=title))
    for name, reason in failed:
        print(f"- {name}: could not run here ({reason})")


if __name__ == "__main__":
    main()
