"""Embedding fidelity: how close a compressed model's sentence embeddings stay to the original model's.

A local `evaluate` module shipped with hf_compress (loaded by path, no Hub access needed).
"""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
Cosine similarity between paired vectors (sentence embeddings of the same text from a compressed model and from its
original). Returns the mean, the 5th percentile (the worst texts) and the minimum over all pairs. 1.0 means the
compressed model is indistinguishable from the original on those texts.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list[list[float]]`): embeddings from the compressed model, one vector per text.
    references (`list[list[float]]`): embeddings of the same texts from the original model.
Returns:
    cosine_mean (`float`), cosine_p5 (`float`), cosine_min (`float`).
Examples:
    >>> metric = evaluate.load("hf_compress/metrics/embedding_fidelity")
    >>> metric.compute(predictions=[[1.0, 0.0]], references=[[1.0, 0.0]])
    {'cosine_mean': 1.0, 'cosine_p5': 1.0, 'cosine_min': 1.0}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EmbeddingFidelity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Sequence(datasets.Value("float32")),
                }
            ),
        )

    def _compute(self, predictions, references):
        pred = np.asarray(predictions, dtype=np.float64)
        ref = np.asarray(references, dtype=np.float64)
        if pred.shape != ref.shape or pred.ndim != 2:
            raise ValueError(
                f"predictions and references must be [n, dim] with equal shapes, got {pred.shape} and {ref.shape}."
            )
        norms = np.linalg.norm(pred, axis=1) * np.linalg.norm(ref, axis=1)
        # A zero vector is maximally unfaithful unless both are zero.
        cos = np.where(norms > 0, (pred * ref).sum(axis=1) / np.maximum(norms, 1e-300), 0.0)
        cos = np.clip(cos, -1.0, 1.0)
        return {
            "cosine_mean": float(cos.mean()),
            "cosine_p5": float(np.percentile(cos, 5)),
            "cosine_min": float(cos.min()),
        }
