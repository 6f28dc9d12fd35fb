"""Quality numbers of the shipped demo model on the held-out docstrings, per quantisation recipe (README).

    PYTHONPATH=. .venv/bin/python tools/eval_demo.py [--recipes bf16 8bit 4bit ...]

Converts mlx_qwen35/surfaces/demo_model with each recipe (the reference: bf16 weights computed in
float32), then reports held-out next-token loss/perplexity, KL to the reference and top-1 agreement,
and for the reference the MTP head's top-1 accuracy on t+2 and the expert-usage skew per layer.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from demo_corpus import stdlib_docs  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

from mlx_qwen35.model import moe  # noqa: E402
from mlx_qwen35.model.rope import text_positions  # noqa: E402
from mlx_qwen35.surfaces.demo import DEMO_WEIGHTS_DIR  # noqa: E402
from mlx_qwen35.weights.convert import convert  # noqa: E402
from mlx_qwen35.weights.loading import load  # noqa: E402

SEQ_LEN = 256


def held_out_windows() -> mx.array:
    """The held-out split as raw docstrings, tokenized and cut into [N, SEQ_LEN] windows (as train_demo does)."""
    tokenizer = Tokenizer.from_file(str(DEMO_WEIGHTS_DIR / "tokenizer.json"))
    texts = [f"{d.name}\n{d.text}<|endoftext|>" for d in stdlib_docs() if d.held_out]
    stream = np.concatenate([np.array(e.ids) for e in tokenizer.encode_batch(texts)])
    return mx.array(stream[: len(stream) // SEQ_LEN * SEQ_LEN].reshape(-1, SEQ_LEN))


def log_probs(model, windows: mx.array) -> mx.array:
    """Next-token log-probabilities [N, T-1, V] in float32."""
    logits = [model(w[None])[0, :-1].astype(mx.float32) for w in windows]
    return mx.stack([x - mx.logsumexp(x, axis=-1, keepdims=True) for x in logits])


def mtp_accuracy(model, windows: mx.array) -> float:
    """Top-1 accuracy of the MTP head's draft of x_{t+2} (from h_t and the embedding of x_{t+1})."""
    lm, hits, total = model.language_model, 0, 0
    for w in windows:
        ids = w[None]
        hidden = lm(ids)
        cos_sin = lm.rope.cos_sin(text_positions(1, ids.shape[1] - 1, 1), hidden.dtype)
        drafted = model.mtp(hidden[:, :-1], lm.embed_tokens(ids[:, 1:]), cos_sin)
        guess = mx.argmax(lm.logits(drafted[:, :-1]), axis=-1)
        hits += int((guess == ids[:, 2:]).sum().item())
        total += ids.shape[1] - 2
    return hits / total


def expert_usage(model, windows: mx.array) -> list[dict[str, float]]:
    """Per MoE layer: the share of routings the busiest expert gets, and the fraction of experts covering 80%."""
    counts: list[np.ndarray] = []
    original = moe.SparseMoE.route

    def counting_route(self, x):
        indices, weights = original(self, x)
        counts.append(np.bincount(np.array(indices).ravel(), minlength=self.gate.weight.shape[0]))
        return indices, weights

    moe.SparseMoE.route = counting_route
    try:
        model.language_model(windows)
    finally:
        moe.SparseMoE.route = original
    rows = []
    for c in counts[: len(model.language_model.layers)]:
        share = np.sort(c)[::-1] / c.sum()
        rows.append(
            {
                "top_expert_share": round(float(share[0]), 3),
                "experts_for_80pct": round(float((np.searchsorted(np.cumsum(share), 0.8) + 1) / len(c)), 3),
            }
        )
    return rows


def main() -> None:
    """Convert per recipe, measure, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", nargs="+", default=["8bit", "4bit", "3bit", "mixed-4-6", "mixed-3-6", "mixed-3-4"])
    args = parser.parse_args()
    windows = held_out_windows()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        reference = None
        for recipe in ["bf16", *args.recipes]:
            out = Path(tmp) / recipe
            convert(
                str(DEMO_WEIGHTS_DIR),
                out,
                recipe=recipe,
                dtype="float32" if recipe == "bf16" else None,
                shard_size_gb=0.01,
            )
            model, _ = load(str(out))
            lp = log_probs(model, windows)
            targets = windows[:, 1:]
            loss = float(-mx.take_along_axis(lp, targets[..., None], axis=-1).mean().item())
            row = {"loss": round(loss, 4), "perplexity": round(math.exp(loss), 2)}
            if reference is None:
                reference = lp
                row["mtp_top1"] = round(mtp_accuracy(model, windows), 4)
                row["expert_usage"] = expert_usage(model, windows)
            else:
                row["kl_to_fp32"] = round(float((mx.exp(reference) * (reference - lp)).sum(-1).mean().item()), 5)
                row["top1_agreement"] = round(float((lp.argmax(-1) == reference.argmax(-1)).mean().item()), 4)
            results["fp32" if recipe == "bf16" else recipe] = row
            print(recipe, json.dumps(row), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
