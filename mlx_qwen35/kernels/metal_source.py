"""Load a kernel from metal_kernels/*.metal (format: metal_kernels/README.md) as an MLX kernel callable."""

import hashlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import mlx.core as mx

from mlx_qwen35.kernels import emulating

_PACKAGE = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class KernelSource:
    """What ``mx.fast.metal_kernel`` takes, read from one .metal file."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    header: str
    body: str


def kernel_path(name: str) -> Path:
    """The .metal file: inside the installed package (wheel), else beside it (source checkout)."""
    for root in (_PACKAGE / "metal_kernels", _PACKAGE.parent / "metal_kernels"):
        if (root / f"{name}.metal").is_file():
            return root / f"{name}.metal"
    raise FileNotFoundError(f"metal_kernels/{name}.metal not found in {_PACKAGE} or beside it")


@cache
def read_kernel(name: str) -> KernelSource:
    """Parse the ``// @inputs``, ``// @outputs``, ``// @header`` and ``// @body`` markers of a .metal file."""
    text = kernel_path(name).read_text()
    declared = {}
    for line in text.splitlines():
        for key in ("@inputs", "@outputs", "@include"):
            if line.startswith(f"// {key} "):
                declared[key] = tuple(line.split(key, 1)[1].split())
    head, sep, body = text.partition("\n// @body\n")
    _, sep2, header = head.partition("\n// @header\n")
    if not (sep and sep2 and "@inputs" in declared and "@outputs" in declared):
        raise ValueError(f"{kernel_path(name)}: needs // @inputs, // @outputs, // @header and // @body lines")
    shared = "".join(read_helpers(helper) for helper in declared.get("@include", ()))
    return KernelSource(name, declared["@inputs"], declared["@outputs"], shared + header, body)


@cache
def read_helpers(name: str) -> str:
    """The ``// @header`` part of a helpers file (no body: not a kernel), for kernels that ``// @include`` it."""
    head, sep, header = kernel_path(name).read_text().partition("\n// @header\n")
    if not sep or "\n// @body\n" in header:
        raise ValueError(f"{kernel_path(name)}: a helpers file has a // @header line and no // @body")
    return header


@cache
def _build(name: str, emulate: bool):
    src = read_kernel(name)
    if emulate:
        from mlx_qwen35.kernels.emulator import emulated_metal_kernel as make
    else:
        make = mx.fast.metal_kernel
    return make(
        name=name,
        input_names=list(src.input_names),
        output_names=list(src.output_names),
        source=src.body,
        header=src.header,
    )


def metal_kernel(name: str):
    """The kernel callable: ``mx.fast.metal_kernel`` on Metal, the CPU emulator when kernels are emulated."""
    return _build(name, emulating())


KERNEL_NAMES = (
    "gated_delta_prefill",
    "expert_dispatch_gate_up",
    "expert_dispatch_down_sum",
    "expert_dispatch_down_sorted",
)


def sources_digest() -> str:
    """One hash of every kernel's source (its helpers included): a self-check result holds only for these sources."""
    digest = hashlib.sha256()
    for name in KERNEL_NAMES:
        src = read_kernel(name)
        digest.update("\0".join([name, *src.input_names, "|", *src.output_names, src.header, src.body, ""]).encode())
    return digest.hexdigest()[:16]
