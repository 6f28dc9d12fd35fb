"""``python convert.py ...`` is ``mlx-qwen35 convert ...`` (for people who run the script from a clone)."""

import sys

from mlx_qwen35.surfaces.cli import main

if __name__ == "__main__":
    sys.argv[1:1] = ["convert"]
    main()
