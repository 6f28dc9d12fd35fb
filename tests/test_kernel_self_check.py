"""The kernels' first-use self-check and path choice (docs/architecture.md §17.1), driven through the Metal CPU
emulator: correct kernels pass, broken ones (a wrong lane index, a source that does not compile) are caught and
warned about once and never chosen, results are cached per kernel source, a bad cache file is never fatal."""

from __future__ import annotations

import json
import logging
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.switch_layers import SwitchGLU
from test_kernels_in_model import CONFIG, logits_prefill_then_decode

from mlx_qwen35.config import parse_config
from mlx_qwen35.kernels import gated_delta, metal_source, self_check, set_chosen_paths, set_use_kernels
from mlx_qwen35.kernels.self_check import PathResult, check_kernels, choose_paths
from mlx_qwen35.model.qwen35 import Qwen35Model

OPERATIONS = ["gated_delta_prefill", "gated_delta_step", "expert_dispatch_unsorted", "expert_dispatch_sorted"]
RANKED = {"kernel": 1.0, "mlx_fast": 2.0, "pure": 3.0}  # injected times: the kernel would win wherever it passes
ON_METAL = mx.metal.is_available()  # on a Mac the real mx.fast.metal_kernel runs, elsewhere the CPU emulator
LOGITS_TOL = 1e-4  # × max |logits|, as tests/test_kernels_in_model.py (its measured headroom: ≥ 10×)


def ranked_timer(calls: list | None = None):
    def timer(op, path, run):
        if calls is not None:
            calls.append((op, path))
        return RANKED[path]

    return timer


def _clear_source_caches():
    metal_source.read_kernel.cache_clear()
    metal_source.read_helpers.cache_clear()
    metal_source._build.cache_clear()


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """Each test gets its own results file and starts with no checks, no choices and the default switch."""
    monkeypatch.setattr(self_check, "cache_file", lambda: tmp_path / "cache" / "kernel_checks.json")
    self_check.forget_checks()
    set_use_kernels(None)
    yield tmp_path / "cache" / "kernel_checks.json"
    self_check.forget_checks()
    set_use_kernels(None)
    _clear_source_caches()


@pytest.fixture
def kernel_sources(tmp_path, monkeypatch):
    """A copy of metal_kernels/ the kernels are read from; ``edit(name, old, new)`` changes one kernel's source."""
    root = tmp_path / "metal_kernels"
    shutil.copytree(metal_source.kernel_path("gated_delta_prefill").parent, root)
    monkeypatch.setattr(metal_source, "kernel_path", lambda name: root / f"{name}.metal")
    _clear_source_caches()

    def edit(name: str, old: str, new: str) -> None:
        path = root / f"{name}.metal"
        text = path.read_text()
        assert old in text
        path.write_text(text.replace(old, new))
        _clear_source_caches()

    return edit


@pytest.fixture(scope="module")
def model() -> Qwen35Model:
    """tests/test_kernels_in_model.py's model: kernel-sized heads (Dk = Dv = 32) and 4-bit experts."""
    mx.random.seed(0)
    model = Qwen35Model(parse_config(CONFIG))
    model.update(model.parameters())
    nn.quantize(
        model, group_size=32, bits=4, class_predicate=lambda path, _: path.endswith("_proj") and ".mlp.experts." in path
    )
    return model


def experts_of(model: Qwen35Model) -> nn.Module:
    return next(m for _, m in model.named_modules() if isinstance(m, SwitchGLU))


def check_model(model: Qwen35Model, timer=None):
    return check_kernels(model.config.text, mx.float32, experts_of(model), timer=timer or ranked_timer())


def by_path(report) -> dict[tuple[str, str], PathResult]:
    return {(r.operation, r.path): r for r in report.results}


# ---------------------------------------------------------------------------------------------- correct kernels


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_correct_kernels_pass_and_are_chosen_when_fastest(model, dtype, caplog):
    set_use_kernels(None, emulate=not ON_METAL)
    report = check_kernels(model.config.text, dtype, experts_of(model), timer=ranked_timer())
    results = by_path(report)
    assert {op for op, path in results if path == "kernel"} == set(OPERATIONS)  # every kernel was checked
    failed = [r for r in report.results if not r.passed]
    assert not failed, failed
    assert all(r.max_diff <= r.tolerance for r in report.results if r.path != "pure")
    assert report.chosen == dict.fromkeys(OPERATIONS, "kernel")
    assert (
        report.emulated != ON_METAL
        and not report.cached
        and report.probe["dtype"] == str(dtype).removeprefix("mlx.core.")
    )
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_chosen_path_is_what_the_wrapper_runs(monkeypatch):
    calls = []
    monkeypatch.setitem(gated_delta.STEP_PATHS, "mlx_fast", lambda *args: calls.append(len(args)) or ("o", "S"))
    q = mx.zeros((1, 1, 1, 32))
    inputs = (
        q,
        q,
        q,
        mx.zeros((1, 1, 1)),
        mx.zeros((1, 1, 1)),
        mx.zeros((1,)),
        mx.zeros((1,)),
        mx.zeros((1, 1, 32, 32)),
    )
    set_chosen_paths({"gated_delta_step": "mlx_fast"})
    assert gated_delta.gated_delta_step(*inputs) == ("o", "S") and calls == [8]
    set_use_kernels(False)  # the switch and use_kernel= still win over the choice
    assert gated_delta.gated_delta_step(*inputs)[0].shape == (1, 1, 1, 32)
    set_use_kernels(None)
    assert gated_delta.gated_delta_step(*inputs, use_kernel=False)[0].shape == (1, 1, 1, 32)
    monkeypatch.setenv("MLX_QWEN35_PURE", "1")
    assert gated_delta.gated_delta_step(*inputs)[0].shape == (1, 1, 1, 32)
    assert calls == [8]


# ---------------------------------------------------------------------------------------------- broken kernels


def test_wrong_lane_index_is_caught_warned_once_and_logits_equal_the_pure_path(model, kernel_sources, caplog):
    kernel_sources("gated_delta_prefill", "state[i] = s_in[i * 32 + lane];", "state[i] = s_in[i * 32 + (lane ^ 1)];")
    ids = [int(i) for i in mx.random.randint(0, 128, (40,), key=mx.random.key(1)).tolist()]
    set_use_kernels(False)
    pure = logits_prefill_then_decode(model, ids)
    set_use_kernels(True, emulate=not ON_METAL)
    broken = logits_prefill_then_decode(model, ids)
    scale = float(mx.abs(pure).max())
    assert float(mx.abs(broken - pure).max()) > 10 * LOGITS_TOL * scale  # the broken kernel does change the logits

    set_use_kernels(None, emulate=not ON_METAL)
    report = check_model(model)
    results = by_path(report)
    for op in ("gated_delta_prefill", "gated_delta_step"):
        assert not results[op, "kernel"].passed and "differs from the pure path" in results[op, "kernel"].error
        assert report.chosen[op] == "mlx_fast"  # the next fastest that passed
    assert report.chosen["expert_dispatch_sorted"] == "kernel"  # the correct kernels still serve
    check_model(model)  # a second check in the process: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("\n" not in w for w in warnings)
    assert "gated_delta_prefill's Metal kernel path failed its self-check on " + self_check.device_name() in warnings[0]
    assert warnings[0].endswith("; using the mx.fast.gated_delta_update path")

    checked = logits_prefill_then_decode(model, ids)
    assert float(mx.abs(checked - pure).max()) <= LOGITS_TOL * scale


def test_source_that_does_not_compile_is_caught_and_the_pure_path_serves(model, kernel_sources, caplog):
    kernel_sources("gated_delta_prefill", "const uint lane = thread_index_in_simdgroup;", "const uint lane = oops;")
    set_use_kernels(None, emulate=not ON_METAL)
    report = check_model(model, timer=lambda op, path, run: {"kernel": 1.0, "pure": 2.0, "mlx_fast": 3.0}[path])
    results = by_path(report)
    for op in ("gated_delta_prefill", "gated_delta_step"):
        assert not results[op, "kernel"].passed and "error" in results[op, "kernel"].error
        assert "oops" in results[op, "kernel"].error and report.chosen[op] == "pure"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("\n" not in w and "using the pure-MLX path" in w for w in warnings)
    ids = [int(i) for i in mx.random.randint(0, 128, (40,), key=mx.random.key(2)).tolist()]
    checked = logits_prefill_then_decode(model, ids)  # would raise if the uncompilable kernel ran
    set_use_kernels(False)
    pure = logits_prefill_then_decode(model, ids)
    assert float(mx.abs(checked - pure).max()) <= LOGITS_TOL * float(mx.abs(pure).max())


def test_nan_output_is_a_failure(monkeypatch):
    monkeypatch.setitem(gated_delta.STEP_PATHS, "mlx_fast", lambda q, k, v, *rest: (mx.full(v.shape, mx.nan), rest[-1]))
    report = check_kernels(timer=ranked_timer())
    result = by_path(report)["gated_delta_step", "mlx_fast"]
    assert not result.passed and result.error == "NaN in the output" and report.chosen["gated_delta_step"] == "pure"


# ---------------------------------------------------------------------------------------------- choosing


def result(op: str, path: str, ms: float | None, passed: bool = True) -> PathResult:
    return PathResult(op, path, passed, None if passed else "broken", ms=ms if passed else None)


def test_fastest_passing_path_wins_and_a_failing_one_is_never_chosen():
    results = [
        result("a", "kernel", None, passed=False),
        result("a", "mlx_fast", 2.0),
        result("a", "pure", 3.0),
        result("b", "kernel", 0.5),
        result("b", "mlx_fast", 0.7),
        result("b", "pure", 0.6),
        result("c", "kernel", None, passed=False),
        result("c", "mlx_fast", None, passed=False),
        result("c", "pure", 9.0),
        result("d", "kernel", None, passed=False),
        result("d", "pure", None, passed=False),  # even a failing pure path leaves "pure" as the fallback
    ]
    assert choose_paths(results) == {"a": "mlx_fast", "b": "kernel", "c": "pure", "d": "pure"}


def test_a_path_that_fails_while_timed_is_not_chosen():
    def timer(op, path, run):
        if path == "mlx_fast":
            raise RuntimeError("[metal::Device] Unable to build pipeline\nsecond line")
        return RANKED[path]

    report = check_kernels(timer=timer)
    for op in ("gated_delta_prefill", "gated_delta_step"):
        r = by_path(report)[op, "mlx_fast"]
        assert not r.passed and r.error == "[metal::Device] Unable to build pipeline"
        assert report.chosen[op] == "pure"


@pytest.mark.skipif(ON_METAL, reason="this machine has Metal")
def test_no_metal_means_no_kernel_candidate():
    report = check_kernels(timer=ranked_timer())
    assert not mx.metal.is_available() and not report.emulated
    assert {path for _, path in by_path(report)} == {"mlx_fast", "pure"}
    assert set(report.chosen.values()) <= {"mlx_fast", "pure"}


def test_pure_switches_skip_the_check(monkeypatch):
    calls = []
    monkeypatch.setenv("MLX_QWEN35_PURE", "1")
    assert check_kernels(timer=ranked_timer(calls)) is None
    monkeypatch.delenv("MLX_QWEN35_PURE")
    set_use_kernels(False)
    assert check_kernels(timer=ranked_timer(calls)) is None
    assert calls == [] and self_check.last_report() is None


# ---------------------------------------------------------------------------------------------- the cache


def test_cached_results_are_reused_and_invalidated_when_a_kernel_source_changes(isolated, kernel_sources):
    calls = []
    first = check_kernels(timer=ranked_timer(calls))
    assert not first.cached and calls and first.key in json.loads(isolated.read_text())["reports"]
    self_check.forget_checks()  # a new process
    calls.clear()
    again = check_kernels(timer=ranked_timer(calls))
    assert again.cached and calls == [] and again.chosen == first.chosen and again.key == first.key

    kernel_sources("gated_delta_prefill", "// @body\n", "// @body\n// a comment changes the source hash\n")
    self_check.forget_checks()
    changed = check_kernels(timer=ranked_timer(calls))
    assert not changed.cached and calls and changed.key != first.key
    assert changed.kernel_sources != first.kernel_sources


def test_key_names_mlx_version_and_device(monkeypatch):
    probe = self_check.Probe()
    key = self_check.cache_key(probe)
    monkeypatch.setattr(self_check, "device_name", lambda: "Apple M9 Ultra")
    on_other_chip = self_check.cache_key(probe)
    monkeypatch.setattr(mx, "__version__", "0.99.0")
    assert len({key, on_other_chip, self_check.cache_key(probe)}) == 3


@pytest.mark.parametrize(
    "content", [b"\x00\xffnot json", b'{"reports": []}', b"[1, 2]", b'{"format": 1, "reports": {"KEY": {"device": 3}}}']
)
def test_corrupt_cache_is_ignored_and_rebuilt(isolated, content):
    key = self_check.cache_key(self_check.make_probe(None, mx.float32, self_check.default_experts()))
    isolated.parent.mkdir(parents=True)
    isolated.write_bytes(content.replace(b"KEY", key.encode()))
    report = check_kernels(timer=ranked_timer())
    assert not report.cached and report.key == key
    assert set(json.loads(isolated.read_text())["reports"]) == {key}


def test_unreadable_cache_is_never_fatal(isolated, caplog):
    isolated.mkdir(parents=True)  # a directory where the file should be: reading and replacing it both fail
    report = check_kernels(timer=ranked_timer())
    assert report is not None and not report.cached and set(report.chosen) == set(OPERATIONS)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "cannot write the kernel self-check cache" in warnings[0]
    assert [p.name for p in isolated.parent.iterdir()] == ["kernel_checks.json"]  # no temporary file left


def test_cache_file_lives_under_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.undo()  # the real cache_file, not the isolated one
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert self_check.cache_file() == tmp_path / "mlx-qwen35" / "kernel_checks.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert self_check.cache_file() == tmp_path / "home" / ".cache" / "mlx-qwen35" / "kernel_checks.json"
