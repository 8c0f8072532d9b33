"""The evaluation report (`hf_compress.evaluation.report`) and the size measurement (`hf_compress.evaluation.measure`)
on tiny models: the breakdown adds up, a quantized model is smaller where it was quantized, and the report's dict
form rebuilds it."""

from __future__ import annotations

from conftest import tiny_model

from hf_compress import apply_compression
from hf_compress.evaluation.measure import size_breakdown
from hf_compress.evaluation.report import CATEGORIES, CompressionReport
from hf_compress.quantization import WeightQuantizationConfig


def test_breakdown_adds_up_and_quantization_shrinks_attention_and_ffn():
    before = size_breakdown(tiny_model("bert"))
    assert set(before["breakdown"]) == set(CATEGORIES)
    assert sum(c["params"] for c in before["breakdown"].values()) == before["params"]
    assert sum(c["bytes"] for c in before["breakdown"].values()) == before["bytes"]
    after = size_breakdown(apply_compression(tiny_model("bert"), WeightQuantizationConfig(bits=8, algorithm="rtn")))
    assert after["params"] == before["params"]  # counted as the uncompressed model would
    for category in ("attention", "ffn"):
        assert after["breakdown"][category]["bytes"] < before["breakdown"][category]["bytes"]


def test_report_dict_round_trip_and_text():
    sizes = size_breakdown(tiny_model("bert"))
    report = CompressionReport(base_model="tiny", recipe={"techniques": []}, before=sizes, after=sizes)
    assert CompressionReport(**report.to_dict()) == report
    assert report.size_ratio == 1.0
    assert "parameters" in report.to_text()
