"""Per-token communication of the three multi-Mac layouts, measured on loopback, and the decode projection for
two and four M3 Ultras over Thunderbolt 5 (docs/architecture.md §21).

Starts RANKS processes on 127.0.0.1 with the ring backend (as mlx.launch would), for each layout; every rank
counts the messages its forward passes build (sends, receives, all_sums: calls and bytes) over the decode steps
of a greedy reply, and rank 0 reports them per token with the decode speed next to one process's (decode runs
uncompiled here: a compiled graph replays its collectives without calling the Python functions counted). Then it
projects the Qwen3.5-397B-A17B (4-bit) on two and four M3 Ultras: each Mac's memory-bandwidth ceiling (§19) on
the bytes its share reads per token (``held_tensor_bytes``, ``decode_read_bytes``), plus the messages' latency
and bytes over RDMA, against one Mac.

    python benchmarks/bench_distributed.py [--ranks 2] [--tokens 24] [--latency-us 10] [--bandwidth-gbs 7.6]
        [--projection-only]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlx_qwen35.config import ModelConfig, parse_config  # noqa: E402
from mlx_qwen35.model.parallel import RankShare, stage_text_config  # noqa: E402
from mlx_qwen35.weights.memory_plan import (  # noqa: E402
    RELEASED_CONFIGS,
    ROOFLINE_CONTEXT_TOKENS,
    decode_read_bytes,
    predicted_tensor_bytes,
)
from mlx_qwen35.weights.quantize import RECIPES  # noqa: E402
from mlx_qwen35.weights.sharding import held_tensor_bytes  # noqa: E402

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


def _read_seconds(cfg: ModelConfig, tensors: dict[str, int], shares: list[RankShare]) -> float:
    """Seconds one rank reads its share of a decode token at ``M3_ULTRA_GBS``: its tensors, caches and states.

    ``shares``: how it is cut, applied in turn (a pipeline stage, then the tensor or expert slice within it).
    """
    text = cfg.text
    for share in shares:
        tensors = held_tensor_bytes(tensors, share, cfg.text)
        text = stage_text_config(text, share)
    local = dataclasses.replace(cfg, text=text)
    return decode_read_bytes(local, tensors, ROOFLINE_CONTEXT_TOKENS) / (M3_ULTRA_GBS * 1e9)


def projection(ranks: int, latency_us: float, bandwidth_gbs: float) -> str:
    """Markdown table: decode tok/s ceilings of the 397B (4-bit) on one M3 Ultra and on ``ranks`` of them, and the
    four-Mac layouts (flat, or pipeline across two pairs with each pair sliced)."""
    cfg = parse_config(RELEASED_CONFIGS[FLAGSHIP])
    tensors = predicted_tensor_bytes(cfg, RECIPES["4bit"])
    layers = cfg.text.num_hidden_layers
    hidden_bytes = cfg.text.hidden_size * 2  # one token's bf16 hidden state
    whole = range(layers)

    def all_sum(n: int, nbytes: int) -> float:
        # JACCL's mesh (one Thunderbolt cable per pair of Macs) sends each rank's vector to every peer at once.
        return latency_us * 1e-6 + (n - 1) * nbytes / (bandwidth_gbs * 1e9)

    def logits_gather(n: int) -> float:  # tensor mode: each rank's bf16 logits of its V/n vocabulary rows
        return all_sum(n, cfg.text.vocab_size // n * 2)

    def hop(nbytes: int) -> float:
        return latency_us * 1e-6 + nbytes / (bandwidth_gbs * 1e9)

    def row(name: str, read_s: float, read_gb: float, messages: str, comm_s: float) -> str:
        return f"| {name} | {read_gb:.1f} | {messages} | {comm_s * 1e3:.2f} | {1 / (read_s + comm_s):.0f} |"

    one = _read_seconds(cfg, tensors, [])
    gb = M3_ULTRA_GBS  # seconds × GB/s = GB read
    rows = [
        "| layout | GB read per token per Mac | collectives per token | their ms | decode ceiling (tok/s) |",
        "|---|---|---|---|---|",
        row("one M3 Ultra", one, one * gb, "0", 0.0),
    ]

    def flat(n: int) -> list[str]:
        stages = _halves(layers, n)
        pipeline_read = sum(_read_seconds(cfg, tensors, [RankShare("pipeline", r, n, stages[r])]) for r in range(n))
        expert = _read_seconds(cfg, tensors, [RankShare("expert", 0, n, whole)])
        tensor = _read_seconds(cfg, tensors, [RankShare("tensor", 0, n, whole)])
        token = all_sum(n, 4)
        return [
            row(f"pipeline, {n} M3 Ultras", pipeline_read, pipeline_read * gb / n, f"{n} hops + 1", n * hop(hidden_bytes) + token),
            row(f"expert, {n} M3 Ultras", expert, expert * gb, f"{layers} all_sums + 1", layers * all_sum(n, hidden_bytes) + token),
            row(f"tensor, {n} M3 Ultras", tensor, tensor * gb, f"{2 * layers} all_sums + 1 + logits all_gather",
                2 * layers * all_sum(n, hidden_bytes) + token + logits_gather(n)),
        ]  # fmt: skip

    rows += flat(ranks)
    if ranks != 4:
        rows += flat(4)
    # Four Macs as two pairs: a pipeline stage per pair (the stages run one after another), each pair sliced.
    pairs = _halves(layers, 2)
    for mode, per_layer in (("expert", 1), ("tensor", 2)):
        read = sum(
            _read_seconds(cfg, tensors, [RankShare("pipeline", s, 2, pairs[s]), RankShare(mode, 0, 2, range(len(pairs[s])))])
            for s in range(2)
        )  # fmt: skip
        comm = per_layer * layers * all_sum(2, hidden_bytes) + 2 * hop(hidden_bytes) + all_sum(4, 4)
        messages = f"{per_layer * layers} all_sums in pairs + 2 hops + 1"
        if mode == "tensor":
            comm += logits_gather(2)
            messages += " + logits all_gather"
        rows.append(row(f"pipeline over 2 pairs × {mode} in each, 4 M3 Ultras", read, read * gb / 2, messages, comm))
    return "\n".join(rows)


def _halves(layers: int, n: int) -> list[range]:
    """``n`` equal runs of the layers (the projection's pipeline stages)."""
    return [range(r * layers // n, (r + 1) * layers // n) for r in range(n)]


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
    ap.add_argument("--projection-only", action="store_true", help="Skip the loopback measurement.")
    args = ap.parse_args()
    if args.projection_only:
        print_projection(args)
        return
    work = Path(tempfile.gettempdir()) / "mlx-qwen35-bench-distributed"
    work.mkdir(exist_ok=True)
    model_dir = build_model(work)
    out = Path(tempfile.mkdtemp(dir=work))
    (single,) = launch(model_dir, "single", 1, args.tokens, out)
    print(f"loopback, {args.ranks} ranks, {args.tokens} greedy tokens; per decode token on rank 0:")
    print(
        "| layout | sends | receives | all_sums | all_gathers | bytes sent + received + reduced | decode tok/s | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|")
    print(f"| one process | 0 | 0 | 0 | 0 | 0 | {single['tps']:.1f} | - |")
    for mode in ("pipeline", "expert", "tensor"):
        lead = launch(model_dir, mode, args.ranks, args.tokens, out)[0]
        calls, sizes = lead["calls"], lead["bytes"]
        print(
            f"| {mode} | {calls.get('send', 0):.0f} | {calls.get('recv', 0):.0f} | {calls.get('all_sum', 0):.0f} | "
            f"{calls.get('all_gather', 0):.0f} | "
            f"{sum(sizes.values()):,.0f} | {lead['tps']:.1f} | {lead['tokens'] == single['tokens']} |"
        )
    print()
    print_projection(args)


def print_projection(args: argparse.Namespace) -> None:
    print(f"{FLAGSHIP} (4-bit, {ROOFLINE_CONTEXT_TOKENS}-token context), ceilings at {M3_ULTRA_GBS} GB/s per Mac, ")
    print(f"RDMA {args.latency_us:g} µs per message and {args.bandwidth_gbs:g} GB/s per link:\n")
    print(projection(args.ranks, args.latency_us, args.bandwidth_gbs))


if __name__ == "__main__":
    main()
