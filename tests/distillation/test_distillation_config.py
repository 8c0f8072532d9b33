"""DistillationArguments: validation before training, layer-map parsing, CLI generation, pickling."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import HfArgumentParser

from hf_compress.distillation import DistillationArguments
from hf_compress.distillation.config import parse_layer_map, resolve_layer_map


def make(tmp_path, **kwargs):
    return DistillationArguments(output_dir=str(tmp_path), report_to=[], **kwargs)


@pytest.mark.parametrize("temperature", [0, -1.0])
def test_temperature_must_be_positive(tmp_path, temperature):
    with pytest.raises(ValueError, match=r"temperature must be > 0, got"):
        make(tmp_path, temperature=temperature)


def test_all_zero_weights_rejected(tmp_path):
    zeros = dict(alpha_kl=0, alpha_task=0, alpha_cos=0, alpha_mse=0, alpha_attn=0, alpha_pooled=0)
    with pytest.raises(ValueError, match="All loss weights are zero"):
        make(tmp_path, **zeros)
    assert make(tmp_path, **{**zeros, "alpha_pooled": 0.5}).alpha_pooled == 0.5


def test_negative_and_non_numeric_weights_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"must be >= 0.*alpha_cos"):
        make(tmp_path, alpha_cos=-1)
    with pytest.raises(TypeError, match="alpha_kl must be a finite number"):
        make(tmp_path, alpha_kl="1")
    with pytest.raises(TypeError, match="finite"):
        make(tmp_path, alpha_mse=float("nan"))


def test_teacher_dtype_and_projection_lr_checked(tmp_path):
    with pytest.raises(ValueError, match="teacher_dtype must be one of"):
        make(tmp_path, teacher_dtype="int8")
    assert str(make(tmp_path, teacher_dtype="bf16").teacher_torch_dtype) == "torch.bfloat16"
    with pytest.raises(ValueError, match="projection_lr must be > 0"):
        make(tmp_path, projection_lr=0.0)


@pytest.mark.parametrize("empty", [{}, "", []])
def test_empty_layer_map_rejected(tmp_path, empty):
    with pytest.raises(ValueError, match="layer_map is empty"):
        make(tmp_path, layer_map=empty)


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, "uniform"),
        ("last", "last"),
        ({"1": "2", 3: 6}, {1: 2, 3: 6}),
        ('{"1": 2, "2": 4}', {1: 2, 2: 4}),
        ("1:2, 2:4,3:6", {1: 2, 2: 4, 3: 6}),
        ([[1, 3]], {1: 3}),
    ],
)
def test_layer_map_forms(value, expected):
    assert parse_layer_map(value) == expected


def test_layer_map_errors():
    with pytest.raises(ValueError, match="not understood"):
        parse_layer_map("every-other")
    with pytest.raises(ValueError, match="integer"):
        parse_layer_map({"a": 1})
    with pytest.raises(ValueError, match=">= 0"):
        parse_layer_map({1: -1})
    with pytest.raises(ValueError, match=r"out of range.*student has hidden states 0\.\.3 and the teacher 0\.\.6"):
        resolve_layer_map({4: 6}, 3, 6)


def test_resolved_presets():
    assert resolve_layer_map("uniform", 3, 6) == {1: 2, 2: 4, 3: 6}
    assert resolve_layer_map("uniform", 4, 4) == {1: 1, 2: 2, 3: 3, 4: 4}
    assert resolve_layer_map("last", 3, 12) == {3: 12}


@given(st.integers(1, 48), st.integers(1, 48))
def test_uniform_map_is_monotone_and_ends_at_the_last_layers(student, teacher):
    mapping = resolve_layer_map("uniform", student, teacher)
    assert sorted(mapping) == list(range(1, student + 1))
    values = [mapping[k] for k in sorted(mapping)]
    assert values == sorted(values) and values[-1] == teacher and all(0 <= v <= teacher for v in values)


@given(st.dictionaries(st.integers(0, 64), st.integers(0, 64), min_size=1))
def test_layer_map_text_round_trip(mapping):
    text = ",".join(f"{s}:{t}" for s, t in mapping.items())
    assert parse_layer_map(text) == mapping


def test_cli_is_generated_from_the_fields(tmp_path):
    parser = HfArgumentParser(DistillationArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--alpha_kl", "0.5", "--temperature", "4", "--layer_map", "1:2,2:4",
         "--teacher_dtype", "bf16", "--report_to", "none"]
    )  # fmt: skip
    assert (args.alpha_kl, args.temperature, args.layer_map, args.teacher_dtype) == (0.5, 4.0, {1: 2, 2: 4}, "bf16")
    help_text = parser.format_help()
    assert "soft-target" in help_text and "layer_map" in help_text


def test_args_pickle_and_json(tmp_path):
    args = make(tmp_path, layer_map={1: 2})
    assert pickle.loads(pickle.dumps(args)).layer_map == {1: 2}  # the Trainer saves training_args.bin this way
    assert '"alpha_kl": 1.0' in args.to_json_string()
