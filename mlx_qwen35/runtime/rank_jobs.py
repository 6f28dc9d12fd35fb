"""Serving or chatting on several ranks: rank 0 hands each prompt to the others, which follow (docs/architecture.md §21).

Rank 0's prompt cache (``LeadingCache``: the server worker's, the chat's) sends each prompt (token ids, pixels)
and its settings before running it; every other rank runs it through its own ``ConversationCache``, so all ranks
see the same prompts in the same order and restore the same prefixes.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx_lm.generate import GenerationResponse

from ..model.inputs import ModelInputs
from ..model.parallel import RankShare
from .conversation import ConversationCache
from .distributed import broadcast_bytes, rank_errors
from .settings import KV_GROUP_SIZE, GenerationSettings
from .speculative import MTPStats


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


class LeadingCache(ConversationCache):
    """Rank 0's prompt cache: each prompt goes to the followers, then runs here as it runs on each of them."""

    def __init__(self, model, processor, share: RankShare, kv_bits: int | None = None, kv_group_size=KV_GROUP_SIZE):
        super().__init__(model, processor, kv_bits, kv_group_size)
        self.share = share

    def stream(
        self,
        inputs: ModelInputs,
        settings: GenerationSettings,
        should_stop: Callable[[], bool] | None = None,
        mtp_stats: MTPStats | None = None,
    ) -> Iterator[GenerationResponse]:
        """``ConversationCache.stream`` on every rank; the prefill runs whole (one rank cannot stop it alone).

        A reply ends early on every rank through ``distributed.stop_reply``.
        """
        send_job(self.share, inputs, settings)
        return super().stream(inputs, settings, _never_stopping(should_stop), mtp_stats)


def _never_stopping(should_stop: Callable[[], bool] | None) -> Callable[[], bool] | None:
    """``should_stop`` still asked (it may draw a progress bar) but never stopping the prefill."""
    if should_stop is None:
        return None

    def ask() -> bool:
        should_stop()
        return False

    return ask


def _receive_job(share: RankShare) -> tuple[ModelInputs, GenerationSettings] | None:
    data = broadcast_bytes(None, share)
    if not data:
        return None
    ids, arrays, settings = pickle.loads(data)
    return ModelInputs(ids, **{k: None if v is None else mx.array(v) for k, v in arrays.items()}), settings


def follow_jobs(model, processor, share: RankShare, kv_bits: int | None = None, kv_group_size=KV_GROUP_SIZE) -> None:
    """A follower's life in a serving or chatting run: each prompt rank 0 sends, through its prompt cache, to the end.

    ``kv_bits`` / ``kv_group_size``: the command line's, as rank 0's ``LeadingCache`` has them. A reply rank 0 stops
    early (``stop_reply``) ends here at the same token.
    """
    cache = ConversationCache(model, processor, kv_bits, kv_group_size)
    while True:
        with rank_errors(share):
            job = _receive_job(share)
            if job is None:
                return
            for _ in cache.stream(*job):
                pass
