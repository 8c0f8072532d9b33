"""Bad inputs, continued (issue #13): numeric ranges by hypothesis, the CLI (exit status 2 and one line on stderr for
each row of `CLI_ROWS`), and inputs that used to fail deep inside and now work (a model with 64 positions, budget
mode and 4-bit defaults on a 312-wide model, row dicts as calibration data). The table of bad inputs is in
`test_bad_inputs.py`.
"""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoConfig, AutoModel

from hf_compress import apply_compression, compress
from hf_compress.calibration import usable_length
from hf_compress.cli import main
from hf_compress.factorization import EmbeddingFactorizationConfig, LowRankLinearConfig
from hf_compress.pruning import FFNPruningConfig, HeadPruningConfig
from hf_compress.quantization import WeightQuantizationConfig


pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["a mail client for the terminal", "an image viewer", "a text editor with plugins", "tools for compilers"]
RTN = dict(bits=8, algorithm="rtn")
WQ, Head = WeightQuantizationConfig, HeadPruningConfig


def _t5():
    config = AutoConfig.for_model("t5", d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=64)
    return AutoModel.from_config(config).eval()


# -- hypothesis: numeric ranges ------------------------------------------------------------------------------------
outside_unit = st.one_of(st.floats(max_value=-1e-12), st.floats(min_value=1), st.just(math.nan))


@settings(max_examples=40, deadline=None)
@given(outside_unit)
def test_any_fraction_outside_0_1_raises(fraction):
    for cls in (HeadPruningConfig, FFNPruningConfig):
        with pytest.raises(ValueError, match=r"fraction must be a number in \[0, 1\)"):
            cls(fraction=fraction)


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=-(10**6), max_value=10**6).filter(lambda b: b not in (4, 8)))
def test_any_bits_but_4_and_8_raises(bits):
    with pytest.raises(ValueError, match=rf"bits must be 4 or 8, got {bits} \(int\)"):
        WeightQuantizationConfig(bits=bits)


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.booleans()))
def test_any_non_number_is_a_type_error(value):
    builds = (lambda: HeadPruningConfig(fraction=value), lambda: EmbeddingFactorizationConfig(energy=value),
              lambda: WeightQuantizationConfig(damp=value), lambda: LowRankLinearConfig(rank=4, min_saving=value))
    for build in builds:
        with pytest.raises(TypeError, match="must be a number|is the fraction"):
            build()


@settings(max_examples=30, deadline=None)
@given(st.one_of(st.floats(max_value=0), st.floats(min_value=1, exclude_min=True), st.just(math.nan)))
def test_any_energy_outside_0_1_raises(energy):
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        EmbeddingFactorizationConfig(energy=energy)


@settings(max_examples=30, deadline=None)
@given(st.integers(max_value=1))
def test_any_group_size_below_2_raises(group_size):
    with pytest.raises(ValueError, match="group_size must be an integer >= 2"):
        WeightQuantizationConfig(bits=4, group_size=group_size)


@pytest.fixture(scope="module")
def small():
    return tiny_model("bert")


@settings(max_examples=25, deadline=None)
@given(st.integers(max_value=-1))
def test_any_negative_latency_rounds_raises(small, rounds):
    with pytest.raises(ValueError, match=rf"latency_rounds must be an integer >= 0; got {rounds}\."):
        compress(small, WQ(**RTN), latency_rounds=rounds)


@settings(max_examples=25, deadline=None)
@given(st.integers(max_value=0))
def test_any_max_eval_texts_below_1_raises(small, count):
    with pytest.raises(ValueError, match=rf"max_eval_texts must be an integer >= 1; got {count}\."):
        compress(small, WQ(**RTN), max_eval_texts=count)


# -- the CLI: exit status 2 and one line ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-bad")
    tiny_model("bert").save_pretrained(root / "tiny")
    _t5().save_pretrained(root / "t5")
    (root / "bad.json").write_text("[{")
    (root / "rows.jsonl").write_text('{"text": "a"}\n')
    return root


FAST = ["--calibration", "none", "--eval-texts", "none", "--latency-rounds", "0"]
CLI_ROWS = [
    ("relative-missing", ["compress", "my-model-dir", *FAST], r"my-model-dir is not a local folder \(looked in"),
    ("latency-negative", ["compress", "{tiny}", *FAST, "--latency-rounds", "-1"],
     r"latency_rounds must be an integer >= 0; got -1"),
    ("budget-words", ["compress", "{tiny}", *FAST, "--budget", "ten"], r"budget must be megabytes.*got 'ten'"),
    ("push-no-slash", ["compress", "{tiny}", *FAST, "--push-to-hub", "noslash"],
     r"push_to_hub must be a Hub repo id 'user/name'"),
    ("max-samples-0", ["compress", "{tiny}", "--max-samples", "0"], r"--max-samples must be at least 1.*got 0"),
    ("head-fraction", ["compress", "{tiny}", *FAST, "--head-pruning-fraction", "1.5"],
     r"fraction must be a number in \[0, 1\).*got 1.5"),
    ("energy-range", ["compress", "{tiny}", *FAST, "--embedding-factorization-energy", "2"],
     r"energy .*in \(0, 1\].*got 2.0"),
    ("exclude-typo", ["compress", "{tiny}", *FAST, "--weight-quantization-algorithm", "rtn",
                      "--weight-quantization-exclude-modules", "qeury"],
     r"exclude_modules pattern 'qeury' matches no module"),
    ("recipe-bad-json", ["compress", "{tiny}", *FAST, "--recipe", "{root}/bad.json"], r"bad.json is not valid JSON"),
    ("t5", ["compress", "{root}/t5", *FAST], r"'t5' model, a family hf_compress does not support.*Supported families"),
    ("task-no-label", ["compress", "{tiny}", *FAST, "--task-data", "{root}/rows.jsonl"],
     r"rows.jsonl: expected JSON lines with 'text' and 'label'"),
    ("evaluate-missing", ["evaluate", "./gone", "--base", "./gone"], r"\./gone is not a local folder"),
    ("energy-word", ["compress", "{tiny}", "--embedding-factorization-energy", "high"],
     r"invalid float value: 'high'"),
]  # fmt: skip


@pytest.mark.parametrize("row", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input_is_one_line_and_exit_2(row, folders, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # default output folders land here (none is created on these errors)
    _, argv, words = row
    argv = [a.format(tiny=folders / "tiny", root=folders) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    err = capsys.readouterr().err
    lines = [line[line.index("hf-compress"):] for line in err.splitlines() if "error:" in line]  # past progress bars
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"hf-compress {argv[0]}: error:") and re.search(words, lines[0]), err
    assert list(tmp_path.iterdir()) == []


# -- inputs that used to fail deep inside now work -----------------------------------------------------------------
def test_usable_length_respects_positions_and_tokenizer(minilm_tokenizer):
    assert usable_length(tiny_model("bert", max_position_embeddings=64)) == 64
    assert usable_length(tiny_model("bert")) == 128  # 512 positions: the 128 default
    assert usable_length(tiny_model("roberta", max_position_embeddings=66)) == 64  # positions start at pad + 1
    assert usable_length(tiny_model("bert"), minilm_tokenizer, 1000) == 512


def test_model_with_64_positions_calibrates_measures_and_recovers(minilm_tokenizer):
    from hf_compress.pipeline.recovery import recover

    model = tiny_model("bert", vocab_size=minilm_tokenizer.vocab_size, max_position_embeddings=64)
    long_texts = [" ".join(TEXTS * 20)] * 4 + TEXTS
    result = compress(model, Head(fraction=0.25), WQ(bits=8, algorithm="gptq", calibration_samples=8),
                      calibration_data=long_texts, tokenizer=minilm_tokenizer, latency_rounds=1)  # fmt: skip
    assert result.report.latency["batch"] == [32, 64] and result.report.fidelity["texts"] == len(long_texts)
    student = apply_compression(tiny_model("bert", vocab_size=minilm_tokenizer.vocab_size, max_position_embeddings=64),
                                Head(fraction=0.25, importance="magnitude"))  # fmt: skip
    teacher = tiny_model("bert", vocab_size=minilm_tokenizer.vocab_size, max_position_embeddings=64)
    recover(student, teacher, long_texts, tokenizer=minilm_tokenizer, max_steps=1, keep_better=False)


def test_budget_mode_on_a_312_wide_model_picks_groups_that_divide_it():
    from hf_compress.pipeline.budget import Space, search_budget

    model = tiny_model("bert", hidden_size=312, num_attention_heads=12, intermediate_size=1200, num_hidden_layers=1,
                       vocab_size=512)  # fmt: skip
    space = Space.for_model(model)
    assert [name for name, _, _ in space.formats] == ["int8", "int4-g24"] and space.round_to == 24
    batches = [{"input_ids": torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(i))}
               for i in range(2)]  # fmt: skip
    configs, choice = search_budget(model, "5x", calibration_data=batches, eval_texts=None, tokenizer=None,
                                    max_measured=2)  # fmt: skip
    assert choice["chosen_settings"]["layers"] == "int4-g24"
    compressed = apply_compression(model, *configs, calibration_data=batches)
    assert compressed(**batches[0]).last_hidden_state.shape == (4, 16, 312)


def test_int4_default_group_divides_a_312_wide_model():
    model = tiny_model("bert", hidden_size=312, num_attention_heads=12, intermediate_size=1200, num_hidden_layers=1)
    apply_compression(model, WQ(bits=4, algorithm="rtn"))
    assert model.encoder.layer[0].attention.self.query.group_size == 26  # largest even divisor of 312 below 32
    assert model.encoder.layer[0].output.dense.group_size == 30  # 1200 = 30 * 40


def test_new_data_forms_are_accepted(minilm_tokenizer):
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)]  # task rows double as calibration texts
    model = tiny_model("bert", vocab_size=minilm_tokenizer.vocab_size)
    result = compress(model, Head(fraction=0.25), WQ(**RTN), calibration_data=rows, tokenizer=minilm_tokenizer,
                      latency_rounds=0)  # fmt: skip
    assert result.report.fidelity["texts"] == len(rows)
