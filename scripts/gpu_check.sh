#!/usr/bin/env bash
# One command that checks hf_compress's CUDA paths on a GPU machine (issue #14):
#
#   bash scripts/gpu_check.sh            # on the GPU machine (a copy of this repo), within 8 minutes
#   bash scripts/gpu_check.sh --prepare  # beforehand, where pip reaches PyPI: fill .gpu_carry/ (see below)
#
# The GPU machine may have no network, so nothing is downloaded there. It runs, each step under `timeout`:
#   1. the environment: GPU name, driver, torch / CUDA / transformers / peft versions        -> env.txt
#   2. pytest tests/quantization/test_cuda.py -v on the GPU (each CUDA branch against the CPU result)    -> pytest_cuda.log, .xml
#   3. the same module with the CPU standing in for the GPU (HF_COMPRESS_TEST_DEVICE=cpu): the CPU-vs-CUDA quick
#      subset; a test failing in 2 but passing here points at a CUDA branch, one failing in both at the test or at
#      this machine's library versions                                                      -> pytest_cpu_dryrun.log
#   4. python -m bench.cuda_quantization --fast                                             -> bench.log, bench_table.md
# and writes summary.txt; all under $OUT if set, else ./gpu_check_out (7 files, none in subfolders).
#
# Python: $PYTHON, else the first of ./.venv/bin/python, python3, python, /opt/torch/.venv/bin/python3 whose torch
# sees a CUDA device. Without one, `pip install torch` is tried once (it fails fast offline) and the failure is said.
# hf_compress runs from this checkout (PYTHONPATH); missing imports are looked for in .gpu_carry/whl, then pip.
# Carried peer wheels are installed to /tmp/hf_compress_site and seen by the bench only.
#
# .gpu_carry/ (made by --prepare, listed in .git/info/exclude; pass carry=[".gpu_carry"] to a device call): MiniLM
# in float16 (its fp32 checkpoint is 87 MB, over the 64 MiB a call carries) with its tokenizer, the Debian texts,
# and wheels of peers the GPU image lacks (default: torchao, hqq and its termcolor; bitsandbytes' 43 MB wheel does
# not fit next to MiniLM: GPU_CHECK_WHEELS="bitsandbytes==0.50.2 ..." GPU_CHECK_MINILM=0 to carry it instead).
#
# GPU_CHECK_REHEARSE=1 rehearses the whole flow on a machine without a GPU (the CPU stands in; a tiny bench).
#
# Exit status: 0 all passed; 1 the CUDA tests failed; 2 no Python with CUDA (or a missing dependency);
# 3 the CPU dry run failed (CUDA tests passed); 4 the bench failed (all tests passed).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REPO=$(pwd)
CARRY="$REPO/.gpu_carry"

prepare() {
    local py="${PYTHON:-$REPO/.venv/bin/python}"
    rm -rf "$CARRY" && mkdir -p "$CARRY/whl" || return 1
    if [ -d .git/info ] && ! grep -qx '/.gpu_carry/' .git/info/exclude 2>/dev/null; then
        echo '/.gpu_carry/' >>.git/info/exclude
    fi
    GPU_CHECK_MINILM="${GPU_CHECK_MINILM:-1}" "$py" - <<'EOF' || return 1
import os, shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from hf_compress.data import debian_dataset_path, minilm_path

carry = Path(".gpu_carry")
shutil.copy(debian_dataset_path(), carry / "debian-packages.jsonl.gz")
if os.environ["GPU_CHECK_MINILM"] == "1":
    source, target = minilm_path(), carry / "minilm"
    target.mkdir()
    for file in source.iterdir():  # config, tokenizer files; the weights are rewritten in float16
        if file.is_file() and file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    weights = load_file(source / "model.safetensors")
    half = {name: t.half() if t.is_floating_point() else t for name, t in weights.items()}
    save_file(half, target / "model.safetensors", metadata={"format": "pt"})
print("prepared", sorted(str(p.relative_to(carry)) for p in carry.rglob("*") if p.is_file()))
EOF
    # Pure-Python or abi3 wheels: what pip builds or fetches here installs under the GPU image's Python 3.12 too.
    # shellcheck disable=SC2086
    "$py" -m pip wheel --quiet --no-deps -w "$CARRY/whl" ${GPU_CHECK_WHEELS:-torchao==0.18.0 hqq==0.2.8.post1 termcolor} ||
        echo "gpu_check --prepare: some wheels could not be fetched (the bench lists those peers as not run)"
    du -sh "$CARRY"
    local bytes
    bytes=$(du -sb "$CARRY" | cut -f1)
    [ "$bytes" -lt $((60 * 1024 * 1024)) ] || echo "gpu_check --prepare: WARNING $CARRY is over 60 MiB; a device call carries 64 MiB in all"
}

if [ "${1:-}" = "--prepare" ]; then
    prepare
    exit $?
fi

OUT_DIR="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT_DIR" || exit 2
SUMMARY="$OUT_DIR/summary.txt"
: >"$SUMMARY"
START=$(date +%s)
BUDGET="${GPU_CHECK_SECONDS:-460}" # the whole run: 8 minutes with the kill margins
log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }
# seconds for a step: at most $1, and never eating the $2 seconds that later steps are kept
slot() {
    local s=$(($(left) - $2))
    [ "$s" -gt "$1" ] && s=$1
    [ "$s" -lt 10 ] && s=10
    echo "$s"
}

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HOME="${HF_HOME:-/tmp/hf_compress_hf_home}"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PIP_OFFLINE_FAST=(--retries 0 --timeout 10 --disable-pip-version-check)

# -- a Python whose torch sees the GPU -------------------------------------------------------------------------------
REHEARSE="${GPU_CHECK_REHEARSE:-}"
UNDER_TEST=$([ -n "$REHEARSE" ] && echo cpu || echo cuda)
BENCH_ARGS=(--fast --out "$OUT_DIR/bench_table.md")
[ -n "$REHEARSE" ] && BENCH_ARGS+=(--device cpu --tiny --no-minilm --no-peers --rounds 1)
cuda_ok() {
    timeout 120 "$1" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() or '$REHEARSE' else 1)" >/dev/null 2>&1
}
find_python() {
    local cand
    for cand in "${PYTHON:-}" "$REPO/.venv/bin/python" python3 python /opt/torch/.venv/bin/python3; do
        [ -n "$cand" ] && command -v "$cand" >/dev/null 2>&1 && cuda_ok "$cand" && {
            command -v "$cand"
            return 0
        }
    done
    return 1
}
PY=$(find_python)
if [ -z "$PY" ]; then
    log "no Python here has a torch that sees a CUDA device; trying 'pip install torch' once"
    any=$(command -v python3 || command -v python)
    if [ -n "$any" ] && timeout 300 "$any" -m pip install --quiet "${PIP_OFFLINE_FAST[@]}" torch >>"$SUMMARY" 2>&1; then
        PY=$(find_python)
    else
        log "pip install torch failed (no network on this machine?)"
    fi
fi
if [ -z "$PY" ]; then
    log "FAILED: no CUDA-enabled torch found (nvidia-smi: $(timeout 30 nvidia-smi -L 2>&1 | head -1))"
    exit 2
fi
log "python: $PY"

# -- what the tests and the bench import ------------------------------------------------------------------------------
# Carried peer wheels go to a side folder used by the bench alone: transformers imports an installed torchao while
# importing its quantizers, so one built for another torch must never reach the tests.
SITE=/tmp/hf_compress_site
BENCH_PATH="$PYTHONPATH"
wheels=()
for wheel in "$CARRY"/whl/*.whl; do # only packages the image lacks: PYTHONPATH would shadow the image's own
    [ -f "$wheel" ] || continue
    name=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]-' '[:lower:]_')
    "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('$name') is not None)" && wheels+=("$wheel")
done
if [ "${#wheels[@]}" -gt 0 ]; then
    rm -rf "$SITE"
    if timeout 120 "$PY" -m pip install --quiet --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" >>"$SUMMARY" 2>&1; then
        for pkg in "$SITE"/*/; do
            pkg=$(basename "$pkg")
            case "$pkg" in *.dist-info | bin | test | tests | __pycache__) continue ;; esac
            if ! err=$(PYTHONPATH="$PYTHONPATH:$SITE" timeout 180 "$PY" -c "import hf_compress, $pkg" 2>&1); then
                rm -rf "${SITE:?}/$pkg"
                log "carried $pkg does not import with this torch; left out ($(echo "$err" | tail -1 | cut -c1-160))"
            fi
        done
        BENCH_PATH="$PYTHONPATH:$SITE"
        log "carried wheels for the bench: ${wheels[*]##*/}"
    else
        log "could not install the carried wheels (see above); the bench will list those peers as not run"
    fi
fi
[ -d "$CARRY/minilm" ] && export HF_COMPRESS_MINILM_DIR="${HF_COMPRESS_MINILM_DIR:-$CARRY/minilm}"
[ -f "$CARRY/debian-packages.jsonl.gz" ] && export HF_COMPRESS_DEBIAN_DATA="${HF_COMPRESS_DEBIAN_DATA:-$CARRY/debian-packages.jsonl.gz}"
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('transformers', 'accelerate', 'safetensors', 'peft', 'pytest', 'tqdm', 'numpy') if u.find_spec(m) is None))")
if [ -n "$missing" ]; then
    log "missing: $missing; trying pip (carried wheels first)"
    # shellcheck disable=SC2086
    timeout 180 "$PY" -m pip install --quiet "${PIP_OFFLINE_FAST[@]}" --find-links "$CARRY/whl" $missing >>"$SUMMARY" 2>&1 ||
        log "pip install $missing failed (no network on this machine?)"
fi
if ! "$PY" -c "import hf_compress, pytest" >>"$SUMMARY" 2>&1; then
    log "FAILED: 'import hf_compress, pytest' does not work with $PY (see above)"
    exit 2
fi

# -- 1. environment ---------------------------------------------------------------------------------------------------
{
    timeout 30 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "nvidia-smi failed"
    timeout 120 "$PY" - <<'EOF'
import importlib, platform, sys
import torch
print("python", sys.version.split()[0], platform.machine(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    index = torch.cuda.current_device()
    print("gpu", torch.cuda.get_device_name(index), "capability", torch.cuda.get_device_capability(index),
          "bf16", torch.cuda.is_bf16_supported(), "fp32 matmul precision", torch.get_float32_matmul_precision())
else:
    print("gpu none (rehearsal)")
cpu = getattr(torch, "cpu", None)
print("host cpu native bf16:", {f: getattr(cpu, f, lambda: None)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")})
for name in ("transformers", "peft", "accelerate", "safetensors", "pytest", "torchao", "hqq", "bitsandbytes"):  # image
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as err:  # noqa: BLE001
        print(name, "not available:", type(err).__name__)
from hf_compress.quantization.kernels import preferred_compute_dtype
print("hf_compress preferred compute dtype: cuda", preferred_compute_dtype("cuda"), "cpu", preferred_compute_dtype("cpu"))
EOF
} >"$OUT_DIR/env.txt" 2>&1
log "environment: $(grep -m1 '^gpu ' "$OUT_DIR/env.txt"); $(grep -m1 '^torch ' "$OUT_DIR/env.txt")"

PYTEST_ARGS=(-p no:cacheprovider)
"$PY" -c "import pytest_timeout" >/dev/null 2>&1 && PYTEST_ARGS+=(--timeout=150)

# -- 2. the CUDA tests --------------------------------------------------------------------------------------------------
t=$(slot 240 150)
log "pytest tests/quantization/test_cuda.py on $UNDER_TEST (at most ${t}s)"
HF_COMPRESS_TEST_DEVICE=$UNDER_TEST timeout -k 10 "$t" "$PY" -m pytest tests/quantization/test_cuda.py -v -rfEsxX "${PYTEST_ARGS[@]}" \
    --junitxml="$OUT_DIR/pytest_cuda.xml" 2>&1 | tee "$OUT_DIR/pytest_cuda.log"
rc_cuda=${PIPESTATUS[0]}
log "$UNDER_TEST tests: exit $rc_cuda ($(tail -1 "$OUT_DIR/pytest_cuda.log"))"

# -- 3. the same tests with the CPU standing in ---------------------------------------------------------------------
t=$(slot 90 100)
log "pytest tests/quantization/test_cuda.py with HF_COMPRESS_TEST_DEVICE=cpu (at most ${t}s)"
HF_COMPRESS_TEST_DEVICE=cpu timeout -k 10 "$t" "$PY" -m pytest tests/quantization/test_cuda.py -q -rfEX "${PYTEST_ARGS[@]}" 2>&1 |
    tee "$OUT_DIR/pytest_cpu_dryrun.log"
rc_dry=${PIPESTATUS[0]}
log "cpu dry run: exit $rc_dry ($(tail -1 "$OUT_DIR/pytest_cpu_dryrun.log"))"

# -- 4. the CUDA bench --------------------------------------------------------------------------------------------------
t=$(slot 360 5)
log "python -m bench.cuda_quantization ${BENCH_ARGS[*]} (at most ${t}s)"
PYTHONPATH="$BENCH_PATH" timeout -k 10 "$t" "$PY" -m bench.cuda_quantization "${BENCH_ARGS[@]}" 2>&1 |
    tee "$OUT_DIR/bench.log"
rc_bench=${PIPESTATUS[0]}
log "bench: exit $rc_bench$([ "$rc_bench" = 124 ] && echo ' (timed out)')"
[ -f "$OUT_DIR/bench_table.md" ] && cat "$OUT_DIR/bench_table.md" >>"$SUMMARY"

status=0
[ "$rc_bench" = 0 ] || status=4
[ "$rc_dry" = 0 ] || status=3
[ "$rc_cuda" = 0 ] || status=1
log "done in $(($(date +%s) - START))s: exit $status (cuda tests $rc_cuda, cpu dry run $rc_dry, bench $rc_bench)"
exit "$status"
