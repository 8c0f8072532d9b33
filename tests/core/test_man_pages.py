"""The other-domain texts of the benchmarks: sentences from installed manual pages (hf_compress.data.manpages)."""

from __future__ import annotations

import gzip

import pytest

from hf_compress.data.manpages import load_man_sentences, man_pages_available, roff_to_text


PAGE = r""".\" a comment line
.TH DEMO 1 "2024" "demo 1.0" "User Commands"
.SH NAME
demo \- show what the parser keeps
.SH SYNOPSIS
.B demo
[\fI\,OPTION\/\fR]...
.SH DESCRIPTION
.B Demo
reads each \fIfile\fR and writes its lines to standard output in a friendly way.
Options such as \fB\-\-all\fR change what it prints.
.PP
.nf
demo \-\-all file.txt
.fi
When no file is given, it reads the standard input until the end of the stream.
.SH OPTIONS
.TP
\fB\-a\fR, \fB\-\-all\fR
print all the lines of every file given on the command line.
"""


def test_roff_markup_is_stripped_and_only_the_description_kept():
    paragraphs = roff_to_text(PAGE)
    assert paragraphs[0] == ("Demo reads each file and writes its lines to standard output in a friendly way. "
                             "Options such as --all change what it prints.")  # fmt: skip
    assert paragraphs[1] == "When no file is given, it reads the standard input until the end of the stream."
    assert not any("demo --all file.txt" in p or "print all the lines" in p for p in paragraphs)  # code, OPTIONS


def test_sentences_are_deterministic_and_spread_over_pages(tmp_path):
    (tmp_path / "man1").mkdir()
    for name in ("alpha", "beta", "gamma", "alpha-extra", "alpha-more"):
        text = PAGE.replace("Demo", name.capitalize()).replace("friendly way", f"{name} way")
        (tmp_path / "man1" / f"{name}.1.gz").write_bytes(gzip.compress(text.encode()))
    (tmp_path / "man1" / "link.1.gz").write_bytes(gzip.compress(b".so man1/alpha.1\n"))
    first = load_man_sentences(6, per_page=2, root=tmp_path)
    assert first == load_man_sentences(6, per_page=2, root=tmp_path) and len(set(first)) == 6  # repeats dropped
    # at most two pages of one command family ("alpha", "alpha-extra", "alpha-more")
    assert sum(s.startswith("Alpha") for s in first) == 2
    with pytest.raises(ValueError, match="Only 6 sentences found .* fewer than limit=50"):
        load_man_sentences(50, per_page=2, root=tmp_path)
    with pytest.raises(FileNotFoundError, match="No manual pages under"):
        load_man_sentences(5, root=tmp_path / "none")


@pytest.mark.skipif(not man_pages_available(), reason="no manual pages installed under /usr/share/man (man1/5/8)")
def test_installed_pages_give_prose_sentences():
    sentences = load_man_sentences(40)
    assert len(sentences) == 40 and all(6 <= len(s.split()) <= 40 and "\\f" not in s for s in sentences)
