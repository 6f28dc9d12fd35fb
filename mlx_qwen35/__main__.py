"""``python -m mlx_qwen35 …`` is the ``mlx-qwen35`` command."""

from .surfaces.cli import main

main()
