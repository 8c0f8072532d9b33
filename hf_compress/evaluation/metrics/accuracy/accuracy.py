"""Accuracy and macro-F1 of class predictions: a local `evaluate` module shipped with hf_compress (no Hub needed)."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Fraction of predictions equal to the reference labels, and the macro-averaged F1 over the classes present in the
references (every class weighs the same, so a model that ignores rare classes scores low).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[int]`): predicted class indices.
    references (`list[int]`): true class indices.
Returns:
    accuracy (`float`), macro_f1 (`float`).
Examples:
    >>> metric = evaluate.load("hf_compress/metrics/accuracy")
    >>> metric.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666, 'macro_f1': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        pred = np.asarray(predictions)
        ref = np.asarray(references)
        f1s = []
        for label in np.unique(ref):
            tp = np.sum((pred == label) & (ref == label))
            precision = tp / max(np.sum(pred == label), 1)
            recall = tp / max(np.sum(ref == label), 1)
            f1s.append(0.0 if tp == 0 else 2 * precision * recall / (precision + recall))
        return {"accuracy": float((pred == ref).mean()), "macro_f1": float(np.mean(f1s))}
