"""Streamed experts: the routed experts resident within a byte budget, the rest read from an expert store (docs/architecture.md §6.1).

The sparse MoE of each layer asks ``ExpertCache.routed`` for its routed output. The layer's routing is read
back to the host (the one sync per layer streaming needs), hits come from memory, misses are read by the
store's thread pool (``pread``), and the layer runs the same SwitchGLU gather matmuls over a stack of just the
experts it uses, with the token–expert pairs renumbered into that stack: the same numbers as fully resident.

Eviction keeps what is used often *and* lately: each expert's score is its decode routing count, decayed by
``DECAY`` per step (so old use fades) and seeded from a calibration run's shares (``priors``); the victim is
the resident expert of lowest score ÷ MoE calls until its layer runs again that the current step does not use.
A decode miss whose own score so measured is well below the victim's is not admitted: the layer computes from the
read copy and drops it (a transient copy, as the stack of the layer's experts is), and the victim stays.
The budget covers every expert in memory, the step's own and the prefetched ones included; a prefill chunk
whose experts do not fit runs them in groups that do, each evaluated before the next is read. Prefetch applies
the next layer's router to this layer's input (the residual stream changes little from one layer to the next)
and reads its likely experts while this layer computes, where guesses as confident have lately been right.
A budget that holds every expert reads each layer whole at its first call and runs it from one stack (a slab),
without reading its routing back; once every layer has one, the layers hold them and run as fully resident.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import Qwen35Error
from ..kernels.expert_dispatch import routed_experts

DECAY = 0.999  # per step: an expert's count halves in ~700 steps without use (routing frequencies drift slowly)
PRIOR_WEIGHT = 256.0  # a calibration share of 1.0 counts as this many uses
# A decode miss is kept only if ADMISSION_MARGIN × its score ÷ calls until its layer runs again exceeds the victim's:
# replaying the benchmark's decode routing at 10/25/50%, 1.25 read 0.701/0.781/0.708 of LRU's experts where always
# admitting read 0.750/0.804/0.722 (random model: 0.871/0.915/0.827 vs 0.897/0.928/0.835), and no more on 12 other
# prompts; 1.0 read more than always admitting on the random model at 25% (and at 50% on the other prompts).
ADMISSION_MARGIN = 1.25
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
# Prefetch guesses are judged by their confidence: the next router's probability, in multiples of a uniform share,
# falls in one of these buckets, and each layer's guesses of a bucket are prefetched only while that bucket's recent
# precision is at least PREFETCH_MIN_PRECISION (a wrong prefetch is bytes read for nothing). On the trained demo
# model the guesses below 3/E were right about half the time, those above 3/E 90-100%; on a random model less.
PREFETCH_SHARE_EDGES = np.array([1.5, 2.0, 3.0, 4.0, 6.0, 8.0])
PREFETCH_MIN_PRECISION = 0.9
PREFETCH_EVIDENCE = 2.0  # pessimism: precision = right / (guesses + this), so a bucket starts off
PRECISION_DECAY = 0.99  # per step: "recent" precision remembers ~100 steps


@dataclass
class ExpertStats:
    """Counters since the cache was made: hits, misses, bytes read, and where the time went."""

    hits: int = 0
    misses: int = 0
    prefetched: int = 0  # reads issued ahead of the layer that needs them
    prefetch_used: int = 0  # of those, read by the layer they were for
    evictions: int = 0
    not_admitted: int = 0  # misses computed from their read copy and dropped: the victim was worth more
    bytes_read: int = 0
    read_wait_seconds: float = 0.0  # the forward waiting for reads it needs
    sync_seconds: float = 0.0  # the forward waiting for the graph up to a layer's routing (compute)
    peak_resident_bytes: int = 0
    steps: int = 0  # forward passes (decode tokens and prefill chunks)

    def as_dict(self, budget_bytes: int, resident_bytes: int) -> dict:
        """The counters and the derived rates, for ``--json`` and ``/stats``."""
        lookups = self.hits + self.misses
        return {
            "budget_bytes": budget_bytes,
            "resident_bytes": resident_bytes,
            "peak_resident_bytes": self.peak_resident_bytes,
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": self.hits / lookups if lookups else None,
            "prefetched": self.prefetched,
            "prefetch_used": self.prefetch_used,
            "evictions": self.evictions,
            "not_admitted": self.not_admitted,
            "bytes_read": self.bytes_read,
            "read_wait_seconds": self.read_wait_seconds,
            "sync_seconds": self.sync_seconds,
            "steps": self.steps,
        }


class ExpertCache:
    """The routed experts of every MoE layer within ``budget_bytes``, read from ``store`` (``weights.expert_store.ExpertStore``)."""

    def __init__(
        self,
        store,
        budget_bytes: int,
        top_k: int,
        priors: dict[int, list[float]] | None = None,
        prefetch: bool = True,
        decay: float = DECAY,
    ):
        self.store = store
        self.layers = sorted(store.layers)
        self._row = {layer: i for i, layer in enumerate(self.layers)}
        num_experts = max(store.layers[layer]["num_experts"] for layer in self.layers)
        self.expert_bytes = np.array([store.expert_bytes(layer) for layer in self.layers], dtype=np.int64)
        self.minimum_bytes = int(top_k * self.expert_bytes.max())
        if budget_bytes < self.minimum_bytes:
            raise Qwen35Error(
                f"--expert-memory-gb {budget_bytes / 1e9:.6g}: below one layer's top-{top_k} experts; "
                f"give at least {self.minimum_bytes / 1e9:.6g} GB ({self.minimum_bytes} bytes)"
            )
        self.budget_bytes = int(budget_bytes)
        self.top_k = top_k
        self.prefetch = prefetch
        self.decay = decay
        shape = (len(self.layers), num_experts)
        self.score = np.zeros(shape)
        if priors:
            for layer, shares in priors.items():
                if layer in self._row:
                    self.score[self._row[layer], : len(shares)] = PRIOR_WEIGHT * np.asarray(shares)
        self.counts = np.zeros(shape, dtype=np.int64)  # tokens routed to each expert: what a calibration saves
        # Prefetch's recent record per layer and confidence bucket (every guess is judged, prefetched or not).
        self.guess_right = np.zeros((len(self.layers), PREFETCH_SHARE_EDGES.size + 1))
        self.guess_total = np.zeros_like(self.guess_right)
        self._guesses: dict[int, list[tuple[int, int]]] = {}  # row → the (expert, bucket) guessed for its next call
        # A budget that holds every expert never evicts: each layer is read whole at its first call and its experts
        # kept in one stack (a slab), run without reading the routing back; it is counted a step later (``_unsynced``).
        self.holds_everything = self.budget_bytes >= store.total_bytes
        self.slabs: dict[int, dict[str, mx.array]] = {}  # row → {``gate_proj.weight`` …: [E, ...]}
        self._unsynced: list[tuple[int, mx.array, bool]] = []  # (row, indices, decode) not yet counted
        # layer → its SparseMoE (set by ``attach_expert_store``): once every layer has a slab, the slabs are handed
        # to the layers, which then run as the fully resident model does (compiled decode) and stop calling the cache.
        self.moes: dict[int, nn.Module] = {}
        self.handed_over = False
        self.resident: dict[tuple[int, int], dict[str, mx.array]] = {}
        self.pending: dict[tuple[int, int], object] = {}  # prefetch futures, their bytes already reserved
        self.in_memory = np.zeros(shape, dtype=bool)  # resident or pending
        self.resident_bytes = 0
        self.stats = ExpertStats()
        # layer → the next MoE layer's routing probabilities [E] for an input of this layer (prefetch)
        self.next_router: dict[int, Callable[[mx.array], mx.array]] = {}

    # ------------------------------------------------------------------------------------------ budget

    def _admit(self, layer: int, expert: int, pinned: np.ndarray, score: float | None = None) -> bool:
        """Make room for one expert by evicting the lowest-scoring unpinned ones; False if nothing may go."""
        need = int(self.expert_bytes[self._row[layer]])
        steps = self._steps_to_next_use(layer)
        while self.resident_bytes + need > self.budget_bytes:
            candidates = self.in_memory & ~pinned
            for key in self.pending:  # a read in flight cannot be dropped mid-way
                candidates[self._row[key[0]], key[1]] = False
            if not candidates.any():
                return False
            keyed = np.where(candidates, self.score / steps[:, None], np.inf)
            row, victim = np.unravel_index(np.argmin(keyed), keyed.shape)
            if score is not None and keyed[row, victim] >= score / steps[self._row[layer]]:
                return False
            self._evict(self.layers[row], int(victim))
        self.resident_bytes += need
        self.in_memory[self._row[layer], expert] = True
        self.stats.peak_resident_bytes = max(self.stats.peak_resident_bytes, self.resident_bytes)
        return True

    def _steps_to_next_use(self, layer: int) -> np.ndarray:
        """Per layer, the MoE calls until it runs next, seen from ``layer`` running now (itself: a whole step away)."""
        n = len(self.layers)
        return (np.arange(n) - self._row[layer] - 1) % n + 1.0

    def _evict(self, layer: int, expert: int) -> None:
        del self.resident[(layer, expert)]
        self.in_memory[self._row[layer], expert] = False
        self.resident_bytes -= int(self.expert_bytes[self._row[layer]])
        self.stats.evictions += 1

    # ------------------------------------------------------------------------------------------ reads

    def _fetch(
        self, layer: int, experts: list[int], pinned: np.ndarray, decode: bool = False
    ) -> dict[int, dict[str, mx.array]]:
        """The tensors of ``experts`` of ``layer``, resident afterwards (room made by eviction) unless, in decode, not admitted."""
        start = time.perf_counter()
        row = self._row[layer]
        prefetched = {e for (lay, e) in self.pending if lay == layer}
        self._settle(layer)
        got, missing = {}, []
        for e in experts:
            key = (layer, e)
            if key in self.resident:
                if e in prefetched:
                    self.stats.misses += 1
                    self.stats.prefetch_used += 1
                else:
                    self.stats.hits += 1
                got[e] = self.resident[key]
                continue
            self.stats.misses += 1
            missing.append(e)
            if decode:
                if not self._admit(layer, e, pinned, score=ADMISSION_MARGIN * self.score[row, e]):
                    self.stats.not_admitted += 1
            elif not self._admit(layer, e, pinned):
                self._settle(None)  # reads in flight for the next layer: resident now, so evictable
                if not self._admit(layer, e, pinned):
                    raise AssertionError("the budget check keeps one layer's experts admissible")
        # All but one on the pool, that one on this thread: it would only wait, and a thread hop costs (measured)
        blobs = {e: self.store.submit(layer, e) for e in missing[:-1]}
        if missing:
            blobs[missing[-1]] = self.store.read(layer, missing[-1])
        for e, blob in blobs.items():
            blob = blob if isinstance(blob, bytes) else blob.result()
            got[e] = self.store.tensors(layer, blob)
            if self.in_memory[row, e]:  # admitted: its bytes were reserved above
                self.resident[(layer, e)] = got[e]
        self.stats.read_wait_seconds += time.perf_counter() - start
        self.stats.bytes_read = self.store.counters.bytes
        return got

    def _prefetch(self, layer: int, probs: np.ndarray, pinned: np.ndarray) -> None:
        """Read ``layer``'s likely experts ahead: its router's top-k on this input, where guesses like them are right."""
        row = self._row[layer]
        top = [int(e) for e in np.argsort(-probs)[: self.top_k]]
        buckets = np.searchsorted(PREFETCH_SHARE_EDGES, probs[top] * probs.size, side="right")
        self._guesses[row] = list(zip(top, buckets.tolist()))
        precision = self.guess_right[row] / (self.guess_total[row] + PREFETCH_EVIDENCE)
        for e, bucket in self._guesses[row]:
            if precision[bucket] < PREFETCH_MIN_PRECISION or self.in_memory[row, e]:
                continue
            if not self._admit(layer, e, pinned, score=self.score[row, e] + 1):
                continue
            self.pending[(layer, e)] = self.store.submit(layer, e)
            self.stats.prefetched += 1

    def _settle(self, layer: int | None) -> None:
        """Prefetches in flight (for ``layer``, or all) into the resident set; their bytes were reserved when issued."""
        for key in [key for key in self.pending if layer is None or key[0] == layer]:
            self.resident[key] = self.store.tensors(key[0], self.pending.pop(key).result())

    # ------------------------------------------------------------------------------------------ forward

    def routed(self, layer: int, x: mx.array, indices: mx.array, weights: mx.array, experts: nn.Module) -> mx.array:
        """Σ_j weights[..., j] · expert_{indices[..., j]}(x) with the experts streamed; ``experts`` is the layer's SwitchGLU shell."""
        row = self._row[layer]
        one_token = x.size == x.shape[-1]  # decode: prefetch pays; a prefill chunk reads what it routes to anyway
        if layer == self.layers[0]:
            self._count_unsynced()
            self.score *= self.decay
            self.guess_right *= PRECISION_DECAY
            self.guess_total *= PRECISION_DECAY
            self.stats.steps += 1
        if row in self.slabs:
            self._unsynced.append((row, indices, one_token))
            out = routed_experts(x, indices, weights, _holding(experts, self.slabs[row]))
            empty_experts(experts)
            return out
        guess = None
        following = self.next_router.get(layer) if self.prefetch and one_token else None
        if following is not None and self.in_memory[row + 1].all():
            following = None  # nothing of the next layer left to read ahead (a budget that holds it all)
        start = time.perf_counter()
        if following is not None:
            guess = following(x)
            mx.eval(indices, guess)
        else:
            mx.eval(indices)
        self.stats.sync_seconds += time.perf_counter() - start
        idx = np.array(indices)  # [..., k]
        used = np.unique(idx)
        self._count(row, idx, one_token)
        pinned = np.zeros_like(self.in_memory)
        fit = int(self.budget_bytes // self.expert_bytes[row])
        if self.holds_everything:  # room for all: read the layer's other experts now, and run it from its slab
            pinned[row] = True
            self._fetch(layer, list(range(self.score.shape[1])), pinned)
            self._make_slab(layer)
            out = routed_experts(x, indices, weights, _holding(experts, self.slabs[row]))
        elif len(used) <= fit:
            pinned[row, used] = True
            got = self._fetch(layer, [int(e) for e in used], pinned, decode=one_token)
            if guess is not None:
                self._prefetch(self.layers[row + 1], np.array(guess).reshape(-1), pinned)
            local = mx.array(np.searchsorted(used, idx), dtype=mx.uint32)
            out = routed_experts(x, local, weights, _stacked(experts, [got[int(e)] for e in used]))
        else:
            out = self._routed_in_groups(layer, x, idx, used, weights, experts, fit)
        empty_experts(experts)  # the graph holds the stacks until it runs; the shell must not keep them after
        if self.moes and len(self.slabs) == len(self.layers):
            self._hand_over()
        return out

    def _hand_over(self) -> None:
        """Every expert resident, in slabs: the MoE layers hold them from now on and run as fully resident."""
        self._count_unsynced()
        for layer, moe in self.moes.items():
            _holding(moe.experts, self.slabs[self._row[layer]])
            moe.expert_cache = None
        self.handed_over = True

    def _count(self, row: int, idx: np.ndarray, decode: bool) -> None:
        """Add a call's routing to the counts, to the scores (decode only), and judge the guesses made for it."""
        routed_tokens = np.bincount(idx.reshape(-1), minlength=self.score.shape[1])
        self.counts[row] += routed_tokens
        if not decode:
            return  # a prompt routes unlike a reply: counting its tokens evicts what decode reuses (measured)
        self.score[row] += routed_tokens
        used = set(np.unique(idx).tolist())
        for e, bucket in self._guesses.pop(row, []):
            self.guess_total[row, bucket] += 1
            self.guess_right[row, bucket] += e in used

    def _count_unsynced(self) -> None:
        """Count the slabs' calls of the last step: their routing is on the host by now (the step was evaluated)."""
        for row, indices, decode in self._unsynced:
            idx = np.array(indices)
            self.stats.hits += len(np.unique(idx))
            self._count(row, idx, decode)
        self._unsynced.clear()

    def _make_slab(self, layer: int) -> None:
        """Stack an all-resident layer's experts once; the resident entries become views of the stack (same bytes)."""
        row = self._row[layer]
        names = list(self.resident[(layer, 0)])
        experts = range(self.score.shape[1])
        slab = {t: mx.stack([self.resident[(layer, e)][t] for e in experts]) for t in names}
        mx.eval(slab)
        for e in experts:
            self.resident[(layer, e)] = {t: slab[t][e] for t in names}
        self.slabs[row] = slab

    def _routed_in_groups(
        self, layer: int, x: mx.array, idx: np.ndarray, used: np.ndarray, weights: mx.array, experts, fit: int
    ) -> mx.array:
        """A prefill chunk whose experts exceed the budget: groups that fit, each evaluated before the next is read."""
        self._settle(None)
        H, k = x.shape[-1], idx.shape[-1]
        flat_x, flat_idx = x.reshape(-1, H), idx.reshape(-1, k)
        y = mx.zeros((flat_idx.shape[0], k, H), dtype=x.dtype)  # each pair's expert output, as SwitchGLU gives
        for start in range(0, len(used), fit):
            group = used[start : start + fit]
            pinned = np.zeros_like(self.in_memory)
            pinned[self._row[layer], group] = True
            got = self._fetch(layer, [int(e) for e in group], pinned)
            tok, slot = np.nonzero(np.isin(flat_idx, group))
            local = mx.array(np.searchsorted(group, flat_idx[tok, slot])[:, None], dtype=mx.uint32)
            shell = _stacked(experts, [got[int(e)] for e in group])
            part = shell(flat_x[mx.array(tok)], local)[:, 0]  # [pairs, H]
            y = y.at[mx.array(tok), mx.array(slot)].add(part)
            mx.eval(y)  # the group's weights may be evicted by the next one
        return (y.reshape(*x.shape[:-1], k, H) * weights[..., None]).sum(axis=-2)

    def keep_counting(self) -> None:
        """Keep every layer calling the cache even once all experts are in (no hand-over): a calibration counts all."""
        self.moes.clear()

    def routing_counts(self) -> dict[int, list[int]]:
        """Tokens routed to each expert of each layer so far, prompts included: what a calibration saves."""
        self._count_unsynced()
        return {layer: self.counts[self._row[layer]].tolist() for layer in self.layers}

    def as_dict(self) -> dict:
        """The counters and rates so far (``ExpertStats.as_dict``)."""
        self._count_unsynced()
        return self.stats.as_dict(self.budget_bytes, self.resident_bytes) | {
            "handed_over": self.handed_over,  # every expert resident, the layers run as resident: counting stopped
            "read_seconds": self.store.counters.seconds,  # inside pread, summed over the pool's threads
        }

    def snapshot(self) -> dict:
        """The counters now, to measure a stretch (decode) against: ``report(snapshot, tokens)``."""
        return self.as_dict()

    def report(self, start: dict | None = None, tokens: int | None = None) -> dict:
        """Totals since loading; with ``start`` and ``tokens``, also the figures per token since ``start``."""
        now = self.as_dict()
        if start is None or not tokens:
            return now
        delta = {k: now[k] - start[k] for k in ("hits", "misses", "bytes_read", "read_wait_seconds", "sync_seconds")}
        lookups = delta["hits"] + delta["misses"]
        return now | {
            "decode_tokens": tokens,
            "decode_hit_rate": delta["hits"] / lookups if lookups else None,
            "bytes_read_per_token": delta["bytes_read"] / tokens,
            "read_wait_ms_per_token": 1e3 * delta["read_wait_seconds"] / tokens,
            "compute_ms_per_token": 1e3 * delta["sync_seconds"] / tokens,
        }


def _stacked(experts: nn.Module, chosen: list[dict[str, mx.array]]) -> nn.Module:
    """The layer's SwitchGLU shell holding just ``chosen``'s tensors, stacked [len(chosen), ...]."""
    return _holding(experts, {t: mx.stack([c[t] for c in chosen]) for t in chosen[0]})


def _holding(experts: nn.Module, stacks: dict[str, mx.array]) -> nn.Module:
    """The layer's SwitchGLU shell holding ``stacks`` ({``gate_proj.weight`` …: [n, ...]}) in its compute dtypes."""
    for (projection, name), empty in experts._stream_empty.items():
        a = stacks[f"{projection}.{name}"]
        getattr(experts, projection)[name] = a if a.dtype == empty.dtype else a.astype(empty.dtype)
    return experts


def empty_experts(experts: nn.Module, dtypes: dict[str, mx.Dtype] | None = None) -> None:
    """Hold empty tensors in a SwitchGLU between calls (the store has the experts); ``dtypes``: what the stacks compute in."""
    if dtypes is not None:
        empty = {}
        for projection in PROJECTIONS:
            module = getattr(experts, projection)
            for name in ("weight", "scales", "biases"):
                if module.get(name) is not None:
                    shape = module[name].shape[1:]
                    empty[(projection, name)] = mx.zeros((0, *shape), dtype=dtypes[f"{projection}.{name}"])
        object.__setattr__(experts, "_stream_empty", empty)
    for (projection, name), a in experts._stream_empty.items():
        getattr(experts, projection)[name] = a
