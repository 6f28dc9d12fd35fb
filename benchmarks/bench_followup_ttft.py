"""Time to first token of a follow-up turn after a ~4k-token conversation: cache reused vs re-prefilled.

Builds a conversation whose history renders to about ``--context`` tokens (pasted text in the first
user turn, a few short turns after it), then times the first token of one more user turn two ways,
alternating for ``--repeats`` rounds and taking medians:

* reused — ``Conversation.send``: the cache is restored from the last reply-start snapshot and only
  the last reply as re-rendered plus the new turn are prefilled;
* re-prefilled — a fresh cache fed the whole rendered conversation (what a runtime that cannot trim
  a hybrid cache does every turn).

Runs on a tiny random checkpoint by default (built once under --workdir, a minute on a CPU); pass
``--model`` for a real one. Prints one JSON line with both medians and their ratio.

    PYTHONPATH=. python benchmarks/bench_followup_ttft.py            # tiny model
    PYTHONPATH=. python benchmarks/bench_followup_ttft.py --model mlx-community/Qwen3.5-0.8B-4bit
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

REPO = Path(__file__).resolve().parents[1]


def tiny_model_dir(workdir: Path) -> Path:
    """The test suite's tiny MoE checkpoint, converted to float32 (built once)."""
    out = workdir / "tiny-moe-mlx"
    if not (out / "config.json").exists():
        sys.path.insert(0, str(REPO / "tests"))
        from checkpoints import build_per_expert_checkpoint

        from mlx_qwen35.weights.convert import convert

        source = build_per_expert_checkpoint(workdir / "tiny-moe-hf", moe=True, seed=0)
        convert(
            hf_path=str(source.path),
            mlx_path=out,
            recipe="bf16",
            dtype="float32",
            shard_size_gb=0.05,
            revision=None,
            overwrite=True,
            dry_run=False,
        )
    return out


def pasted_text(processor, tokens: int) -> str:
    """About ``tokens`` tokens of ordinary text (the benchmark's stand-in for a pasted document)."""
    paragraph = (REPO / "README.md").read_text()
    text = paragraph
    while len(processor.encode(text)) < tokens:
        text += "\n\n" + paragraph
    ids = processor.encode(text)[:tokens]
    return processor.decode(ids)


def first_token_seconds(events) -> float:
    """Seconds until the first event of a streamed reply, then drain it."""
    started = time.perf_counter()
    next(events)
    elapsed = time.perf_counter() - started
    for _ in events:
        pass
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MLX checkpoint dir or Hub id (default: the tiny test model)")
    parser.add_argument("--context", type=int, default=4096, help="tokens of conversation before the follow-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per reply while building the history")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "mlx-qwen35-bench")
    args = parser.parse_args()

    from mlx_qwen35 import load, stream_generate
    from mlx_qwen35.runtime.conversation import Conversation, ConversationSettings
    from mlx_qwen35.runtime.sessions import load_conversation, save_conversation

    model, processor = load(args.model or str(tiny_model_dir(args.workdir)))
    settings = ConversationSettings(
        system="You are a helpful assistant.",
        max_tokens=args.max_tokens,
        thinking_budget=args.max_tokens // 2,
        sampling={"temp": 0.0},
    )
    conversation = Conversation(model, processor, settings)
    for _ in conversation.send("Summarise this document:\n\n" + pasted_text(processor, args.context)):
        pass
    for question in ("Which commands does it mention?", "And what does the test suite cover?"):
        for _ in conversation.send(question):
            pass

    # Every round starts from the same state: the conversation saved once, loaded back (not timed).
    saved = save_conversation(conversation, args.workdir / "conversation")
    question = "Thanks. One more question: is it fast?"
    reused, prefilled = [], []
    for _ in range(args.repeats):
        conversation = load_conversation(saved, model, processor)
        events = conversation.send(question)  # lazy: rendering, restore and prefill run on the first next()
        tokens = conversation.prompt_tokens()
        reused.append(first_token_seconds(events))
        stats = conversation.last_stats
        del conversation
        mx.clear_cache()
        prefilled.append(
            first_token_seconds(stream_generate(model, processor, tokens, max_tokens=args.max_tokens, temp=0.0))
        )
        mx.clear_cache()

    result = {
        "context_tokens": stats.prompt_tokens,
        "reused_tokens": stats.reused_tokens,
        "prefilled_tokens_reused_path": stats.prefilled_tokens,
        "ttft_reused_s": round(statistics.median(reused), 4),
        "ttft_reprefilled_s": round(statistics.median(prefilled), 4),
        "speedup": round(statistics.median(prefilled) / statistics.median(reused), 1),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
