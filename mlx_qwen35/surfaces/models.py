"""``mlx-qwen35 models`` (``ls``): the Qwen3.5 checkpoints on this machine, with size, quantisation and fit."""

from __future__ import annotations

from pathlib import Path

from ..weights.local_models import DEFAULT_SEARCH_DIRS, FIT_FRACTION, find_models, hf_hub_cache, total_memory_bytes
from .demo import demo_model_dir


def search_dirs(extra: list[Path]) -> list[Path]:
    """Where ``models`` looks besides the Hub cache: ``extra``, the usual model folders, and the demo checkpoint."""
    return [*extra, *DEFAULT_SEARCH_DIRS, demo_model_dir()]


def list_models(extra_dirs: list[Path]) -> None:
    """Print a table of the local checkpoints (largest first), or where to get one when there is none."""
    import sys

    from rich.console import Console
    from rich.table import Table

    # Piped (to grep, to a script), a row stays one line whatever its length.
    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 10_000)
    memory = total_memory_bytes()
    models = find_models(search_dirs(extra_dirs), memory_bytes=memory)
    if not models:
        looked = ", ".join(str(d) for d in [*search_dirs(extra_dirs), hf_hub_cache()])
        console.print(f"no Qwen3.5 checkpoint found (looked in {looked})", markup=False)
        console.print(
            "get one: 'mlx-qwen35 generate mlx-community/Qwen3.5-0.8B-4bit -p hi' downloads it; "
            "'mlx-qwen35 demo' builds a tiny one trained on the Python docs",
            markup=False,
        )
        return
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("model", "size", "quantisation", f"fits {memory / 1e9:.0f} GB", "path"):
        # The path folds rather than being cut: it is what the user copies into the next command.
        table.add_column(
            column, no_wrap=column != "path", overflow="fold", justify="right" if column == "size" else "left"
        )
    for entry in models:
        fits = "yes" if entry.fits else f"no (over {FIT_FRACTION:.0%} of memory)"
        name = "demo (tiny, trained on Python docs)" if entry.path == demo_model_dir() else entry.name
        table.add_row(name, _size(entry.size_bytes), entry.quantization, fits, str(entry.path))
    console.print(table)


def _size(size_bytes: int) -> str:
    return f"{size_bytes / 1e9:.1f} GB" if size_bytes >= 1e8 else f"{size_bytes / 1e6:.1f} MB"
