"""A real 2-process distillation run: `accelerate launch` on CPU with the gloo backend."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification


SCRIPT = Path(__file__).resolve().parents[1] / "helpers" / "_distill_ddp_script.py"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="the accelerate CLI is not installed")  # fmt: skip
def test_two_process_gloo_distillation(tmp_path):
    launcher = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    # --multi_gpu selects accelerate's torchrun launcher; with no GPU (use_cpu=True in the script) the processes
    # train on CPU and the Trainer picks the gloo backend.
    command = [
        launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()), str(SCRIPT), str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["world_size"] == 2 and r["backend"] == "gloo" for r in ranks)
    assert all(r["teacher_frozen"] and r["teacher_eval"] for r in ranks)
    # DDP kept the students identical, and the projections (outside DDP) were averaged the same way.
    assert ranks[0]["student"] == ranks[1]["student"]
    assert ranks[0]["projections"] == ranks[1]["projections"]
    logs = ranks[0]["logs"]
    assert logs[-1]["loss"] < 0.8 * logs[0]["loss"] and logs[-1]["loss_kl"] < logs[0]["loss_kl"]
    assert {"loss_kl", "loss_cos"} <= set(logs[0]) and "loss_task" not in logs[0]
    # The student saved by rank 0 reloads and computes what it computed in memory.
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        logits = student(input_ids=torch.arange(5, 15).reshape(1, 10)).logits[0]
    torch.testing.assert_close(logits, torch.tensor(ranks[0]["probe_logits"]))
