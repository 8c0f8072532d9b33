"""Atomic saving: an exception, Ctrl-C or a killed process during a save never leaves a half-written folder where a
good one was, and leftovers of killed processes are cleaned up by the next save."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import tiny_model

from hf_compress.hub import atomic_directory, save_compressed


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def good(tmp_path):
    target = tmp_path / "model"
    save_compressed(tiny_model("bert"), target, extra_files={"notes/a.txt": "first"})
    return target


def test_save_replaces_the_folder_and_leaves_no_temporaries(good):
    before = _tree(good)
    save_compressed(tiny_model("bert", seed=1), good, extra_files={"b.txt": b"second"})
    after = _tree(good)
    assert "b.txt" in after and "notes/a.txt" not in after  # replaced whole, not merged
    assert after["model.safetensors"] != before["model.safetensors"]
    assert sorted(p.name for p in good.parent.iterdir()) == ["model"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_midway_keeps_the_previous_folder(good, monkeypatch, error):
    before = _tree(good)
    model = tiny_model("bert", seed=2)
    original_save = model.save_pretrained

    def save_then_fail(path, **kwargs):
        original_save(path, **kwargs)  # the new weights are half there when the failure hits
        raise error

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(type(error)):
        save_compressed(model, good)
    assert _tree(good) == before
    assert sorted(p.name for p in good.parent.iterdir()) == ["model"]


def test_failure_on_a_new_target_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_directory(tmp_path / "new") as tmp:
            (tmp / "x").write_text("partial")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_killed_process_never_leaves_a_half_written_folder(good, tmp_path):
    before = _tree(good)
    script = textwrap.dedent(f"""
        import time
        from hf_compress.hub import atomic_directory
        with atomic_directory({str(good)!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half" * 1000)
            print("writing", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert _tree(good) == before
    leftovers = list(good.parent.glob(".model.tmp-*"))
    assert len(leftovers) == 1  # the dead process's scratch folder, never at the target path
    save_compressed(tiny_model("bert"), good)  # the next save cleans it up
    assert not list(good.parent.glob(".model.tmp-*"))


def test_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_directory(tmp_path / "f"):
            pass
