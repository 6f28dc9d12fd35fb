"""Every document the code cites is in the repository, and every cited section of it exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"\b((?:docs|metal_kernels)/[\w./-]+\.md)(?:\s+§(\d+(?:\.\d+)?)(?:[–-](\d+(?:\.\d+)?))?)?")
SOURCES = ("*.py", "*.metal", "*.js", "*.html", "*.css", "*.jinja", "*.md", "*.toml")


def tracked_sources() -> list[Path]:
    out = subprocess.run(["git", "ls-files", *SOURCES], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / p for p in out.stdout.split() if "vendor/" not in p]


def sections(doc: Path) -> set[str]:
    """The numbers of the markdown headings ``## 4.`` / ``### 4.6`` of ``doc``."""
    return set(re.findall(r"^#{2,4} (\d+(?:\.\d+)?)\.? ", doc.read_text(), flags=re.M))


def test_every_cited_document_and_section_exists():
    missing = []
    for path in tracked_sources():
        for line_no, line in enumerate(path.read_text().splitlines(), 1):
            for doc, first, last in CITATION.findall(line):
                where = f"{path.relative_to(ROOT)}:{line_no}"
                if not (ROOT / doc).is_file():
                    missing.append(f"{where} cites {doc}, which is not in the repository")
                    continue
                for number in filter(None, (first, last)):
                    if number not in sections(ROOT / doc):
                        missing.append(f"{where} cites {doc} §{number}, which has no such section")
    assert not missing, "\n".join(missing)


def test_no_citation_of_a_document_outside_the_repository():
    """The reference notes the project was written from are not shipped; the code cites our own docs."""
    outside = [
        f"{path.relative_to(ROOT)}:{n}"
        for path in tracked_sources()
        if path.suffix != ".md" and path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "ARCHITECTURE.md" in line
    ]
    assert not outside, "cite docs/architecture.md instead:\n" + "\n".join(outside)


def test_the_citation_pattern_reads_ranges_and_sections():
    assert CITATION.findall("see docs/architecture.md §4.3–4.8 and metal_kernels/README.md") == [
        ("docs/architecture.md", "4.3", "4.8"),
        ("metal_kernels/README.md", "", ""),
    ]
    assert {"4", "4.6", "18"} <= sections(ROOT / "docs" / "architecture.md")
