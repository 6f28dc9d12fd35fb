"""``mlx-qwen35 bench``: prefill, time to first token, decode, peak memory and launches per token, side by side.

Ours and each ``--compare`` peer run in one process on their own conversions of the same source
checkpoint (or on one mlx-community directory both can load), alternating round by round so that
whatever else the machine does falls on both alike; the ratios are of medians.
"""

from __future__ import annotations

import contextlib
import json
import platform
import sys
from pathlib import Path

import mlx.core as mx

from ...errors import Qwen35Error
from ..text_columns import print_columns
from .measure import Run, Summary, launches, measure_run
from .runtimes import LOADERS, OURS, require_peer

WARMUP_PROMPT = 32


def _prompt(length: int) -> list[int]:
    # Ordinary ids below 900: valid in every Qwen3.5 vocabulary and in the presets' (costs do not depend on them).
    return [5 + (i * 7) % 900 for i in range(length)]


def _peer_dir(peer: str, model_dir: Path, peer_model: str | None, source: str | None) -> Path:
    """Where ``peer`` finds the same weights: --peer-model, its own conversion of --source, or ``model_dir`` itself."""
    from ...weights.hub import resolve_checkpoint
    from ...weights.memory_plan import stored_tensors_on_disk
    from ...weights.peer_formats import detect_format

    if peer_model:
        return resolve_checkpoint(peer_model, argument="--peer-model")
    fmt = detect_format(stored_tensors_on_disk(model_dir))
    if fmt == "hf":
        raise Qwen35Error(
            f"{model_dir}: a Hugging Face checkpoint; convert it first (mlx-qwen35 convert), then bench that"
        )
    if fmt in ("mlx-lm", "mlx-vlm"):  # a peer's (e.g. mlx-community) conversion: both runtimes load it as it is
        return model_dir
    if not source:
        raise Qwen35Error(
            f"--compare {peer}: {model_dir} is our conversion, which {peer} cannot load; give --source HF_DIR_OR_ID "
            f"(the checkpoint it was converted from, converted for {peer} at the same bits) or --peer-model DIR"
        )
    from .presets import activation_dtype, bench_cache_dir, convert_for

    quant = json.loads((model_dir / "config.json").read_text()).get("quantization") or {}
    bits, group = quant.get("bits"), quant.get("group_size")
    if not bits:
        raise Qwen35Error(f"{model_dir}: not quantised; bench compares quantised conversions (e.g. --recipe 4bit)")
    src = resolve_checkpoint(source, argument="--source")
    target = (
        bench_cache_dir()
        / "peers"
        / f"{src.resolve().as_posix().strip('/').replace('/', '--')}-{peer}-{bits}bit-g{group}"
    )
    if not target.is_dir():
        print(f"converting {src} for {peer} at {bits} bits, group {group} → {target}")
        convert_for(peer, src, target, activation_dtype(), bits, group)
    return target


def _check_fits(dirs: dict[str, Path], context: int) -> None:
    """All the runtimes' weights (resident together) plus one run's cache and workspace fit this machine; else one line."""
    from ...weights.local_models import total_memory_bytes
    from ...weights.memory_plan import GIB, OS_RESERVE_GIB, plan_model_dir

    memory = total_memory_bytes()
    plans = [plan_model_dir(d, memory, context=context) for d in dirs.values()]
    need = sum(p.weights for p in plans) + max(p.total - p.weights for p in plans)
    if need > memory - OS_RESERVE_GIB * GIB:
        raise Qwen35Error(
            f"bench needs {need / 1e9:.1f} GB ({' + '.join(dirs)} at {context:,} tokens) but this machine has "
            f"{memory / 1e9:.1f} GB; use a smaller model or recipe, shorter --prompt-lengths, or fewer --compare"
        )


def _machine() -> dict:
    info = mx.device_info()
    return {
        "platform": platform.platform(),
        "device": info.get("device_name") or platform.processor() or platform.machine(),
        "memory_bytes": info.get("memory_size"),
        "mlx": mx.__version__,
        "backend": "metal" if mx.metal.is_available() else "cpu",
    }


def run_bench(
    model: str | None,
    preset: str | None,
    compare: list[str],
    peer_model: str | None,
    source: str | None,
    prompt_lengths: list[int],
    decode_tokens: int,
    repeats: int,
    warmup: int,
    as_json: bool,
) -> dict:
    """Measure ours (and each peer in ``compare``), print the table or JSON; returns the JSON report."""
    if (model is None) == (preset is None):
        raise Qwen35Error(
            "bench: give a model directory / Hub id, or --preset NAME (bench, dispatch, 397b-layers), not both"
        )
    if not prompt_lengths or min(prompt_lengths) < 2:
        raise Qwen35Error(f"--prompt-lengths {prompt_lengths}: give token counts of 2 or more, e.g. 128,1024")
    if decode_tokens < 1 or repeats < 1 or warmup < 0:
        raise Qwen35Error("--decode-tokens and --repeats must be at least 1, --warmup at least 0")
    for peer in compare:
        require_peer(peer)
    # With --json, stdout carries the report alone: the converters' and loaders' progress goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        if preset:
            from .presets import build_preset

            dirs = build_preset(preset, [OURS, *compare])
            label = f"preset {preset}"
            dirs.pop("source")
        else:
            from ...weights.hub import resolve_checkpoint

            ours = resolve_checkpoint(model, argument="model")
            dirs = {OURS: ours, **{p: _peer_dir(p, ours, peer_model, source) for p in compare}}
            label = model
        _check_fits(dirs, max(prompt_lengths) + decode_tokens)

        runners = [LOADERS[name](directory) for name, directory in dirs.items()]
    for _ in range(warmup):
        for runner in runners:
            measure_run(runner, _prompt(WARMUP_PROMPT), 4)
    results: dict[str, dict[int, list[Run]]] = {r.name: {n: [] for n in prompt_lengths} for r in runners}
    for length in prompt_lengths:
        for _ in range(repeats):
            for runner in runners:
                results[runner.name][length].append(measure_run(runner, _prompt(length), decode_tokens))
    step_prompt = _prompt(min(prompt_lengths))
    steps = {r.name: r.decode_step_graph(step_prompt) for r in runners}
    step_launches = {name: launches(step.primitives) for name, step in steps.items()}

    report = {
        "model": label,
        "machine": _machine(),
        "settings": {"decode_tokens": decode_tokens, "repeats": repeats, "warmup": warmup},
        "runtimes": {
            name: {
                "weights_bytes": runner.weights_bytes,
                "decode_step_launches": step_launches[name],
                "decode_step_build_s": steps[name].build_s,
                "prompts": {str(n): _summaries(runs) for n, runs in results[name].items()},
            }
            for name, runner in zip(results, runners)
        },
        "ratios": {
            peer: {
                "decode_step_launches": step_launches[OURS] / step_launches[peer],
                "decode_step_build_s": steps[OURS].build_s / steps[peer].build_s,
                "prompts": {
                    str(n): {
                        key: _median(results[OURS][n], key) / _median(results[peer][n], key)
                        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes", "ttft_s")
                    }
                    for n in prompt_lengths
                },
            }
            for peer in results
            if peer != OURS
        },
    }
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _print_table(report, prompt_lengths)
    return report


def _median(runs: list[Run], key: str) -> float:
    return Summary([getattr(r, key) for r in runs]).median


def _summaries(runs: list[Run]) -> dict:
    keys = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes")
    return {key: Summary([getattr(r, key) for r in runs]).as_dict() for key in keys}


def _print_table(report: dict, prompt_lengths: list[int]) -> None:
    m, s = report["machine"], report["settings"]
    print(
        f"{report['model']} on {m['device']} ({m['backend']}, MLX {m['mlx']}); {s['repeats']} rounds alternating, "
        f"median (min–max); decode over {s['decode_tokens']} tokens"
    )
    rows = [["prompt", "runtime", "TTFT s", "prefill tok/s", "decode tok/s", "peak MB"]]
    for n in prompt_lengths:
        for name, runtime in report["runtimes"].items():
            p = runtime["prompts"][str(n)]
            rows.append(
                [
                    str(n),
                    name,
                    _cell(p["ttft_s"], "{:.3f}"),
                    _cell(p["prefill_tokens_per_s"], "{:.0f}"),
                    _cell(p["decode_tokens_per_s"], "{:.1f}"),
                    f"{p['peak_memory_bytes']['median'] / 1e6:.0f}",
                ]
            )
        for peer, ratio in report["ratios"].items():
            r = ratio["prompts"][str(n)]
            rows.append(
                [
                    "",
                    f"ours / {peer}",
                    f"{r['ttft_s']:.2f}×",
                    f"{r['prefill_tokens_per_s']:.2f}×",
                    f"{r['decode_tokens_per_s']:.2f}×",
                    f"{r['peak_memory_bytes']:.2f}×",
                ]
            )
    print_columns(rows)
    launches_line = ", ".join(f"{name} {r['decode_step_launches']}" for name, r in report["runtimes"].items())
    ratios = ", ".join(f"{r['decode_step_launches']:.2f}× {peer}'s" for peer, r in report["ratios"].items())
    print(
        f"non-view primitives in one decode step (≈ kernel launches on Metal): {launches_line}"
        + (f" (ours {ratios})" if ratios else "")
    )
    builds = ", ".join(f"{name} {r['decode_step_build_s'] * 1e3:.2f} ms" for name, r in report["runtimes"].items())
    print(f"host time to build one decode step's graph (Python and MLX, not evaluated): {builds}")


def _cell(summary: dict, fmt: str) -> str:
    return f"{fmt.format(summary['median'])} ({fmt.format(summary['min'])}–{fmt.format(summary['max'])})"
