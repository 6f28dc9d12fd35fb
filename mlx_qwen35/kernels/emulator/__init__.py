"""Run `mx.fast.metal_kernel` sources on the CPU: the same call, compiled with g++ against metal_emu.h.

``emulated_metal_kernel(...)`` takes the arguments of ``mx.fast.metal_kernel`` and returns a callable
taking the same keyword arguments as the real kernel (inputs, template, grid, threadgroup,
output_shapes, output_dtypes, init_value). It writes the kernel signature exactly as MLX does
(mlx/fast.cpp ``write_signature``: input address space by size, scalars by reference, ``*_shape`` /
``*_strides`` / ``*_ndim`` and thread attributes only when the body names them), compiles the
translation unit once per source (cached by hash), and runs the grid on numpy copies of the inputs.
A test tool: slow, single-threaded, and exact about SIMD-group and barrier semantics (see metal_emu.h).
"""

import ctypes
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

_HEADER = Path(__file__).with_name("metal_emu.h")
_CXX_FLAGS = ["-std=c++17", "-O2", "-shared", "-fPIC", "-ffp-contract=off", "-U_FORTIFY_SOURCE", "-Wno-attributes"]
_MAX_CONSTANT_ARRAY_SIZE = 8  # MLX passes smaller inputs in the `constant` address space

_TYPE_NAMES = {
    mx.bool_: "bool",
    mx.uint8: "uint8_t",
    mx.uint16: "uint16_t",
    mx.uint32: "uint32_t",
    mx.uint64: "uint64_t",
    mx.int8: "int8_t",
    mx.int16: "int16_t",
    mx.int32: "int32_t",
    mx.int64: "int64_t",
    mx.float16: "float16_t",
    mx.bfloat16: "bfloat16_t",
    mx.float32: "float",
}

# (attribute, type) in MLX's order; a kernel gets the ones its body mentions.
_ATTRIBUTES = [
    ("dispatch_quadgroups_per_threadgroup", "uint"),
    ("dispatch_simdgroups_per_threadgroup", "uint"),
    ("dispatch_threads_per_threadgroup", "uint3"),
    ("grid_origin", "uint3"),
    ("grid_size", "uint3"),
    ("quadgroup_index_in_threadgroup", "uint"),
    ("quadgroups_per_threadgroup", "uint"),
    ("simdgroup_index_in_threadgroup", "uint"),
    ("simdgroups_per_threadgroup", "uint"),
    ("thread_execution_width", "uint"),
    ("thread_index_in_quadgroup", "uint"),
    ("thread_index_in_simdgroup", "uint"),
    ("thread_index_in_threadgroup", "uint"),
    ("thread_position_in_grid", "uint3"),
    ("thread_position_in_threadgroup", "uint3"),
    ("threadgroup_position_in_grid", "uint3"),
    ("threadgroups_per_grid", "uint3"),
    ("threads_per_grid", "uint3"),
    ("threads_per_simdgroup", "uint"),
    ("threads_per_threadgroup", "uint3"),
]
_EMULATED_ATTRIBUTES = {  # the ThreadIds field (or constant) each attribute is fed from
    "simdgroup_index_in_threadgroup": "id.simdgroup_index_in_threadgroup",
    "simdgroups_per_threadgroup": "id.simdgroups_per_threadgroup",
    "thread_execution_width": "32u",
    "threads_per_simdgroup": "32u",
    "thread_index_in_simdgroup": "id.thread_index_in_simdgroup",
    "thread_index_in_threadgroup": "id.thread_index_in_threadgroup",
    "thread_position_in_grid": "id.thread_position_in_grid",
    "thread_position_in_threadgroup": "id.thread_position_in_threadgroup",
    "threadgroup_position_in_grid": "id.threadgroup_position_in_grid",
    "threadgroups_per_grid": "id.threadgroups_per_grid",
    "threads_per_grid": "id.threads_per_grid",
    "threads_per_threadgroup": "id.threads_per_threadgroup",
}


def _as_array(x) -> mx.array:
    """Inputs as MLX sees them: Python scalars become 0-d int32 / float32 / bool arrays."""
    if isinstance(x, mx.array):
        return x
    if isinstance(x, bool):
        return mx.array(x, mx.bool_)
    if isinstance(x, int):
        return mx.array(x, mx.int32)
    if isinstance(x, float):
        return mx.array(x, mx.float32)
    return mx.array(x)


def _to_numpy(x: mx.array) -> np.ndarray:
    if x.dtype == mx.bfloat16:  # numpy has no bfloat16: carry the bits
        return np.ascontiguousarray(np.array(x.view(mx.uint16)))
    return np.ascontiguousarray(np.array(x))


def _template_value(arg) -> str:
    if isinstance(arg, bool):
        return str(int(arg))
    if isinstance(arg, int):
        return str(arg)
    return _TYPE_NAMES[arg]


def _template_kind(arg) -> str:
    return "bool" if isinstance(arg, bool) else "int" if isinstance(arg, int) else "typename"


class EmulatedKernel:
    """The callable `mx.fast.metal_kernel` returns, run by the CPU emulator."""

    def __init__(
        self, name, input_names, output_names, source, header="", ensure_row_contiguous=True, atomic_outputs=False
    ):
        if atomic_outputs:
            raise NotImplementedError("the Metal emulator has no atomic outputs")
        self.name, self.source, self.header = name, source, header
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.shape_infos = [
            tuple(f"{n}{suffix}" in source for suffix in ("_shape", "_strides", "_ndim")) for n in self.input_names
        ]
        self.attributes = [(a, t) for a, t in _ATTRIBUTES if a in source]
        unsupported = [a for a, _ in self.attributes if a not in _EMULATED_ATTRIBUTES]
        if unsupported:
            raise NotImplementedError(f"the Metal emulator does not provide {unsupported}")

    def translation_unit(self, inputs: list[mx.array], output_dtypes, template) -> str:
        """MLX's generated kernel (signature + body) followed by a C entry point that runs its grid."""
        func = f"custom_kernel_{self.name}"
        params, args, slot = [], [], 0
        for name, arr, (shape, strides, ndim) in zip(self.input_names, inputs, self.shape_infos):
            space = "constant" if arr.size < _MAX_CONSTANT_ARRAY_SIZE else "device"
            ctype = _TYPE_NAMES[arr.dtype]
            if arr.ndim == 0:
                params.append(f"  const {space} {ctype}& {name} [[buffer({slot})]]")
                args.append(f"*(const {ctype}*)buffers[{slot}]")
            else:
                params.append(f"  const {space} {ctype}* {name} [[buffer({slot})]]")
                args.append(f"(const {ctype}*)buffers[{slot}]")
            slot += 1
            if arr.ndim > 0:
                for present, decl, cast in (
                    (shape, f"const constant int* {name}_shape", "(const int*)"),
                    (strides, f"const constant int64_t* {name}_strides", "(const int64_t*)"),
                    (ndim, f"const constant int& {name}_ndim", "*(const int*)"),
                ):
                    if present:
                        params.append(f"  {decl} [[buffer({slot})]]")
                        args.append(f"{cast}buffers[{slot}]")
                        slot += 1
        for name, dtype in zip(self.output_names, output_dtypes):
            params.append(f"  device {_TYPE_NAMES[dtype]}* {name} [[buffer({slot})]]")
            args.append(f"({_TYPE_NAMES[dtype]}*)buffers[{slot}]")
            slot += 1
        for attr, ctype in self.attributes:
            params.append(f"  {ctype} {attr} [[{attr}]]")
            args.append(_EMULATED_ATTRIBUTES[attr])
        template_decl, instance = "", func
        if template:
            template_decl = "template <" + ", ".join(f"{_template_kind(v)} {k}" for k, v in template) + ">\n"
            instance += "<" + ", ".join(_template_value(v) for _, v in template) + ">"
        return (
            f'#include "metal_emu.h"\n{self.header}{template_decl}[[kernel]] void {func}(\n'
            + ",\n".join(params)
            + f") {{\n{self.source}\n}}\n\n"
            + 'extern "C" int mlx_emu_run(void** buffers, const unsigned* grid, const unsigned* tg, char* err, int err_len) {\n'
            + "  std::string e = metal_emu::launch(grid, tg, [&](const metal_emu::ThreadIds& id) {\n"
            + f"    {instance}({', '.join(args)});\n  }});\n"
            + "  std::strncpy(err, e.c_str(), err_len - 1);\n  return e.empty() ? 0 : 1;\n}\n"
        )

    def __call__(
        self,
        *,
        inputs,
        output_shapes,
        output_dtypes,
        grid,
        threadgroup,
        template=None,
        init_value=None,
        verbose=False,
        stream=None,
    ):
        if len(inputs) != len(self.input_names):
            raise ValueError(
                f"[metal_kernel] Expected `inputs` to have size {len(self.input_names)} but got size {len(inputs)}."
            )
        inputs = [_as_array(x) for x in inputs]
        source = self.translation_unit(inputs, output_dtypes, list(template or []))
        if verbose:
            print(source)
        library = _compile(source)
        keep = []  # numpy buffers, in kernel-parameter order
        for arr, (shape, strides, ndim) in zip(inputs, self.shape_infos):
            keep.append(_to_numpy(arr))
            if arr.ndim > 0:
                if shape:
                    keep.append(np.array(arr.shape, np.int32))
                if strides:  # row-contiguous copies, as MLX makes with ensure_row_contiguous
                    keep.append(np.array(np.cumprod((arr.shape[1:] + (1,))[::-1])[::-1], np.int64))
                if ndim:
                    keep.append(np.array(arr.ndim, np.int32))
        outputs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            np_dtype = np.uint16 if dtype == mx.bfloat16 else np.dtype(_to_numpy(mx.zeros(1, dtype)).dtype)
            out = np.empty(tuple(shape), np_dtype)
            if init_value is None:
                out.view(np.uint8)[...] = 0xFF  # NaN / -1: unwritten elements are visible
            else:
                out[...] = _to_numpy(mx.full(1, init_value, dtype))[0]
            outputs.append(out)
        keep += outputs
        buffers = (ctypes.c_void_p * len(keep))(*(b.ctypes.data for b in keep))
        grid_c = (ctypes.c_uint * 3)(*grid)
        tg_c = (ctypes.c_uint * 3)(*threadgroup)
        err = ctypes.create_string_buffer(1024)
        if library.mlx_emu_run(buffers, grid_c, tg_c, err, len(err)):
            raise RuntimeError(f"[metal emulator] kernel {self.name}: {err.value.decode()}")
        return [
            mx.array(o).view(mx.bfloat16) if d == mx.bfloat16 else mx.array(o) for o, d in zip(outputs, output_dtypes)
        ]


def emulated_metal_kernel(
    name, input_names, output_names, source, header="", ensure_row_contiguous=True, atomic_outputs=False
) -> EmulatedKernel:
    """Same arguments as ``mx.fast.metal_kernel``; the kernel runs on the CPU emulator."""
    return EmulatedKernel(name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs)


_libraries: dict[str, ctypes.CDLL] = {}


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or tempfile.gettempdir()
    path = Path(root) / f"mlx_qwen35_metal_emu_{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _compile(source: str) -> ctypes.CDLL:
    """Build (or reuse) the shared library for one translation unit; keyed by source, header and flags."""
    key = hashlib.sha256("\0".join([source, _HEADER.read_text(), *_CXX_FLAGS]).encode()).hexdigest()[:24]
    if key in _libraries:
        return _libraries[key]
    so = _cache_dir() / f"{key}.so"
    if not so.exists():
        cpp = so.with_suffix(".cpp")
        cpp.write_text(source)
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        cxx = os.environ.get("CXX", "g++")
        result = subprocess.run(
            [cxx, *_CXX_FLAGS, f"-I{_HEADER.parent}", str(cpp), "-o", str(tmp)], capture_output=True, text=True
        )
        if result.returncode:
            raise RuntimeError(f"[metal emulator] g++ failed on {cpp}:\n{result.stderr[-4000:]}")
        os.replace(tmp, so)  # atomic: parallel test runs never load a half-written library
    library = ctypes.CDLL(str(so))
    library.mlx_emu_run.restype = ctypes.c_int
    _libraries[key] = library
    return library
