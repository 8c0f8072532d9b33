"""Quantize-on-load: a sharded fp32 checkpoint of a >= 1B-parameter Llama-style model -> int4, in bounded memory.

    python -m bench.quantize_on_load                 # 1.1B parameters (4.4 GB of fp32 shards in a temp dir)
    python -m bench.quantize_on_load --small         # 110M parameters, a quick check

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


_CHILD = textwrap.dedent(
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quantize_on_load", description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="a 110M-parameter model (quick check)")
    parser.add_argument("--algorithm", default="rtn", help="scale algorithm used while loading (default: rtn)")
    args = parser.parse_args(argv)
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
