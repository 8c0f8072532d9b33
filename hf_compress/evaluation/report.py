"""The evaluation report produced by every compression (sizes, latency, fidelity and task metrics, before and after)
and its text form; the measuring code is in `hf_compress.evaluation.measure`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


__all__ = ["CompressionReport", "CATEGORIES"]

CATEGORIES = ("embeddings", "attention", "ffn", "other")


@dataclass
class CompressionReport:
    """Everything measured about one compression; `to_markdown` renders the before/after table."""

    base_model: str
    recipe: dict[str, Any]
    before: dict[str, Any]  # {"params", "bytes", "breakdown": {category: {"params", "bytes"}}}
    after: dict[str, Any]
    latency: dict[str, Any] | None = None  # {"ratio", "before_ms", "after_ms", "device", "batch"}
    fidelity: dict[str, Any] | None = None  # {"cosine_mean", "cosine_p5", "cosine_min", "texts"}
    task: dict[str, Any] | None = None  # {"metric", "before": {...}, "after": {...}, "mode", "examples"}
    checkpoint_bytes: int | None = None
    choice: dict[str, Any] | None = None  # budget mode: what was chosen and why, every measured candidate
    recovery: dict[str, Any] | None = None  # recovery distillation: its budget, steps, seconds, held-out cosine
    seconds: dict[str, float] = field(default_factory=dict)
    card_info: dict[str, Any] = field(default_factory=dict)  # repo id and reproduce command the card was made with

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def size_ratio(self) -> float:
        return self.after["bytes"] / self.before["bytes"]

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(quantity, before, after, change) rows of the summary table."""
        b, a = self.before, self.after
        rows = [
            ("parameters", f"{b['params'] / 1e6:.2f}M", f"{a['params'] / 1e6:.2f}M", _ratio(a["params"], b["params"])),
            ("size (MB)", _mb(b["bytes"]), _mb(a["bytes"]), _ratio(a["bytes"], b["bytes"])),
        ]
        for cat in CATEGORIES:
            bb, ab = b["breakdown"][cat]["bytes"], a["breakdown"][cat]["bytes"]
            if bb or ab:
                rows.append((f"  {cat} (MB)", _mb(bb), _mb(ab), _ratio(ab, bb)))
        if self.checkpoint_bytes is not None:
            rows.append(("checkpoint on disk (MB)", "", _mb(self.checkpoint_bytes), ""))
        if self.latency:
            lat = self.latency
            rows.append((f"latency ({lat['device']}, ms)", f"{lat['before_ms']:.1f}", f"{lat['after_ms']:.1f}",
                         f"{lat['ratio']:.2f}x"))  # fmt: skip
        if self.fidelity:
            fid = self.fidelity
            rows.append((f"cosine to original ({fid['texts']} texts)", "1.0000", f"{fid['cosine_mean']:.4f}",
                         f"p5 {fid['cosine_p5']:.4f}"))  # fmt: skip
        if self.recovery:
            rec = self.recovery
            budget = " / ".join(x for x in (f"{rec['max_seconds']:g} s" if rec.get("max_seconds") else "",
                                            f"{rec['max_steps']} steps" if rec.get("max_steps") else "") if x)
            before, after = rec.get("held_out_cosine_before"), rec.get("held_out_cosine_after")
            rows.append((f"recovery ({budget} budget: {rec['steps']} steps, {rec['seconds']:.0f} s)",
                         _num(before), _num(after), "held-out cosine" + ("" if rec.get("kept_trained", True)
                                                                          else ", not kept")))  # fmt: skip
        if self.task:
            for key, after in self.task["after"].items():
                before = self.task["before"].get(key)
                rows.append((f"{self.task['metric']}/{key}", _num(before), _num(after), _delta(after, before)))
        return rows

    def to_markdown(self) -> str:
        lines = ["| | before | after | change |", "|---|---|---|---|"]
        lines += [f"| {q.strip()} | {b} | {a} | {c} |" for q, b, a, c in self.rows()]
        return "\n".join(lines)

    def to_text(self) -> str:
        """A fixed-width table for terminals."""
        rows = [("", "before", "after", "change"), *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        out = [
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows
        ]
        return "\n".join([out[0], "-" * len(out[0]), *out[1:]])


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f}"


def _ratio(after: float, before: float) -> str:
    return f"{after / before:.3f}x" if before else ""


def _num(v: Any) -> str:
    return "" if v is None else f"{v:.4f}"


def _delta(after: float | None, before: float | None) -> str:
    return "" if after is None or before is None else f"{after - before:+.4f}"


# -- sizes ---------------------------------------------------------------------------------------------------------
