"""FSDP under a real 2-process ``accelerate launch`` on CPU (gloo): distillation and fine-tuning of compressed models.

One launch runs, in the same two processes, FSDP2 from ``examples/accelerate/fsdp2_cpu.yaml`` and then FSDP1
requested through ``TrainingArguments(fsdp=True, fsdp_config={"version": 1})``; the reference is the same script
as one process (run in this process, to save an interpreter start). Dropout is off and the global batch is the
same, so the sharded runs must reproduce the single process up to float summation order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForSequenceClassification

from hf_compress import get_recipe
from hf_compress.factorization import FactorizedEmbedding
from hf_compress.integrations.trainer import check_fsdp_compatible
from hf_compress.pruning import EmptyAttention


ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tests" / "helpers" / "_distill_fsdp_script.py"
CONFIG = ROOT / "examples" / "accelerate" / "fsdp2_cpu.yaml"
LAUNCHER = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    command = [LAUNCHER, "launch", "--config_file", str(CONFIG), "--main_process_port", str(free_port()),
               str(SCRIPT), str(out), "fsdp2,fsdp1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1",
           "HF_COMPRESS_QUIET": "1", "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    launch = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Meanwhile the single-process reference, here.
    spec = importlib.util.spec_from_file_location("_distill_fsdp_script", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        script.main(out, ["one"])
    finally:
        torch.set_num_threads(threads)
    stdout, stderr = launch.communicate(timeout=600)
    assert launch.returncode == 0, stdout[-3000:] + stderr[-5000:]
    return out


def record(out: Path, mode: str, name: str) -> dict:
    return json.loads((out / mode / f"{name}.json").read_text())


def assert_same_run(out: Path, mode: str, name: str, version: int) -> dict:
    one, sharded = record(out, "one", name), record(out, mode, name)
    assert sharded["world_size"] == 2 and sharded["distributed_type"] == "DistributedType.FSDP"
    assert sharded["fsdp_version"] == version  # accelerate alone would have trained with DDP on CPU
    assert sharded["param_types"] == (["DTensor"] if version == 2 else ["Parameter"])
    assert [h["step"] for h in sharded["logs"]] == [h["step"] for h in one["logs"]]
    for key in [k for k in one["logs"][0] if k.startswith("loss")]:
        torch.testing.assert_close(
            torch.tensor([h[key] for h in sharded["logs"]]), torch.tensor([h[key] for h in one["logs"]]),
            rtol=1e-5, atol=1e-5, msg=f"{mode} {name}: {key} differs from the single-process run",
        )  # fmt: skip
    return sharded


def assert_same_weights(actual: dict, expected: dict, atol: float = 1e-4) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=atol, msg=key)


@pytest.mark.parametrize("mode, version", [("fsdp2", 2), ("fsdp1", 1)])
def test_fsdp_distillation_matches_one_process(runs, mode, version):
    sharded = assert_same_run(runs, mode, "distill", version)
    one = record(runs, "one", "distill")
    # The teacher is not wrapped (a full frozen copy per process), and the width projections (outside FSDP) are
    # averaged over the processes like the student's gradients.
    assert sharded["teacher_frozen"] and sharded["teacher_type"] == "BertForSequenceClassification"
    torch.testing.assert_close(torch.tensor(sharded["projections"]), torch.tensor(one["projections"]), atol=1e-4,
                               rtol=1e-4)  # fmt: skip
    assert one["logs"][-1]["loss"] < one["logs"][0]["loss"]
    # Resuming from the step-3 checkpoint continues exactly (steps 4-6 as in the uninterrupted run).
    resumed = record(runs, mode, "distill-resumed")["logs"]
    assert [h["step"] for h in resumed] == [h["step"] for h in sharded["logs"]]
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed]),
                               torch.tensor([h["loss"] for h in sharded["logs"]]), rtol=1e-5, atol=1e-6)  # fmt: skip
    # save_model gathered the full student on rank 0: it reloads with plain from_pretrained.
    reloaded = AutoModelForSequenceClassification.from_pretrained(runs / mode / "distill" / "final")
    reference = AutoModelForSequenceClassification.from_pretrained(runs / "one" / "distill" / "final")
    assert_same_weights(reloaded.state_dict(), reference.state_dict())


@pytest.mark.parametrize("mode, version", [("fsdp2", 2), ("fsdp1", 1)])
def test_fsdp_finetune_of_pruned_factorized_model(runs, mode, version):
    assert_same_run(runs, mode, "pruned", version)
    models = {}
    for name in (mode, "one"):
        model = AutoModelForSequenceClassification.from_pretrained(runs / name / "pruned" / "final").eval()
        # the compressed structure survived sharding and gathering: non-uniform heads, an emptied layer, factors
        assert model.bert.encoder.layer[0].attention.self.query.out_features == 3 * 8
        assert isinstance(model.bert.encoder.layer[1].attention.self, EmptyAttention)
        assert isinstance(model.bert.embeddings.word_embeddings, FactorizedEmbedding)
        models[name] = model
    assert get_recipe(models[mode]) == get_recipe(models["one"])
    assert_same_weights(models[mode].state_dict(), models["one"].state_dict(), atol=1e-5)
    # the checkpoint written during training (full model on rank 0, plus FSDP's resume files) reloads too
    checkpoint = runs / mode / "pruned" / "run" / "checkpoint-6"
    assert {"optimizer.bin", "pytorch_model_fsdp.bin", "scheduler.pt"} <= {p.name for p in checkpoint.iterdir()}
    reloaded = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    assert_same_weights(reloaded.state_dict(), models[mode].state_dict(), atol=0)


def test_fsdp2_lora_on_int8_model(runs):
    assert_same_run(runs, "fsdp2", "lora", 2)
    adapter = load_file(runs / "fsdp2" / "lora" / "final" / "adapter_model.safetensors")
    reference = load_file(runs / "one" / "lora" / "final" / "adapter_model.safetensors")
    assert_same_weights(adapter, reference, atol=1e-5)
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)  # trained (LoRA B starts at zero)
    # the int8 base stays packed integer buffers (never sharded); the classifier head is saved with the adapter
    assert adapter["base_model.model.classifier.weight_packed"].dtype == torch.int8


def test_fsdp1_refuses_peft_adapters_it_could_not_save(runs):
    error = record(runs, "fsdp1", "lora")["error"]
    assert "lack its LoRA weights" in error and "fsdp_version: 2" in error


class _Plugin:
    def __init__(self, version: int, use_orig_params: bool = True, layers: list[str] | None = None):
        from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

        self.fsdp_version, self.use_orig_params = version, use_orig_params
        self.auto_wrap_policy, self.transformer_cls_names_to_wrap = transformer_auto_wrap_policy, layers


class _Layer(nn.Linear):
    pass


@pytest.mark.parametrize("version", [1, 2])
def test_fsdp_unit_dtype_errors_name_the_fix(version):
    # a quantized layer's bias in bf16 inside an fp32 layer: one wrapped unit with two dtypes
    mixed = nn.Sequential(_Layer(4, 4), nn.Linear(4, 4).to(torch.bfloat16))
    with pytest.raises(ValueError, match=r"mixes \['torch.bfloat16', 'torch.float32'\].*dtype=torch.bfloat16"):
        check_fsdp_compatible(mixed, _Plugin(version))
    # ...fine when each dtype is its own unit (the bf16 layer wrapped on its own, the rest fp32)
    split = nn.Sequential(nn.Linear(4, 4), _Layer(4, 4).to(torch.bfloat16))
    check_fsdp_compatible(split, _Plugin(version, layers=["_Layer"]))


def test_fsdp1_flat_parameter_errors_name_the_fix():
    frozen = nn.Sequential(nn.Linear(4, 4).requires_grad_(False), nn.Linear(4, 4))
    with pytest.raises(ValueError, match="use_orig_params: true"):
        check_fsdp_compatible(frozen, _Plugin(1, use_orig_params=False))
    check_fsdp_compatible(frozen, _Plugin(1, use_orig_params=True))
    check_fsdp_compatible(frozen, _Plugin(2, use_orig_params=False))  # FSDP2 keeps each parameter's own flag
