"""Kernel wrappers: each takes its Metal kernel when it can, else its pure-MLX path (the specification).

Which path an operation takes: the wrapper's ``use_kernel`` argument if given (True: the kernel,
False: the pure path), else the switch set here by ``set_use_kernels``, else the pure path when
``MLX_QWEN35_PURE=1``, else the path the self-check chose for it at load (``kernels/self_check.py``,
docs/architecture.md §17.1), else "the kernel if Metal is available".
"""

import os

import mlx.core as mx

from mlx_qwen35.errors import Qwen35Error

_use_kernels: bool | None = None
_emulate = False
_chosen: dict[str, str] = {}  # operation → "kernel" | "mlx_fast" | "pure", set by the self-check


def set_use_kernels(flag: bool | None, *, emulate: bool = False) -> None:
    """Force the kernels on (True) or off (False), or restore the default (None); emulate runs them on the CPU."""
    global _use_kernels, _emulate
    _use_kernels, _emulate = flag, emulate


def set_chosen_paths(chosen: dict[str, str]) -> None:
    """The path each operation takes by default from now on (the self-check's choice); {} forgets them."""
    _chosen.clear()
    _chosen.update(chosen)


def emulating() -> bool:
    """Whether kernels run on the Metal CPU emulator instead of ``mx.fast.metal_kernel``."""
    return _emulate


def kernels_runnable() -> bool:
    """Whether a Metal kernel can run here: on Metal, or on the CPU emulator when it is switched on."""
    return _emulate or mx.metal.is_available()


def paths_forced() -> bool:
    """Whether the switch or ``MLX_QWEN35_PURE=1`` fixes every operation's path, so no choice of ours applies."""
    return _use_kernels is not None or os.environ.get("MLX_QWEN35_PURE") == "1"


def kernel_forced(requested: bool | None) -> bool:
    """Whether the caller or the switch asked for the kernel explicitly (then an unsupported shape is an error)."""
    return bool(_use_kernels if requested is None else requested)


def _wants_kernel(requested: bool | None) -> bool:
    """Whether the caller or the switch wants the kernel (None: neither said, so Metal decides)."""
    flag = _use_kernels if requested is None else requested
    if flag is None:
        return kernels_runnable() and os.environ.get("MLX_QWEN35_PURE") != "1"
    if flag and not kernels_runnable():
        raise Qwen35Error(
            "use_kernel=True needs Metal, which this machine lacks: pass use_kernel=False "
            "(or call mlx_qwen35.kernels.set_use_kernels(None)) to take the pure-MLX path"
        )
    return flag


def resolve_path(operation: str, requested: bool | None) -> str:
    """The path ("kernel", "mlx_fast" or "pure") one call of ``operation`` takes (see the module docstring)."""
    if requested is not None or paths_forced():
        return "kernel" if _wants_kernel(requested) else "pure"
    path = _chosen.get(operation, "kernel")
    return "pure" if path == "kernel" and not kernels_runnable() else path
