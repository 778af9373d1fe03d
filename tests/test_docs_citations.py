"""Citations of the method document: every "docs/method.md §N" names a section that exists.

Code, tests and docs cite the method specification by section number (``docs/method.md §7``,
``docs/method.md §6.2 and §9``, ``docs/method.md §3-§5``). This test keeps those numbers from going stale
when docs/method.md is renumbered, checks the document's own cross-references (``§N`` inside it), and
refuses citations of a ``METHOD.md`` file, which is not part of the repository.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHOD_DOC = ROOT / "docs" / "method.md"
SCANNED_SUFFIXES = {".py", ".md", ".json"}
# virtual environments, build outputs and run outputs (see .gitignore): not the project's text
SKIPPED_DIRS = {".venv", "venv", "__pycache__", "build", "dist", "runs", "demo_output", "node_modules"}

SECTION_NUMBER = r"\d+(?:\.\d+)*"
HEADING = re.compile(rf"^#{{2,6}}\s+({SECTION_NUMBER})\.?\s", re.MULTILINE)
# "docs/method.md" followed by one or more section numbers: "§4", "§6.2 and §9", "§2, §6.3 and §7", "§3-§5"
CITATION = re.compile(rf"docs/method\.md((?:\s*(?:,|and|or|to|-|–)?\s*§{SECTION_NUMBER})+)")
SECTION_REF = re.compile(rf"§({SECTION_NUMBER})")
BARE_METHOD = re.compile(r"(?<![\w/.-])METHOD\.md")


def _skipped(name: str) -> bool:
    return name.startswith(".") or name in SKIPPED_DIRS or name.endswith(".egg-info")


def _project_files() -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not _skipped(d)]  # pruned, never entered
        files += [Path(folder) / n for n in names if Path(n).suffix in SCANNED_SUFFIXES]
    return sorted(files)


def _sections() -> set[str]:
    return set(HEADING.findall(METHOD_DOC.read_text(encoding="utf-8")))


def _citations(text: str) -> list[tuple[int, str]]:
    """(line number, section) of every section cited after "docs/method.md" in ``text``."""
    found = []
    for match in CITATION.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        found.extend((line, section) for section in SECTION_REF.findall(match.group(1)))
    return found


def test_method_doc_has_numbered_sections():
    sections = _sections()
    assert {str(n) for n in range(1, 16)} <= sections
    assert "6.2" in sections


def test_citation_parser():
    text = "x (docs/method.md §2, §6.3 and §7)\ny docs/method.md §3-§5 and docs/method.md §12.2."
    assert _citations(text) == [(1, "2"), (1, "6.3"), (1, "7"), (2, "3"), (2, "5"), (2, "12.2")]
    assert not BARE_METHOD.search("see docs/method.md §9 and docs/methods.md")
    assert BARE_METHOD.search("(METHOD.md section 5)")


def test_every_cited_section_exists():
    sections = _sections()
    files = _project_files()
    assert METHOD_DOC in files
    stale, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        cited = _citations(text)
        if path == METHOD_DOC:  # the document's own cross-references, "(§7)"
            cited = [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in SECTION_REF.finditer(text)]
        total += len(cited)
        stale += [f"{path.relative_to(ROOT)}:{line}: §{s}" for line, s in cited if s not in sections]
    assert total > 0, "no citation of docs/method.md found: is the scan looking at the repository?"
    assert not stale, "sections cited but missing from docs/method.md:\n" + "\n".join(stale)


@pytest.mark.parametrize("suffix", sorted(SCANNED_SUFFIXES))
def test_no_citation_of_a_method_file_outside_the_repository(suffix):
    bare = []
    for path in _project_files():
        # this test names the pattern; docs/method.md may explain where its numbering came from
        if path.suffix != suffix or path in (Path(__file__).resolve(), METHOD_DOC):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if BARE_METHOD.search(line):
                bare.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not bare, "cite docs/method.md §N instead of METHOD.md:\n" + "\n".join(bare)
