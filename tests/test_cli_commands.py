"""The hf-compress command line: --help of every subcommand, options generated from the config dataclasses, the
compress / inspect / evaluate / card / push commands, and one-line errors with a non-zero exit on bad input."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
from hub_server import HubServer, use_hub

from hf_compress.cli import build_parser, main
from hf_compress.registry import registered_techniques


SUBCOMMANDS = ["compress", "inspect", "evaluate", "push", "card"]


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
