"""Bad inputs at every entry point (issue #13): each is refused before any work, with the exception type and a message
that names what was received and what is allowed.

One table (`ROWS`) of ``(id, call, exception, words)`` covers the configs, `compress()` arguments, calibration, eval
and task data, the model and tokenizer, and apply-time faults. `test_bad_inputs_cli_and_ranges.py` has the CLI rows,
the hypothesis ranges and the inputs that used to fail deep inside and now work.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch
from conftest import tiny_model
from transformers import AutoConfig, AutoModel

from hf_compress import apply_compression, compress
from hf_compress.architectures import UnsupportedArchitectureError
from hf_compress.distillation import DistillationArguments
from hf_compress.factorization import EmbeddingFactorizationConfig, LowRankLinearConfig
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig


pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a mail client for the terminal", "an image viewer", "a text editor with plugins", "tools for compilers"]
RTN = dict(bits=8, algorithm="rtn")
WQ, Head, FFN, Emb, LowRank = (WeightQuantizationConfig, HeadPruningConfig, FFNPruningConfig,
                               EmbeddingFactorizationConfig, LowRankLinearConfig)  # fmt: skip


def _dataset(**columns):
    return datasets.Dataset.from_dict(columns)


def _t5():
    config = AutoConfig.for_model("t5", d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    return AutoModel.from_config(config).eval()


@dataclass
class Ctx:
    base: Any  # a tiny BERT (vocab 128): every case gets its own copy
    tokenizer: Any  # MiniLM's, 30522 tokens
    tmp: Path

    def model(self):
        return copy.deepcopy(self.base)

    def quantized(self):
        return apply_compression(self.model(), WQ(**RTN))

    def write(self, name: str, text: str) -> str:
        path = self.tmp / name
        path.write_text(text)
        return str(path)


@pytest.fixture(scope="module")
def ctx(minilm_tokenizer, tmp_path_factory):
    return Ctx(tiny_model("bert"), minilm_tokenizer, tmp_path_factory.mktemp("bad"))


def _compress(c: Ctx, *configs, **kwargs):
    kwargs.setdefault("measure", False)
    if not configs and not {"preset", "recipe", "budget"} & set(kwargs):
        configs = (WQ(**RTN),)
    return compress(c.model(), *configs, **kwargs)


NOT_TEXT = r"accepted: a list of texts \(list\[str\]\), a datasets.Dataset"
ROWS = [
    # -- WeightQuantizationConfig --------------------------------------------------------------------------------
    ("wq-bits-3", lambda c: WQ(bits=3), ValueError, r"bits must be 4 or 8, got 3 \(int\)"),
    ("wq-bits-str", lambda c: WQ(bits="8"), TypeError, r"bits must be 4 or 8, got '8' \(str\)"),
    ("wq-group-1", lambda c: WQ(group_size=1), ValueError, r"group_size must be an integer >= 2.*got 1"),
    ("wq-group-float", lambda c: WQ(group_size=32.0),
     TypeError, r"group_size must be an integer >= 2.*32.0 \(float\)"),
    ("wq-damp-str", lambda c: WQ(damp="x"), TypeError, r"damp must be a number in \(0, 1\); got 'x' \(str\)"),
    ("wq-damp-1", lambda c: WQ(damp=1.0), ValueError, r"damp must be a number in \(0, 1\); got 1.0"),
    ("wq-samples-0", lambda c: WQ(calibration_samples=0), ValueError, r"calibration_samples must be an integer >= 1"),
    ("wq-embeddings-str", lambda c: WQ(quantize_embeddings="no"),
     TypeError, r"quantize_embeddings must be True or False; got 'no'"),
    ("wq-target-int", lambda c: WQ(target_modules=3),
     TypeError, r"target_modules must be a list of module-name suffixes.*got 3"),
    ("wq-exclude-regex", lambda c: WQ(exclude_modules="query("),
     ValueError, r"exclude_modules 'query\(' is not a valid regular expression"),
    ("wq-override-not-dict", lambda c: WQ(overrides={"query": 8}),
     TypeError, r"overrides maps module patterns.*got 'query' \(str\): 8 \(int\)"),
    ("wq-override-symmetric", lambda c: WQ(overrides={"query": {"symmetric": "yes"}}),
     TypeError, r"overrides\['query'\]\['symmetric'\] must be True or False"),
    ("wq-algorithm", lambda c: WQ(algorithm="awq"),
     ValueError, r"algorithm must be one of \('auto', 'rtn'.*got 'awq'"),
    ("wq-symmetric-str", lambda c: WQ(symmetric="yes"),
     TypeError, r"symmetric must be True, False or None, got 'yes'"),
    # -- pruning configs ---------------------------------------------------------------------------------------
    ("head-fraction-1", lambda c: Head(fraction=1.0), ValueError, r"fraction must be a number in \[0, 1\).*got 1.0"),
    ("head-fraction-str", lambda c: Head(fraction="0.3"),
     TypeError, r"fraction must be a number in \[0, 1\).*got '0.3' \(str\)"),
    ("head-fraction-bool", lambda c: Head(fraction=True), TypeError, r"fraction must be a number.*got True \(bool\)"),
    ("head-count-bool", lambda c: Head(num_heads_to_prune=True),
     TypeError, r"num_heads_to_prune must be a non-negative integer, got True"),
    ("head-batch-0", lambda c: Head(fraction=0.3, batch_size=0),
     ValueError, r"batch_size must be a positive integer, got 0"),
    ("head-seed-negative", lambda c: Head(fraction=0.3, seed=-1), ValueError, r"seed must be an integer >= 0, got -1"),
    ("head-importance", lambda c: Head(fraction=0.3, importance="taylor"),
     ValueError, r"importance must be one of \('auto'"),
    ("ffn-round-to-0", lambda c: FFN(fraction=0.5, round_to=0),
     ValueError, r"round_to must be an integer >= 1.*got 0"),
    ("ffn-round-to-str", lambda c: FFN(fraction=0.5, round_to="64"),
     TypeError, r"round_to must be an integer >= 1.*'64' \(str\)"),
    ("ffn-min-neurons", lambda c: FFN(fraction=0.5, min_neurons_per_layer=-2),
     ValueError, r"min_neurons_per_layer must be an integer >= 0, got -2"),
    ("ffn-size-bool", lambda c: FFN(intermediate_sizes={0: True}),
     ValueError, r"intermediate_sizes needs layer indices >= 0 and sizes >= 0"),
    ("ffn-fraction-nan", lambda c: FFN(fraction=math.nan),
     ValueError, r"fraction must be a number in \[0, 1\).*got nan"),
    # -- factorization configs ---------------------------------------------------------------------------------
    ("emb-energy-str", lambda c: Emb(energy="high"),
     TypeError, r"energy is the fraction.*in \(0, 1\].*got 'high' \(str\)"),
    ("emb-energy-0", lambda c: Emb(energy=0.0), ValueError, r"energy .*in \(0, 1\].*got 0.0"),
    ("emb-rank-float", lambda c: Emb(rank=8.0), TypeError, r"rank must be a positive integer, got 8.0 \(float\)"),
    ("emb-budget-str", lambda c: Emb(param_budget="half"),
     TypeError, r"param_budget must be a positive number, got 'half'"),
    ("emb-smoothing-str", lambda c: Emb(rank=8, smoothing="x"),
     TypeError, r"smoothing must be a number >= 0; got 'x' \(str\)"),
    ("emb-smoothing-negative", lambda c: Emb(rank=8, smoothing=-1),
     ValueError, r"smoothing must be a number >= 0; got -1"),
    ("emb-center-str", lambda c: Emb(rank=8, center="yes"), TypeError, r"center must be True or False; got 'yes'"),
    ("emb-texts-0", lambda c: Emb(rank=8, sensitivity_texts=0),
     ValueError, r"sensitivity_texts must be an integer >= 1; got 0"),
    ("lr-energy-str", lambda c: LowRank(energy="high"), TypeError, r"energy is the fraction.*got 'high' \(str\)"),
    ("lr-min-saving-str", lambda c: LowRank(rank=4, min_saving="x"),
     TypeError, r"min_saving must be a number in \[0, 1\); got 'x'"),
    ("lr-texts-0", lambda c: LowRank(rank=4, max_calibration_texts=0),
     ValueError, r"max_calibration_texts must be an integer >= 1"),
    ("lr-exclude-int", lambda c: LowRank(rank=4, exclude_modules=5),
     TypeError, r"exclude_modules must be a list of module-name suffixes.*got 5"),
    # -- DistillationArguments ---------------------------------------------------------------------------------
    ("distil-temperature-0", lambda c: DistillationArguments(output_dir=str(c.tmp), temperature=0.0),
     ValueError, r"temperature must be > 0, got 0.0"),
    ("distil-projection-lr-str", lambda c: DistillationArguments(output_dir=str(c.tmp), projection_lr="fast"),
     TypeError, r"projection_lr must be a number > 0.*got 'fast'"),
    ("distil-alpha-str", lambda c: DistillationArguments(output_dir=str(c.tmp), alpha_kl="1"),
     TypeError, r"alpha_kl must be a finite number, got '1'"),
    # -- patterns and amounts that select nothing, at apply time -----------------------------------------------
    ("wq-exclude-typo", lambda c: apply_compression(c.model(), WQ(**RTN, exclude_modules=["qeury"])),
     ValueError, r"exclude_modules pattern \['qeury'\] matches no module; modules look like \[.*query"),
    ("wq-exclude-regex-typo", lambda c: apply_compression(c.model(), WQ(**RTN, exclude_modules=r".*qeury")),
     ValueError, r"exclude_modules pattern '\.\*qeury' matches no module"),
    ("wq-override-typo", lambda c: apply_compression(c.model(), WQ(**RTN, overrides={"embedingz": {"bits": 4}})),
     ValueError, r"overrides pattern 'embedingz' matches no quantized module; quantized modules look like"),
    ("wq-target-typo", lambda c: apply_compression(c.model(), WQ(**RTN, target_modules=["qeury"])),
     ValueError, r"target_modules \['qeury'\] matched no"),
    ("lr-exclude-typo", lambda c: apply_compression(c.model(), LowRank(rank=4, exclude_modules=["intermediat.dense"])),
     ValueError, r"exclude_modules pattern \['intermediat.dense'\] matches no targeted linear layer"),
    ("ffn-round-to-full",
     lambda c: apply_compression(c.model(), FFN(fraction=0.25, round_to=64, importance="magnitude")),
     ValueError, r"round_to=64\) prunes nothing.*FFN sizes \[64, 64\].*round_to=32 \(or less\)"),
    ("ffn-fraction-rounds-to-0", lambda c: apply_compression(c.model(), FFN(fraction=0.001, importance="magnitude")),
     ValueError, r"fraction=0.001, round_to=1\) prunes nothing.*fraction=0.01 \(or more\)"),
    ("head-fraction-rounds-to-0", lambda c: apply_compression(c.model(), Head(fraction=0.05, importance="magnitude")),
     ValueError, r"removes round\(0.05 \* 8 heads\) = 0 heads. Use fraction >= 0.125"),
    ("quantize-twice", lambda c: apply_compression(c.quantized(), WQ(**RTN)),
     ValueError, r"BertModel is already quantized \(\d+ modules such as 'embeddings.word_embeddings'"),
    ("quantize-twice-targeted", lambda c: apply_compression(c.quantized(), WQ(**RTN, target_modules=["query"])),
     ValueError, r"already quantized"),
    ("apply-t5", lambda c: apply_compression(_t5(), WQ(**RTN)),
     UnsupportedArchitectureError, r"'t5' model, a family hf_compress does not support.*Supported families.*'bert'"),
    ("apply-calibration-ints", lambda c: apply_compression(c.model(), Head(fraction=0.25), calibration_data=[1, 2]),
     TypeError, r"calibration_data\[0\] is 1 \(int\); every item must be a text"),
    # -- compress() arguments ----------------------------------------------------------------------------------
    ("preset-int", lambda c: _compress(c, preset=3),
     TypeError, r"preset must be a preset name \(str\), one of \['distil', 'int4', 'int8', 'max'\]; got 3"),
    ("preset-unknown", lambda c: compress(c.model(), preset="int9"),
     ValueError, r"Unknown preset 'int9'. Choose one of"),
    ("budget-list", lambda c: compress(c.model(), budget=[1], calibration_data=TEXTS),
     TypeError, r"budget must be megabytes.*got \[1\] \(list\)"),
    ("budget-words", lambda c: compress(c.model(), budget="ten", calibration_data=TEXTS),
     ValueError, r"budget must be megabytes \('12', '12MB'\) or a reduction factor \('10x'\), got 'ten'"),
    ("latency-list", lambda c: compress(c.model(), budget="2x", latency=[0.5], calibration_data=TEXTS),
     TypeError, r"latency must be a ratio to the original's latency such as '0.5x' \(str\) or 0.5.*\(list\)"),
    ("latency-words", lambda c: compress(c.model(), budget="2x", latency="fast", calibration_data=TEXTS),
     ValueError, r"latency must be a ratio .* got 'fast'. '0.5x' asks for half"),
    ("latency-slower", lambda c: compress(c.model(), budget="2x", latency="1.5x", calibration_data=TEXTS),
     ValueError, r"latency must be in \(0, 1\] .*got '1.5x'"),
    ("latency-zero", lambda c: compress(c.model(), budget="2x", latency=0, calibration_data=TEXTS),
     ValueError, r"latency must be in \(0, 1\].*got 0"),
    ("latency-no-budget", lambda c: _compress(c, latency="0.5x"),
     ValueError, r"latency='0.5x' is a target of budget mode: give a size target too, e.g. budget='10x'"),
    ("latency-untimed", lambda c: compress(c.model(), budget="2x", latency="0.5x", calibration_data=TEXTS,
                                           latency_rounds=0),
     ValueError, r"latency=... is measured: latency_rounds must be >= 1"),
    ("budget-no-data", lambda c: compress(c.model(), budget="2x"),
     ValueError, r"Budget mode measures candidates on data: pass calibration_data"),
    ("metric-int", lambda c: _compress(c, metric=3),
     TypeError, r"metric must be an evaluate metric name or path \(str\).*got 3 \(int\)"),
    ("metric-offline", lambda c: _compress(c, measure=True, metric="f2", task_data=[{"text": "a", "label": 0}]),
     ValueError, r"metric 'f2' is neither shipped with hf_compress \(\['accuracy', 'embedding_fidelity'\]\).*offline"),
    ("distill-str", lambda c: _compress(c, distill="yes"),
     TypeError, r"distill must be True, False, None.*got 'yes' \(str\)"),
    ("distill-no-data", lambda c: _compress(c, Head(fraction=0.25), distill=True),
     ValueError, r"Recovery distillation .* trains on calibration texts; got calibration_data=None"),
    ("distill-batches",
     lambda c: _compress(c, Head(fraction=0.25), distill=True, calibration_data=[{"input_ids": torch.ones(1, 4)}]),
     ValueError, r"got calibration_data=tokenized batches"),
    ("distill-unknown-option",
     lambda c: _compress(c, Head(fraction=0.25), distill={"steps": 3}, calibration_data=TEXTS),
     ValueError, r"distill has unknown options \['steps'\]; it takes recover\(\) options \['max_steps'"),
    ("push-no-slash", lambda c: _compress(c, push_to_hub="noslash"),
     ValueError, r"push_to_hub must be a Hub repo id 'user/name'.*got 'noslash' \(str\)"),
    ("push-spaces", lambda c: _compress(c, push_to_hub="me/my model"),
     ValueError, r"push_to_hub must be a Hub repo id.*'me/my model'"),
    ("output-dir-file", lambda c: _compress(c, output_dir=c.write("a-file", "x")),
     FileExistsError, r"Cannot save into .*a-file: it exists and is a file, not a folder"),
    ("output-dir-int", lambda c: _compress(c, output_dir=7),
     TypeError, r"output_dir must be a folder path \(str or os.PathLike\); got 7 \(int\)"),
    ("latency-negative", lambda c: _compress(c, latency_rounds=-1),
     ValueError, r"latency_rounds must be an integer >= 0; got -1. latency_rounds=0 skips"),
    ("latency-float", lambda c: _compress(c, latency_rounds=1.5),
     TypeError, r"latency_rounds must be an integer >= 0; got 1.5 \(float\)"),
    ("latency-bool", lambda c: _compress(c, latency_rounds=True),
     TypeError, r"latency_rounds must be an integer >= 0; got True \(bool\)"),
    ("max-eval-0", lambda c: _compress(c, max_eval_texts=0),
     ValueError, r"max_eval_texts must be an integer >= 1; got 0"),
    ("max-eval-str", lambda c: _compress(c, max_eval_texts="all"),
     TypeError, r"max_eval_texts must be an integer >= 1; got 'all' \(str\)"),
    ("measure-str", lambda c: _compress(c, measure="no"), TypeError, r"measure must be True or False; got 'no'"),
    ("token-int", lambda c: _compress(c, token=123),
     TypeError, r"token must be a Hub token \(str\) or None; got a int"),
    ("recipe-bad-json", lambda c: compress(c.model(), recipe=c.write("r.json", "[{")),
     ValueError, r"Recipe file .*r.json is not valid JSON"),
    ("recipe-item-int", lambda c: compress(c.model(), recipe=[3]),
     TypeError, r"recipe\[0\] is 3 \(int\); each item must be a technique config or its dict"),
    # -- data: calibration, eval, task -------------------------------------------------------------------------
    ("eval-ints", lambda c: _compress(c, eval_data=[1, 2, 3]),
     TypeError, r"eval_data\[0\] is 1 \(int\); every item must be a text \(str\)"),
    ("eval-dict", lambda c: _compress(c, eval_data={"text": TEXTS}),
     TypeError, r"eval_data is a dict \(keys \['text'\]\); " + NOT_TEXT),
    ("eval-dataset-no-text", lambda c: _compress(c, eval_data=_dataset(body=TEXTS)),
     ValueError, r"The eval_data dataset has columns \['body'\]; expected a 'text' column"),
    ("eval-token-batches", lambda c: _compress(c, eval_data=[{"input_ids": torch.ones(1, 3, dtype=torch.long)}]),
     TypeError, r"eval_data\[0\] is a dict with keys \['input_ids'\] and no 'text' text"),
    ("eval-string", lambda c: _compress(c, eval_data="one text"),
     TypeError, r"eval_data must be a list of texts, not a single string; wrap it in a list"),
    ("calibration-ints", lambda c: _compress(c, calibration_data=[1, 2]),
     TypeError, r"calibration_data\[0\] is 1 \(int\).*or tokenized batches"),
    ("calibration-none-inside", lambda c: _compress(c, calibration_data=["a", None]),
     TypeError, r"calibration_data\[1\] is None \(NoneType\); every item must be a text"),
    ("calibration-dict", lambda c: _compress(c, calibration_data={"text": TEXTS}),
     TypeError, r"calibration_data is a dict.*datasets.Dataset.from_dict"),
    ("calibration-rows-without-text", lambda c: _compress(c, calibration_data=[{"t": "x"}]),
     TypeError, r"calibration_data\[0\] is a dict with keys \['t'\] and no 'text' text"),
    ("calibration-list-ids", lambda c: _compress(c, calibration_data=[{"input_ids": [[1, 2]]}]),
     TypeError, r"calibration_data\[0\]\['input_ids'\] is \[\[1, 2\]\] \(list\); tokenized batches hold tensors"),
    ("calibration-int", lambda c: _compress(c, calibration_data=5),
     TypeError, r"calibration_data must be a list of texts .*got 5 \(int\)"),
    ("calibration-datasetdict",
     lambda c: _compress(c, calibration_data=datasets.DatasetDict({"train": _dataset(text=TEXTS)})),
     TypeError, r"calibration_data is a DatasetDict with splits \['train'\]; pass one split"),
    ("calibration-empty", lambda c: _compress(c, calibration_data=[]),
     ValueError, r"calibration_data is empty; give at least one text"),
    ("task-dict", lambda c: _compress(c, task_data={"text": TEXTS}),
     TypeError, r"task_data must be labeled rows.*'text' and 'label'"),
    ("task-no-label", lambda c: _compress(c, task_data=[{"text": "a"}]),
     ValueError, r"task_data\[0\] = .* needs a 'text' text and a 'label'"),
    ("task-dataset-no-label", lambda c: _compress(c, task_data=_dataset(text=TEXTS)),
     ValueError, r"task_data has columns \['text'\]; it needs 'text' and 'label' \(missing \['label'\]\)"),
    # -- the model, its source and its tokenizer ---------------------------------------------------------------
    ("model-t5", lambda c: compress(_t5(), WQ(**RTN)),
     UnsupportedArchitectureError, r"T5Model is a 't5' model.*Supported families \(model_type\): \['bert', 'distil"),
    ("source-relative", lambda c: compress("my-model-dir"),
     FileNotFoundError,
     r"my-model-dir is not a local folder \(looked in /.*/my-model-dir\) and could not be loaded as a Hub id "
     r"\(offline: HF_HUB_OFFLINE=1"),
    ("source-dot", lambda c: compress("./x"),
     FileNotFoundError, r"\./x is not a local folder \(looked in /.*/x\), and it is not a Hub id"),
    ("source-nested", lambda c: compress("models/x"),
     FileNotFoundError, r"models/x is not a local folder \(looked in /.*models/x\) and could not be loaded as a Hub"),
    ("tokenizer-larger-than-embedding",
     lambda c: _compress(c, Head(fraction=0.25), tokenizer=c.tokenizer, calibration_data=TEXTS),
     ValueError, r"The tokenizer has 30522 tokens but the model's input embedding has 128 rows"),
    ("tokenizer-too-large-apply",
     lambda c: apply_compression(c.model(), Head(fraction=0.25), calibration_data=TEXTS, tokenizer=c.tokenizer),
     ValueError, r"tokenizer has 30522 tokens .* 128 rows"),
]  # fmt: skip


def test_the_table_is_large_and_distinct():
    assert len(ROWS) >= 60 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_refused_with_its_words(row, ctx):
    _, call, error, words = row
    with pytest.raises(error, match=words) as info:
        call(ctx)
    if error is ValueError:  # a wrong value, not a wrong type (WrongTypeError is both)
        assert not isinstance(info.value, TypeError), info.value


def test_unsupported_family_fails_before_writing_anything(tmp_path):
    with pytest.raises(UnsupportedArchitectureError):
        compress(_t5(), WQ(**RTN), output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_quantized_model_is_left_unchanged_by_a_refused_exclude(ctx):
    model = ctx.model()
    with pytest.raises(ValueError, match="matches no module"):
        apply_compression(model, WQ(**RTN, exclude_modules=["qeury"]))
    assert type(model.encoder.layer[0].attention.self.query) is torch.nn.Linear
