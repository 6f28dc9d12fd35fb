"""Per-token communication of the two multi-Mac layouts, measured on loopback, and the decode projection for
two M3 Ultras over Thunderbolt 5 (docs/architecture.md §21).

Starts RANKS processes on 127.0.0.1 with the ring backend (as mlx.launch would), for each layout; every rank
counts the messages its forward passes build (sends, receives, all_sums: calls and bytes) over the decode steps
of a greedy reply, and rank 0 reports them per token with the decode speed next to one process's (decode runs
uncompiled here: a compiled graph replays its collectives without calling the Python functions counted). Then it
projects the Qwen3.5-397B-A17B (4-bit) on two M3 Ultras: each Mac's memory-bandwidth ceiling (§19) plus
the collectives' latency and bytes over RDMA, against one Mac.

    python benchmarks/bench_distributed.py [--ranks 2] [--tokens 24] [--latency-us 10] [--bandwidth-gbs 7.6]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_qwen35.config import parse_config  # noqa: E402
from mlx_qwen35.weights.memory_plan import (  # noqa: E402
    _EXPERTS,
    RELEASED_CONFIGS,
    ROOFLINE_CONTEXT_TOKENS,
    decode_read_bytes,
    predicted_tensor_bytes,
)
from mlx_qwen35.weights.quantize import RECIPES  # noqa: E402

M3_ULTRA_GBS = 819  # Apple's published memory bandwidth (memory_plan.CHIP_BANDWIDTH_GBS)
FLAGSHIP = "Qwen3.5-397B-A17B"


def build_model(root: Path) -> Path:
    """A 12-layer random MoE of the demo's shapes (3 attention layers), converted to float32."""
    from mlx_qwen35.surfaces.demo import demo_config
    from mlx_qwen35.weights.convert import convert
    from mlx_qwen35.weights.random_checkpoint import write_random_hf_checkpoint

    if (root / "mlx" / "config.json").exists():
        return root / "mlx"
    config = demo_config()
    config["text_config"]["layer_types"] = (["linear_attention"] * 3 + ["full_attention"]) * 3
    config["text_config"]["num_hidden_layers"] = 12
    write_random_hf_checkpoint(root / "hf", config, seed=1)
    convert(str(root / "hf"), root / "mlx", recipe="bf16", dtype="float32", shard_size_gb=0.01)
    return root / "mlx"


class Counter:
    """Wraps mx.distributed's point-to-point and collective calls, counting calls and payload bytes."""

    def __init__(self):
        self.calls: dict[str, int] = {}
        self.bytes: dict[str, int] = {}
        for name in ("send", "recv", "recv_like", "all_sum", "all_gather"):
            original = getattr(mx.distributed, name)
            setattr(mx.distributed, name, self._counting(name, original))

    def _counting(self, name, original):
        def counted(*args, **kwargs):
            out = original(*args, **kwargs)
            payload = args[0] if name in ("send", "all_sum", "all_gather", "recv_like") else out
            kind = "recv" if name == "recv_like" else name
            self.calls[kind] = self.calls.get(kind, 0) + 1
            self.bytes[kind] = self.bytes.get(kind, 0) + payload.nbytes
            return out

        return counted

    def snapshot(self) -> tuple[dict, dict]:
        return dict(self.calls), dict(self.bytes)


def rank_worker(model_dir: str, mode: str, tokens: int, out: str) -> None:
    """One rank (or, mode "single", the one process): a greedy reply; per-token messages over its decode steps."""
    from mlx_qwen35.runtime.distributed import join
    from mlx_qwen35.runtime.generation import stream_text
    from mlx_qwen35.runtime.settings import GenerationSettings
    from mlx_qwen35.weights.loading import load

    share = None if mode == "single" else join(mode, Path(model_dir))
    counter = Counter()
    model, processor = load(model_dir, share=share)
    settings = GenerationSettings(max_tokens=tokens)
    prompt = processor.encode("Once upon a time there was a small model that ran on several computers.")
    start, reply = None, []
    for n, response in enumerate(stream_text(model, processor, prompt, settings), start=1):
        reply.append(response.token)
        if n == 1:
            start = counter.snapshot()  # the prefill is behind us; what follows is decode steps only
    calls, sizes = counter.snapshot()
    steps = tokens - 2  # at the first token the second's step was already built; the last builds none
    per_token = {k: (calls[k] - start[0].get(k, 0)) / steps for k in calls}
    per_token_bytes = {k: (sizes[k] - start[1].get(k, 0)) / steps for k in sizes}
    rank = share.rank if share else 0
    result = {"calls": per_token, "bytes": per_token_bytes, "tps": response.generation_tps, "tokens": reply}
    Path(out, f"{mode}-rank{rank}.json").write_text(json.dumps(result))


def launch(model_dir: Path, mode: str, ranks: int, tokens: int, out: Path) -> list[dict]:
    """Run ``ranks`` ranks of ``mode`` on loopback (bounded); their results."""
    sockets = [socket.socket() for _ in range(ranks)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    hostfile = out / f"{mode}-hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{s.getsockname()[1]}"] for s in sockets]))
    for s in sockets:
        s.close()
    command = [sys.executable, __file__, "--worker", str(model_dir), mode, str(tokens), str(out)]
    # Compiled decode graphs replay their collectives without calling Python, where they are counted.
    env = os.environ | {"MLX_HOSTFILE": str(hostfile), "MLX_QWEN35_COMPILE": "0"}
    procs = [subprocess.Popen(command, env=env | {"MLX_RANK": str(r)}) for r in range(ranks)]
    for p in procs:
        if p.wait(timeout=600) != 0:
            raise SystemExit(f"{mode}: a rank failed (exit {p.returncode})")
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(ranks)]


def projection(ranks: int, latency_us: float, bandwidth_gbs: float) -> str:
    """Markdown table: decode tok/s ceilings of the 397B (4-bit) on one M3 Ultra and on ``ranks`` of them."""
    cfg = parse_config(RELEASED_CONFIGS[FLAGSHIP])
    tensors = predicted_tensor_bytes(cfg, RECIPES["4bit"])
    experts = {k: v for k, v in tensors.items() if _EXPERTS.search(k)}
    rest = {k: v for k, v in tensors.items() if not _EXPERTS.search(k)}
    context = ROOFLINE_CONTEXT_TOKENS
    read_experts = decode_read_bytes(cfg, experts, 0) - decode_read_bytes(cfg, {}, 0)
    read_rest = decode_read_bytes(cfg, rest, context)
    bw = M3_ULTRA_GBS * 1e9
    hidden_bytes = cfg.text.hidden_size * 2  # one token's bf16 hidden state
    moe_layers = cfg.text.num_hidden_layers

    def message(nbytes: int) -> float:
        return latency_us * 1e-6 + nbytes / (bandwidth_gbs * 1e9)

    one = (read_rest + read_experts) / bw
    # Pipeline: the stages run one after another, so each token still reads every weight once; add the hops.
    pipeline = one + ranks * message(hidden_bytes) + message(4)
    # Expert: each Mac reads the non-expert weights and 1/n of the experts; one all_sum per MoE layer.
    expert = (read_rest + read_experts / ranks) / bw + moe_layers * message(hidden_bytes) + message(4)
    # Not built: the attention / DeltaNet projections sliced too (two more all_sums per layer), the upper bound.
    everything = (read_rest + read_experts) / ranks / bw + 3 * moe_layers * message(hidden_bytes) + message(4)
    rows = [
        "| layout | weights read per token per Mac (GB) | messages per token | decode ceiling (tok/s) |",
        "|---|---|---|---|",
        f"| one M3 Ultra | {(read_rest + read_experts) / 1e9:.1f} | 0 | {1 / one:.0f} |",
        f"| pipeline, {ranks} M3 Ultras | {(read_rest + read_experts) / ranks / 1e9:.1f} | "
        f"{ranks} hops + 1 token all_sum | {1 / pipeline:.0f} |",
        f"| expert, {ranks} M3 Ultras | {(read_rest + read_experts / ranks) / 1e9:.1f} | "
        f"{moe_layers} all_sums + 1 | {1 / expert:.0f} |",
        f"| (not built) every projection sliced, {ranks} M3 Ultras | {(read_rest + read_experts) / ranks / 1e9:.1f} | "
        f"{3 * moe_layers} all_sums + 1 | {1 / everything:.0f} |",
    ]
    return "\n".join(rows)


def main() -> None:
    """Measure both layouts on loopback; print the per-token messages and the Thunderbolt 5 projection."""
    if sys.argv[1:2] == ["--worker"]:
        model_dir, mode, tokens, out = sys.argv[2:6]
        rank_worker(model_dir, mode, int(tokens), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--latency-us", type=float, default=10.0, help="One RDMA message's latency (reported: 3-50 µs).")
    ap.add_argument("--bandwidth-gbs", type=float, default=7.6, help="RDMA bandwidth per rank, GB/s.")
    args = ap.parse_args()
    work = Path(tempfile.gettempdir()) / "mlx-qwen35-bench-distributed"
    work.mkdir(exist_ok=True)
    model_dir = build_model(work)
    out = Path(tempfile.mkdtemp(dir=work))
    (single,) = launch(model_dir, "single", 1, args.tokens, out)
    print(f"loopback, {args.ranks} ranks, {args.tokens} greedy tokens; per decode token on rank 0:")
    print("| layout | sends | receives | all_sums | bytes sent + received + summed | decode tok/s | same tokens |")
    print("|---|---|---|---|---|---|---|")
    print(f"| one process | 0 | 0 | 0 | 0 | {single['tps']:.1f} | - |")
    for mode in ("pipeline", "expert"):
        lead = launch(model_dir, mode, args.ranks, args.tokens, out)[0]
        calls, sizes = lead["calls"], lead["bytes"]
        print(
            f"| {mode} | {calls.get('send', 0):.0f} | {calls.get('recv', 0):.0f} | {calls.get('all_sum', 0):.0f} | "
            f"{sum(sizes.values()):,.0f} | {lead['tps']:.1f} | {lead['tokens'] == single['tokens']} |"
        )
    print(f"\n{FLAGSHIP} (4-bit, {ROOFLINE_CONTEXT_TOKENS}-token context), ceilings at {M3_ULTRA_GBS} GB/s per Mac, ")
    print(f"RDMA {args.latency_us:g} µs per message and {args.bandwidth_gbs:g} GB/s:\n")
    print(projection(args.ranks, args.latency_us, args.bandwidth_gbs))


if __name__ == "__main__":
    main()
