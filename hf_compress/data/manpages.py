"""Sentences from the manual pages installed on this machine: held-out text of another domain than the Debian
package descriptions the benchmarks calibrate on.

The benchmarks measure fidelity on these sentences *and* on Debian test texts: compression tuned on one domain can
lose more elsewhere, and only a second source shows it. This is a measuring stick, never a source of defaults:
nothing in hf_compress is tuned on it.

The extraction is deterministic for a given set of installed pages: English pages of sections 1, 5 and 8
(``/usr/share/man/man{1,5,8}/*.gz``, no translations), visited in the order of a hash of their file names (so the
pages are spread over the alphabet and over packages), at most two pages of a command family (``gcloud`` ships
thousands), the prose of their DESCRIPTION section with the roff
markup stripped, split into sentences, a few per page.
"""

from __future__ import annotations

import gzip
import re
import zlib
from functools import lru_cache
from pathlib import Path


__all__ = ["MAN_ROOT", "man_pages_available", "load_man_sentences", "roff_to_text"]

MAN_ROOT = Path("/usr/share/man")
SECTIONS = ("man1", "man5", "man8")
_ESCAPES = [
    (re.compile(r"\\f(\[[^\]]*\]|\(..|.)"), ""),  # font changes \fB \fI \fR \fP \f(CW \f[B]
    (re.compile(r"\\s[+-]?\d+"), ""),  # size changes
    (re.compile(r"\\\*(\(..|\[[^\]]*\]|.)"), ""),  # strings \*(Aq \*[x]
    (re.compile(r"\\\((em|en)"), " - "),
    (re.compile(r"\\\((lq|rq|dq)"), '"'),
    (re.compile(r"\\\((oq|cq|aq)"), "'"),
    (re.compile(r"\\\(..|\\\[[^\]]*\]"), ""),  # other special characters
    (re.compile(r"\\[-e]"), lambda m: "-" if m.group(0) == "\\-" else "\\"),
    (re.compile(r"\\[&|^,/%:!0 ~]"), ""),  # zero-width and spacing escapes
    (re.compile(r"\\[a-zA-Z]"), ""),
]
_TEXT_MACROS = re.compile(r"^\.(B|I|BR|RB|IR|RI|BI|IB|SM|SB)\s+(.*)$")
_WORD = re.compile(r"[A-Za-z][a-z]+")


def man_pages_available(root: Path | str = MAN_ROOT) -> bool:
    """Whether English manual pages of sections 1, 5 or 8 are installed under `root`."""
    root = Path(root)
    return any(next((root / s).glob("*.gz"), None) is not None for s in SECTIONS if (root / s).is_dir())


def roff_to_text(source: str, section: str = "DESCRIPTION") -> list[str]:
    """Paragraphs of plain text of one roff (man macro) page: the named section only (all sections when None)."""
    paragraphs: list[str] = []
    current: list[str] = []
    inside = section is None
    skipping = False  # inside .nf / .EX (code, tables): no prose there

    def flush() -> None:
        if current:
            paragraphs.append(" ".join(current))
            current.clear()

    for raw in source.splitlines():
        line = raw.rstrip()
        if line.startswith((".\\\"", "'\\\"", '.\\"')):
            continue
        if line.startswith(".SH") or line.startswith(".SS"):
            flush()
            title = line[3:].strip().strip('"').upper()
            if line.startswith(".SH"):
                inside = section is None or title == section
            continue
        if line.startswith((".nf", ".EX", ".TS", ".EQ")):
            flush()
            skipping = True
            continue
        if line.startswith((".fi", ".EE", ".TE", ".EN")):
            skipping = False
            continue
        if not inside or skipping:
            continue
        macro = _TEXT_MACROS.match(line)
        if macro:
            line = macro.group(2).replace('"', "")
        elif line.startswith((".", "'")):
            flush()  # .PP, .TP, .IP, .RS ...: a paragraph break
            continue
        text = _strip_escapes(line).strip()
        if not text:
            flush()
            continue
        current.append(text)
    flush()
    return paragraphs


def _strip_escapes(line: str) -> str:
    for pattern, replacement in _ESCAPES:
        line = pattern.sub(replacement, line)
    return line.replace("\\", "")


def _sentences(paragraph: str) -> list[str]:
    """Prose sentences of 6 to 40 words, mostly words (not option lists or paths)."""
    paragraph = re.sub(r"\s+", " ", paragraph).strip()
    out = []
    for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph):
        words = sentence.split()
        if not 6 <= len(words) <= 40 or not sentence[0].isupper() or sentence[-1] not in ".!?":
            continue
        if len(_WORD.findall(sentence)) < 0.7 * len(words):
            continue
        out.append(sentence)
    return out


@lru_cache(maxsize=8)
def _collect(root: str, limit: int, per_page: int) -> tuple[str, ...]:
    files = sorted(p for s in SECTIONS if (Path(root) / s).is_dir() for p in (Path(root) / s).glob("*.gz"))
    files.sort(key=lambda p: (zlib.crc32(p.name.encode()), p.name))  # spread over packages, reproducibly
    seen: set[str] = set()
    chosen: list[str] = []
    families: dict[str, int] = {}
    for path in files:
        if path.is_symlink():  # an alias of a page already listed under its own name
            continue
        # At most 2 pages of one command family (gcloud alone ships 16 000 pages): variety of authors and topics.
        family = re.split(r"[_.-]", path.name, maxsplit=1)[0]
        if families.get(family, 0) >= 2:
            continue
        try:
            source = gzip.decompress(path.read_bytes()).decode("utf-8", errors="replace")
        except (OSError, EOFError, zlib.error):
            continue
        if source.lstrip().startswith(".so "):  # a redirect to another page
            continue
        taken = 0
        families[family] = families.get(family, 0) + 1
        for paragraph in roff_to_text(source):
            for sentence in _sentences(paragraph):
                if sentence in seen:
                    continue
                seen.add(sentence)
                chosen.append(sentence)
                taken += 1
                if taken >= per_page:
                    break
            if taken >= per_page:
                break
        if len(chosen) >= limit:
            break
    return tuple(chosen[:limit])


def load_man_sentences(limit: int = 240, per_page: int = 2, root: Path | str = MAN_ROOT) -> list[str]:
    """`limit` sentences from the installed manual pages (at most `per_page` from each page), deterministic.

    Raises `FileNotFoundError` when no English pages of sections 1, 5 or 8 are installed (Docker images often strip
    them: ``apt-get install man-db manpages`` and unminimize bring them back), and `ValueError` when fewer than
    `limit` sentences could be found.
    """
    from ..validation import check_number

    check_number("limit", limit, low=1, integer=True)
    check_number("per_page", per_page, low=1, integer=True)
    if not man_pages_available(root):
        raise FileNotFoundError(
            f"No manual pages under {Path(root)}/{{{','.join(SECTIONS)}}}/*.gz: the other-domain texts come from "
            "the installed man pages. Install some (apt-get install manpages man-db) or measure on other texts."
        )
    sentences = list(_collect(str(root), limit, per_page))
    if len(sentences) < limit:
        raise ValueError(
            f"Only {len(sentences)} sentences found in the manual pages under {root}, fewer than limit={limit}. "
            "Ask for fewer, or allow more per page (per_page)."
        )
    return sentences
