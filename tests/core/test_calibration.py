"""Calibration data in the forms users have it: texts, a datasets.Dataset, token batches."""

from __future__ import annotations

import datasets
import pytest
import torch

from hf_compress.calibration import calibration_batches


def test_texts_and_dataset_give_the_same_batches(minilm, minilm_tokenizer, debian_texts):
    from_texts = list(calibration_batches(minilm, debian_texts[:10], tokenizer=minilm_tokenizer, batch_size=4))
    dataset = datasets.Dataset.from_dict({"text": debian_texts[:10]})
    from_dataset = list(calibration_batches(minilm, dataset, batch_size=4))  # tokenizer found from the checkpoint
    assert [b["input_ids"].shape[0] for b in from_texts] == [4, 4, 2]
    for a, b in zip(from_texts, from_dataset):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_bad_calibration_data(minilm, minilm_tokenizer):
    with pytest.raises(TypeError, match="not a single string"):
        list(calibration_batches(minilm, "one text", tokenizer=minilm_tokenizer))
    with pytest.raises(ValueError, match="empty"):
        list(calibration_batches(minilm, [], tokenizer=minilm_tokenizer))
    with pytest.raises(ValueError, match="columns"):
        list(calibration_batches(minilm, datasets.Dataset.from_dict({"body": ["x"]})))
