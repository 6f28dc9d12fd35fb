"""Streamed experts against mlx-vlm's ``moe_offload`` on the same checkpoint, at the same budgets, in the same run.

For the trained demo model (skewed routing) and a random model of its shape: mlx-vlm converts the HF
checkpoint to 4 bits (``mlx_vlm.convert``); ``mlx_vlm.moe_offload.repack`` makes its offload dir and our
``expert-store`` repacks the *same* mlx-vlm dir (calibrated on the demo corpus's training split). Then, for
each budget (a share of the routed experts' bytes, passed to mlx-vlm as ``expert_cache_gb``), each runtime
loads once and answers the held-out questions greedily in turn (one session: the cache carries over), the two
runtimes interleaved prompt by prompt so that other load on the machine slows both alike.

A fourth runtime isolates the offload from the model code: our model with its MoE layers streaming through
mlx-vlm's ``ExpertStore``/``OffloadedSwitchGLU`` (their caching and reads) instead of ours.

Measured per runtime, over the decode steps (after each prompt's first token):
* bytes read per token: the process's ``rchar`` (/proc/self/io: every byte through read/pread, whoever
  issued it; MLX reads safetensors with pread), so both runtimes are counted the same way;
* tokens/s, and the hit rate each runtime reports;
* whether the greedy tokens agree.
The held-out prompts are run in ``--rounds`` rounds of ``--prompts`` each (different prompts; one session, so the
caches carry over), the runtimes' order rotated each round; tokens/s ×mlx-vlm is the
median of the rounds' ratios (min and max beside it), so a burst of load on the machine moves one round, not all.

What any cache could do: the routing of our run without prefetch (prefill and decode, in order) is replayed
through three policies at the same number of expert slots, counting the experts read in decode: mlx-vlm's LRU
(its prefill bypass included), Belady's (evicts the expert used furthest in the future: the least any cache can
read), and the static oracle (keeps the experts most used in this very decode: the best online policy for
routing drawn i.i.d. from a fixed distribution; its misses read into room beside the budget, so it is optimistic;
"in budget": it keeps top-k fewer and its misses go through an LRU of top-k slots, as a cache's must). Ours is
its own misses in the same decode calls (bytes over the decode tokens count another window: the first decode
step runs before the first token is yielded).
Before each prompt the expert files' pages are dropped from the OS page cache (``POSIX_FADV_DONTNEED``),
so reads go to the disk rather than to memory (on this Linux box, a virtual disk; on a Mac, the SSD).

    python benchmarks/bench_expert_offload.py [--workdir DIR] [--budgets 10 25 50 100] [--prompts 6] [--tokens 48]
"""

from __future__ import annotations

import argparse
import bisect
import glob
import json
import os
import shutil
import statistics
import sys
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_qwen35.surfaces.demo import DEMO_WEIGHTS_DIR  # noqa: E402


def rchar() -> int:
    """Bytes this process has read through read(2)/pread(2) so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def drop_cached_pages(files: list[str]) -> None:
    """Forget the files' pages in the OS page cache, so the next reads go to the disk."""
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def prepare(name: str, hf: Path, work: Path, calibration: str) -> dict[str, Path]:
    """mlx-vlm's 4-bit conversion of ``hf``, its offload repack, and our store repacked from that same dir."""
    from mlx_vlm.convert import convert as vlm_convert
    from mlx_vlm.moe_offload import repack as vlm_repack

    from mlx_qwen35.surfaces.expert_store import calibrate
    from mlx_qwen35.weights.expert_repack import repack

    root = work / name
    dirs = {"vlm": root / "mlx-vlm-4bit", "vlm_offload": root / "mlx-vlm-offload", "ours": root / "ours-store"}
    if not dirs["vlm"].exists():
        # float32: mlx-vlm's chunked DeltaNet prefill calls gather_mm, which MLX's CPU runs in float32 only
        vlm_convert(str(hf), mlx_path=str(dirs["vlm"]), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
    if not dirs["vlm_offload"].exists():
        vlm_repack(str(dirs["vlm"]), str(dirs["vlm_offload"]))
    if not dirs["ours"].exists():
        repack(dirs["vlm"], dirs["ours"])
        calibrate(dirs["ours"], calibration)
    return dirs


def ours_runtime(model_dir: Path, budget: str | None, tokens: int, prefetch: bool = True) -> tuple:
    """(generate(messages) → token ids, the expert files, the cache's counters) for our store at ``budget``."""
    from mlx_qwen35.runtime.generation import stream_generate
    from mlx_qwen35.weights.loading import load

    model, processor = load(str(model_dir), expert_memory=budget)
    if model.expert_cache is not None:
        model.expert_cache.prefetch = prefetch

    def generate(messages):
        return (r.token for r in stream_generate(model, processor, messages, max_tokens=tokens, enable_thinking=False))

    files = sorted(glob.glob(str(model_dir / "experts" / "*.bin")))
    cache = generate.cache = model.expert_cache
    return generate, files, cache.as_dict if cache else (lambda: {"hit_rate": None, "peak_resident_bytes": 0})


def vlm_runtime(model_dir: Path, budget_bytes: int | None, tokens: int) -> tuple:
    """The same for mlx-vlm's offload dir with ``expert_cache_gb`` = the same bytes (or its plain dir: None)."""
    from mlx_vlm import load, stream_generate

    options = {} if budget_bytes is None else {"expert_cache_gb": budget_bytes / 1e9}
    model, processor = load(str(model_dir), **options)
    template = processor.tokenizer

    def generate(messages):
        text = template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        return (r.token for r in stream_generate(model, processor, text, max_tokens=tokens, temperature=0.0))

    files = sorted(glob.glob(str(model_dir / "experts" / "*.safetensors")))
    store = getattr(model, "moe_offload_store", None)
    return generate, files, (lambda: store.stats()) if store else (lambda: {"hit_rate": None})


class VlmStoreInOurModel:
    """mlx-vlm's ``ExpertStore`` + ``OffloadedSwitchGLU`` behind our MoE's cache seam: their caching and reads, our model."""

    def __init__(self, offload_dir: Path, budget_bytes: int, group_size: int = 64, bits: int = 4):
        from mlx_lm.models.switch_layers import SwiGLU
        from mlx_vlm.models.switch_layers import OffloadedSwitchGLU
        from mlx_vlm.moe_offload import ExpertStore

        self.store = ExpertStore(str(offload_dir), budget_bytes)
        quant = (group_size, bits, "affine")
        self.layers = {
            lid: OffloadedSwitchGLU(self.store, lid, quant, quant, quant, SwiGLU()) for lid in self.store._maps
        }

    def routed(self, layer, x, indices, weights, experts):
        return (self.layers[layer](x, indices) * weights[..., None]).sum(axis=-2)


def vlm_store_runtime(model_dir: Path, offload_dir: Path, budget_bytes: int, tokens: int) -> tuple:
    """Our model (from our store dir) with its MoE layers streaming through mlx-vlm's store instead of ours."""
    from mlx_qwen35.runtime.generation import stream_generate
    from mlx_qwen35.weights.loading import load

    model, processor = load(str(model_dir))
    adapter = VlmStoreInOurModel(offload_dir, budget_bytes)
    for layer in model.language_model.layers:
        layer.mlp.expert_cache = adapter

    def generate(messages):
        return (r.token for r in stream_generate(model, processor, messages, max_tokens=tokens, enable_thinking=False))

    files = sorted(glob.glob(str(offload_dir / "experts" / "*.safetensors")))
    return generate, files, adapter.store.stats


def sessions(runtimes: dict[str, tuple], rounds: list[list[list[dict]]]) -> dict[str, dict]:
    """Each round's prompts through each runtime in turn (interleaved, so load on the machine hits all alike).

    Per runtime: decode bytes (rchar) and seconds, from each prompt's first token on; page cache dropped before;
    tokens/s per round too, the runtimes' order rotated each round.
    """
    totals = {
        name: {"bytes": 0, "request_bytes": 0, "seconds": 0.0, "tokens": 0, "replies": [], "round_tok_s": []}
        for name in runtimes
    }
    names = list(runtimes)
    for round_, prompts in enumerate(rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        spent = {name: [0.0, 0] for name in names}
        for messages in prompts:
            for name in order:
                generate, files, _ = runtimes[name]
                drop_cached_pages(files)
                reply, request_start = [], rchar()
                for token in generate(messages):
                    if not reply:
                        start_bytes, start = rchar(), time.perf_counter()
                    reply.append(int(token))
                t = totals[name]
                seconds = time.perf_counter() - start
                t["seconds"] += seconds
                t["bytes"] += rchar() - start_bytes
                t["request_bytes"] += rchar() - request_start
                t["tokens"] += len(reply) - 1
                spent[name][0] += seconds
                spent[name][1] += len(reply) - 1
                t["replies"].append(reply)
        for name in names:
            totals[name]["round_tok_s"].append(spent[name][1] / spent[name][0])
    return {
        name: {
            "bytes_per_token": t["bytes"] / max(t["tokens"], 1),
            "request_bytes_per_token": t["request_bytes"] / max(t["tokens"], 1),
            "tok_s": statistics.median(t["round_tok_s"]),
            "round_tok_s": t["round_tok_s"],
            "tokens": t["tokens"],
            "replies": t["replies"],
            "stats": runtimes[name][2](),
        }
        for name, t in totals.items()
    }


# ---------------------------------------------------------------------------------------------- what any cache could do
# A trace is the routing of every MoE call in order: (layer, expert indices [tokens, k], decode?); a policy replays it
# with room for ``slots`` experts and returns the experts it reads in decode calls.


@dataclass
class Recording:
    """A run's trace, and the cache's own reads in its decode calls (counted as the replays count theirs)."""

    calls: list = field(default_factory=list)  # (layer, indices, decode); indices stay lazy
    decode_reads: int = 0


def record_routing(cache) -> Recording:
    """Wrap ``cache.routed`` to append each call's (layer, indices, decode) and count its misses in decode calls."""
    recording, routed = Recording(), cache.routed

    def recorded(layer, x, indices, weights, experts):
        decode, misses = x.size == x.shape[-1], cache.stats.misses
        recording.calls.append((layer, indices, decode))
        out = routed(layer, x, indices, weights, experts)
        recording.decode_reads += decode * (cache.stats.misses - misses)
        return out

    cache.routed = recorded
    return recording


def lru_reads(trace: list, slots: int, num_experts: int) -> int:
    """mlx-vlm's ``ExpertStore``: LRU over (layer, expert); a call routed to over half the experts bypasses it."""
    lru, reads = OrderedDict(), 0
    for layer, idx, decode in trace:
        used = np.unique(idx)
        if 2 * len(used) > num_experts:
            continue
        for e in used:
            if (layer, e) in lru:
                lru.move_to_end((layer, e))
            else:
                lru[(layer, e)] = True
                reads += decode
        while len(lru) > slots:
            lru.popitem(last=False)
    return reads


def belady_reads(trace: list, slots: int) -> int:
    """Belady's MIN: on a miss evict the resident expert (not used by this call) whose next use is furthest away."""
    uses: dict[tuple, list[int]] = {}
    for t, (layer, idx, _) in enumerate(trace):
        for e in np.unique(idx):
            uses.setdefault((layer, e), []).append(t)

    def next_use(key, t):
        times = uses[key]
        i = bisect.bisect_right(times, t)
        return times[i] if i < len(times) else len(trace)

    resident, reads = set(), 0
    for t, (layer, idx, decode) in enumerate(trace):
        needed = [(layer, e) for e in np.unique(idx)]
        reads += decode * sum(key not in resident for key in needed)
        if len(needed) > slots:  # a prefill chunk in groups: keep what is needed soonest
            resident = set(sorted(resident | set(needed), key=lambda key: next_use(key, t))[:slots])
            continue
        for key in needed:
            if key in resident:
                continue
            if len(resident) >= slots:
                resident.remove(max(resident - set(needed), key=lambda v: next_use(v, t)))
            resident.add(key)
    return reads


def static_reads(trace: list, slots: int, scratch: int = 0) -> int:
    """The static oracle: the experts used in most decode calls stay resident; every other use is a read.

    ``scratch`` = 0: all ``slots`` kept, the other experts read into room beside them; else ``slots - scratch`` kept
    and the others through an LRU of ``scratch`` slots (a call's own experts always fit), within the slots.
    """
    uses = Counter((layer, e) for layer, idx, decode in trace if decode for e in np.unique(idx))
    kept = {key for key, _ in uses.most_common(slots - scratch)}
    if not scratch:
        return sum(n for key, n in uses.items() if key not in kept)
    lru, reads = OrderedDict(), 0
    for layer, idx, decode in trace:
        others = [(layer, e) for e in np.unique(idx) if (layer, e) not in kept]
        for key in others:
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = True
                reads += decode
        while len(lru) > max(scratch, len(others)):
            lru.popitem(last=False)
    return reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-expert-offload"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="Rounds of the prompts; tok/s is the rounds' median.")
    parser.add_argument("--models", nargs="+", default=["trained", "random"])
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    from demo_corpus import first_paragraph, stdlib_docs

    from mlx_qwen35.weights.random_checkpoint import write_random_hf_checkpoint

    docs = stdlib_docs()
    held_out = [d for d in docs if d.held_out][: args.prompts * args.rounds]
    prompts = [[{"role": "user", "content": d.question}] for d in held_out]
    rounds = [prompts[i : i + args.prompts] for i in range(0, len(prompts), args.prompts)]
    calibration = "\n\n".join(f"{d.question}\n{first_paragraph(d.text)}" for d in docs if not d.held_out)[:40000]
    args.workdir.mkdir(parents=True, exist_ok=True)
    sources = {"trained": DEMO_WEIGHTS_DIR}
    if "random" in args.models:
        random_hf = args.workdir / "random-hf"
        if not random_hf.exists():
            config = json.loads((DEMO_WEIGHTS_DIR / "config.json").read_text())
            write_random_hf_checkpoint(random_hf, config, seed=0)
            shutil.copyfile(DEMO_WEIGHTS_DIR / "tokenizer.json", random_hf / "tokenizer.json")
        sources["random"] = random_hf
    rows = []
    for name in args.models:
        dirs = prepare(name, sources[name], args.workdir, calibration)
        config = json.loads((dirs["ours"] / "config.json").read_text())["text_config"]
        print(f"\n{name}: {config['num_experts']} experts, top-{config['num_experts_per_tok']}, mx {mx.__version__}")
        from mlx_qwen35.weights.expert_store import ExpertStore

        total = ExpertStore(dirs["ours"]).total_bytes
        resident = sessions(
            {"ours": ours_runtime(dirs["vlm"], None, args.tokens), "vlm": vlm_runtime(dirs["vlm"], None, args.tokens)},
            rounds,
        )
        print(
            f"fully resident (no store): ours {resident['ours']['tok_s']:.1f} tok/s, mlx-vlm "
            f"{resident['vlm']['tok_s']:.1f} tok/s (ratio {resident['ours']['tok_s'] / resident['vlm']['tok_s']:.2f})"
        )
        store = ExpertStore(dirs["ours"])
        expert_bytes = {store.expert_bytes(layer) for layer in store.layers}
        assert len(expert_bytes) == 1, "the oracles count slots: every layer's experts the same size"
        expert_bytes = expert_bytes.pop()
        head = ["budget", "runtime", "decode B/tok", "request B/tok", "tok/s", "hit rate", "bytes ×vlm", "tok/s ×vlm"]
        head += ["(min–max)", "same as ours"]
        print(("{:>7} {:>20} " + "{:>13} " * (len(head) - 2)).format(*head))
        for budget in args.budgets:
            runtimes = {
                "ours": ours_runtime(dirs["ours"], f"{budget}%", args.tokens),
                "ours, no prefetch": ours_runtime(dirs["ours"], f"{budget}%", args.tokens, prefetch=False),
                "mlx-vlm": vlm_runtime(dirs["vlm_offload"], budget * total // 100, args.tokens),
                "vlm store, our model": vlm_store_runtime(
                    dirs["ours"], dirs["vlm_offload"], budget * total // 100, args.tokens
                ),
            }
            recording = record_routing(runtimes["ours, no prefetch"][0].cache)
            measured = sessions(runtimes, rounds)
            vlm = measured["mlx-vlm"]
            for runtime, r in measured.items():
                same = sum(a == b for a, b in zip(r["replies"], measured["ours"]["replies"]))
                row = {
                    "model": name,
                    "budget_pct": budget,
                    "budget_bytes": budget * total // 100,
                    "runtime": runtime,
                    "decode_bytes_per_token": r["bytes_per_token"],
                    "request_bytes_per_token": r["request_bytes_per_token"],
                    "tok_s": r["tok_s"],
                    # a full budget hands the experts to the layers after the first prompt: no lookups counted after
                    "hit_rate": None if r["stats"].get("handed_over") else r["stats"].get("hit_rate"),
                    "bytes_vs_vlm": r["bytes_per_token"] / max(vlm["bytes_per_token"], 1e-9),
                    "request_bytes_vs_vlm": r["request_bytes_per_token"] / max(vlm["request_bytes_per_token"], 1e-9),
                    "tok_s_vs_vlm": statistics.median(a / b for a, b in zip(r["round_tok_s"], vlm["round_tok_s"])),
                    "tok_s_vs_vlm_min": min(a / b for a, b in zip(r["round_tok_s"], vlm["round_tok_s"])),
                    "tok_s_vs_vlm_max": max(a / b for a, b in zip(r["round_tok_s"], vlm["round_tok_s"])),
                    "replies_as_ours": f"{same}/{len(r['replies'])}",
                    "peak_resident_bytes": r["stats"].get("peak_resident_bytes"),
                    "resident_tok_s": resident["vlm" if runtime == "mlx-vlm" else "ours"]["tok_s"],
                }
                rows.append(row)
                hit_rate = "—" if row["hit_rate"] is None else f"{row['hit_rate']:.3f}"
                print(
                    f"{budget:>6}% {runtime:>20} {row['decode_bytes_per_token']:>13,.0f} "
                    f"{row['request_bytes_per_token']:>13,.0f} {row['tok_s']:>13.1f} {hit_rate:>13} "
                    f"{row['bytes_vs_vlm']:>13.2f} {row['tok_s_vs_vlm']:>13.2f} "
                    f"{row['tok_s_vs_vlm_min']:>6.2f}–{row['tok_s_vs_vlm_max']:<6.2f} {row['replies_as_ours']:>13}",
                    flush=True,
                )
            if budget >= 100:
                continue  # room for every expert: nothing for any policy to read after the first prompt
            slots = budget * total // 100 // expert_bytes
            trace = [
                (layer, np.array(idx).reshape(-1, idx.shape[-1]), decode) for layer, idx, decode in recording.calls
            ]
            lru = lru_reads(trace, slots, config["num_experts"])
            bound = {
                "model": name,
                "budget_pct": budget,
                "runtime": "bounds (ours' routing)",
                "slots": slots,
                "lru_reads": lru,
                "belady_vs_lru": belady_reads(trace, slots) / max(lru, 1),
                "static_oracle_vs_lru": static_reads(trace, slots) / max(lru, 1),
                "static_in_budget_vs_lru": static_reads(trace, slots, config["num_experts_per_tok"]) / max(lru, 1),
                "ours_vs_lru": recording.decode_reads / max(lru, 1),
            }
            rows.append(bound)
            print(
                f"{'':>7} {'any cache, same routing':>20}: {slots} slots; experts read in decode ×LRU's ({lru}): "
                f"Belady {bound['belady_vs_lru']:.2f}, static oracle {bound['static_oracle_vs_lru']:.2f} "
                f"(in budget {bound['static_in_budget_vs_lru']:.2f}), ours (no prefetch) {bound['ours_vs_lru']:.2f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
