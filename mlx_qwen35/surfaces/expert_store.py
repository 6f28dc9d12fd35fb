"""`mlx-qwen35 expert-store`: repack an MLX checkpoint so its routed experts stream from the SSD (docs/architecture.md §6.1).

Writes ``--out``: the checkpoint's other tensors as shards, the routed experts one by one in ``experts/``. With
``--calibration FILE`` it then runs the new checkpoint over that text and saves each expert's share of the
routing (``experts/priors.json``), which the resident cache starts its frequencies from.
"""

from __future__ import annotations

from pathlib import Path

CALIBRATION_TOKENS = 4096  # a short run: enough to rank the experts of a skewed router


def calibrate(model_dir: Path, text: str, max_tokens: int = CALIBRATION_TOKENS) -> int:
    """Run ``text`` (its first ``max_tokens`` tokens) through the store at ``model_dir`` and save the routing shares; the tokens run."""
    import mlx.core as mx

    from ..errors import Qwen35Error
    from ..model.cache import make_cache
    from ..runtime.generation import prefill
    from ..weights.expert_store import write_priors
    from ..weights.loading import load

    model, processor = load(str(model_dir))
    tokens = processor.encode(text)[:max_tokens]
    if not tokens:
        raise Qwen35Error("--calibration: the file has no text; give prompts like the ones you will send")
    cache = model.expert_cache
    cache.keep_counting()
    prefill(model, mx.array(tokens), make_cache(model))
    write_priors(model_dir, cache.routing_counts())
    cache.store.close()
    return len(tokens)


def run_expert_store(
    model: str, out: Path, overwrite: bool, calibration: Path | None, calibration_tokens: int, shard_size_gb: float
) -> None:
    """Repack ``model`` into ``out`` with an expert store, then calibrate it on ``calibration`` if given."""
    from ..errors import Qwen35Error
    from ..weights.expert_repack import repack
    from ..weights.hub import resolve_checkpoint

    text = None
    if calibration is not None:
        try:
            text = calibration.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise Qwen35Error(f"--calibration {calibration}: cannot read it ({e}); give a UTF-8 text file") from None
    source = resolve_checkpoint(model, None, argument="--model")
    target = repack(source, out, overwrite=overwrite, shard_size_gb=shard_size_gb)
    print(f"wrote {target}: resident shards + experts/")
    if text is not None:
        n = calibrate(target, text, calibration_tokens)
        print(f"calibrated on {n} tokens of {calibration}: experts/priors.json")
