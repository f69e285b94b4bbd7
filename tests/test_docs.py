"""The project's notes live in `docs/`, and every reference to them resolves.

Code and docs cite a section as `docs/<file>.md §N` (N such as 3 or 3.1; lists `§2.5, §6.10` and ranges
`§3.1-3.2` too) or as `docs/<file>.md#anchor` (GitHub's heading slug). Section §N exists when a heading of that
file starts with N followed by "." or a space: `## 3. Cache state`, `### 3.1 What each layer keeps`. Inside a docs
file a bare `§N` means a section of that same file. The design notes kept outside the repository are never cited.
"""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

SCANNED_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".tpl", ".toml", ".txt", ".json")
SKIPPED_DIRS = {"__pycache__", "build", "dist", "node_modules"}
DOCS = "docs"
# Notes outside the repository that comments used to cite (spelled in two parts so this file does not cite them).
OUTSIDE_NOTES = ("V4_MODEL" ".md", "ARCHITECTURE" ".md")

_OUTSIDE = re.compile("|".join(re.escape(n) for n in OUTSIDE_NOTES))
_NUMBER = r"\d+(?:\.\d+)*"
_SECTION = rf"§\s?(?P<first>{_NUMBER})(?:\s?[-–]\s?(?P<last>{_NUMBER}))?"
_SECTION_LIST = rf"(?:\s*(?:,|/|and)?\s*§\s?{_NUMBER}(?:\s?[-–]\s?{_NUMBER})?)+"
_REFERENCE = re.compile(rf"{DOCS}/(?P<file>[\w.-]+?\.md)`?(?:#(?P<anchor>[\w-]+)|(?P<sections>{_SECTION_LIST}))?")
_HEADING = re.compile(r"^#{1,6}\s+(?P<text>.+?)\s*#*\s*$")
_THIS_FILE = Path(__file__).resolve()  # its synthetic references are test data


def scanned_files(root: Path, include_docs: bool = True) -> list[Path]:
    """Text files of the tree (hidden folders, build output, caches and this file left out)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        dirs = rel.parts[:-1]
        if any(d.startswith(".") or d in SKIPPED_DIRS or d.endswith(".egg-info") for d in dirs):
            continue
        if not include_docs and dirs[:1] == (DOCS,):
            continue
        if path.is_file() and path.suffix in SCANNED_SUFFIXES and path.resolve() != _THIS_FILE:
            out.append(path)
    return out


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def outside_references(root: Path) -> list[str]:
    """`path:line: text` of every mention of the notes kept outside the repository (docs/ itself not scanned)."""
    return [f"{p.relative_to(root)}:{i}: {line.strip()}" for p in scanned_files(root, include_docs=False)
            for i, line in enumerate(_lines(p), 1) if _OUTSIDE.search(line)]


def headings(md: Path) -> list[str]:
    """Heading texts of a markdown file, fenced code blocks skipped."""
    out, fenced = [], False
    for line in _lines(md):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line)):
            out.append(m["text"])
    return out


def section_number(heading: str) -> str | None:
    m = re.match(rf"({_NUMBER})(?:\.|\s|$)", heading)
    return m[1] if m else None


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _sections(text: str) -> list[str]:
    return [n for m in re.finditer(_SECTION, text) for n in (m["first"], m["last"]) if n]


def broken_references(root: Path) -> list[str]:
    """`path:line: problem` for every docs reference that does not resolve to an existing file and heading."""
    docs = root / DOCS
    cache: dict[str, list[str]] = {}

    def heads(name: str) -> list[str] | None:
        if name not in cache:
            path = docs / name
            cache[name] = headings(path) if path.is_file() else None
        return cache[name]

    def check(where: str, name: str, numbers: list[str], anchor: str | None) -> list[str]:
        hs = heads(name)
        if hs is None:
            return [f"{where}: {DOCS}/{name} does not exist"]
        bad = [f"{where}: {DOCS}/{name} has no section §{n}" for n in numbers
               if n not in {section_number(h) for h in hs}]
        if anchor is not None and anchor not in {slug(h) for h in hs}:
            bad.append(f"{where}: {DOCS}/{name} has no heading with anchor #{anchor}")
        return bad

    problems = []
    for path in scanned_files(root):
        rel = path.relative_to(root)
        own = rel.name if rel.parts[0] == DOCS and len(rel.parts) == 2 and rel.suffix == ".md" else None
        for i, line in enumerate(_lines(path), 1):
            where = f"{rel}:{i}"
            for m in _REFERENCE.finditer(line):
                problems += check(where, m["file"], _sections(m["sections"] or ""), m["anchor"])
            if own is not None:  # a bare § in a docs file: its own sections
                problems += check(where, own, _sections(_REFERENCE.sub("", line)), None)
    return problems


def duplicate_sections(md: Path) -> list[str]:
    numbers = [n for n in map(section_number, headings(md)) if n]
    return sorted({n for n in numbers if numbers.count(n) > 1})


# ---- the repository -------------------------------------------------------------------------------------------

def test_no_reference_to_notes_outside_the_repository():
    assert outside_references(REPO) == []


def test_every_docs_reference_resolves():
    assert broken_references(REPO) == []


def test_docs_are_cited_and_their_section_numbers_unique():
    cited = {m["file"] for p in scanned_files(REPO, include_docs=False) for line in _lines(p)
             for m in _REFERENCE.finditer(line)}
    for name in ("architecture.md", "v4_model.md"):
        assert (REPO / DOCS / name).is_file()
        assert name in cited, f"nothing outside docs/ cites {DOCS}/{name}"
        assert duplicate_sections(REPO / DOCS / name) == []


# ---- the checker itself ----------------------------------------------------------------------------------------

def test_the_checker_finds_bad_references(tmp_path):
    """A synthetic tree: good references pass; a missing section, a missing file, a missing anchor, a bad bare §
    inside docs and a mention of the outside notes are each reported."""
    (tmp_path / DOCS).mkdir()
    (tmp_path / DOCS / "notes.md").write_text(
        "# Notes\n\n## 1. Configs\n\nSee §1.2.\n\n### 1.2 The layer schedule\n\n```\n# 9. not a heading\n```\n"
        "## 2. Forward pass\n")
    (tmp_path / "model").mkdir()
    good = ("# docs/notes.md §1.2 and (`docs/notes.md` §1, §2) and docs/notes.md §1-2\n"
            "# docs/notes.md#12-the-layer-schedule, and the file alone: docs/notes.md\n")
    (tmp_path / "model" / "ok.py").write_text(good)
    assert broken_references(tmp_path) == []
    assert outside_references(tmp_path) == []

    (tmp_path / "model" / "bad.py").write_text(
        "x = 1  # docs/notes.md §1.3\n"           # no such section
        "# docs/other.md §1\n"                    # no such file
        "# docs/notes.md#no-such-heading\n"       # no such anchor
        "# docs/notes.md §2, §9\n"                # the second of a list
        "# docs/notes.md §9.1\n"                  # fenced '# 9.' is not a heading
        f"# see {OUTSIDE_NOTES[0]} §2\n")
    with (tmp_path / DOCS / "notes.md").open("a") as f:
        f.write("\nAs §3 says.\n")                # a bare § in docs: its own file
    assert broken_references(tmp_path) == [
        "docs/notes.md:14: docs/notes.md has no section §3",
        "model/bad.py:1: docs/notes.md has no section §1.3",
        "model/bad.py:2: docs/other.md does not exist",
        "model/bad.py:3: docs/notes.md has no heading with anchor #no-such-heading",
        "model/bad.py:4: docs/notes.md has no section §9",
        "model/bad.py:5: docs/notes.md has no section §9.1",
    ]
    assert outside_references(tmp_path) == [f"model/bad.py:6: # see {OUTSIDE_NOTES[0]} §2"]


def test_section_numbers_do_not_match_their_subsections():
    assert section_number("3. Cache state") == "3"
    assert section_number("3.1 What each layer keeps") == "3.1"
    assert section_number("3 Cache") == "3"
    assert section_number("30 things") == "30"
    assert section_number("Cache state") is None
    assert slug("3.1 What `each` layer keeps (FP8)") == "31-what-each-layer-keeps-fp8"
