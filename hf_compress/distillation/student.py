"""Build a shallower student from its teacher by copying a subset of its layers (DistilBERT's initialisation)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from ..architectures import get_adapter
from ..plugin import get_recipe
from ..utils import replace_module


if TYPE_CHECKING:
    from transformers import PreTrainedModel


__all__ = ["make_student", "default_student_layers"]


def default_student_layers(teacher_layers: int, num_layers: int) -> list[int]:
    """`num_layers` teacher layer indices spread evenly from the first layer to the last.

    For 6 of 12 layers this is ``[0, 2, 4, 7, 9, 11]``, the layers DistilBERT copied from BERT-base; for 3 of 6 it is
    ``[0, 3, 5]``. Keeping the first and the last layer keeps the layers closest to the embeddings and to the head.
    """
    if num_layers == 1:
        return [teacher_layers - 1]
    step = (teacher_layers - 1) / (num_layers - 1)
    return [int(i * step + 0.5) for i in range(num_layers)]


def make_student(
    teacher: PreTrainedModel, num_layers: int | None = None, layers: list[int] | None = None
) -> PreTrainedModel:
    """A copy of `teacher` that keeps only some of its transformer layers, with their trained weights.

    Everything else (embeddings, final norm, pooler, task head, config) is copied unchanged and the config's
    ``num_hidden_layers`` is updated, so the student saves and reloads like any model of its family. Distilling
    from the teacher then recovers most of the quality lost with the removed layers (DistilBERT kept 97 % of BERT's
    GLUE score with 6 of its 12 layers initialised this way).

    Args:
        teacher (`PreTrainedModel`):
            An uncompressed model of a family in `hf_compress.architectures.ADAPTERS` (any head class). It is not changed.
        num_layers (`int`, *optional*):
            How many layers the student keeps; defaults to half of the teacher's (rounded down, at least 1). The
            layers are spread evenly and include the first and the last (see `default_student_layers`).
        layers (`list[int]`, *optional*):
            Exactly which teacher layers to copy, in increasing order (0-based). Overrides the even spread.

    Returns:
        `PreTrainedModel`: a new model of the teacher's class.

    ```py
    >>> from hf_compress.distillation import make_student
    >>> teacher = AutoModelForSequenceClassification.from_pretrained("my-finetuned-minilm")  # 6 layers
    >>> student = make_student(teacher, num_layers=3)  # layers [0, 3, 5]
    >>> student = make_student(teacher, layers=[0, 2, 4])  # every other layer
    ```
    """
    if get_recipe(teacher) is not None:
        raise ValueError(
            "make_student needs an uncompressed teacher: the compression recipe of this model refers to its layers "
            "by index, and dropping layers would break it. Make the student from the original model, then "
            "compress the student (and distil it from the original to recover quality)."
        )
    adapter = get_adapter(teacher)
    teacher_layers = len(adapter.layer_modules(teacher))
    if layers is None:
        if num_layers is None:
            num_layers = max(1, teacher_layers // 2)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= teacher_layers:
            raise ValueError(
                f"num_layers must be an int in 1..{teacher_layers} (the teacher's depth), got {num_layers!r}."
            )
        layers = default_student_layers(teacher_layers, num_layers)
    else:
        layers = list(layers)
        if not layers:
            raise ValueError("layers is empty; give the teacher layer indices to copy, e.g. [0, 2, 4].")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
            raise TypeError(f"layers must be a list of ints, got {layers!r}.")
        out_of_range = [i for i in layers if not 0 <= i < teacher_layers]
        if out_of_range:
            raise ValueError(
                f"layers {out_of_range} are out of range: the teacher has layers 0..{teacher_layers - 1}."
            )
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ValueError(f"layers must be strictly increasing without repeats, got {layers}.")
        if num_layers is not None and num_layers != len(layers):
            raise ValueError(f"num_layers={num_layers} disagrees with the {len(layers)} layers given in {layers}.")

    student = copy.deepcopy(teacher)
    student_list = adapter.layer_modules(student)
    kept = nn.ModuleList([student_list[i] for i in layers])
    replace_module(student.base_model, adapter.layers, kept)
    _renumber(kept)
    _update_config(student.config.get_text_config(), layers, teacher_layers)
    if student.config.get_text_config() is not student.config:
        _update_config(student.config, layers, teacher_layers)
    return student




def _renumber(layers: nn.ModuleList) -> None:
    """Give every ``layer_idx`` its new position: decoder caches index their per-layer state by it."""
    for new_index, layer in enumerate(layers):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_index


def _update_config(config, layers: list[int], teacher_layers: int) -> None:
    config.num_hidden_layers = len(layers)  # attribute_map turns this into n_layer / n_layers where needed
    # Per-layer lists (e.g. layer_types of Llama/Qwen2/Mistral: full or sliding attention) follow the kept layers.
    for name in ("layer_types",):
        value = getattr(config, name, None)
        if isinstance(value, (list, tuple)) and len(value) == teacher_layers:
            setattr(config, name, [value[i] for i in layers])
