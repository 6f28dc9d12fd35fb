"""mlx-qwen35: the Qwen3.5 family on Apple Silicon with MLX.

Public API: ``load``, ``generate``, ``stream_generate``. Imported lazily so that the command line
starts instantly and the package imports without MLX-heavy work.
"""

from __future__ import annotations

__all__ = ["load", "generate", "stream_generate", "Qwen35Error"]

from .errors import Qwen35Error


def __getattr__(name: str):
    if name == "__version__":
        from importlib.metadata import version

        return version("mlx-qwen35")  # the installed metadata: pyproject.toml's, the one place it is written
    if name == "load":
        from .weights.loading import load

        return load
    if name in ("generate", "stream_generate"):
        from .runtime import generation as _generation

        return getattr(_generation, name)
    raise AttributeError(f"module 'mlx_qwen35' has no attribute {name!r}")
