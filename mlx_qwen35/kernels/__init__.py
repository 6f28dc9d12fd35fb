"""Kernel wrappers: each takes its Metal kernel when it can, else its pure-MLX path (the specification).

Which one runs: the wrapper's ``use_kernel`` argument if given, else the switch set here by
``set_use_kernels``, else "Metal is available and ``MLX_QWEN35_PURE`` is not 1".
"""

import os

import mlx.core as mx

from mlx_qwen35.errors import Qwen35Error

_use_kernels: bool | None = None
_emulate = False


def set_use_kernels(flag: bool | None, *, emulate: bool = False) -> None:
    """Force the kernels on (True) or off (False), or restore the default (None); emulate runs them on the CPU."""
    global _use_kernels, _emulate
    _use_kernels, _emulate = flag, emulate


def emulating() -> bool:
    """Whether kernels run on the Metal CPU emulator instead of ``mx.fast.metal_kernel``."""
    return _emulate


def kernel_forced(requested: bool | None) -> bool:
    """Whether the caller or the switch asked for the kernel explicitly (then an unsupported shape is an error)."""
    return bool(_use_kernels if requested is None else requested)


def resolve_use_kernel(requested: bool | None) -> bool:
    """Decide for one wrapper call whether its kernel runs (see the module docstring)."""
    flag = _use_kernels if requested is None else requested
    runnable = _emulate or mx.metal.is_available()
    if flag is None:
        return runnable and os.environ.get("MLX_QWEN35_PURE") != "1"
    if flag and not runnable:
        raise Qwen35Error(
            "use_kernel=True needs Metal, which this machine lacks: pass use_kernel=False "
            "(or call mlx_qwen35.kernels.set_use_kernels(None)) to take the pure-MLX path"
        )
    return flag
