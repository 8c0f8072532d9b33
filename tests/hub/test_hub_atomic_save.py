"""Atomic saving: an exception, Ctrl-C or a killed process during a save never leaves a half-written folder where a
good one was, and leftovers of killed processes are cleaned up by the next save. And no save ever deletes a file
hf_compress did not write: a non-empty folder needs overwrite=True, the source checkpoint overwrite="source", even
then only the files in the manifest or about to be written are replaced; symlinks are followed; the working
directory and the home folder (patched HOME, never the real one) keep their files and their identity."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import tiny_model
from transformers import AutoModel

from hf_compress import compress
from hf_compress.hub import _commit, atomic_directory, save_compressed
from hf_compress.hub.saving import MANIFEST, check_output_dir
from hf_compress.quantization import WeightQuantizationConfig


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _user_files(folder):
    """A folder of someone's work: files at the top, in a subfolder, and in a folder hf_compress also writes to."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    (folder / "plots").mkdir(exist_ok=True)
    (folder / "thesis.txt").write_text("three years of work")
    (folder / "data" / "results.csv").write_text("a,b\n1,2\n")
    (folder / "plots" / "mine.png").write_bytes(b"my plot")
    return {name: (folder / name).read_bytes() for name in ("thesis.txt", "data/results.csv", "plots/mine.png")}


def _kept(folder, files):
    return all((folder / name).read_bytes() == content for name, content in files.items())


@pytest.fixture()
def good(tmp_path):
    target = tmp_path / "model"
    save_compressed(tiny_model("bert"), target, extra_files={"notes/a.txt": "first"})
    return target


def test_save_replaces_the_folder_and_leaves_no_temporaries(good):
    before = _tree(good)
    save_compressed(tiny_model("bert", seed=1), good, extra_files={"b.txt": b"second"}, overwrite=True)
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
        save_compressed(model, good, overwrite=True)
    assert _tree(good) == before
    assert sorted(p.name for p in good.parent.iterdir()) == ["model"]


def test_failure_on_a_new_target_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_directory(tmp_path / "new") as tmp:
            (tmp / "x").write_text("partial")
            raise ValueError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("foreign", [False, True], ids=["swap", "in-place"])
def test_a_killed_process_never_leaves_a_half_written_folder(good, tmp_path, foreign):
    if foreign:
        _user_files(good)
    before = _tree(good)
    script = textwrap.dedent(f"""
        import time
        from hf_compress.hub import atomic_directory
        with atomic_directory({str(good)!r}, overwrite=True) as tmp:
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
    save_compressed(tiny_model("bert"), good, overwrite=True)  # the next save cleans it up
    assert not list(good.parent.glob(".model.tmp-*"))
    if foreign:
        assert _tree(good).keys() >= {"thesis.txt", "data/results.csv"}


def test_refuses_to_replace_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        with atomic_directory(tmp_path / "f"):
            pass


def test_a_previous_output_holding_nothing_else_is_replaced_without_overwrite(good):
    # `good` holds one previous save and nothing else: running the same command twice must work.
    assert "notes/a.txt" in json.loads((good / MANIFEST).read_text())["files"]
    save_compressed(tiny_model("bert", seed=1), good, extra_files={"b.txt": "second"})
    assert (good / "b.txt").read_text() == "second" and not (good / "notes").exists()
    assert AutoModel.from_pretrained(good) is not None
    with pytest.raises(ValueError, match=r"overwrite must be False, True .* or 'source'.*got 'yes'"):
        save_compressed(tiny_model("bert", seed=1), good, overwrite="yes")


def test_foreign_files_are_refused_then_kept_with_overwrite(good):
    mine = _user_files(good)
    inode = (good / "thesis.txt").stat().st_ino
    with pytest.raises(FileExistsError, match="not empty and holds files hf_compress did not write") as err:
        save_compressed(tiny_model("bert", seed=1), good)
    assert all(name in str(err.value) for name in ("thesis.txt", "data", str(good), "overwrite=True"))
    assert _kept(good, mine) and "notes/a.txt" in _tree(good)

    save_compressed(tiny_model("bert", seed=1), good, extra_files={"b.txt": "second"}, overwrite=True)
    after = _tree(good)
    assert _kept(good, mine) and (good / "thesis.txt").stat().st_ino == inode  # never moved, copied or relinked
    assert "notes/a.txt" not in after and not (good / "notes").exists()  # the previous save's file: owned, removed
    assert after["b.txt"] == b"second" and AutoModel.from_pretrained(good) is not None
    assert json.loads(after[MANIFEST])["files"] == ["b.txt", "config.json", "model.safetensors"]
    assert sorted(p.name for p in good.parent.iterdir()) == ["model"]


def test_a_folder_without_manifest_keeps_all_but_the_files_written(tmp_path):
    folder = tmp_path / "work"
    mine = _user_files(folder)
    (folder / "config.json").write_text("{}")  # a file of the same name as one hf_compress writes is replaced
    save_compressed(tiny_model("bert"), folder, overwrite=True)
    assert _kept(folder, mine) and json.loads((folder / "config.json").read_text())["model_type"] == "bert"


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failure_midway_next_to_foreign_files_changes_nothing(good, monkeypatch, error):
    _user_files(good)
    before = _tree(good)
    model = tiny_model("bert", seed=2)
    original_save = model.save_pretrained

    def save_then_fail(path, **kwargs):
        original_save(path, **kwargs)
        raise error

    monkeypatch.setattr(model, "save_pretrained", save_then_fail)
    with pytest.raises(type(error)):
        save_compressed(model, good, overwrite=True)
    assert _tree(good) == before
    assert sorted(p.name for p in good.parent.iterdir()) == ["model"]


def test_an_error_while_moving_files_in_moves_the_old_ones_back(good, monkeypatch):
    _user_files(good)
    before = _tree(good)
    real_replace, moves = os.replace, []

    def failing_replace(src, dst):
        if Path(dst).parent == good and Path(dst).name != MANIFEST:
            moves.append(dst)
            if len(moves) == 2:
                raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        save_compressed(tiny_model("bert", seed=3), good, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _tree(good) == before and sorted(p.name for p in good.parent.iterdir()) == ["model"]


def test_ctrl_c_while_moving_files_in_waits_until_they_are_all_there(good, monkeypatch):
    _user_files(good)
    real_replace, sent = os.replace, []

    def interrupted_replace(src, dst):
        if Path(dst).parent == good and not sent:
            sent.append(dst)
            os.kill(os.getpid(), signal.SIGINT)  # delivered to the deferring handler, not raised here
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted_replace)
    model = tiny_model("bert", seed=4)
    with pytest.raises(KeyboardInterrupt):
        save_compressed(model, good, extra_files={"c.txt": "third"}, overwrite=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert sent and (good / "c.txt").read_text() == "third" and "notes/a.txt" not in _tree(good)
    reloaded = AutoModel.from_pretrained(good)
    assert all((a == b).all() for a, b in zip(reloaded.state_dict().values(), model.state_dict().values()))


def test_a_file_that_appears_during_the_save_is_kept(good):
    with atomic_directory(good, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        (good / "late.txt").write_text("written by another program meanwhile")
    assert (good / "late.txt").is_file() and (good / "new.txt").is_file() and not (good / "notes").exists()


def test_a_replaced_folder_gives_back_what_it_does_not_own(tmp_path):
    old, real = tmp_path / ".x.old-1-ab", tmp_path / "x"
    old.mkdir()
    real.mkdir()
    (old / "owned.bin").write_bytes(b"o")
    (old / "sub").mkdir()
    (old / "sub" / "late.txt").write_text("late")
    _commit.dispose(old, {"owned.bin"}, real)
    assert not old.exists() and (real / "sub" / "late.txt").read_text() == "late" and not (real / "owned.bin").exists()


def test_a_file_in_the_way_of_a_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "plots").write_text("not a folder")
    with pytest.raises(FileExistsError, match="plots is a file or a symlink"):
        save_compressed(tiny_model("bert"), folder, extra_files={"plots/a.png": b"x"}, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["plots"]


@pytest.fixture()
def checkpoint(tmp_path):
    folder = tmp_path / "checkpoint"
    tiny_model("bert").save_pretrained(folder)
    (folder / "training_args.bin").write_bytes(b"trainer state")
    return folder


def test_the_source_checkpoint_is_refused_unless_allowed(checkpoint, tmp_path):
    before = _tree(checkpoint)
    model = AutoModel.from_pretrained(checkpoint)
    (tmp_path / "link").symlink_to(checkpoint)
    for target in (checkpoint, tmp_path / "link"):
        for overwrite in (False, True):
            with pytest.raises(FileExistsError, match=r"is the checkpoint the model was loaded from .*'source'"):
                save_compressed(model, target, overwrite=overwrite)
    with pytest.raises(FileExistsError, match="--overwrite-source"):  # compress refuses before compressing
        compress(str(checkpoint), WeightQuantizationConfig(bits=8, algorithm="rtn"), measure=False,
                 output_dir=checkpoint, overwrite=True)  # fmt: skip
    assert _tree(checkpoint) == before

    result = compress(str(checkpoint), WeightQuantizationConfig(bits=8, algorithm="rtn"), measure=False,
                      output_dir=tmp_path / "link", overwrite="source")  # fmt: skip
    assert (tmp_path / "link").is_symlink() and result.output_dir == tmp_path / "link"
    assert (checkpoint / "training_args.bin").read_bytes() == b"trainer state"
    assert "hf_compress" in (checkpoint / "config.json").read_text()


def test_a_symlinked_output_is_followed(tmp_path):
    real = tmp_path / "disk" / "models"
    real.mkdir(parents=True)
    link = tmp_path / "out"
    link.symlink_to(real)
    assert save_compressed(tiny_model("bert"), link) == link
    save_compressed(tiny_model("bert", seed=1), link, overwrite=True)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "model.safetensors").is_file() and sorted(p.name for p in real.parent.iterdir()) == ["models"]


def test_the_working_directory_and_home_are_never_wiped(tmp_path, monkeypatch):
    home = tmp_path / "home"
    mine = _user_files(home)
    work = home / "project"
    work.mkdir()
    (work / "notes.md").write_text("notes")
    monkeypatch.setenv("HOME", str(home))  # never the real home
    monkeypatch.chdir(work)
    identity = {path: path.stat().st_ino for path in (home, work)}
    for target in (".", os.getcwd(), "~", str(home), ".."):
        with pytest.raises(FileExistsError, match="not empty"):
            save_compressed(tiny_model("bert"), target)
    for target in (".", "~", ".."):
        save_compressed(tiny_model("bert"), target, overwrite=True)
    assert _kept(home, mine) and (work / "notes.md").read_text() == "notes"
    assert {path: path.stat().st_ino for path in (home, work)} == identity  # same folders, not swapped copies
    assert os.getcwd() == str(work) and (work / "model.safetensors").is_file() and (home / MANIFEST).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]

    empty = home / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    inode = empty.stat().st_ino
    save_compressed(tiny_model("bert"), ".")  # an empty working directory is fine, and stays the same folder
    assert empty.stat().st_ino == inode and Path(".").resolve() == empty and (empty / "config.json").is_file()


def test_the_filesystem_root_is_refused_and_never_renamed():
    assert _commit.must_stay(Path("/")) and not _commit.sibling_ok(Path("/"))
    with pytest.raises(FileExistsError, match="not empty"):
        check_output_dir("/")  # only reads the listing
