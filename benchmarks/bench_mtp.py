"""Speculative decoding with the MTP head on the trained demo model: what drafting buys, and why (README "MTP").

Same process, same checkpoint (the shipped demo model, converted to 4 bits; float32 activations off Metal),
greedy, one chat prompt:
- decode tokens/s with MTP off, on at k = 1, 2, 3 (every step drafts k) and adaptive (``DraftPolicy``);
  acceptance per depth (given the drafts before it were accepted) and tokens emitted per step;
- the cost of a verify over k + 1 positions relative to one decode step, a quantised matmul's cost on 1, 2 and 4
  rows, and for the MoE the distinct experts a verify reads per layer (the union over its positions);
- the rollback designs of docs/architecture.md §20.2: per-position states (ours), snapshot + re-run of the
  accepted prefix, and δ replay of the accepted steps;
- mlx-vlm 0.7's MTP drafter on the same weights (``mlx_vlm.convert`` + ``mlx_vlm.split_mtp``, ``--draft-kind mtp``).

    python benchmarks/bench_mtp.py [--tokens 128] [--rounds 3] [--skip-mlx-vlm]

Absolute times on a shared CPU mean little; the ratios within one run are what to read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mlx_qwen35.model.cache import cache_length, keep_verified, make_cache, restore, snapshot  # noqa: E402
from mlx_qwen35.model.moe import SparseMoE  # noqa: E402
from mlx_qwen35.runtime.generation import prompt_token_ids, stream_text  # noqa: E402
from mlx_qwen35.runtime.prefill import prefill  # noqa: E402
from mlx_qwen35.runtime.settings import GenerationSettings, MTPSettings  # noqa: E402
from mlx_qwen35.runtime.speculative import MTPStats  # noqa: E402
from mlx_qwen35.surfaces.demo import DEMO_WEIGHTS_DIR  # noqa: E402
from mlx_qwen35.weights.convert import convert  # noqa: E402
from mlx_qwen35.weights.loading import load  # noqa: E402

PROMPT = "Write a function that reads a file and returns its lines."
MAX_DRAFT = 3


def median_seconds(run, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def our_runners(model, processor, tokens: int) -> dict:
    """Per configuration, a run: → (decode tokens/s after the first token, its MTPStats, its tokens)."""
    messages = [{"role": "user", "content": PROMPT}]
    base = GenerationSettings(max_tokens=tokens, enable_thinking=False)
    configs = {"off": base} | {
        f"k={k}": replace(base, mtp=MTPSettings(enabled=True, mtp_tokens=k, adaptive=False))
        for k in range(1, MAX_DRAFT + 1)
    }
    configs["adaptive k<=3"] = replace(base, mtp=MTPSettings(enabled=True, mtp_tokens=MAX_DRAFT, adaptive=True))

    def runner(settings):
        def run():
            stats = MTPStats()
            out = list(stream_text(model, processor, messages, settings, mtp_stats=stats))
            return out[-1].generation_tps, stats, [r.token for r in out]

        return run

    return {name: runner(settings) for name, settings in configs.items()}


def interleaved(runners: dict, rounds: int) -> dict:
    """Every runner once per round, in turn (so a change in the machine's load hits all alike); the first round
    warms the paths up and is not counted. Per runner: the median tokens/s and its last result."""
    speeds, last = {name: [] for name in runners}, {}
    for round_ in range(rounds + 1):
        for name, run in runners.items():
            last[name] = run()
            if round_:
                speeds[name].append(last[name][0])
    return {name: (statistics.median(speeds[name]), last[name]) for name in runners}


def primed_cache(model, processor) -> tuple[list[int], list, int, list]:
    """PROMPT's ids, a cache holding them plus one decoded token, its length, and a snapshot to restore it to."""
    ids = prompt_token_ids(processor, [{"role": "user", "content": PROMPT}], enable_thinking=False)
    cache = make_cache(model)
    prefill(model, mx.array(ids), cache)
    model.language_model(mx.array([[ids[-1]]]), cache)
    mx.eval([c.state for c in cache])
    return ids, cache, cache_length(cache), snapshot(cache)


def verify_costs(model, processor) -> dict:
    """Median seconds of one decode step and of a verify over T = 2 … 4 positions, from the same cache state."""
    lm = model.language_model
    ids, cache, start_length, base = primed_cache(model, processor)
    costs = {}

    def decode():
        restore(cache, base)
        mx.eval(lm.logits(lm(mx.array([[ids[-1]]]), cache)), [c.state for c in cache])

    costs[1] = median_seconds(decode, 60)
    for T in range(2, MAX_DRAFT + 2):

        def verify(T=T):
            restore(cache, base)
            hidden, states = lm.verify(mx.array([ids[-T:]]), cache)
            mx.eval(lm.logits(hidden), [s for s in states if s is not None])
            keep_verified(cache, start_length, states, 1)

        costs[T] = median_seconds(verify, 60)
    return costs


def distinct_experts(model, processor) -> dict:
    """Mean distinct routed experts per MoE layer that a verify of T positions reads (T = 1: a decode step)."""
    lm = model.language_model
    ids = prompt_token_ids(processor, [{"role": "user", "content": PROMPT}], enable_thinking=False)
    routed: list[mx.array] = []
    original = SparseMoE.route

    def recording(self, x):
        indices, weights = original(self, x)
        routed.append(indices)
        return indices, weights

    SparseMoE.route = recording
    os.environ["MLX_QWEN35_COMPILE"] = "0"  # a compiled graph calls route only while tracing
    try:
        out = {}
        for T in range(1, MAX_DRAFT + 2):
            counts = []
            for start in range(0, len(ids) - T, T):  # windows of the prompt, each verified after a decode state
                cache = make_cache(model)
                prefill(model, mx.array(ids[: start + 1]), cache)
                lm(mx.array([[ids[start + 1]]]), cache)
                routed.clear()
                if T == 1:
                    lm(mx.array([[ids[start + 1]]]), cache)
                else:
                    lm.verify(mx.array([ids[start + 1 : start + 1 + T]]), cache)
                counts += [len(set(mx.array(i).reshape(-1).tolist())) for i in routed]
            out[T] = statistics.mean(counts)
        return out
    finally:
        SparseMoE.route = original
        del os.environ["MLX_QWEN35_COMPILE"]


def matmul_cost_per_rows(model) -> dict:
    """Median µs of the model's lm_head (a quantised matmul) on 1, 2 and 4 rows: the verify's cost in one number."""
    head = model.language_model.lm_head
    out = {}
    for rows in (1, 2, 4):
        x = mx.random.normal((1, rows, model.config.text.hidden_size))
        out[rows] = median_seconds(lambda x=x: mx.eval(head(x)), 100) * 1e6
    return out


def rollback_costs(model, processor, verify_seconds: dict) -> dict:
    """The three rollback designs after a verify of 4 positions that accepted 1 draft (2 positions kept)."""
    lm = model.language_model
    ids, cache, start_length, base = primed_cache(model, processor)
    hidden, states = lm.verify(mx.array([ids[-4:]]), cache)
    mx.eval(hidden, [s for s in states if s is not None])

    def keep():
        keep_verified(cache, start_length, states, 2)
        mx.eval([c.state for c in cache])

    def rerun():  # snapshot design: back to the snapshot, then the kept 2 positions again through the trunk
        restore(cache, base)
        _, again = lm.verify(mx.array([ids[-2:]]), cache)
        mx.eval([s for s in again if s is not None], [c.state for c in cache])

    # δ replay: S ← α S + δ kᵀ for the kept steps, on every DeltaNet layer's state (shapes of this model)
    layers = [c for c in cache if hasattr(c, "cache") and not hasattr(c, "offset")]
    S = [c.cache[1] for c in layers]
    B, Hv, Dv, Dk = S[0].shape
    alphas = [mx.random.uniform(shape=(B, Hv, 1, 1)) for _ in range(2)]
    deltas = [mx.random.normal((B, Hv, Dv, 1)) for _ in range(2)]
    keys = [mx.random.normal((B, Hv, 1, Dk)) for _ in range(2)]
    mx.eval(alphas, deltas, keys)

    def replay():
        out = []
        for state in S:
            for a, d, k in zip(alphas, deltas, keys):
                state = a * state + d * k
            out.append(state)
        mx.eval(out)

    return {
        "per-position states (ours)": median_seconds(keep, 60),
        "snapshot + re-run accepted prefix": median_seconds(rerun, 30),
        "delta replay (+ writing the deltas in verify)": median_seconds(replay, 60),
        "decode step": verify_seconds[1],
    }


def mlx_vlm_runners(workdir: Path, tokens: int) -> dict | None:
    """mlx-vlm's own conversion, MTP split and MTP drafter on the same checkpoint: a run per configuration → (tokens/s,)."""
    try:
        from mlx_vlm import convert as vlm_convert
        from mlx_vlm import load as vlm_load
        from mlx_vlm.generate.dispatch import stream_generate
        from mlx_vlm.prompt_utils import apply_chat_template
        from mlx_vlm.speculative.drafters import load_drafter
        from mlx_vlm.split_mtp import split_mtp
    except ImportError:
        return None
    target, drafter = workdir / "mlx-vlm-4bit", workdir / "mlx-vlm-mtp"
    vlm_convert(hf_path=str(DEMO_WEIGHTS_DIR), mlx_path=str(target), quantize=True, q_bits=4, dtype="float32")
    split_mtp(str(DEMO_WEIGHTS_DIR), str(drafter))
    model, processor = vlm_load(str(target))
    draft_model, kind = load_drafter(str(drafter), kind="mtp")
    prompt = apply_chat_template(processor, model.config, PROMPT, enable_thinking=False)
    configs = {"off": {}} | {
        f"k={k}": dict(draft_model=draft_model, draft_kind=kind, draft_block_size=k + 1) for k in (1, 2, 3)
    }

    def runner(kwargs):
        def run():
            responses = list(stream_generate(model, processor, prompt, max_tokens=tokens, temperature=0.0, **kwargs))
            return (responses[-1].generation_tps,)

        return run

    return {f"mlx-vlm {name}": runner(kwargs) for name, kwargs in configs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-mlx-vlm", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        convert(hf_path=str(DEMO_WEIGHTS_DIR), mlx_path=workdir / "mlx-4bit", recipe="4bit")
        model, processor = load(str(workdir / "mlx-4bit"))
        theirs = None if args.skip_mlx_vlm else mlx_vlm_runners(workdir, args.tokens)
        ours = our_runners(model, processor, args.tokens)
        results = interleaved(ours | (theirs or {}), args.rounds)
        print(f"\nmlx-qwen35, demo model 4-bit, {mx.default_device()}, greedy, {args.tokens} tokens")
        off = results["off"][0]
        reference = results["off"][1][2]
        print(f"{'':16}{'tok/s':>8}{'× off':>8}{'tok/step':>10}  acceptance by depth")
        for name in ours:
            tps, (_, s, tokens) = results[name]
            assert tokens == reference, f"{name}: the tokens differ from MTP off"
            depths = " ".join(f"{s.acceptance(d):.2f}" for d in range(len(s.tested_at)))
            per_step = len(tokens) / s.steps if s.steps else 1.0
            print(f"{name:16}{tps:8.1f}{tps / off:8.2f}{per_step:10.2f}  {depths}")
        if theirs is None and not args.skip_mlx_vlm:
            print("mlx-vlm is not installed: no comparison")
        elif theirs:
            print("\nmlx-vlm 0.7 on the same checkpoint (its conversion, its MTP split), same rounds, tok/s:")
            their_off = results["mlx-vlm off"][0]
            for name in ("off", "k=1", "k=2", "k=3"):
                tps = results[f"mlx-vlm {name}"][0]
                print(
                    f"  {name:8}{tps:8.1f}  (× its off {tps / their_off:.2f}; ours / its {results[name][0] / tps:.2f})"
                )
            best_ours = max(results[f"k={k}"][0] for k in (1, 2, 3))
            best_theirs = max(results[f"mlx-vlm k={k}"][0] for k in (1, 2, 3))
            print(f"ours / mlx-vlm: off {off / their_off:.2f}×, best fixed k {best_ours / best_theirs:.2f}×")
        costs = verify_costs(model, processor)
        print(
            "\nverify over T positions, relative to one decode step: "
            + ", ".join(f"T={T} {c / costs[1]:.2f}×" for T, c in costs.items() if T > 1)
        )
        if model.config.text.is_moe:
            experts = distinct_experts(model, processor)
            top_k, total = model.config.text.num_experts_per_tok, model.config.text.num_experts
            print(
                f"distinct experts per MoE layer read by a verify (top-{top_k} of {total}): "
                + ", ".join(f"T={T} {n:.1f}" for T, n in experts.items())
            )
        rows = matmul_cost_per_rows(model)
        print("lm_head (quantised matmul) µs at 1 / 2 / 4 rows: " + " / ".join(f"{v:.0f}" for v in rows.values()))
        rollback = rollback_costs(model, processor, costs)
        print(
            "\nrollback after a 4-position verify that kept 2 (ms): "
            + ", ".join(f"{k} {v * 1e3:.2f}" for k, v in rollback.items())
        )


if __name__ == "__main__":
    main()
