"""Never load a wrong model (issue #13).

(a) Without ``import hf_compress``, every plain-transformers path to a compressed checkpoint raises, and the error says
    to ``import hf_compress`` (one subprocess checks every checkpoint and path, and prints JSON).
(b) With the plugin, a checkpoint that disagrees with its recipe (an entry of the recipe deleted from config.json, a
    tensor removed, reshaped or added in model.safetensors) raises a `ValueError` naming the module.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from hf_compress import (
    EmbeddingFactorizationConfig,
    FFNPruningConfig,
    HeadPruningConfig,
    LowRankLinearConfig,
    WeightQuantizationConfig,
    apply_compression,
    get_recipe,
)
from hf_compress.plugin import LOAD_GUARD


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Case:
    """A compressed checkpoint and where to tamper with it: `tensor` (a saved tensor of a compressed module) and a
    recipe edit (`edit` on the technique at `technique`) that leaves `edited_module` out of step with the weights."""

    family: str
    auto_class: Any
    techniques: Any  # () -> list of technique configs
    tensor: str
    edit: Any  # (technique dict) -> None
    edited_module: str
    technique: int = -1
    extra: dict = field(default_factory=dict)


def _drop(key, entry):
    return lambda t: t[key].pop(entry)


def _rtn(bits):
    return lambda: [WeightQuantizationConfig(bits=bits, algorithm="rtn")]


LM = AutoModelForCausalLM
CASES = {
    "head_pruning-bert": Case("bert", AutoModel, lambda: [HeadPruningConfig(heads_to_prune={0: [1], 1: [0, 2]})],
                              "encoder.layer.1.attention.self.key.weight", _drop("heads_to_prune", "1"),
                              "encoder.layer.1.attention.self.query"),
    "head_pruning-llama": Case("llama", LM, lambda: [HeadPruningConfig(heads_to_prune={0: [0, 1]})],
                               "model.layers.0.self_attn.q_proj.weight", _drop("heads_to_prune", "0"),
                               "model.layers.0.self_attn.o_proj"),
    "ffn_pruning-bert": Case("bert", AutoModel,
                             lambda: [FFNPruningConfig(intermediate_sizes={0: 32, 1: 48}, importance="magnitude")],
                             "encoder.layer.0.intermediate.dense.bias", _drop("intermediate_sizes", "1"),
                             "encoder.layer.1.output.dense"),
    "ffn_pruning-llama": Case("llama", LM,
                              lambda: [FFNPruningConfig(intermediate_sizes={0: 32, 1: 48}, importance="magnitude")],
                              "model.layers.1.mlp.down_proj.weight", _drop("intermediate_sizes", "0"),
                              "model.layers.0.mlp.up_proj"),
    "embedding_factorization-bert": Case("bert", AutoModel, lambda: [EmbeddingFactorizationConfig(rank=8)],
                                         "embeddings.word_embeddings.token_factor.weight",
                                         lambda t: t.update(rank=6), "embeddings.word_embeddings"),
    "embedding_factorization-gpt2": Case("gpt2", LM, lambda: [EmbeddingFactorizationConfig(rank=8)],  # tied head
                                         "transformer.wte.projection.weight", lambda t: t.update(rank=4),
                                         "transformer.wte"),
    "low_rank_linear-bert": Case("bert", AutoModel,
                                 lambda: [LowRankLinearConfig(rank=4, target_modules=["intermediate.dense"])],
                                 "encoder.layer.0.intermediate.dense.up.weight",
                                 _drop("ranks", "encoder.layer.1.intermediate.dense"),
                                 "encoder.layer.1.intermediate.dense"),
    "low_rank_linear-llama": Case("llama", LM, lambda: [LowRankLinearConfig(rank=4, target_modules=["up_proj"])],
                                  "model.layers.1.mlp.up_proj.down.weight", _drop("ranks", "layers.0.mlp.up_proj"),
                                  "model.layers.0.mlp.up_proj"),
    "int8-bert": Case("bert", AutoModel, _rtn(8), "encoder.layer.0.attention.self.query.weight_scale",
                      _drop("modules", "encoder.layer.1.output.dense"), "encoder.layer.1.output.dense"),
    "int8-llama": Case("llama", LM, _rtn(8), "model.layers.0.mlp.gate_proj.weight_packed",
                       _drop("modules", "head:lm_head"), "lm_head"),
    "int4-bert": Case("bert", AutoModel, _rtn(4), "embeddings.word_embeddings.weight_zero",
                      _drop("modules", "encoder.layer.0.intermediate.dense"), "encoder.layer.0.intermediate.dense"),
    "int4-llama": Case("llama", LM, _rtn(4), "model.layers.1.self_attn.v_proj.weight_packed",
                       _drop("modules", "layers.1.mlp.down_proj"), "model.layers.1.mlp.down_proj"),
    "combined-bert": Case("bert", AutoModel, lambda: [
        HeadPruningConfig(heads_to_prune={0: [3]}),
        FFNPruningConfig(intermediate_sizes={1: 40}, importance="magnitude"),
        EmbeddingFactorizationConfig(rank=8), LowRankLinearConfig(rank=4, target_modules=["attention.output.dense"]),
        WeightQuantizationConfig(bits=8, algorithm="rtn")], "encoder.layer.1.intermediate.dense.weight_scale",
        _drop("ranks", "encoder.layer.0.attention.output.dense"), "encoder.layer.0.attention.output.dense",
        technique=3),
    "combined-gpt2": Case("gpt2", LM, lambda: [
        HeadPruningConfig(heads_to_prune={0: [1]}), EmbeddingFactorizationConfig(rank=8),
        LowRankLinearConfig(rank=4, target_modules=["c_fc"]), WeightQuantizationConfig(bits=4, algorithm="rtn")],
        "transformer.h.0.attn.c_attn.weight_packed", _drop("modules", "h.1.mlp.c_fc.up"),
        "transformer.h.1.mlp.c_fc.up"),
}  # fmt: skip
MINILM = "minilm-int8"

# Every way plain transformers (and sentence-transformers) may build a model from a folder; run in a subprocess
# that never imports hf_compress. Each prints [exception type, message] or ["ok", model type].
PLAIN_SCRIPT = r"""
import json, sys
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          PreTrainedConfig, pipeline)
PATHS = {
    "AutoModel": lambda d: AutoModel.from_pretrained(d),
    "attn_sdpa": lambda d: AutoModel.from_pretrained(d, attn_implementation="sdpa"),
    "attn_eager": lambda d: AutoModel.from_pretrained(d, attn_implementation="eager"),
    "dtype": lambda d: AutoModel.from_pretrained(d, dtype="float32"),
    "ignore_mismatched_sizes": lambda d: AutoModel.from_pretrained(d, ignore_mismatched_sizes=True),
    "SequenceClassification": lambda d: AutoModelForSequenceClassification.from_pretrained(d, num_labels=2),
    "CausalLM": lambda d: AutoModelForCausalLM.from_pretrained(d),
    "AutoConfig+from_config": lambda d: AutoModel.from_config(AutoConfig.from_pretrained(d)),
    "AutoConfig+AutoModel": lambda d: AutoModel.from_pretrained(d, config=AutoConfig.from_pretrained(d)),
    "config_class": lambda d: PreTrainedConfig.from_json_file(d + "/config.json"),
    "pipeline": lambda d: pipeline("feature-extraction", model=d, dtype="float32"),
}
folders, real_st = json.loads(sys.argv[1]), sys.argv[2]
results = {}
for name, folder in folders.items():
    results[name] = {}
    for path, load in PATHS.items():
        try:
            results[name][path] = ["ok", type(load(folder)).__name__]
        except Exception as err:
            results[name][path] = [type(err).__name__, str(err)]
from sentence_transformers import SentenceTransformer
try:
    results["sentence_transformers"] = ["ok", type(SentenceTransformer(real_st, device="cpu")).__name__]
except Exception as err:
    results["sentence_transformers"] = [type(err).__name__, str(err)]
assert "hf_compress" not in sys.modules
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, minilm_dir, minilm_tokenizer) -> dict[str, Path]:
    """One saved checkpoint per case, plus int8 MiniLM (with its tokenizer, so sentence-transformers could load it)."""
    root = tmp_path_factory.mktemp("guard")
    folders = {}
    for name, case in CASES.items():
        model = tiny_model(case.family, case.auto_class)
        apply_compression(model, *case.techniques())
        model.save_pretrained(root / name)
        folders[name] = root / name
    minilm = AutoModel.from_pretrained(minilm_dir).eval()
    apply_compression(minilm, WeightQuantizationConfig(bits=8, algorithm="rtn"))
    minilm.save_pretrained(root / MINILM)
    minilm_tokenizer.save_pretrained(root / MINILM)
    folders[MINILM] = root / MINILM
    return folders


@pytest.fixture(scope="module")
def plain_results(checkpoints) -> dict:
    folders = json.dumps({name: str(path) for name, path in checkpoints.items()})
    result = subprocess.run([sys.executable, "-c", PLAIN_SCRIPT, folders, str(checkpoints[MINILM])],
                            capture_output=True, text=True, timeout=600, env=_env())  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}


# -- (a) plain transformers refuses ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*CASES, MINILM])
def test_plain_transformers_raises_on_every_path(plain_results, name):
    for path, (kind, message) in plain_results[name].items():
        assert kind == "ValueError", f"{name} via {path}: {kind} {message}"
        assert "import hf_compress" in message, f"{name} via {path}: {message}"


def test_sentence_transformers_raises_too(plain_results):
    kind, message = plain_results["sentence_transformers"]
    assert kind == "ValueError" and "import hf_compress" in message, (kind, message)


# -- with the plugin: a clean checkpoint loads, and its config round-trips --------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_untampered_checkpoint_loads_and_round_trips(checkpoints, name, tmp_path):
    case, folder = CASES[name], checkpoints[name]
    saved = json.loads((folder / "config.json").read_text())
    assert LOAD_GUARD in saved["id2label"]
    model = case.auto_class.from_pretrained(folder)
    assert get_recipe(model) is not None and model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    assert LOAD_GUARD not in json.dumps(model.config.to_dict()) and LOAD_GUARD not in repr(model.config)
    assert type(model.config).from_dict(model.config.to_dict()).to_dict() == model.config.to_dict()
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == saved
    AutoModel.from_pretrained(folder)  # the base model of a task checkpoint: prefixes handled, heads left out
    config = AutoConfig.from_pretrained(folder)  # sentence-transformers style: AutoConfig, then AutoModel
    assert get_recipe(AutoModel.from_pretrained(folder, config=config)) is not None


def test_classifier_keeps_labels_and_problem_type(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_model("bert", AutoModelForSequenceClassification, num_labels=3)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "mid", 2: "pos"}, {"neg": 0, "mid": 1, "pos": 2}
    model.config.problem_type = "single_label_classification"
    apply_compression(model, HeadPruningConfig(heads_to_prune={0: [1]}))
    model.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert again.config.id2label == {0: "neg", 1: "mid", 2: "pos"} and again.config.label2id["pos"] == 2
    assert again.config.problem_type == "single_label_classification"
    # A new head with another label count re-initialises only the head, as in plain transformers.
    relabelled = AutoModelForSequenceClassification.from_pretrained(
        tmp_path, num_labels=5, ignore_mismatched_sizes=True
    )
    assert relabelled.classifier.out_features == 5


def test_checkpoint_with_the_old_attn_implementation_guard_still_loads(checkpoints, tmp_path):
    folder = Path(shutil.copytree(checkpoints["int8-bert"], tmp_path / "old"))
    config = json.loads((folder / "config.json").read_text())
    del config["id2label"]
    config["attn_implementation"] = (
        "hf_compress-checkpoint: run `import hf_compress` before from_pretrained (pip install hf-compress)"
    )
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModel.from_pretrained(folder)
    assert (
        model.config._attn_implementation in ("sdpa", "eager") and "attn_implementation" not in model.config.__dict__
    )


# -- (b) with the plugin, a checkpoint that disagrees with its recipe raises -----------------------------------------
def _tampered(source: Path, target: Path, weights=None, recipe=None) -> Path:
    shutil.copytree(source, target)
    if weights is not None:
        tensors = load_file(target / "model.safetensors")
        weights(tensors)
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    if recipe is not None:
        config = json.loads((target / "config.json").read_text())
        recipe(config["quantization_config"]["techniques"])
        (target / "config.json").write_text(json.dumps(config))
    return target


def _shrunk(tensors, key):
    tensors[key] = tensors[key][:-1].clone()


TAMPERING = {
    "recipe entry": lambda case: dict(recipe=lambda techniques: case.edit(techniques[case.technique])),
    "removed tensor": lambda case: dict(weights=lambda t: t.pop(case.tensor)),
    "reshaped tensor": lambda case: dict(weights=lambda t: _shrunk(t, case.tensor)),
    "extra tensor": lambda case: dict(weights=lambda t: t.__setitem__(case.tensor.rpartition(".")[0] + ".stray",
                                                                       torch.zeros(2))),
}  # fmt: skip


@pytest.mark.parametrize("name", CASES)
def test_tampered_checkpoint_names_the_module(checkpoints, name, tmp_path):
    case = CASES[name]
    for kind, tamper in TAMPERING.items():
        folder = _tampered(checkpoints[name], tmp_path / kind.replace(" ", "_"), **tamper(case))
        module = case.edited_module if kind == "recipe entry" else case.tensor.rpartition(".")[0]
        with pytest.raises(ValueError, match="do not match the hf_compress recipe") as caught:
            case.auto_class.from_pretrained(folder)
        assert f"\n  {_group_of(module)}: " in str(caught.value), (kind, str(caught.value))


def _group_of(module: str) -> str:
    # Factorized and quantized children are reported under the module the recipe replaced: `...c_fc.up` -> `...c_fc`.
    return re.sub(r"\.(up|down|projection|token_factor)$", "", module)


def test_tampered_minilm_names_the_module(checkpoints, tmp_path):
    key = "encoder.layer.3.attention.output.dense.weight_scale"
    folder = _tampered(checkpoints[MINILM], tmp_path / "minilm", weights=lambda t: t.pop(key))
    with pytest.raises(ValueError, match=r"encoder\.layer\.3\.attention\.output\.dense: missing: weight_scale"):
        AutoModel.from_pretrained(folder)
    assert get_recipe(AutoModel.from_pretrained(checkpoints[MINILM])) is not None
