"""``mlx-qwen35 doctor``: what a bug report needs about this machine, its MLX, and what the kernels did here.

The JSON fields are documented in the README ("Diagnosing a Mac: doctor"); the self-check behind the
``kernels`` object in docs/architecture.md §17.1.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import mlx.core as mx

from ..kernels import paths_forced, set_use_kernels
from ..kernels.self_check import cache_file, check_kernels, device_name, last_report
from ..weights.local_models import total_memory_bytes

DOCTOR_FORMAT = 1


def doctor_report(model: str | None = None, emulate: bool = False) -> dict:
    """The doctor's findings as a JSON-ready dict; loads ``model`` (lazily) to check the kernels at its shapes."""
    if emulate:
        set_use_kernels(None, emulate=True)
    model_dir = None
    if model is not None:
        from ..weights.hub import resolve_checkpoint
        from ..weights.loading import load_model

        model_dir = resolve_checkpoint(model, argument="--model")
        load_model(model_dir)  # runs the self-check at the model's head sizes, dtype and expert quantisation
        report = last_report()
    else:
        report = check_kernels()
    return {
        "doctor_format": DOCTOR_FORMAT,
        "system": {
            "os": platform.platform(),
            "machine": platform.machine(),
            "chip": device_name(),
            "memory_bytes": total_memory_bytes(),
            "python": platform.python_version(),
        },
        "mlx": {
            "version": mx.__version__,
            "default_device": "gpu" if mx.default_device() == mx.gpu else "cpu",
            "metal_available": mx.metal.is_available(),
        },
        "wired_memory": _wired_memory(model_dir),
        "kernels": {
            "paths": _paths_mode(),
            "emulated": emulate,
            "cache_file": str(cache_file()),
            "self_check": report.to_dict() if report is not None and not paths_forced() else None,
        },
    }


def _paths_mode() -> str:
    """How each operation's path is decided here: by the self-check, or fixed by the environment / the switch."""
    if os.environ.get("MLX_QWEN35_PURE") == "1":
        return "pure (MLX_QWEN35_PURE=1)"
    return "fixed by set_use_kernels" if paths_forced() else "self-checked"


def _wired_memory(model_dir) -> dict:
    """The GPU wired-memory limit now, and what ``model_dir`` needs (``mlx-qwen35 plan``'s number) with the command."""
    need = None
    if model_dir is not None:
        from ..weights.memory_plan import plan_model_dir

        need = plan_model_dir(model_dir, total_memory_bytes())
    return {
        "limit_mb": _sysctl_wired_limit_mb(),
        "max_recommended_working_set_bytes": mx.device_info().get("max_recommended_working_set_size"),
        "model_weight_bytes": need.weights if need else None,
        "model_need_bytes": need.total if need else None,
        "needed_mb": need.wired_limit_mb if need else None,
        "command": f"sudo sysctl iogpu.wired_limit_mb={need.wired_limit_mb}" if need else None,
    }


def _sysctl_wired_limit_mb() -> int | None:
    """macOS's ``iogpu.wired_limit_mb`` (0: the system default); None where there is no such setting."""
    if sys.platform != "darwin":
        return None
    try:
        out = subprocess.run(["sysctl", "-n", "iogpu.wired_limit_mb"], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def format_report(report: dict) -> str:
    """The human-readable form of ``doctor_report``: one fact a line."""
    s, m, w, k = report["system"], report["mlx"], report["wired_memory"], report["kernels"]
    lines = [
        f"system      {s['os']} ({s['machine']}), {s['chip']}, {s['memory_bytes'] / 2**30:.1f} GiB memory",
        f"mlx         {m['version']}, default device {m['default_device']}, Metal "
        + ("available" if m["metal_available"] else "not available"),
        f"wired limit {'n/a' if w['limit_mb'] is None else str(w['limit_mb']) + ' MB'}",
    ]
    if w["command"]:
        lines.append(f"this model  {w['model_weight_bytes'] / 1e9:.1f} GB of weights: {w['command']}")
    lines.append(
        f"kernels     {k['paths']}{' (emulated)' if k['emulated'] else ''}; results cached in {k['cache_file']}"
    )
    check = k["self_check"]
    if check is not None:
        lines.append(f"self-check  {check['seconds']:.3f} s{' (from the cache)' if check['cached'] else ''}")
        for r in check["results"]:
            chosen = " ← chosen" if check["chosen"][r["operation"]] == r["path"] else ""
            outcome = f"{r['ms']:.3f} ms" if r["passed"] else f"FAILED: {r['error']}"
            lines.append(f"  {r['operation']:<26} {r['path']:<9} {outcome}{chosen}")
    return "\n".join(lines)


def run_doctor(model: str | None = None, as_json: bool = False, emulate: bool = False) -> None:
    """Print the doctor's report (JSON with ``as_json``)."""
    report = doctor_report(model, emulate)
    print(json.dumps(report, indent=2) if as_json else format_report(report))
