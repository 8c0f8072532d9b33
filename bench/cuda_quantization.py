"""Weight quantization on CUDA: hf_compress int8 / int4 next to fp16 / bf16 casts and the CUDA peers, in one run.

    python -m bench.cuda_quantization                 # MiniLM and a random 8-layer Llama (hidden 1024) on cuda
    python -m bench.cuda_quantization --fast          # fewer texts and timing rounds (scripts/gpu_check.sh runs this)
    python -m bench.cuda_quantization --device cpu --fast --tiny   # a functional check without a GPU

One markdown table: size in device memory and latency, both relative to the bf16 cast timed in the same run (CUDA
synchronised, warmed up, rounds alternating between variants, median of per-round ratios: `harness.time_alternately`),
and the mean cosine to fp32 of MiniLM's mean-pooled sentence embeddings / the Llama's logits. "latency" is a full
batch (MiniLM 32 x 128 tokens, Llama prefill 4 x 256: the dequantize + GEMM path); "few-row latency" 16 rows of
MiniLM or a 1-token Llama forward (the packed int8 / int4 kernels). Memory is measured after the first forward
passes, so kernel-layout caches count. Peers (bitsandbytes, torchao, hqq: the ``bench`` extra) are each tried and a
failure is listed as "could not run: <error>". MiniLM comes from `hf_compress.data.minilm_path()`, ``--minilm-dir`` or
``$HF_COMPRESS_MINILM_DIR``; without any, a randomly initialised BERT of MiniLM's shape on random tokens stands in.
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, BertConfig, LlamaConfig

from bench.harness import BenchConfig, format_table, time_alternately
from bench.quantization import _replace_linears
from hf_compress import apply_compression
from hf_compress.data import load_debian, minilm_path
from hf_compress.evaluation.measure import sentence_embeddings
from hf_compress.quantization import WeightQuantizationConfig
from hf_compress.quantization.kernels import preferred_compute_dtype
from hf_compress.utils import count_parameters, model_bytes


MINILM_SHAPE = dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                    intermediate_size=1536, max_position_embeddings=512)  # fmt: skip
LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=False)  # fmt: skip
LLAMA_TINY = {**LLAMA, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
GPTQ_ON_CPU_MAX_PARAMS = 50e6  # a model GPTQ cannot calibrate on the device is calibrated on the CPU up to this size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated(device: torch.device) -> int:
    gc.collect()
    _sync(device)
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _random_ids(vocab: int, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@functools.cache
def _importable(module: str) -> None:
    """Import `module` in a subprocess first: a peer built for another torch may crash the process, not raise."""
    try:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"import {module} hung") from err
    if done.returncode:
        lines = (done.stderr.strip() or f"exit status {done.returncode}").splitlines()
        raise ModuleNotFoundError(f"import {module} failed: {lines[-1][:160]}")


class Task:
    """One base model with its inputs: what the variants are built from, timed on and compared with."""

    def __init__(self, name, model, source, batches, full, few, calibration, logits):
        self.name, self.model, self.source, self.batches = name, model, source, batches
        self.full, self.few, self.calibration, self.logits = full, few, calibration, logits
        self.reference = self.outputs(model)

    @torch.inference_mode()
    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        """Per evaluation batch: sentence embeddings (encoder, on the CPU) or float32 logits (decoder, on the device)."""
        if not self.logits:
            return [sentence_embeddings(model, self.batches)]
        where = next(model.parameters()).device
        return [model(**{k: v.to(where) for k, v in b.items()}).logits.float() for b in self.batches]

    def cosine(self, model: nn.Module) -> float:
        """Mean cosine similarity to fp32 of every embedding / every token's logits."""
        pairs = zip(self.outputs(model), self.reference)
        scores = [F.cosine_similarity(out.flatten(0, -2), ref.flatten(0, -2), dim=-1) for out, ref in pairs]
        return float(torch.cat(scores).mean())

    def saved(self) -> str:
        """A folder holding the fp32 base model, for peers that quantize inside from_pretrained."""
        if self.source is None:
            self.source = tempfile.mkdtemp(prefix=f"bench-{self.name}-")
            self.model.save_pretrained(self.source)
        return str(self.source)


def minilm_task(args, device: torch.device) -> Task:
    """The real MiniLM on Debian texts when the checkpoint and data are here, else a random BERT of its shape."""
    folder = args.minilm_dir or os.environ.get("HF_COMPRESS_MINILM_DIR")
    try:
        folder = folder or str(minilm_path())
        model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
        name = "MiniLM-L6"
    except (ImportError, OSError, ValueError) as err:
        print(f"MiniLM not available ({type(err).__name__}: {err}); a random BERT of its shape stands in")
        torch.manual_seed(0)
        model, tokenizer, folder = AutoModel.from_config(BertConfig(**MINILM_SHAPE)), None, None
        name = "BERT-MiniLM-shape"
    model = model.float().eval().to(device)
    config = BenchConfig()
    try:
        texts = [row["text"] for row in load_debian("test", per_section=4 if args.fast else 40)]
        calibration = [row["text"] for row in load_debian("train", per_section=3 if args.fast else 11)][:128]
    except FileNotFoundError as err:
        print(f"Debian texts not available ({err}); random tokens instead")
        texts = calibration = None
    if tokenizer is None or texts is None:
        batches = [_random_ids(MINILM_SHAPE["vocab_size"], 16, 64, seed=s) for s in range(3 if args.fast else 30)]
        full = _random_ids(MINILM_SHAPE["vocab_size"], config.latency_batch, config.latency_seq)
        few, calibration = _random_ids(MINILM_SHAPE["vocab_size"], 1, 16), batches[:2]
    else:

        def encode(chunk, length=128, padding="max_length"):
            return dict(tokenizer(chunk, padding=padding, truncation=True, max_length=length, return_tensors="pt"))

        batches = [encode(texts[i : i + 64], padding=True) for i in range(0, len(texts), 64)]
        repeated = (texts * (config.latency_batch // len(texts) + 1))[: config.latency_batch]
        full, few = encode(repeated, config.latency_seq), encode(texts[:1], 16)
    return Task(name, model, folder, batches, full, few, calibration, logits=False)


def llama_task(args, device: torch.device) -> Task:
    """A randomly initialised Llama built on the device (no checkpoint needed), on random tokens."""
    shape = LLAMA_TINY if args.tiny else LLAMA
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**shape), dtype=torch.float32).eval()
    vocab, n = shape["vocab_size"], 2 if args.fast else 8
    batches = [_random_ids(vocab, 4, 128, seed=100 + s) for s in range(n)]
    calibration = [_random_ids(vocab, 8, 128, seed=200 + s) for s in range(2 if args.fast else 8)]
    name = f"Llama-{shape['num_hidden_layers']}L-{shape['hidden_size']}"
    return Task(name, model, None, batches, _random_ids(vocab, 4, 256), _random_ids(vocab, 1, 1), calibration, True)


def hf_compress_variant(task: Task, device: torch.device, notes: list, calibrated: bool, **kwargs) -> Callable:
    """apply_compression on a copy of the base model on the device; GPTQ that fails there is redone on the CPU."""

    def build():
        calibration = task.calibration if calibrated else None
        model = copy.deepcopy(task.model)
        try:
            apply_compression(model, WeightQuantizationConfig(**kwargs), calibration_data=calibration)
            return model
        except RuntimeError as err:  # suspected: gptq.collect_hessians keeps its Hessians on the CPU
            if not calibrated or device.type == "cpu" or count_parameters(task.model) > GPTQ_ON_CPU_MAX_PARAMS:
                raise
            notes.append(f"{task.name}: GPTQ on {device.type} failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:120]}); calibrated on the CPU, then moved")  # fmt: skip
        del model
        dtype = str(preferred_compute_dtype(device)).removeprefix("torch.")
        model = copy.deepcopy(task.model).cpu()
        apply_compression(model, WeightQuantizationConfig(**kwargs, compute_dtype=dtype), calibration_data=calibration)
        return model.to(device)

    return build


def peers(task: Task, device: torch.device) -> dict[str, Callable]:
    """CUDA peers in bf16, each built from the fp32 base (from its saved folder for bitsandbytes)."""

    def bf16():
        return copy.deepcopy(task.model).to(torch.bfloat16)

    def bnb(**config):
        def build():
            _importable("bitsandbytes")
            from transformers import BitsAndBytesConfig

            cls = AutoModelForCausalLM if task.logits else AutoModel
            quantization = BitsAndBytesConfig(**config)
            return cls.from_pretrained(task.saved(), quantization_config=quantization, dtype=torch.bfloat16,
                                       device_map=str(device)).eval()  # fmt: skip

        return build

    def torchao(name: str, **config):
        def build():
            _importable("torchao.quantization")
            import torchao.quantization as tq

            model = bf16()
            try:
                tq.quantize_(model, getattr(tq, name)(**config))
            except TypeError:  # an older torchao without int4_packing_format: its default (tinygemm) layout
                config.pop("int4_packing_format", None)
                tq.quantize_(model, getattr(tq, name)(**config))
            return model

        return build

    def hqq(bits: int, group: int):
        def build():
            _importable("hqq.core.quantize")
            from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

            config = BaseQuantizeConfig(nbits=bits, group_size=group)
            make = lambda lin: HQQLinear(lin, config, compute_dtype=torch.bfloat16, device=str(device))  # noqa: E731
            return _replace_linears(bf16(), make)

        return build

    nf4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return {
        "bitsandbytes int8": bnb(load_in_8bit=True),
        "bitsandbytes nf4": bnb(**nf4),
        "torchao int8 weight-only": torchao("Int8WeightOnlyConfig"),
        "torchao int4 g128": torchao("Int4WeightOnlyConfig", group_size=128, int4_packing_format="tile_packed_to_4d"),
        "hqq 4-bit g64": hqq(4, 64),
    }


def variants(task: Task, device: torch.device, notes: list, no_peers: bool) -> dict[str, Callable]:
    base, dynamic = task.model, "int8_dynamic"
    found = {
        "fp32": lambda: base,
        "fp16 cast": lambda: copy.deepcopy(base).to(torch.float16),
        "bf16 cast": lambda: copy.deepcopy(base).to(torch.bfloat16),
        "hf_compress int8 (GPTQ)": hf_compress_variant(task, device, notes, True, bits=8),
        "hf_compress int8 (no calibration)": hf_compress_variant(task, device, notes, False, bits=8),
        "hf_compress int4 g32 (GPTQ)": hf_compress_variant(task, device, notes, True, bits=4),
        "hf_compress int4 g32 (no calibration)": hf_compress_variant(task, device, notes, False, bits=4),
        "hf_compress int8 dynamic act.": hf_compress_variant(task, device, notes, False, bits=8, activations=dynamic),
    }
    return found if no_peers else {**found, **peers(task, device)}


def forward(model: nn.Module, batch: dict, device: torch.device) -> Callable[[], None]:
    where = next(model.parameters()).device
    inputs = {k: v.to(where) for k, v in batch.items()}

    def run() -> None:
        with torch.inference_mode():
            model(**inputs)
        _sync(device)

    return run


def measure(task: Task, device: torch.device, args, notes: list) -> list[dict]:
    """Build every variant (recording failures), then compare sizes, fidelity and latency against bf16."""
    built, rows, failed = {}, [], []
    for name, factory in variants(task, device, notes, args.no_peers).items():
        before, start = _allocated(device), time.perf_counter()
        try:
            model = factory().eval()
            for batch in (task.few, task.full):  # a peer that builds but cannot run is reported too
                forward(model, batch, device)()
        except Exception as err:  # noqa: BLE001  (any peer failure is reported, not fatal)
            failed.append({"model": task.name, "variant": f"{name}: could not run: {type(err).__name__}: "
                                                          f"{str(err).splitlines()[0][:140] if str(err) else ''}"})  # fmt: skip
            traceback.print_exc(limit=2)
            continue
        seconds = time.perf_counter() - start
        print(f"[{task.name}] {name}: built and run in {seconds:.1f} s", flush=True)
        size = (_allocated(device) - before) if device.type == "cuda" and name != "fp32" else model_bytes(model)
        built[name] = model
        rows.append({"model": task.name, "variant": name, "memory (MB)": size / 1e6, "size": size,
                     "cos mean": task.cosine(model), "build (s)": seconds})  # fmt: skip
    rounds = args.rounds or (5 if args.fast else 20)
    for column, batch in (("latency vs bf16", task.full), ("few-row latency vs bf16", task.few)):
        fns = {name: forward(model, batch, device) for name, model in built.items()}
        for fn in [*fns.values()] * 2:  # two warm-ups more than time_alternately's one (caches, cuBLAS heuristics)
            fn()
        ratios = time_alternately(fns, rounds, "bf16 cast", progress=False)
        for row in rows:
            row[column] = ratios[row["variant"]]
    reference = next(row["size"] for row in rows if row["variant"] == "bf16 cast")
    for row in rows:
        row["size vs bf16"] = row.pop("size") / reference
    return rows + failed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.cuda_quantization", description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="fewer texts and timing rounds (a few minutes on a GPU)")
    parser.add_argument("--device", default="cuda", help="where to run (default cuda; cpu for a functional check)")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer hidden-256 Llama instead of the 8-layer one")
    parser.add_argument("--no-peers", action="store_true", help="only the casts and the hf_compress variants")
    parser.add_argument("--no-llama", action="store_true", help="MiniLM only")
    parser.add_argument("--no-minilm", action="store_true", help="the Llama only")
    parser.add_argument("--minilm-dir", default=None, help="a MiniLM checkpoint folder (default: the bundled one)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 20, --fast 5)")
    parser.add_argument("--out", default=None, help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available here; use --device cpu for a functional check")
    notes: list[str] = []
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = f"Weight quantization on {where} (torch {torch.__version__})"
    columns = ["model", "variant", "memory (MB)", "size vs bf16", "latency vs bf16", "few-row latency vs bf16",
               "cos mean", "build (s)"]  # fmt: skip
    tasks = [*([] if args.no_minilm else [minilm_task]), *([] if args.no_llama else [llama_task])]
    rows: list[dict] = []
    for index, make in enumerate(tasks):
        rows += measure(make(args, device), device, args, notes)
        table = format_table([{c: row.get(c) for c in columns} for row in rows], title=title)
        text = "\n".join([table, "", *(f"- {note}" for note in notes)])
        if args.out:  # after each model: a run stopped by a timeout still leaves the finished part
            Path(args.out).write_text(text + "\n")
        if index == len(tasks) - 1:
            print(text)


if __name__ == "__main__":
    main()
