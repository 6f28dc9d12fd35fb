"""The demo model's corpus: the Python standard library's own docstrings (PSF licence), see tools/CORPUS.md.

Deterministic for one Python version: a fixed module list, members in sorted order. A fixed 1 in
HOLDOUT_EVERY documents (by a stable hash of its name) is held out for evaluation.
"""

from __future__ import annotations

import importlib
import inspect
import zlib
from dataclasses import dataclass

# Pure-Python, side-effect-free modules with well-documented APIs (no GUI, no network at import).
MODULES = (
    "abc argparse array base64 bisect builtins calendar cmath collections colorsys contextlib copy csv "
    "dataclasses datetime decimal difflib enum filecmp fnmatch fractions functools glob gzip hashlib heapq "
    "hmac html itertools json keyword linecache locale logging math mimetypes operator os os.path pathlib "
    "pickle pprint queue random re secrets shlex shutil statistics string struct subprocess tarfile "
    "tempfile textwrap threading time timeit tokenize traceback typing unicodedata urllib.parse uuid "
    "warnings weakref zipfile zlib"
).split()
HOLDOUT_EVERY = 20
MIN_DOC_CHARS = 40


@dataclass(frozen=True)
class Doc:
    """One documented object: its dotted name and its docstring."""

    name: str
    text: str

    @property
    def held_out(self) -> bool:
        """Whether this document belongs to the evaluation split (stable across runs and machines)."""
        return zlib.crc32(self.name.encode()) % HOLDOUT_EVERY == 0

    @property
    def question(self) -> str:
        """The chat question this document answers."""
        return f"What does {self.name} do?"


def _docstring(obj: object) -> str | None:
    doc = inspect.getdoc(obj)
    return doc.strip() if doc and len(doc.strip()) >= MIN_DOC_CHARS else None


def stdlib_docs() -> list[Doc]:
    """Every public module, function, class and method docstring of MODULES, in a fixed order."""
    docs, seen = [], set()
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        candidates = [(module_name, module)]
        for attr in sorted(vars(module)):
            if attr.startswith("_"):
                continue
            value = getattr(module, attr)
            if not (inspect.isclass(value) or inspect.isroutine(value)):
                continue
            candidates.append((f"{module_name}.{attr}", value))
            if inspect.isclass(value):
                for method in sorted(vars(value)):
                    if not method.startswith("_") and inspect.isroutine(getattr(value, method, None)):
                        candidates.append((f"{module_name}.{attr}.{method}", getattr(value, method)))
        for name, obj in candidates:
            text = _docstring(obj)
            if text is not None and text not in seen:  # re-exported objects appear once
                seen.add(text)
                docs.append(Doc(name, text))
    return docs


def first_paragraph(text: str) -> str:
    """A docstring's summary: its first blank-line-separated paragraph."""
    return text.split("\n\n", 1)[0].strip()
