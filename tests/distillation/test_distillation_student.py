"""make_student: layer copying for every supported family, config update, reload, cached generation, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_inputs, tiny_model
from hypothesis import given
from hypothesis import strategies as st
from transformers import AutoModel, AutoModelForCausalLM

from hf_compress import apply_compression, get_adapter
from hf_compress.distillation import default_student_layers, make_student


def test_every_family_copies_the_chosen_layers_and_reloads(family, tmp_path):
    teacher = tiny_model(family, num_hidden_layers=4)
    student = make_student(teacher, layers=[1, 3])
    adapter = get_adapter(teacher)
    assert len(adapter.layer_modules(student)) == 2 and student.config.num_hidden_layers == 2
    assert len(adapter.layer_modules(teacher)) == 4 and teacher.config.num_hidden_layers == 4  # teacher untouched
    for new, old in zip(adapter.layer_modules(student), [1, 3]):
        teacher_layer = adapter.layer_modules(teacher)[old]
        for (name, p), (_, q) in zip(new.state_dict().items(), teacher_layer.state_dict().items()):
            assert torch.equal(p, q), name
            assert p.data_ptr() != q.data_ptr()  # a copy, not shared storage
    inputs = tiny_inputs(family)
    out = student(**inputs, output_hidden_states=True)
    assert len(out.hidden_states) == 3
    student.save_pretrained(tmp_path)
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**inputs).last_hidden_state, out.last_hidden_state)


def test_default_is_half_the_layers_evenly_spread():
    teacher = tiny_model("bert", num_hidden_layers=6)
    student = make_student(teacher)
    assert student.config.num_hidden_layers == 3
    assert default_student_layers(12, 6) == [0, 2, 4, 7, 9, 11]  # the layers DistilBERT copied from BERT-base
    assert default_student_layers(6, 3) == [0, 3, 5]
    assert default_student_layers(6, 1) == [5]


@given(st.integers(1, 40), st.data())
def test_default_layers_are_increasing_and_span_the_teacher(teacher_layers, data):
    count = data.draw(st.integers(1, teacher_layers))
    layers = default_student_layers(teacher_layers, count)
    assert len(layers) == count and len(set(layers)) == count and layers == sorted(layers)
    assert layers[-1] == teacher_layers - 1 and (count == 1 or layers[0] == 0)


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_decoder_student_generates_with_a_cache(family):
    # Kept layers are renumbered (layer_idx), otherwise the KV cache of a 2-layer model is indexed at 3.
    teacher = tiny_model(family, AutoModelForCausalLM, num_hidden_layers=4)
    student = make_student(teacher, layers=[0, 3])
    attn = [m for m in student.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    assert sorted({m.layer_idx for m in attn}) == [0, 1]
    prompt = torch.tensor([[1, 5, 9]])
    cached = student.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True)
    uncached = student.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == 7
    if getattr(teacher.config, "layer_types", None) is not None:
        assert len(student.config.layer_types) == 2


def test_bad_arguments_are_clear_errors():
    teacher = tiny_model("bert", num_hidden_layers=4)
    with pytest.raises(ValueError, match=r"out of range: the teacher has layers 0\.\.3"):
        make_student(teacher, layers=[0, 4])
    with pytest.raises(ValueError, match="strictly increasing"):
        make_student(teacher, layers=[2, 1])
    with pytest.raises(ValueError, match="layers is empty"):
        make_student(teacher, layers=[])
    with pytest.raises(ValueError, match=r"num_layers must be an int in 1\.\.4"):
        make_student(teacher, num_layers=5)
    with pytest.raises(ValueError, match="disagrees"):
        make_student(teacher, num_layers=3, layers=[0, 1])


def test_compressed_teacher_is_refused():
    import _toy_technique

    teacher = apply_compression(tiny_model("bert"), _toy_technique.ToyFFNSliceConfig(keep=8))
    with pytest.raises(ValueError, match="uncompressed teacher"):
        make_student(teacher, num_layers=1)


def test_real_minilm_student(minilm, minilm_tokenizer, debian_texts):
    student = make_student(minilm, layers=[0, 2, 4])
    assert student.config.num_hidden_layers == 3
    batch = minilm_tokenizer(debian_texts[:4], padding=True, return_tensors="pt")
    with torch.no_grad():
        teacher_states = minilm(**batch, output_hidden_states=True).hidden_states
        student_states = student(**batch, output_hidden_states=True).hidden_states
    # The embeddings are shared and the first student layer is teacher layer 0: identical outputs.
    torch.testing.assert_close(student_states[1], teacher_states[1])
