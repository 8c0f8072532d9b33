"""A layers x heads importance heatmap with the removed heads marked, for model cards and notebooks."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


__all__ = ["plot_head_importance", "head_importance_table"]

FILENAME = "head_importance.png"


def head_importance_table(model_or_recipe: Any) -> tuple[list[list[float | None]], set[tuple[int, int]]]:
    """The ``layers x heads`` scores and the ``(layer, head)`` pairs removed, from a pruned model or its recipe.

    Several head-pruning steps (gradual pruning) are merged: the latest score of each head is shown, and a head
    removed by any step is marked.
    """
    recipe = getattr(getattr(model_or_recipe, "config", None), "quantization_config", model_or_recipe)
    steps = recipe.find("head_pruning") if hasattr(recipe, "find") else []
    if not steps:
        raise ValueError(
            "No head pruning found: the model's recipe has no 'head_pruning' step. Prune with "
            "apply_compression(model, HeadPruningConfig(...), calibration_data=...) first."
        )
    scores: list[list[float | None]] | None = None
    removed: set[tuple[int, int]] = set()
    for step in steps:
        for layer, heads in (step.heads_to_prune or {}).items():
            removed.update((int(layer), head) for head in heads)
        if step.head_importance is not None:
            if scores is None:
                scores = [list(row) for row in step.head_importance]
            for layer, row in enumerate(step.head_importance):
                for head, value in enumerate(row):
                    if value is not None:
                        scores[layer][head] = value
    if scores is None:
        raise ValueError(
            "The heads were given explicitly (heads_to_prune=...), so no importance was computed; prune with "
            "fraction= or num_heads_to_prune= to get scores for the heatmap."
        )
    return scores, removed


def plot_head_importance(
    model_or_recipe: Any, save_directory: str | os.PathLike | None = None, *, filename: str = FILENAME
) -> Path | Any:
    """Draw the head-importance heatmap of a pruned model; removed heads are crossed out.

    Args:
        model_or_recipe (`PreTrainedModel` or `CompressionConfig`): a model pruned by hf_compress (also after
            `from_pretrained`: the scores travel in ``config.json``) or its recipe.
        save_directory (`str` or `os.PathLike`, *optional*): where to write `filename`, e.g. the folder the model
            was saved to. Without it, the matplotlib figure is returned (for notebooks).

    Returns:
        The path of the PNG, or the figure when `save_directory` is ``None``.

    ```py
    >>> model.save_pretrained("minilm-pruned")
    >>> plot_head_importance(model, "minilm-pruned")  # minilm-pruned/head_importance.png
    ```
    """
    import matplotlib

    if save_directory is not None:
        matplotlib.use("Agg", force=False)  # headless when writing files; notebooks keep their backend
    import matplotlib.pyplot as plt

    scores, removed = head_importance_table(model_or_recipe)
    layers, heads = len(scores), len(scores[0])
    grid = [[math.nan if v is None else v for v in row] for row in scores]
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * heads + 2), max(2.5, 0.4 * layers + 1.2)))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="importance (normalised per layer)")
    for layer, head in removed:
        ax.text(head, layer, "x", ha="center", va="center", color="red", fontsize=12, fontweight="bold")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_title(f"Head importance ({len(removed)} of {layers * heads} heads removed, marked x)")
    fig.tight_layout()
    if save_directory is None:
        return fig
    path = Path(save_directory) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
