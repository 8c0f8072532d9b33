"""A layers x heads importance heatmap with the removed heads marked, for model cards and notebooks."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any


__all__ = ["plot_head_importance", "head_importance_table"]

FILENAME = "head_importance.png"


def head_importance_table(source: Any) -> tuple[list[list[float | None]] | None, set[tuple[int, int]], int]:
    """Scores (``layers x heads``, ``None`` when none were computed), removed ``(layer, head)`` pairs, head count.

    `source` is a pruned model, its recipe, or one `HeadPruningConfig` (or a list of them). Several head-pruning
    steps (gradual pruning) are merged: the latest score of each head is kept, a head removed by any step is marked.
    """
    recipe = getattr(getattr(source, "config", None), "quantization_config", source)
    if hasattr(recipe, "find"):
        steps = recipe.find("head_pruning")
    else:
        steps = [
            s for s in (recipe if isinstance(recipe, (list, tuple)) else [recipe]) if hasattr(s, "heads_to_prune")
        ]
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
        for layer, row in enumerate(step.head_importance or []):
            if scores is None:
                scores = [list(r) for r in step.head_importance]
            scores[layer] = [new if new is not None else old for new, old in zip(row, scores[layer])]
    config = getattr(getattr(source, "config", None), "get_text_config", None)
    if scores is not None:
        heads = len(scores[0])
    elif config is not None:
        heads = int(config().num_attention_heads)
    else:
        heads = max((h for _, h in removed), default=0) + 1
    return scores, removed, heads


def plot_head_importance(
    model_or_recipe: Any, save_directory: str | os.PathLike | None = None, *, filename: str = FILENAME
) -> Path | Any:
    """Draw the head-importance heatmap of a pruned model; removed heads are crossed out.

    Args:
        model_or_recipe (`PreTrainedModel`, `CompressionConfig` or `HeadPruningConfig`): a model pruned by
            hf_compress (also after `from_pretrained`: the scores travel in ``config.json``), its recipe, or the
            resolved head-pruning config(s). Heads given explicitly (no scores) are drawn as a kept/removed layout.
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

    scores, removed, heads = head_importance_table(model_or_recipe)
    if scores is None:  # heads given explicitly: show the layout only
        layers = max((layer for layer, _ in removed), default=0) + 1
        if hasattr(model_or_recipe, "config"):
            layers = int(model_or_recipe.config.get_text_config().num_hidden_layers)
        scores = [[None] * heads for _ in range(layers)]
    layers = len(scores)
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
