"""The hf-compress command line: --help of every subcommand, options generated from the config dataclasses, the
compress / inspect / evaluate / card / push commands, one-line errors with a non-zero exit on bad input, --overwrite,
and --token, whose value never reaches stdout, stderr, the model card or the Hub."""

from __future__ import annotations

import dataclasses
import pickle
import shutil
import subprocess
import sys

import pytest
from conftest import tiny_model
from hub_server import HubServer, use_hub

from hf_compress.cli import build_parser, main, reproduce_command
from hf_compress.registry import registered_techniques


SUBCOMMANDS = ["compress", "inspect", "evaluate", "push", "card"]
SECRET = "hf_cliSecretToken0123456789abcdef"
FAST = ["--weight-quantization-bits", "8", "--weight-quantization-algorithm", "rtn", "--calibration", "none",
        "--eval-texts", "none", "--latency-rounds", "0"]  # fmt: skip


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_of_every_subcommand(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"] if command else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: hf-compress")
    if command is None:
        assert all(c in out for c in SUBCOMMANDS)


def test_technique_options_come_from_the_config_dataclasses(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for name, technique in registered_techniques().items():
        if name.startswith("toy"):
            continue
        assert f"--{name.replace('_', '-')} " in out
        for field in dataclasses.fields(technique.config_cls):
            text = field.metadata.get("help", "")
            if text and "resolved" not in text.lower() and "unset" not in text.lower() and "by apply" not in text:
                flag = f"--{name}-{field.name}".replace("_", "-")
                assert flag in out, flag
                assert " ".join(text.split())[:40] in out


def test_entry_point_runs_as_a_program():
    proc = subprocess.run([sys.executable, "-m", "hf_compress.cli", "push", "--help"], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0 and "USER/NAME" in proc.stdout


@pytest.mark.parametrize(
    "argv, match",
    [
        (["compress", "/does/not/exist"], "does/not/exist"),
        (["compress", "--preset", "int8", "--weight-quantization-bits", "4"], "not both"),
        (["compress", "--weight-quantization-bits", "3"], "must be 4 or 8"),
        (["compress", "--calibration", "nope.txt"], "nope.txt"),
        (["inspect", "/does/not/exist"], "does/not/exist"),
        (["push", "/does/not/exist", "user/name"], "not a folder"),
        (["card", "/does/not/exist"], "hf_compress_report.json"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(capsys, argv, match):
    code, _, err = _run(capsys, *argv)
    assert code == 2
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"hf-compress {argv[0]}: error:") and match in lines[0], err


def test_parser_rejects_bad_types(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["compress", "--weight-quantization-bits", "eight"])
    assert exit_info.value.code == 2
    assert "invalid int value" in capsys.readouterr().err


def test_compress_inspect_evaluate_card_push(capsys, tmp_path, minilm_dir, monkeypatch):
    out = tmp_path / "minilm-int8"
    code, stdout, err = _run(capsys, "compress", str(minilm_dir), "--weight-quantization-bits", "8",
                             "--weight-quantization-algorithm", "rtn", "--calibration", "none", "--output-dir", str(out), "--latency-rounds", "1")  # fmt: skip
    assert code == 0, err
    assert "size (MB)" in stdout and "cosine to original" in stdout and f"saved to {out}" in stdout
    assert (out / "README.md").is_file()
    assert "--weight-quantization-bits 8" in (out / "README.md").read_text()  # the reproduce command

    code, stdout, _ = _run(capsys, "inspect", str(out))
    assert code == 0 and "weight_quantization: bits=8" in stdout and "model.safetensors" in stdout

    code, stdout, _ = _run(capsys, "evaluate", str(out), "--eval-texts", "debian", "--latency-rounds", "0")
    assert code == 0 and "cosine to original" in stdout

    readme = (out / "README.md").read_bytes()
    code, stdout, _ = _run(capsys, "card", str(out))
    assert code == 0 and (out / "README.md").read_bytes() == readme

    code, _, err = _run(capsys, "inspect", str(minilm_dir))
    assert code == 2 and "not compressed by hf_compress" in err

    with HubServer() as hub:
        use_hub(monkeypatch, hub)
        code, stdout, err = _run(capsys, "push", str(out), "tester/cli", "--private")
        assert code == 0, err
        assert "pushed" in stdout and "model.safetensors" in stdout
        assert hub.repos["tester/cli"].private
        use_hub(monkeypatch, hub, token="wrong")
        code, _, err = _run(capsys, "push", str(out), "tester/cli")
        assert code == 1 and "rejected the token" in err and "wrong" not in err.replace("wrong", "", 0)


def _run_or_exit(capsys, *argv):
    """main() with argparse's SystemExit turned into the exit status."""
    try:
        code = main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    tiny_model("bert").save_pretrained(folder)
    return folder


def test_compress_into_a_folder_with_other_files_needs_overwrite_and_keeps_them(capsys, tmp_path, monkeypatch,
                                                                                 tiny_dir):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.txt").write_text("three years of work")
    code, _, err = _run(capsys, "compress", str(tiny_dir), *FAST, "--output-dir", ".")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "thesis.txt" in err and "--overwrite" in err and str(tmp_path) in err

    code, out, err = _run(capsys, "compress", str(tiny_dir), *FAST, "--output-dir", ".", "--overwrite")
    assert code == 0, err
    assert (tmp_path / "thesis.txt").read_text() == "three years of work"
    assert (tmp_path / "model.safetensors").is_file()

    before = {p.name: p.read_bytes() for p in tiny_dir.iterdir()}
    code, _, err = _run(capsys, "compress", str(tiny_dir), *FAST, "--output-dir", str(tiny_dir), "--overwrite")
    assert code == 2 and "checkpoint the model was loaded from" in err and "--overwrite-source" in err
    assert {p.name: p.read_bytes() for p in tiny_dir.iterdir()} == before


def test_token_option_pushes_and_the_token_is_never_shown_or_saved(capsys, tmp_path, monkeypatch, tiny_dir):
    from huggingface_hub import constants

    out = tmp_path / "out"
    with HubServer(tokens={SECRET: "tester"}) as hub:
        use_hub(monkeypatch, hub, token=None)  # no HF_TOKEN and no saved login: only --token can authenticate
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
        code, stdout, err = _run(capsys, "compress", str(tiny_dir), *FAST, "--output-dir", str(out),
                                 "--push-to-hub", "tester/tiny", "--token", SECRET)  # fmt: skip
        assert code == 0, err
        assert "pushed" in stdout and SECRET not in stdout + err
        uploaded = hub.files("tester/tiny")
        assert "README.md" in uploaded and "--push-to-hub tester/tiny" in uploaded["README.md"].decode()
        assert not any(SECRET.encode() in data for data in uploaded.values())
        assert not any(SECRET.encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())

        code, stdout, err = _run(capsys, "push", str(out), "tester/again", f"--token={SECRET}")
        assert code == 0 and "tester/again" in hub.repos and SECRET not in stdout + err
        code, stdout, err = _run(capsys, "push", str(out), "tester/again", "--token", "hf_revokedToken0123456789abc")
        assert code == 1 and "rejected the token from the token argument (--token)" in err
        assert "hf_revokedToken" not in stdout + err and len(err.strip().splitlines()) == 1


def test_export_to_is_its_own_option_not_a_token(capsys):
    # `--to` abbreviates --token on `push` (hidden there, see below) but is a real option of `export`: its value
    # must stay readable in messages.
    code, _, err = _run_or_exit(capsys, "export", "/does/not/exist", "--to", "onnx")
    assert code == 2 and "/does/not/exist is not a folder" in err
    code, _, err = _run_or_exit(capsys, "export", "/does/not/exist", "--to", "nonsense-engine")
    assert code == 2 and "nonsense-engine" in err and "'onnx'" in err


def test_the_reproduce_command_leaves_the_token_out():
    argv = ["compress", "--token", SECRET, "--preset", "int8", f"--token={SECRET}", "--tok", "x1234", "m"]
    assert reproduce_command(argv) == "hf-compress compress --preset int8 m"


@pytest.mark.parametrize(
    "argv",
    [
        ["compress", "--token", SECRET, "--weight-quantization-bits", "eight"],
        ["compress", f"--token={SECRET}", "--no-such-option", "1"],
        ["compress", "--push-to-hub", "user/x", "--token", "hunter2-secret", "--preset", "nope"],
        ["compress", "--token", "hunter2-secret"],  # no --push-to-hub: our own error line
        ["push", "some/dir", "user/name", "--tokn", "hunter2-secret"],
        ["push", "some/dir", "user/name", "--to=hunter2-secret", "--private=yes"],
        ["push", "/does/not/exist", "user/name", "--token", "hunter2-secret"],
        ["--token", "hunter2-secret", "push", "x", "user/name"],
        [SECRET],
    ],
)
def test_a_rejected_command_line_never_shows_the_token(capsys, argv):
    code, out, err = _run_or_exit(capsys, *argv)
    assert code == 2
    assert "hunter2-secret" not in out + err and SECRET not in out + err
    assert len(err.strip().splitlines()) == 1 and "error:" in err and "Traceback" not in err, err


def test_a_traceback_never_shows_the_token(capsys, monkeypatch, tmp_path):
    import hf_compress.hub

    def buggy_push(*args, token=None, **kwargs):
        raise ZeroDivisionError(f"a bug that quotes its token {token}")

    monkeypatch.setattr(hf_compress.hub, "push_to_hub", buggy_push)
    code, _, err = _run(capsys, "push", str(tmp_path), "user/name", "--token", "hunter2-secret")
    assert code == 1 and "Traceback" in err and "ZeroDivisionError" in err and "hunter2-secret" not in err


@pytest.fixture(scope="module")
def compressed_tiny(tmp_path_factory, tiny_dir):
    from hf_compress import compress
    from hf_compress.quantization import WeightQuantizationConfig

    out = tmp_path_factory.mktemp("cli") / "tiny-int8"
    compress(str(tiny_dir), WeightQuantizationConfig(bits=8, algorithm="rtn"), measure=False, output_dir=out)
    return out


@pytest.mark.parametrize("damage", ["truncated", "garbage", "pickle", "truncated-pickle", "weights-file"])
def test_inspect_on_unreadable_weights_is_one_line_and_exit_2(capsys, tmp_path, compressed_tiny, damage):
    import torch

    folder = shutil.copytree(compressed_tiny, tmp_path / "damaged")
    weights = folder / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "garbage":
        weights.write_bytes(b"\xff" * 4096)
    elif damage in ("pickle", "truncated-pickle"):
        weights.unlink()
        if damage == "pickle":  # a pickle of arbitrary code: torch.load(weights_only=True) refuses it
            (folder / "pytorch_model.bin").write_bytes(pickle.dumps(print))
        else:
            torch.save(tiny_model("bert").state_dict(), folder / "pytorch_model.bin")
            data = (folder / "pytorch_model.bin").read_bytes()
            (folder / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    path = weights if damage == "weights-file" else folder
    code, out, err = _run(capsys, "inspect", str(path))
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hf-compress inspect: error:") and str(path) in lines[0], err
