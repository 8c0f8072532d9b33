"""Every notebook in notebooks/ runs top to bottom (nbclient, a real kernel), on the real MiniLM and Debian data.

``HF_COMPRESS_NOTEBOOK_FAST=1`` makes the notebooks use less data, so the whole set stays within a few minutes;
the code path is the same as a full run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    names = {path.stem for path in NOTEBOOKS}
    assert {"01_quickstart", "02_head_pruning", "03_distillation", "04_lora_on_compressed"} <= names, names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_COMPRESS_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("HF_COMPRESS_NOTEBOOK_THREADS", os.environ.get("HF_COMPRESS_NOTEBOOK_THREADS", "1"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell and the traceback, if any cell fails
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors
