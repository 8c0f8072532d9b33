"""Quantize-on-load: a sharded fp32 checkpoint of a >= 1B-parameter Llama-style model -> int4, in bounded memory.

    python -m bench.quantize_on_load                 # 1.1B parameters (4.4 GB of fp32 shards in a temp dir)
    python -m bench.quantize_on_load --small         # 110M parameters, a quick check
    python -m bench.quantize_on_load --calibrated    # int4 GPTQ, layer by layer, 128 texts x 512 tokens
    python -m bench.quantize_on_load --calibrated --small --samples 16   # quick

``--calibrated`` runs `hf_compress.sequential.sequential_compress` (int4 g32 GPTQ, each layer calibrated on the
outputs of the already-quantized layers before it) from the fp32 folder, then saves the int4 checkpoint and reloads
it; calibration texts are Debian package descriptions (train split) concatenated and cut into windows of
``--seq-len`` tokens of the MiniLM tokenizer (its ids fit the 32000-row vocabulary). Its checkpoints are cached in
the bench temp dir (``$TMPDIR/hf_compress_bench/``) and reused. Peak memory is sampled the same way, through
calibration + quantization and through saving.

The checkpoint is written shard by shard (random weights, never a whole model in memory). A fresh subprocess then
runs ``AutoModel.from_pretrained(path, quantization_config=CompressionConfig([WeightQuantizationConfig(bits=4)]))``
while a thread samples its resident memory (/proc/self/status) every 20 ms. The table reports, for the whole loading
process up to the end of ``from_pretrained``: the peak of the total (VmHWM: anonymous + file-backed pages of the
mmapped shards) and of the anonymous part alone; the baseline (torch, transformers and hf_compress imported, before
loading), so the model's share is visible. A second table follows a first decoding forward pass (one sequence of 4
tokens: the int4 CPU kernel, which switches each layer to its own weight layout): the peak and the current resident
memory, and the bytes of every distinct tensor storage the model holds (parameters, buffers, kernel tables and any
cached kernel layout: what a second copy of the weights would add shows there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch
from safetensors.torch import save_file


LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048,
)  # fmt: skip
LLAMA_SMALL = {**LLAMA_1B, "hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 8}


def write_checkpoint(path: Path, config_kwargs: dict, shard_bytes: int = 512 * 2**20) -> int:
    """Write config.json and fp32 safetensors shards with an index; returns the number of parameters."""
    from transformers import LlamaConfig

    config = LlamaConfig(**config_kwargs, dtype="float32")
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(path)
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
            p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
        })  # fmt: skip
    shapes["lm_head.weight"] = (config.vocab_size, h)
    generator = torch.Generator().manual_seed(0)
    weight_map, shard, size, index, total = {}, {}, 0, 0, 0

    def flush():
        nonlocal shard, size, index
        name = f"model-{index:05d}.safetensors"
        save_file(shard, path / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, size, index = {}, 0, index + 1

    for key, shape in shapes.items():
        tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
        total += tensor.numel()
        if size and size + tensor.numel() * 4 > shard_bytes:
            flush()
        shard[key] = tensor
        size += tensor.numel() * 4
    flush()
    index_data = {"metadata": {"total_size": total * 4}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index_data))
    return total


# Both child scripts start with this: a thread that samples the process's peak resident memory every 20 ms.
_RSS_SAMPLER = textwrap.dedent(
    """
    import json, sys, threading, time
    peak = {"total": 0, "anon": 0}
    def sample():
        while True:
            fields = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
            kb = lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024
            peak["total"] = max(peak["total"], kb("VmRSS"), kb("VmHWM"))
            peak["anon"] = max(peak["anon"], kb("RssAnon"))
            time.sleep(0.02)
    threading.Thread(target=sample, daemon=True).start()
    """
)


_CHILD = _RSS_SAMPLER + textwrap.dedent(
    """
    import torch
    torch.set_num_threads(2)
    import hf_compress
    from hf_compress import CompressionConfig
    from hf_compress.quantization import WeightQuantizationConfig, QuantLinear
    from hf_compress.utils import model_bytes
    from transformers import AutoModelForCausalLM
    time.sleep(0.1)
    base = dict(peak)
    start = time.time()
    config = WeightQuantizationConfig(bits=4, algorithm=sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], quantization_config=CompressionConfig([config]))
    seconds = time.time() - start
    time.sleep(0.1)
    loading = dict(peak)
    quantized = sum(isinstance(m, QuantLinear) for m in model.modules())
    packed = model_bytes(model)
    def resident(model):
        storages = {}
        for module in model.modules():
            extra = [getattr(getattr(module, "_int4_converted", None), "table", None)]
            extra += [t for value in getattr(module, "_kernel_cache", {}).values() for t in value]
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False), *extra]:
                if torch.is_tensor(t):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(storages.values())
    before = resident(model)
    start = time.time()
    with torch.inference_mode():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    first = time.time() - start
    time.sleep(0.1)
    fields = dict(l.split(":", 1) for l in open("/proc/self/status") if ":" in l)
    now = int(fields["VmRSS"].split()[0]) * 1024
    print(json.dumps({"base": base, "loading": loading, "forward": dict(peak), "model_bytes": packed, "now": now,
                      "resident_before": before, "resident_after": resident(model), "first_forward": first,
                      "seconds": seconds, "quantized_linears": quantized, "finite": bool(torch.isfinite(logits).all())}))
    """
)


_CALIBRATED_CHILD = _RSS_SAMPLER + textwrap.dedent(
    """
    import torch
    torch.set_num_threads(int(sys.argv[6]))
    import hf_compress
    from hf_compress.quantization import WeightQuantizationConfig
    from hf_compress.sequential import sequential_compress
    from transformers import AutoModelForCausalLM
    path, out, samples, seq_len, bound = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    bound = None if bound == "none" else "auto" if bound == "auto" else int(bound)
    ids = torch.load(sys.argv[7])[:samples, :seq_len]
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk)} for chunk in ids.split(4)]
    time.sleep(0.1)
    base = dict(peak)
    start = time.time()
    float_target = {"on": True, "off": False}[sys.argv[8]]
    model = sequential_compress(path, WeightQuantizationConfig(bits=4, algorithm="gptq"), batches,
                                max_activation_bytes=bound, progress=True, float_target=float_target)
    seconds = time.time() - start
    time.sleep(0.1)
    calibrated = dict(peak)
    start = time.time()
    model.save_pretrained(out)
    save_seconds = time.time() - start
    time.sleep(0.1)
    saved = dict(peak)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.inference_mode():
        logits = reloaded(torch.tensor([[1, 2, 3, 4]])).logits
    print(json.dumps({"base": base, "calibrated": calibrated, "saved": saved, "seconds": seconds,
                      "save_seconds": save_seconds, "tokens": int(ids.numel()),
                      "finite": bool(torch.isfinite(logits).all())}))
    """
)


def calibration_ids(samples: int, seq_len: int) -> torch.Tensor:
    """``[samples, seq_len]`` token ids: Debian train descriptions, concatenated, in MiniLM-tokenizer windows."""
    from transformers import AutoTokenizer

    from hf_compress.data import load_debian, minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = [row["text"] for row in load_debian("train")]
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id])
        if len(ids) >= samples * seq_len:
            break
    if len(ids) < samples * seq_len:
        raise SystemExit(f"the Debian train split holds {len(ids)} tokens, fewer than {samples} x {seq_len}")
    return torch.tensor(ids[: samples * seq_len]).reshape(samples, seq_len)


def cached_checkpoint(config_kwargs: dict, name: str) -> tuple[Path, int]:
    """The fp32 checkpoint of `config_kwargs` under the bench temp dir, written once and reused."""
    folder = Path(tempfile.gettempdir()) / "hf_compress_bench" / name
    stamp = folder / "bench_params.json"
    wanted = json.dumps(config_kwargs, sort_keys=True)
    if stamp.exists() and json.loads(stamp.read_text()).get("config") == wanted:
        return folder, json.loads(stamp.read_text())["params"]
    folder.mkdir(parents=True, exist_ok=True)
    params = write_checkpoint(folder, config_kwargs)
    stamp.write_text(json.dumps({"config": wanted, "params": params}))
    return folder, params


def calibrated(args: argparse.Namespace) -> None:
    kwargs, name = (LLAMA_SMALL, "llama-110m-fp32") if args.small else (LLAMA_1B, "llama-1.1b-fp32")
    if args.layers is not None:  # same widths, fewer layers: peak memory is per layer (a quicker check)
        kwargs, name = {**kwargs, "num_hidden_layers": args.layers}, f"{name}-{args.layers}layers"
    path, params = cached_checkpoint(kwargs, name)
    fp32_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(prefix="hf_compress_calibrated_") as tmp:
        ids_file = Path(tmp) / "ids.pt"
        torch.save(calibration_ids(args.samples, args.seq_len), ids_file)
        command = [sys.executable, "-c", _CALIBRATED_CHILD, str(path), str(Path(tmp) / "int4"), str(args.samples),
                   str(args.seq_len), args.activation_memory, str(args.threads), str(ids_file),
                   "off" if args.no_float_target else "on"]  # fmt: skip
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
        if result.returncode:
            raise SystemExit(f"sequential GPTQ failed (exit {result.returncode}); its stderr is above")
        stats = json.loads(result.stdout.strip().splitlines()[-1])
        int4_bytes = sum(p.stat().st_size for p in (Path(tmp) / "int4").glob("*.safetensors"))

    def gb(value: float) -> str:
        return f"{value / 1e9:.2f} GB ({value / fp32_bytes:.3f}x)"

    base, during, saved = stats["base"], stats["calibrated"], stats["saved"]
    print(f"### Sequential GPTQ: synthetic Llama, {params / 1e9:.2f}B parameters, fp32 -> int4 g32, "
          f"{args.samples} calibration texts x {args.seq_len} tokens\n")  # fmt: skip
    print("Peak resident memory of the process; x = fraction of the fp32 checkpoint size.\n")
    print("| fp32 checkpoint | baseline (imports) | peak RSS, calibrate + quantize | peak RSS anonymous | "
          "peak - baseline | peak RSS incl. saving | int4 checkpoint | calibrate + quantize | save |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    print(f"| {fp32_bytes / 1e9:.2f} GB | {gb(base['total'])} | {gb(during['total'])} | {gb(during['anon'])} | "
          f"{gb(during['total'] - base['total'])} | {gb(saved['total'])} | {gb(int4_bytes)} | "
          f"{stats['seconds']:.0f} s | {stats['save_seconds']:.0f} s |")  # fmt: skip
    print(f"\nactivations: max_activation_bytes={args.activation_memory!r} ('auto': a quarter of the available "
          f"memory; 0: spilled to disk); {args.threads} threads; reloaded with from_pretrained, finite logits: "
          f"{stats['finite']}.")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quantize_on_load", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 110M-parameter model (quick check)")
    parser.add_argument("--algorithm", default="rtn", help="scale algorithm used while loading (default: rtn)")
    parser.add_argument("--calibrated", action="store_true", help="int4 GPTQ, layer by layer (sequential)")
    parser.add_argument("--samples", type=int, default=128, help="--calibrated: calibration texts (default 128)")
    parser.add_argument("--seq-len", type=int, default=512, help="--calibrated: tokens per text (default 512)")
    parser.add_argument("--activation-memory", default="auto",
                        help="--calibrated: max_activation_bytes: 'auto', 'none' or bytes (0: on disk)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="--calibrated: torch threads (default 2)")
    parser.add_argument("--no-float-target", action="store_true",
                        help="--calibrated: plain sequential GPTQ (no float-model target: one in x in moment less)")
    parser.add_argument("--layers", type=int, default=None,
                        help="--calibrated: build the checkpoint with this many layers (same widths; quicker)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.calibrated:
        calibrated(args)
        return
    with tempfile.TemporaryDirectory(prefix="hf_compress_onload_") as tmp:
        path = Path(tmp)
        params = write_checkpoint(path, LLAMA_SMALL if args.small else LLAMA_1B)
        fp32_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        shards = len(list(path.glob("*.safetensors")))
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), args.algorithm], capture_output=True, text=True, check=False
        )
        if result.returncode:
            raise SystemExit(f"loading failed:\n{result.stderr[-3000:]}")
        stats = json.loads(result.stdout.strip().splitlines()[-1])

    def gb(value: float) -> str:
        return f"{value / 1e9:.2f} GB ({value / fp32_bytes:.2f}x)"

    base, loading, forward = stats["base"], stats["loading"], stats["forward"]
    print(f"### Quantize-on-load: synthetic Llama, {params / 1e9:.2f}B parameters, {shards} fp32 shards -> int4 g32\n")
    print("Peak resident memory of the loading process; x = fraction of the fp32 checkpoint size.\n")
    print(
        "| fp32 checkpoint | baseline (imports) | peak RSS total | peak RSS anonymous | peak total - baseline | "
        "int4 model in memory | load + quantize |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {fp32_bytes / 1e9:.2f} GB | {gb(base['total'])} | {gb(loading['total'])} | {gb(loading['anon'])} | "
        f"{gb(loading['total'] - base['total'])} | {gb(stats['model_bytes'])} | {stats['seconds']:.0f} s |"
    )
    print("\nAfter a first decoding forward pass (4 tokens), same process:\n")
    print("| peak RSS total | RSS now | model storages before -> after the forward | first forward |")
    print("|---|---|---|---|")
    print(
        f"| {gb(forward['total'])} | {gb(stats['now'])} | {gb(stats['resident_before'])} -> "
        f"{gb(stats['resident_after'])} | {stats['first_forward']:.1f} s |"
    )
    print(f"\n{stats['quantized_linears']} linear layers quantized; finite logits: {stats['finite']}; "
          f"scales chosen with algorithm={args.algorithm!r}.")  # fmt: skip


if __name__ == "__main__":
    main()
