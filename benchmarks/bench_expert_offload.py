"""Streamed experts against mlx-vlm's ``moe_offload`` on the same checkpoint, at the same budgets, in the same run.

For the trained demo model (skewed routing) and a random model of its shape: mlx-vlm converts the HF
checkpoint to 4 bits (``mlx_vlm.convert``); ``mlx_vlm.moe_offload.repack`` makes its offload dir and our
``expert-store`` repacks the *same* mlx-vlm dir (calibrated on the demo corpus's training split). Then, for
each budget (a share of the routed experts' bytes, passed to mlx-vlm as ``expert_cache_gb``), each runtime
loads once and answers the held-out questions greedily in turn (one session: the cache carries over).

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
        vlm_convert(str(hf), mlx_path=str(dirs["vlm"]), quantize=True, q_bits=4, q_group_size=64)
    if not dirs["vlm_offload"].exists():
        vlm_repack(str(dirs["vlm"]), str(dirs["vlm_offload"]))
    if not dirs["ours"].exists():
        repack(dirs["vlm"], dirs["ours"])
        calibrate(dirs["ours"], calibration)
    return dirs


def run_ours(model_dir: Path, budget: str, prompts: list[list[dict]], tokens: int) -> dict:
    from mlx_qwen35.runtime.generation import stream_generate
    from mlx_qwen35.weights.loading import load

    model, processor = load(str(model_dir), expert_memory=budget)
    files = sorted(glob.glob(str(model_dir / "experts" / "*.bin")))
    return _session(
        lambda p: (r.token for r in stream_generate(model, processor, p, max_tokens=tokens, enable_thinking=False)),
        prompts,
        files,
        lambda: model.expert_cache.as_dict(),
    )


def run_vlm(model_dir: Path, budget_bytes: int, prompts: list[list[dict]], tokens: int) -> dict:
    from mlx_vlm import load, stream_generate

    model, processor = load(str(model_dir), expert_cache_gb=budget_bytes / 1e9)
    files = sorted(glob.glob(str(model_dir / "experts" / "*.safetensors")))
    template = processor.tokenizer

    def generate(messages):
        text = template.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        return (r.token for r in stream_generate(model, processor, text, max_tokens=tokens, temperature=0.0))

    store = getattr(model, "moe_offload_store", None)
    return _session(generate, prompts, files, lambda: store.stats() if store else {"hit_rate": None})


def _session(generate, prompts, files, stats) -> dict:
    """Each prompt in turn: decode bytes (rchar), decode seconds and tokens, from each prompt's first token on."""
    decode_bytes = decode_seconds = decode_tokens = 0
    replies = []
    for messages in prompts:
        drop_cached_pages(files)
        reply = []
        for token in generate(messages):
            if not reply:
                start_bytes, start = rchar(), time.perf_counter()
            reply.append(int(token))
        decode_seconds += time.perf_counter() - start
        decode_bytes += rchar() - start_bytes
        decode_tokens += len(reply) - 1
        replies.append(reply)
    return {
        "bytes_per_token": decode_bytes / max(decode_tokens, 1),
        "tok_s": decode_tokens / decode_seconds,
        "tokens": decode_tokens,
        "replies": replies,
        "stats": stats(),
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
        print(
            f"{'budget':>7} {'ours B/tok':>11} {'vlm B/tok':>10} {'ratio':>6} {'ours tok/s':>10} {'vlm tok/s':>9} "
            f"{'ratio':>6} {'ours hit':>8} {'vlm hit':>8} same"
        )
        from mlx_qwen35.weights.expert_store import ExpertStore

        total = ExpertStore(dirs["ours"]).total_bytes
        for budget in args.budgets:
            ours = run_ours(dirs["ours"], f"{budget}%", prompts, args.tokens)
            vlm = run_vlm(dirs["vlm_offload"], budget * total // 100, prompts, args.tokens)
            same = sum(a == b for a, b in zip(ours["replies"], vlm["replies"]))
            row = {
                "model": name,
                "budget_pct": budget,
                "ours_bytes_per_token": ours["bytes_per_token"],
                "vlm_bytes_per_token": vlm["bytes_per_token"],
                "bytes_ratio": ours["bytes_per_token"] / max(vlm["bytes_per_token"], 1e-9),
                "ours_tok_s": ours["tok_s"],
                "vlm_tok_s": vlm["tok_s"],
                "tok_s_ratio": ours["tok_s"] / vlm["tok_s"],
                "ours_hit_rate": ours["stats"]["hit_rate"],
                "vlm_hit_rate": vlm["stats"]["hit_rate"],
                "identical_replies": f"{same}/{len(prompts)}",
                "ours_peak_resident_bytes": ours["stats"]["peak_resident_bytes"],
                "budget_bytes": budget * total // 100,
            }
            rows.append(row)
            print(
                f"{budget:>6}% {row['ours_bytes_per_token']:>11,.0f} {row['vlm_bytes_per_token']:>10,.0f} "
                f"{row['bytes_ratio']:>6.2f} {row['ours_tok_s']:>10.1f} {row['vlm_tok_s']:>9.1f} "
                f"{row['tok_s_ratio']:>6.2f} {row['ours_hit_rate']:>8.3f} {row['vlm_hit_rate'] or 0:>8.3f} "
                f"{row['identical_replies']}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
