"""Hub push against a Hub-compatible server on loopback: one-commit upload, reload with from_pretrained from that
server in a fresh process, private repos, rejected tokens, network errors, a missing token."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from hub_server import HubServer, use_hub
from transformers import AutoModel

from hf_compress import compress
from hf_compress.hub import HubPushError, push_to_hub
from hf_compress.hub.saving import MANIFEST
from hf_compress.quantization import WeightQuantizationConfig


TOKEN = "hf_test_write_token"


@pytest.fixture(scope="module")
def compressed_dir(tmp_path_factory, minilm_dir, debian_texts):
    out = tmp_path_factory.mktemp("push") / "minilm-int8"
    compress(str(minilm_dir), WeightQuantizationConfig(bits=8, algorithm="rtn"), eval_data=debian_texts[:16],
             output_dir=out, reproduce_command="hf-compress compress --weight-quantization-bits 8", latency_rounds=0)  # fmt: skip
    return out


@pytest.fixture()
def hub():
    with HubServer(tokens={TOKEN: "tester"}) as server:
        yield server


def _snapshot(folder):
    """What a push uploads: every file but the local bookkeeping of the save (the manifest)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST}  # fmt: skip


def test_push_round_trip_reloads_from_the_server(hub, monkeypatch, compressed_dir, tmp_path, minilm_tokenizer):
    use_hub(monkeypatch, hub)
    before = _snapshot(compressed_dir)
    result = push_to_hub(compressed_dir, "tester/minilm-int8", private=True)

    # Everything in one commit: model, config, tokenizer, card, plots, report.
    assert len(hub.commit_payloads) == 1
    uploaded = hub.files("tester/minilm-int8")
    assert uploaded == before
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "plots/size_breakdown.png"):
        assert name in uploaded
    assert result.files == {name: len(data) for name, data in before.items()}
    assert result.total_bytes == sum(result.files.values())
    lfs_paths = {line["value"]["path"] for line in hub.commit_payloads[0] if line["key"] == "lfsFile"}
    assert {"model.safetensors", "plots/size_breakdown.png"} <= lfs_paths  # binaries went through LFS
    assert hub.repos["tester/minilm-int8"].private
    assert TOKEN not in "".join(p.read_text(errors="ignore") for p in compressed_dir.rglob("*") if p.is_file())

    # A fresh process loads it with plain from_pretrained("user/name") from the server and matches the local reload.
    inputs = dict(
        minilm_tokenizer(["a text editor for programmers", "chess engine"], padding=True, return_tensors="pt")
    )
    torch.save(inputs, tmp_path / "inputs.pt")
    script = textwrap.dedent(f"""
        import torch, hf_compress
        from transformers import AutoModel
        model = AutoModel.from_pretrained("tester/minilm-int8")
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        with torch.no_grad():
            torch.save(model(**inputs).last_hidden_state, {str(tmp_path / "remote.pt")!r})
    """)  # fmt: skip
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "home"),
           "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = AutoModel.from_pretrained(compressed_dir).eval()
    with torch.no_grad():
        expected = local(**inputs).last_hidden_state
    torch.testing.assert_close(torch.load(tmp_path / "remote.pt"), expected, rtol=0, atol=0)
    assert any(m == "GET" and p.endswith("/model.safetensors") for m, p in hub.requests)

    # Private: an anonymous client cannot see it.
    env.pop("HF_TOKEN")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0


def test_push_again_updates_the_same_repo(hub, monkeypatch, compressed_dir):
    use_hub(monkeypatch, hub)
    push_to_hub(compressed_dir, "tester/again")
    second = push_to_hub(compressed_dir, "tester/again", commit_message="second")
    assert len(hub.repos["tester/again"].commits) >= 1
    assert second.repo_id == "tester/again"


def test_rejected_token_is_a_clear_error_and_keeps_the_folder(hub, monkeypatch, compressed_dir):
    use_hub(monkeypatch, hub, token="hf_revoked_token_123")
    before = _snapshot(compressed_dir)
    with pytest.raises(
        HubPushError, match=r"rejected the token from the HF_TOKEN environment variable \(HTTP 401\)"
    ) as err:
        push_to_hub(compressed_dir, "tester/nope")
    assert "hf_revoked_token_123" not in str(err.value)
    assert str(compressed_dir) in str(err.value)
    assert _snapshot(compressed_dir) == before
    assert "tester/nope" not in hub.repos


def test_writing_to_someone_elses_namespace_is_403(hub, monkeypatch, compressed_dir):
    use_hub(monkeypatch, hub)
    with pytest.raises(HubPushError, match="HTTP 403"):
        push_to_hub(compressed_dir, "someone-else/model")


def test_unreachable_hub_is_a_clear_error(monkeypatch, compressed_dir):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    hub = type("Dead", (), {"url": f"http://127.0.0.1:{port}"})()
    use_hub(monkeypatch, hub)
    before = _snapshot(compressed_dir)
    with pytest.raises(HubPushError, match="Could not reach the Hub at http://127.0.0.1") as err:
        push_to_hub(compressed_dir, "tester/offline")
    assert "still saved in" in str(err.value)
    assert _snapshot(compressed_dir) == before


def test_missing_token_says_how_to_log_in(hub, monkeypatch, compressed_dir, tmp_path):
    from huggingface_hub import constants

    use_hub(monkeypatch, hub, token=None)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(HubPushError, match="hf auth login"):
        push_to_hub(compressed_dir, "tester/x")


def test_offline_mode_is_explained(monkeypatch, compressed_dir):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubPushError, match="HF_HUB_OFFLINE"):
        push_to_hub(compressed_dir, "tester/x", token=TOKEN)


def test_bad_inputs(tmp_path, compressed_dir):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        push_to_hub(tmp_path, "tester/x", token=TOKEN)
    with pytest.raises(ValueError, match="user/name"):
        push_to_hub(compressed_dir, "no-namespace", token=TOKEN)


def test_compress_pushes_in_one_call(hub, monkeypatch, minilm_dir, tmp_path, debian_texts):
    use_hub(monkeypatch, hub)
    result = compress(str(minilm_dir), WeightQuantizationConfig(bits=8, algorithm="rtn"), eval_data=debian_texts[:8],
                      output_dir=tmp_path / "out", push_to_hub="tester/one-call", latency_rounds=0)  # fmt: skip
    assert result.push.repo_id == "tester/one-call"
    readme = hub.files("tester/one-call")["README.md"].decode()
    assert 'AutoModel.from_pretrained("tester/one-call")' in readme
    assert (tmp_path / "out" / "model.safetensors").is_file()
