"""First-use self-check of every kernel and the measured choice of each operation's path (docs/architecture.md §17.1).

At load, each operation's candidate paths (our Metal kernel, MLX's ``mx.fast.gated_delta_update``, our pure
path) run on a small probe of the model's own head sizes and dtype and are compared with the pure path at
the tests' tolerances; the passing ones are timed on the model's shape and the fastest becomes the default
(``kernels.set_chosen_paths``). A failure costs one warning line and that path is never chosen. Results
are cached on disk per (kernel sources, MLX version, device, probe), so the next load only reads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU

from mlx_qwen35.config import TextConfig
from mlx_qwen35.kernels import emulating, kernels_runnable, paths_forced, set_chosen_paths
from mlx_qwen35.kernels.expert_dispatch import SORT_MIN_PAIRS, kernel_fits, routed_kernel, routed_pure
from mlx_qwen35.kernels.gated_delta import CHUNK, PREFILL_PATHS, STEP_PATHS
from mlx_qwen35.kernels.metal_source import sources_digest

log = logging.getLogger(__name__)

CHECK_FORMAT = 1  # bump when what the check runs or records changes: older cached results then no longer apply
EXPERT_PATHS = {"kernel": routed_kernel, "pure": routed_pure}
# The tests' fp32 tolerances (tests/test_gated_delta.py TOL: absolute; tests/test_expert_dispatch.py TOL: × max |ref|).
GATED_DELTA_TOL = 1e-5
EXPERTS_REL_TOL = 1e-4
PROBE_TOKENS = CHUNK + 3  # crosses a chunk boundary of the chunked paths
BENCH_TOKENS_GPU = 512  # a quarter of a prefill chunk: long enough that the sequential kernel's cost shows
BENCH_TOKENS_CPU = CHUNK  # keeps the whole check well under a second on a CPU
# On a CPU (and the emulator, which runs every lane as a fiber) probe at most 2 key heads × 2 value heads each, so
# the check stays well under a second (the 397B's 16 × 4 heads take 3.8 s there); on Metal every head, which is
# also the exact template instantiation the model runs.
CPU_MAX_HEADS = 2
PROBE_EXPERTS = 4
MAX_CACHED_REPORTS = 32


@dataclass(frozen=True)
class Probe:
    """The shapes and dtype the check runs at: the model's head sizes, its compute dtype and its expert quantisation."""

    key_heads: int = 2
    value_heads: int = 4
    key_dim: int = 128
    value_dim: int = 128
    dtype: str = "float32"
    bench_tokens: int = BENCH_TOKENS_CPU
    expert_hidden: int = 0  # 0: no experts the kernels take (dense model, or float experts)
    expert_intermediate: int = 0
    expert_top_k: int = 2
    expert_bits: int = 0
    expert_group_size: int = 0
    expert_scales_dtype: str = ""


@dataclass
class PathResult:
    """One candidate path of one operation: whether it matched the pure path, and its time on the model's shape."""

    operation: str
    path: str
    passed: bool
    error: str | None = None  # the first line of the exception, or "NaN in the output", or the mismatch
    max_diff: float | None = None
    tolerance: float | None = None
    ms: float | None = None  # best of the timed runs; None when it failed (a failed path is never timed)


@dataclass
class SelfCheckReport:
    """What the check found and chose; ``doctor --json`` prints it, the cache file stores it."""

    key: str
    kernel_sources: str  # metal_source.sources_digest() of the sources checked
    device: str
    mlx_version: str
    emulated: bool
    probe: dict
    results: list[PathResult]
    chosen: dict[str, str]
    seconds: float
    cached: bool = False
    cache_file: str = ""

    def to_dict(self) -> dict:
        """The JSON form (``doctor --json``'s ``kernels`` object; README "doctor")."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> SelfCheckReport:
        """Inverse of ``to_dict``; raises KeyError / TypeError on a malformed entry."""
        fields = dict(data)
        fields["results"] = [PathResult(**r) for r in data["results"]]
        return cls(**fields)


Timer = Callable[[str, str, Callable[[], object]], float]


def best_ms(operation: str, path: str, run: Callable[[], object], repeats: int = 3) -> float:
    """Best wall time of ``run`` in milliseconds over ``repeats`` evaluated runs, after one warm-up (compile, JIT)."""
    mx.eval(run())
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(run())
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def choose_paths(results: list[PathResult]) -> dict[str, str]:
    """Per operation, the passing path with the least time (untimed passing paths rank last); else the pure path."""
    chosen: dict[str, str] = {}
    for op in dict.fromkeys(r.operation for r in results):
        passing = [r for r in results if r.operation == op and r.passed]
        best = min(passing, key=lambda r: math.inf if r.ms is None else r.ms, default=None)
        chosen[op] = best.path if best else "pure"
    return chosen


def make_probe(text: TextConfig | None, dtype: mx.Dtype, experts: nn.Module | None) -> Probe:
    """The probe for a model (its text config, compute dtype and routed experts), or a small default one."""
    fields: dict = {"dtype": _dtype_name(dtype)}
    if text is not None:
        fields |= dict(
            key_heads=text.linear_num_key_heads,
            value_heads=text.linear_num_value_heads,
            key_dim=text.linear_key_head_dim,
            value_dim=text.linear_value_head_dim,
            expert_top_k=max(1, min(text.num_experts_per_tok, PROBE_EXPERTS)),
        )
    on_gpu = mx.default_device() == mx.gpu and not emulating()
    if not on_gpu:  # heads are independent, so a few of them rank the paths as well as all of them
        hk = min(fields.get("key_heads", 2), CPU_MAX_HEADS)
        r = fields.get("value_heads", 4) // fields.get("key_heads", 2)
        fields |= dict(key_heads=hk, value_heads=hk * min(r, CPU_MAX_HEADS))
    fields["bench_tokens"] = BENCH_TOKENS_GPU if on_gpu else BENCH_TOKENS_CPU
    if experts is not None and kernel_fits(experts):
        gate = experts.gate_proj
        fields |= dict(
            expert_hidden=gate.input_dims,
            expert_intermediate=gate.output_dims,
            expert_bits=gate.bits,
            expert_group_size=gate.group_size,
            expert_scales_dtype=_dtype_name(gate.scales.dtype),
        )
    return Probe(**fields)


def device_name() -> str:
    """The chip MLX runs on (e.g. "Apple M2 Max"), as MLX names it."""
    return str(mx.device_info().get("device_name", "unknown device"))


def cache_file() -> Path:
    """Where the results live: ``$XDG_CACHE_HOME/mlx-qwen35/kernel_checks.json`` (default ``~/.cache``)."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "mlx-qwen35" / "kernel_checks.json"


def cache_key(probe: Probe) -> str:
    """The results hold for these kernel sources, this MLX, this device, this probe and emulation or not."""
    parts = [CHECK_FORMAT, sources_digest(), mx.__version__, device_name(), emulating(), asdict(probe)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


_reports: dict[str, SelfCheckReport] = {}  # this process's checks, by key
_warned: set[tuple[str, str, str]] = set()
_last: list[SelfCheckReport] = []  # the report whose choices are in force


def last_report() -> SelfCheckReport | None:
    """The report of the latest ``check_kernels`` (whose choices are in force), or None if none ran."""
    return _last[-1] if _last else None


def check_kernels(
    text: TextConfig | None = None,
    dtype: mx.Dtype = mx.float32,
    experts: nn.Module | None = None,
    *,
    timer: Timer | None = None,
) -> SelfCheckReport | None:
    """Check every kernel on this model's probe (once per process, cached on disk) and make the winners the default.

    Returns None when ``MLX_QWEN35_PURE=1`` or ``set_use_kernels`` fixes the paths (then nothing runs).
    """
    if paths_forced():
        return None
    if text is None and experts is None:
        experts = default_experts()
    probe = make_probe(text, dtype, experts)
    key = cache_key(probe)
    report = _reports.get(key) or _read_cached(key)
    if report is None:
        report = run_checks(probe, experts, timer=timer)
        report.key = key
        _write_cached(report)
    _reports[key] = report
    _last[:] = [report]
    set_chosen_paths(report.chosen)
    for r in report.results:
        if not r.passed and (key, r.operation, r.path) not in _warned:
            _warned.add((key, r.operation, r.path))
            log.warning(
                "mlx-qwen35: %s's %s path failed its self-check on %s (%s); using the %s path",
                r.operation,
                _path_label(r.path),
                report.device,
                r.error,
                _path_label(report.chosen[r.operation]),
            )
    return report


def forget_checks() -> None:
    """Drop this process's results and choices (the next ``check_kernels`` reads the disk cache or checks anew)."""
    _reports.clear()
    _warned.clear()
    _last.clear()
    set_chosen_paths({})


def run_checks(probe: Probe, experts: nn.Module | None = None, *, timer: Timer | None = None) -> SelfCheckReport:
    """Run, compare and time (with ``timer``, default ``best_ms``) every candidate path on ``probe``; no cache involved."""
    timer = timer or best_ms
    start = time.perf_counter()
    results: list[PathResult] = []
    for op, paths, check_inputs, bench_inputs, compare in _operations(probe, experts):
        for path, fn in paths.items():
            results.append(_check_path(op, path, fn, check_inputs, bench_inputs, compare, timer))
    return SelfCheckReport(
        key="",
        kernel_sources=sources_digest(),
        device=device_name(),
        mlx_version=mx.__version__,
        emulated=emulating(),
        probe=asdict(probe),
        results=results,
        chosen=choose_paths(results),
        seconds=round(time.perf_counter() - start, 4),
    )


def _check_path(op, path, fn, check_inputs, bench_inputs, compare, timer) -> PathResult:
    """Compare one path with the pure path (the pure path is the reference and is only timed), then time it."""
    diff = tol = None
    try:
        if path != "pure":
            diff, tol = compare(fn(*check_inputs()))
            if math.isnan(diff):
                return PathResult(op, path, False, "NaN in the output", None, tol)
            if diff > tol:
                return PathResult(op, path, False, f"differs from the pure path by {diff:.3g} > {tol:.3g}", diff, tol)
        inputs = bench_inputs()
        ms = timer(op, path, lambda: fn(*inputs))
    except Exception as e:  # a compile error, a launch failure, a bad shape: any of them disqualifies the path
        return PathResult(op, path, False, _first_line(e), diff, tol)
    return PathResult(op, path, True, None, diff, tol, round(ms, 4))


def _operations(probe: Probe, experts: nn.Module | None):
    """(operation, its candidate paths, check inputs, bench inputs, compare-with-pure) for each operation."""
    dtype = getattr(mx, probe.dtype)
    for op, all_paths, tokens in (
        ("gated_delta_prefill", PREFILL_PATHS, PROBE_TOKENS),
        ("gated_delta_step", STEP_PATHS, 1),
    ):
        kernel_ok = kernels_runnable() and probe.key_dim % 32 == 0
        paths = {p: fn for p, fn in all_paths.items() if p != "kernel" or kernel_ok}
        check = _gated_delta_inputs(probe, dtype, batch=2, tokens=tokens)
        bench = _gated_delta_inputs(probe, dtype, batch=1, tokens=probe.bench_tokens if tokens > 1 else 1)
        yield op, paths, check, bench, _gated_delta_compare(check, dtype)
    if probe.expert_hidden:
        module = _probe_experts(experts)
        for op, tokens in (
            ("expert_dispatch_unsorted", 1),
            ("expert_dispatch_sorted", -(-SORT_MIN_PAIRS // probe.expert_top_k)),
        ):
            paths = {p: fn for p, fn in EXPERT_PATHS.items() if p != "kernel" or kernels_runnable()}
            inputs = _expert_inputs(probe, module, dtype, tokens)
            yield op, paths, inputs, inputs, _experts_compare(inputs)


def _gated_delta_inputs(probe: Probe, dtype: mx.Dtype, batch: int, tokens: int) -> Callable[[], tuple]:
    """Seeded inputs as the layer passes them (tests/test_gated_delta.py's distribution); prefill also gets a mask
    whose second row starts with padding, as a left-padded batch has."""

    def make() -> tuple:
        rng = np.random.default_rng(0)
        hk, hv, dk, dv = probe.key_heads, probe.value_heads, probe.key_dim, probe.value_dim
        f = lambda *shape: mx.array(rng.standard_normal(shape).astype(np.float32))  # noqa: E731
        q, k, v = (
            f(batch, tokens, hk, dk).astype(dtype),
            f(batch, tokens, hk, dk).astype(dtype),
            f(batch, tokens, hv, dv).astype(dtype),
        )
        a, b = f(batch, tokens, hv), f(batch, tokens, hv)
        A_log, dt_bias = mx.array(rng.uniform(-2, 1.5, hv).astype(np.float32)), f(hv)
        state = 0.1 * f(batch, hv, dv, dk)
        if tokens == 1:
            return q, k, v, a, b, A_log, dt_bias, state
        mask = mx.array(np.arange(tokens)[None, :] >= np.array([[0]] + [[5]] * (batch - 1)))
        return q, k, v, a, b, A_log, dt_bias, state, mask

    return make


def _gated_delta_compare(check: Callable[[], tuple], dtype: mx.Dtype) -> Callable:
    """Compare (o, state) with the pure path's exact fp32 result: |Δ| ≤ the tests' fp32 tolerance, plus one ulp
    of the largest output in a half dtype (see ``_ulp``)."""
    q, k, v, a, b, A_log, dt_bias, state, *mask = check()
    ref_o, ref_state = PREFILL_PATHS["pure"](q, k, v.astype(mx.float32), a, b, A_log, dt_bias, state, *(mask or [None]))
    o_tol = GATED_DELTA_TOL + _ulp(dtype) * float(mx.abs(ref_o).max())

    def compare(outputs) -> tuple[float, float]:
        o, new_state = outputs
        return _worst([(_max_diff(o, ref_o), o_tol), (_max_diff(new_state, ref_state), GATED_DELTA_TOL)])

    return compare


def _probe_experts(experts: nn.Module) -> nn.Module:
    """The model's first few experts: same quantisation, same values, a few MB read from the checkpoint."""
    n = min(PROBE_EXPERTS, experts.gate_proj.num_experts)
    module = SwitchGLU(1, 1, 1)
    for name in ("gate_proj", "up_proj", "down_proj"):
        p = getattr(experts, name)
        sliced = QuantizedSwitchLinear(
            p.group_size, 1, 1, bias=False, group_size=p.group_size, bits=p.bits, mode=p.mode
        )
        sliced.weight, sliced.scales, sliced.biases = p.weight[:n], p.scales[:n], p.biases[:n]
        setattr(module, name, sliced)
    module.activation = experts.activation
    mx.eval(module.parameters())
    return module


def default_experts() -> nn.Module:
    """Seeded 4-bit experts of tests/test_expert_dispatch.py's sizes: the probe when there is no model."""
    rng = np.random.default_rng(0)
    module = SwitchGLU(64, 128, PROBE_EXPERTS)
    for p in (module.gate_proj, module.up_proj, module.down_proj):
        p.weight = mx.array(0.05 * rng.standard_normal(p.weight.shape).astype(np.float32))
    nn.quantize(module, group_size=64, bits=4)
    return module


def _expert_inputs(probe: Probe, experts: nn.Module, dtype: mx.Dtype, tokens: int) -> Callable[[], tuple]:
    def make() -> tuple:
        rng = np.random.default_rng(1)
        E, k = experts.gate_proj.num_experts, min(probe.expert_top_k, experts.gate_proj.num_experts)
        x = mx.array(rng.standard_normal((1, tokens, experts.gate_proj.input_dims)).astype(np.float32), dtype)
        indices = mx.array(np.argsort(rng.standard_normal((1, tokens, E)), axis=-1)[..., :k].astype(np.uint32))
        w = rng.uniform(0.1, 1.0, (1, tokens, k))
        return x, indices, mx.array((w / w.sum(-1, keepdims=True)).astype(np.float32), dtype), experts

    return make


def _experts_compare(inputs: Callable[[], tuple]) -> Callable:
    """Compare with the pure path in fp32 (tests/test_expert_dispatch.py's reference): |Δ| ≤ 1e-4 × max |ref|,
    plus one ulp in a half dtype (see ``_ulp``)."""
    x, indices, weights, experts = inputs()
    ref = routed_pure(x.astype(mx.float32), indices, weights.astype(mx.float32), experts)
    tol = (EXPERTS_REL_TOL + _ulp(x.dtype)) * float(mx.abs(ref).max())
    return lambda out: (_max_diff(out, ref), tol)


def _ulp(dtype: mx.Dtype) -> float:
    """One ulp at 1 of a half dtype (0 for fp32): the output is rounded once, which costs at most half of it, so
    ``ulp × max |ref|`` keeps ≥ 2× headroom (measured 2.2× for gated delta, 3× for the experts, bf16, Dk = 128)."""
    return 0.0 if dtype == mx.float32 else float(mx.finfo(dtype).eps)


def _max_diff(x: mx.array, ref: mx.array) -> float:
    """max |x − ref|, NaN if x holds a NaN (the emulator fills unwritten outputs with NaN)."""
    return float(mx.abs(x.astype(mx.float32) - ref).max())


def _worst(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    if any(math.isnan(d) for d, _ in pairs):
        return math.nan, pairs[0][1]
    return max(pairs, key=lambda p: p[0] / p[1])


def _dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def _first_line(e: Exception) -> str:
    """The line of an error that says what went wrong (a compiler's first 'error' line), shortened to fit one line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return next((line for line in lines if "error" in line.lower()), lines[0])[:240]


def _path_label(path: str) -> str:
    return {"kernel": "Metal kernel", "mlx_fast": "mx.fast.gated_delta_update", "pure": "pure-MLX"}[path]


def _read_cached(key: str) -> SelfCheckReport | None:
    """The cached report for ``key``; a missing, unreadable or corrupt file counts as no report (it is rebuilt)."""
    path = cache_file()
    try:
        report = SelfCheckReport.from_dict(json.loads(path.read_text())["reports"][key])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.debug("ignoring the kernel self-check cache %s: %s", path, e)
        return None
    report.cached, report.cache_file = True, str(path)
    return report


def _write_cached(report: SelfCheckReport) -> None:
    """Add ``report`` to the cache file atomically; a failure to write costs one warning, never the load."""
    path = cache_file()
    report.cache_file = str(path)
    try:
        reports = json.loads(path.read_text())["reports"]
        if not isinstance(reports, dict):
            raise TypeError("reports is not an object")
    except (OSError, ValueError, KeyError, TypeError):
        reports = {}
    reports.pop(report.key, None)
    reports[report.key] = report.to_dict() | {"cached": False}
    reports = dict(list(reports.items())[-MAX_CACHED_REPORTS:])
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": CHECK_FORMAT, "reports": reports}, indent=1))
        os.replace(tmp, path)  # atomic: a concurrent load never reads half a file
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning(
            "mlx-qwen35: cannot write the kernel self-check cache %s (%s); the check runs again next load", path, e
        )
