"""One rank of a multi-process test run (tests/test_distributed.py): greedy replies to two turns, resident bytes.

``python rank_generate.py MODEL MODE OUT_DIR [IMAGE]``; MODE is ``single`` (one process, no mx.distributed),
``pipeline``, ``expert`` or ``tensor`` (this process is rank $MLX_RANK of the ring in $MLX_HOSTFILE). Writes
``OUT_DIR/rank<N>.json``: the tokens of each turn, the bytes of the arrays this rank holds, MLX's active memory,
its layers and the shapes of its cache's arrays. $RANK_TEST_SPLIT is the --split; $RANK_TEST_DIE=N makes rank N
die after the first turn, $RANK_TEST_STALL=N stop there (SIGSTOP to its process group).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache

from mlx_qwen35.model.cache import make_cache
from mlx_qwen35.runtime.distributed import join, rank_errors
from mlx_qwen35.runtime.generation import stream_text
from mlx_qwen35.runtime.settings import GenerationSettings
from mlx_qwen35.weights.loading import load

TOKENS_PER_TURN = 8


def main(model_dir: str, mode: str, out_dir: str, image: str | None = None) -> None:
    share = None if mode == "single" else join(mode, Path(model_dir), split=os.environ.get("RANK_TEST_SPLIT"))
    model, processor = load(model_dir, share=share)
    mx.eval(model.parameters())
    gc.collect()
    mx.clear_cache()
    held = sum(a.nbytes for _, a in tree_flatten(model.parameters()))
    active = mx.get_active_memory()
    content = [{"type": "text", "text": "Describe what you see."}]
    if image:
        content.insert(0, {"type": "image", "image": image})
    first = processor([{"role": "user", "content": content}], enable_thinking=False)
    settings = GenerationSettings(max_tokens=TOKENS_PER_TURN)
    cache = make_cache(model)
    turns = []
    with rank_errors(share):
        tokens = [r.token for r in stream_text(model, processor, first, settings, cache=cache)]
        turns.append(tokens)
        if os.environ.get("RANK_TEST_DIE") == str(share.rank if share else 0):
            os._exit(9)  # the fault test: this rank dies between two generations of its peers
        if os.environ.get("RANK_TEST_STALL") == str(share.rank if share else 0):
            os.killpg(0, signal.SIGSTOP)  # the host freezes (this rank and its watchdog): sockets stay open
        # The second turn continues the same cache: the multi-turn prompt cache path.
        follow_up = processor.encode("<|im_end|>\n<|im_start|>user\nAnd then?<|im_end|>\n<|im_start|>assistant\n")
        context = list(first.input_ids) + tokens
        turns.append(
            [r.token for r in stream_text(model, processor, follow_up, settings, cache=cache, cached_tokens=context)]
        )
    rank = share.rank if share else 0
    layers = [share.layers.start, share.layers.stop] if share else None
    shapes = [[list(a.shape) for a in (c.cache if isinstance(c, ArraysCache) else (c.keys, c.values))] for c in cache]
    result = {"turns": turns, "held_bytes": held, "active_bytes": active, "layers": layers, "cache_shapes": shapes}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:])
