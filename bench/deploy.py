"""Deployment engines on MiniLM: hf_compress exports to ONNX Runtime and OpenVINO next to PyTorch, in one run.

    flock /tmp/hf_compress_bench.lock python -m bench.deploy          # full run (a few minutes)
    flock /tmp/hf_compress_bench.lock python -m bench.deploy --fast   # smoke run on less data

Rows: eager torch fp32 (the reference every latency is a ratio to), a bf16 cast, hf_compress int8 / int4 g32 in
PyTorch and int8 with calibrated static int8 activations (``activations="int8_static"``: GPTQ weights, per-layer
smoothing, one uint8 input scale per layer), the same models exported by `hf_compress.export` and run by ONNX
Runtime and OpenVINO (weights are our exact integers; engines in float32 activations, plus each engine's faster
defaults), and the engines' own baselines: ONNX Runtime fp32 and ``quantize_dynamic`` int8, OpenVINO fp32, NNCF
int8 weights and NNCF static int8 (``nncf.quantize`` with the same calibration texts, transformer preset) when nncf
is installed. Batch 32 x 128 tokens, 2 threads; mean / p5 cosine of mean-pooled sentence embeddings to fp32 on
Debian test texts. "size vs fp32" is the model files on disk for exports (the tokenizer excluded).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import tempfile
import traceback
from pathlib import Path

import torch

from bench.harness import BenchConfig, format_table, load_minilm, run_benchmark
from hf_compress import apply_compression
from hf_compress.data import load_debian
from hf_compress.export import export, load_exported
from hf_compress.quantization import WeightQuantizationConfig


THREADS = 2


def _onnx_dynamic_int8(fp32_folder: Path, out: Path):
    """ONNX Runtime's own weight + dynamic activation int8 of the fp32 export (a copy of its folder)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    shutil.copytree(fp32_folder, out)
    quantize_dynamic(str(fp32_folder / "model.onnx"), str(out / "model.onnx"), weight_type=QuantType.QInt8)
    return load_exported(out, threads=THREADS)


def _nncf_int8(fp32_folder: Path, out: Path):
    import nncf  # optional: not a dependency of hf_compress
    import openvino as ov

    shutil.copytree(fp32_folder, out)
    model = nncf.compress_weights(ov.Core().read_model(str(fp32_folder / "openvino_model.xml")))
    ov.save_model(model, str(out / "openvino_model.xml"), compress_to_fp16=False)
    return load_exported(out, threads=THREADS, exact=False)  # the engine's defaults, as NNCF's users run it


def _nncf_static(fp32_folder: Path, out: Path, texts: list[str], tokenizer):
    """NNCF's post-training static int8 (SmoothQuant + bias correction, transformer preset) on the same texts."""
    import nncf  # optional: not a dependency of hf_compress
    import openvino as ov

    shutil.copytree(fp32_folder, out)
    names = ("input_ids", "attention_mask", "token_type_ids")
    batches = []
    for start in range(0, len(texts), 16):
        enc = tokenizer(texts[start : start + 16], padding=True, truncation=True, max_length=128, return_tensors="np")
        batches.append({name: enc[name] for name in names})
    model = nncf.quantize(ov.Core().read_model(str(fp32_folder / "openvino_model.xml")), nncf.Dataset(batches),
                          model_type=nncf.ModelType.TRANSFORMER, subset_size=len(batches))  # fmt: skip
    ov.save_model(model, str(out / "openvino_model.xml"), compress_to_fp16=False)
    return load_exported(out, threads=THREADS, exact=False)


def _budget_model(folder: Path, calibration: list[str]):
    """`compress(budget="10x")` on MiniLM, exported to OpenVINO next to the saved folder."""
    from transformers import AutoModel

    from hf_compress import compress
    from hf_compress.data import minilm_path

    compress(str(minilm_path()), budget="10x", calibration_data=calibration, output_dir=str(folder),
             export="openvino", measure=False)  # fmt: skip
    return AutoModel.from_pretrained(folder).eval()


def _disk(folder: Path) -> int:
    names = ("model.onnx", "model.onnx.data", "openvino_model.xml", "openvino_model.bin")
    return sum((folder / n).stat().st_size for n in names if (folder / n).is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="less data and fewer latency rounds (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    base, tokenizer = load_minilm()
    fp32_bytes = sum(p.numel() * 4 for p in base.parameters())
    config = BenchConfig(threads=THREADS, probe=False, latency_rounds=3 if args.fast else 7,
                         fidelity_per_section=5 if args.fast else 40)  # fmt: skip
    variants, failures = [], []
    tmp = Path(tempfile.mkdtemp(prefix="hf_compress_deploy_"))

    def add(name, build, folder=None):
        try:
            model = build()
        except Exception as err:  # an engine that does not install or convert here is listed, not fatal
            failures.append(f"{name}: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            traceback.print_exc()
            return
        variants.append((name, model))
        if folder is not None:
            config.extra_columns[name] = {"params (M)": None, "memory (MB)": None, "disk (MB)": _disk(folder) / 1e6,
                                          "size vs fp32": _disk(folder) / fp32_bytes}  # fmt: skip

    add("bf16 cast", lambda: copy.deepcopy(base).to(torch.bfloat16))
    calibration = [r["text"] for r in load_debian("train", per_section=4 if args.fast else 12)]
    quantized = {}
    for label, kwargs, data in (
        ("int8", dict(bits=8), None),  # no calibration: the data-free error-minimising search
        ("int8 per-channel", dict(bits=8, group_size=-1), calibration),  # GPTQ; the layout OpenVINO runs fastest
        ("int4 g32", dict(bits=4, group_size=32), calibration),  # GPTQ
        ("int8 static act.", dict(bits=8, activations="int8_static"), calibration),  # GPTQ + calibrated inputs
    ):
        model = copy.deepcopy(base)
        apply_compression(model, WeightQuantizationConfig(**kwargs), calibration_data=data, tokenizer=tokenizer)
        quantized[label] = model
        add(f"hf_compress {label} (PyTorch)", lambda m=model: m)
    folders = {"fp32": base, **quantized}
    for engine, target in (("ORT", "onnx"), ("OpenVINO", "openvino")):
        for label, model in folders.items():
            folder = tmp / f"{target}-{label.replace(' ', '_')}"
            try:
                export(model, to=target, output_dir=folder, tokenizer=tokenizer)
            except Exception as err:
                failures.append(f"{engine} {label} export: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                continue
            name = f"{engine} fp32" if label == "fp32" else f"{engine} hf_compress {label}"
            add(name, lambda f=folder: load_exported(f, threads=THREADS), folder)
            if label != "fp32":  # the engine's defaults: int8 activations on the fly for compressed weights
                add(f"{name}, engine defaults", lambda f=folder: load_exported(f, threads=THREADS, exact=False),
                    folder)  # fmt: skip
            if engine == "OpenVINO" and label in ("int8 per-channel", "int4 g32"):
                # the defaults' on-the-fly int8 activations (groups of 32) cost ~1.4e-4 of cosine: finer groups,
                # or none (float activations at the CPU's default precision, bf16 where it is native)
                for setting, groups in (("int8 act. groups of 16", 16), ("float act.", 0)):
                    add(f"{name}, default precision, {setting}",
                        lambda f=folder, g=groups: load_exported(
                            f, threads=THREADS, exact=False, engine_config={"DYNAMIC_QUANTIZATION_GROUP_SIZE": g}),
                        folder)  # fmt: skip
        if engine == "ORT":
            add("ORT quantize_dynamic int8", lambda: _onnx_dynamic_int8(tmp / "onnx-fp32", tmp / "ort-dyn"),
                tmp / "ort-dyn")  # fmt: skip
    add(
        "OpenVINO NNCF int8 weights, engine defaults",
        lambda: _nncf_int8(tmp / "openvino-fp32", tmp / "nncf"),
        tmp / "nncf",
    )
    add("OpenVINO NNCF int8 static (calibrated)",
        lambda: _nncf_static(tmp / "openvino-fp32", tmp / "nncf-static", calibration, tokenizer),
        tmp / "nncf-static")  # fmt: skip
    if not args.fast:  # the one-call budget model (pruned, factorized, quantized) and its OpenVINO export
        add("hf_compress --budget 10x (PyTorch)", lambda: _budget_model(tmp / "budget", calibration))
        add(
            "OpenVINO hf_compress --budget 10x, engine defaults",
            lambda: load_exported(tmp / "budget-openvino", threads=THREADS, exact=False),
            tmp / "budget-openvino",
        )
    rows = run_benchmark(variants, config, reference=("fp32 (eager torch)", base), tokenizer=tokenizer)
    print(format_table(rows, "Deployment engines on MiniLM (batch 32 x 128, 2 threads)"))
    for line in failures:
        print(f"- not measured: {line}")


if __name__ == "__main__":
    main()
