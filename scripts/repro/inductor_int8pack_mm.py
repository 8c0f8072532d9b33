"""torch-only reproduction: `torch._weight_int8pack_mm` inside a `torch.compile` graph on CPU (torch 2.13.0).

Two failures were seen with this kernel in compiled hf_compress graphs:
- On a CPU with AVX512-BF16/AMX (checked 2026-12-02): inductor's weight-only-int8 GEMM lowering cannot compile a
  graph whose *scale* is computed inside it (here: a float32 ``[out, 1]`` scale sliced and cast to bf16, what an int8
  layer with ``compute_dtype="float32"`` does): ``LoweringException: AssertionError: <class
  'torch._inductor.ir.Pointwise'>``. The last case below reproduces it with torch alone.
- On an AVX-512 CPU without BF16 (an earlier session): a tiny int8 BERT compiled with ``fullgraph=True`` and called
  20 times on a 4 x 16 batch aborted with glibc heap errors ("malloc(): unaligned tcache chunk detected"); it did
  not reproduce outside the model, nor on the AMX machine.
hf_compress therefore never emits this kernel inside a compiled graph (`hf_compress.quantization.kernels`), and
tests/quantization/test_quantization_compile.py calls a compiled int8 encoder 50 times at 1-32 rows in a subprocess.
Run: ``python scripts/repro/inductor_int8pack_mm.py``; it prints each case's outcome and exits 0 either way.
"""

import traceback

import torch


def case(name, fn, *args):
    try:
        with torch.inference_mode():
            eager = fn(*args)
            for _ in range(20):
                compiled = torch.compile(fn, fullgraph=True)(*args)
        print(f"{name}: ok, max |compiled - eager| = {(compiled - eager).abs().max().item():.3g}")
    except Exception as err:  # noqa: BLE001  (the point is to show what torch raises)
        print(f"{name}: {type(err).__name__}: {str(err).strip().splitlines()[0]}")
        traceback.print_exc(limit=0)


torch.manual_seed(0)
weight = torch.randint(-128, 128, (64, 64), dtype=torch.int8)
scale = torch.rand(64, dtype=torch.bfloat16) / 64
scale_fp32 = scale.float()[:, None]  # stored as [out, 1] float32, cast inside the graph
x = torch.randn(4, 64)
print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}")
case("int8pack_mm on a graph input", lambda a: torch._weight_int8pack_mm(a, weight, scale), x.to(torch.bfloat16))
case("int8pack_mm after an fp32 -> bf16 cast", lambda a: torch._weight_int8pack_mm(a.to(torch.bfloat16), weight, scale).float(), x)
case("int8pack_mm after layer_norm + cast", lambda a: torch._weight_int8pack_mm(
    torch.nn.functional.layer_norm(a, (64,)).to(torch.bfloat16), weight, scale).float(), x)
case("int8pack_mm with its scale cast in the graph", lambda a: torch._weight_int8pack_mm(
    a.to(torch.bfloat16), weight, scale_fp32[:, 0].to(torch.bfloat16)).float(), x)
