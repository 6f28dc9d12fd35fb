"""A serving run on several ranks: rank 0 hands each request to the others, which follow (docs/architecture.md §21).

Rank 0's server worker sends each prompt (token ids, pixels) and its settings before running it; every
other rank runs it through its own ``ConversationCache``, so all ranks see the same prompts in the same order.
"""

from __future__ import annotations

import pickle

import mlx.core as mx
import numpy as np

from ..model.inputs import ModelInputs
from ..model.parallel import RankShare
from .conversation import ConversationCache
from .distributed import broadcast_bytes, rank_errors
from .settings import GenerationSettings


def send_job(share: RankShare, inputs: ModelInputs, settings: GenerationSettings | None) -> None:
    """Rank 0: give the followers the next prompt and its settings (``follow_jobs`` runs it on each of them)."""
    arrays = {k: None if v is None else np.array(v) for k, v in vars(inputs).items() if k != "input_ids"}
    # pickle between the ranks of one run: the same program on hosts the user started it on (mlx.launch).
    broadcast_bytes(pickle.dumps((list(inputs.input_ids), arrays, settings)), share)


def shared_prompt(share: RankShare, inputs: ModelInputs | None) -> ModelInputs:
    """Rank 0's prompt (its ids and images, which only rank 0 read) on every rank; the others pass None."""
    if share.leads:
        send_job(share, inputs, None)
        return inputs
    return _receive_job(share)[0]


def end_jobs(share: RankShare) -> None:
    """Rank 0: no more prompts; every follower's ``follow_jobs`` returns."""
    broadcast_bytes(b"", share)


def _receive_job(share: RankShare) -> tuple[ModelInputs, GenerationSettings] | None:
    data = broadcast_bytes(None, share)
    if not data:
        return None
    ids, arrays, settings = pickle.loads(data)
    return ModelInputs(ids, **{k: None if v is None else mx.array(v) for k, v in arrays.items()}), settings


def follow_jobs(model, processor, share: RankShare) -> None:
    """A follower's life in a serving run: each prompt rank 0 sends, through the same prompt cache, to the end.

    Rank 0's ``ConversationCache`` sees the same prompts in the same order, so both restore the same prefixes;
    rank 0 runs every generation to its end too (a client that leaves cannot stop only one rank).
    """
    cache = ConversationCache(model, processor)
    while True:
        with rank_errors(share):
            job = _receive_job(share)
            if job is None:
                return
            for _ in cache.stream(*job):
                pass
