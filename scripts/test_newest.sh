#!/usr/bin/env bash
# Catch drift before users do: a fresh virtual environment (.venv-newest, or $VENV) with the newest releases of
# every dependency that pyproject.toml allows (no constraints file), then the README's test command.
# torch stays at 2.13.0, the CPU build this machine kind installs (newer torch from the registry is a CUDA build of
# several GB). Prints the versions that differ from requirements/tested.txt, then the pytest summary; exits with
# pytest's status. Extra arguments go to pytest (e.g. `bash scripts/test_newest.sh -x -k peft`).
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv-newest}" CONSTRAINTS="" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf "$VENV"
bash scripts/setup.sh
"$VENV/bin/python" -m pip install --quiet --upgrade --upgrade-strategy eager -e ".[dev]" "torch==2.13.0"
echo "== versions that differ from requirements/tested.txt"
"$VENV/bin/python" -m pip freeze --exclude-editable | grep -v '^hf.compress' | sed 's/+cpu$//' \
    | sort > "$VENV/newest.txt"
grep -v '^#' requirements/tested.txt | sort | comm -13 - "$VENV/newest.txt" | sed 's/^/  now: /' || true
echo "== pytest"
"$VENV/bin/python" -m pytest -q "$@"
