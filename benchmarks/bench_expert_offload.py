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
Before each prompt the expert files' pages are dropped from the OS page cache (``POSIX_FADV_DONTNEED``),
so reads go to the disk rather than to memory (on this Linux box, a virtual disk; on a Mac, the SSD).

    python benchmarks/bench_expert_offload.py [--workdir DIR] [--budgets 10 25 50 100] [--prompts 6] [--tokens 48]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

import mlx.core as mx  # noqa: E402

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
    cache = model.expert_cache
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


def sessions(runtimes: dict[str, tuple], prompts: list[list[dict]]) -> dict[str, dict]:
    """Each prompt through each runtime in turn (interleaved, so load on the machine hits both alike).

    Per runtime: decode bytes (rchar) and seconds, from each prompt's first token on; page cache dropped before.
    """
    totals = {name: {"bytes": 0, "request_bytes": 0, "seconds": 0.0, "tokens": 0, "replies": []} for name in runtimes}
    for messages in prompts:
        for name, (generate, files, _) in runtimes.items():
            drop_cached_pages(files)
            reply, request_start = [], rchar()
            for token in generate(messages):
                if not reply:
                    start_bytes, start = rchar(), time.perf_counter()
                reply.append(int(token))
            t = totals[name]
            t["seconds"] += time.perf_counter() - start
            t["bytes"] += rchar() - start_bytes
            t["request_bytes"] += rchar() - request_start
            t["tokens"] += len(reply) - 1
            t["replies"].append(reply)
    return {
        name: {
            "bytes_per_token": t["bytes"] / max(t["tokens"], 1),
            "request_bytes_per_token": t["request_bytes"] / max(t["tokens"], 1),
            "tok_s": t["tokens"] / t["seconds"],
            "tokens": t["tokens"],
            "replies": t["replies"],
            "stats": runtimes[name][2](),
        }
        for name, t in totals.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-expert-offload"))
    parser.add_argument("--budgets", type=int, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--models", nargs="+", default=["trained", "random"])
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args()
    from demo_corpus import first_paragraph, stdlib_docs

    from mlx_qwen35.weights.random_checkpoint import write_random_hf_checkpoint

    docs = stdlib_docs()
    held_out = [d for d in docs if d.held_out][: args.prompts]
    prompts = [[{"role": "user", "content": d.question}] for d in held_out]
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
            prompts,
        )
        print(
            f"fully resident (no store): ours {resident['ours']['tok_s']:.1f} tok/s, mlx-vlm "
            f"{resident['vlm']['tok_s']:.1f} tok/s (ratio {resident['ours']['tok_s'] / resident['vlm']['tok_s']:.2f})"
        )
        head = ["budget", "runtime", "decode B/tok", "request B/tok", "tok/s", "hit rate", "bytes ×vlm", "tok/s ×vlm"]
        head.append("same as ours")
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
            measured = sessions(runtimes, prompts)
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
                    "hit_rate": r["stats"].get("hit_rate"),
                    "bytes_vs_vlm": r["bytes_per_token"] / max(vlm["bytes_per_token"], 1e-9),
                    "request_bytes_vs_vlm": r["request_bytes_per_token"] / max(vlm["request_bytes_per_token"], 1e-9),
                    "tok_s_vs_vlm": r["tok_s"] / vlm["tok_s"],
                    "replies_as_ours": f"{same}/{len(prompts)}",
                    "peak_resident_bytes": r["stats"].get("peak_resident_bytes"),
                    "resident_tok_s": resident["vlm" if runtime == "mlx-vlm" else "ours"]["tok_s"],
                }
                rows.append(row)
                print(
                    f"{budget:>6}% {runtime:>20} {row['decode_bytes_per_token']:>13,.0f} "
                    f"{row['request_bytes_per_token']:>13,.0f} {row['tok_s']:>13.1f} {row['hit_rate'] or 0:>13.3f} "
                    f"{row['bytes_vs_vlm']:>13.2f} {row['tok_s_vs_vlm']:>13.2f} {row['replies_as_ours']:>13}",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
