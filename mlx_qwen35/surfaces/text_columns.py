"""Plain aligned columns for terminal tables that must stay copy-pasteable (``plan``, ``bench``)."""

from __future__ import annotations


def print_columns(rows: list[list[str]], left: int = 2) -> None:
    """Print ``rows`` (the first is the header) in aligned columns: the first ``left`` to the left, numbers right."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
