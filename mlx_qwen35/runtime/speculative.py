"""Speculative decoding with the checkpoint's own MTP head: draft, verify, accept, roll back (docs/architecture.md §20).

Each step the MTP head drafts k tokens by chaining itself on its own outputs; one forward of the trunk over
the k + 1 positions (the last emitted token and the drafts) scores them all; the exact rule accepts a prefix
(greedy: the drafts the trunk's argmax agrees with; sampling: the speculative-sampling test, so every emitted
token is drawn from the trunk's own distribution); the caches keep the accepted positions. The verify forward
runs each position with a decode step's numbers and records the DeltaNet state after each one
(``LanguageModel.verify``), so greedy output is token-identical to decoding without the head and the cache
after a rejected draft is bit-identical to one that never drafted.

``generate_tokens_speculative`` is a drop-in for ``generation.generate_tokens`` (same arguments, same
``(token, logprobs)`` stream, same cache contract) plus the MTP settings and a ``MTPStats`` it fills in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from ..model.cache import cache_length, keep_verified
from ..model.inputs import ModelInputs
from ..model.mtp import make_mtp_cache
from .prefill import prefill_prompt
from .settings import PENALTY_CONTEXT, PREFILL_STEP_SIZE, MTPSettings, Sampling
from .token_generator import LogitsProcessor, Sampler, generate_tokens

# While drafting is off, the (hidden state, next token) pairs the head has not read wait; this many at most,
# then they go through it in one batch, so its cache stays whole for when drafting pays again.
PENDING_PAIRS = 32
PLAIN_BURST = 16  # tokens decoded plainly (generate_tokens) each time the policy finds drafting does not pay


@dataclass
class MTPStats:
    """One request's drafting: tokens drafted and accepted in all, and per depth (index 0 = the first draft)."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0  # trunk forwards that checked at least one draft
    steps: int = 0  # trunk forwards in all (verify or plain decode)
    tested_at: list[int] = field(default_factory=list)  # drafts at each depth whose turn to be checked came
    accepted_at: list[int] = field(default_factory=list)

    def record(self, drafted: int, matches: list[bool]) -> None:
        """One step: ``drafted`` tokens drafted, ``matches`` whether each checked draft was accepted."""
        self.steps += 1
        self.drafted += drafted
        self.verify_steps += drafted > 0
        self.accepted += sum(matches)
        while len(self.tested_at) < len(matches):
            self.tested_at.append(0)
            self.accepted_at.append(0)
        for depth, match in enumerate(matches):
            self.tested_at[depth] += 1
            self.accepted_at[depth] += match

    def acceptance(self, depth: int) -> float | None:
        """The share of drafts at ``depth`` accepted when their turn came (None: none tested yet)."""
        tested = self.tested_at[depth] if depth < len(self.tested_at) else 0
        return self.accepted_at[depth] / tested if tested else None


class DraftPolicy:
    """How many tokens to draft next: the k (0 … max) of most expected tokens per second, from this request's
    acceptance per depth and its measured seconds per step at each k (docs/architecture.md §20.3).

    Expected tokens of a k-draft step: 1 + Σ_{j≤k} Π_{i≤j} a_i (a_i: acceptance at depth i, given the ones
    before were accepted). Seconds: the step's mean at that k, measured; a k not measured yet is read off the
    line through the measured ones. Without ``adaptive`` it always drafts the most.
    """

    WARMUP = 2  # the first steps at each k build graphs and fill caches: not counted
    PROBE_EVERY = 16  # every this many choices, one step at a neighbouring k keeps the estimates current
    PRIOR = (1.0, 2.0)  # (accepted, tested) before any measurement: acceptance 1/2 at each depth

    def __init__(self, settings: MTPSettings, stats: MTPStats):
        self.max_tokens = settings.mtp_tokens
        self.adaptive = settings.adaptive
        self.stats = stats
        self.seen = [0] * (self.max_tokens + 1)
        self.seconds = [0.0] * (self.max_tokens + 1)  # summed over counted steps
        self.counted = [0] * (self.max_tokens + 1)
        self.choices = 0
        self.drafting_off = False  # the last choice was 0 because no k beat plain decode (not a warm-up)

    def record_time(self, k: int, seconds: float) -> None:
        self.seen[k] += 1
        if self.seen[k] > self.WARMUP:
            self.seconds[k] += seconds
            self.counted[k] += 1

    def expected_tokens(self, k: int) -> float:
        """Tokens a step with k drafts emits on average, from the acceptance seen so far."""
        accepted, tested = self.PRIOR
        total, reach = 1.0, 1.0
        for depth in range(k):
            a = self.stats.accepted_at[depth] if depth < len(self.stats.accepted_at) else 0
            t = self.stats.tested_at[depth] if depth < len(self.stats.tested_at) else 0
            reach *= (a + accepted) / (t + tested)
            total += reach
        return total

    def step_seconds(self, k: int) -> float | None:
        """Mean seconds of a step at ``k``: measured, else interpolated from the measured ks (None: too few)."""
        measured = {j: self.seconds[j] / self.counted[j] for j in range(self.max_tokens + 1) if self.counted[j]}
        if k in measured:
            return measured[k]
        if len(measured) < 2:
            return None
        (k0, s0), (k1, s1) = sorted(measured.items(), key=lambda item: abs(item[0] - k))[:2]
        return s0 + (s1 - s0) * (k - k0) / (k1 - k0)

    def choose(self) -> int:
        """The number of tokens to draft in the next step."""
        self.drafting_off = False
        if not self.adaptive:
            return self.max_tokens
        # Measure the most drafting and plain decode first; then the best by expected tokens per second.
        for k in (self.max_tokens, 0):
            if self.counted[k] < 2:
                return k
        rates = {k: self.expected_tokens(k) / s for k in range(self.max_tokens + 1) if (s := self.step_seconds(k))}
        best = max(rates, key=rates.get)
        self.choices += 1
        if self.choices % self.PROBE_EVERY == 0:  # a neighbour, so an unmeasured or stale k gets measured
            up = (self.choices // self.PROBE_EVERY) % 2 or best == 0
            return min(self.max_tokens, best + 1) if up else best - 1
        self.drafting_off = best == 0
        return best


def sampling_probabilities(sampling: Sampling, vocab: int) -> Callable[[mx.array], mx.array]:
    """The distribution mlx-lm's sampler draws from for ``sampling`` (temp > 0): its filters, in its order
    (``make_sampler``), then softmax(x / temp). Log-probabilities [1, V] → probabilities [1, V]."""
    top_k = sampling.top_k if sampling.top_k < vocab else 0  # as generation.sampling_functions
    filters = []
    if 0 < sampling.top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, sampling.top_p))
    if sampling.min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, sampling.min_p))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def probabilities(logprobs: mx.array) -> mx.array:
        for keep in filters:
            logprobs = keep(logprobs)
        return mx.softmax(logprobs * (1 / sampling.temp), axis=-1)

    return probabilities


def speculative_choice(p: mx.array, q: mx.array, draft: mx.array) -> tuple[mx.array, mx.array]:
    """The speculative-sampling rule for one drafted token: (accepted?, the token to emit if not).

    p, q [1, V]: the trunk's and the draft's distributions; ``draft`` [1] was drawn from q. Accept with
    probability min(1, p(d)/q(d)); else draw from the normalised residual max(0, p − q). The emitted token
    is then distributed exactly as p (Leviathan et al. 2023, Chen et al. 2023).
    """
    p_d = mx.take_along_axis(p, draft[:, None], axis=-1)[:, 0]
    q_d = mx.take_along_axis(q, draft[:, None], axis=-1)[:, 0]
    accepted = mx.random.uniform(shape=p_d.shape) * q_d < p_d
    residual = mx.maximum(p - q, 0.0)
    # p = q leaves no residual, but then the draft is always accepted: any token will do for the unused branch.
    residual = mx.where(residual.sum(axis=-1, keepdims=True) > 0, residual, p)
    return accepted, mx.random.categorical(mx.log(residual))


def generate_tokens_speculative(
    model,
    prompt: ModelInputs,
    cache: list,
    sampler: Sampler,
    logits_processors: Sequence[LogitsProcessor] = (),
    *,
    max_tokens: int,
    mtp: MTPSettings,
    sampling: Sampling,
    stats: MTPStats | None = None,
    stop_tokens: Container[int] = (),
    context_tokens: Sequence[int] = (),
    choose_token: Callable[[int], int] | None = None,
    prefill_step_size: int = PREFILL_STEP_SIZE,
    should_stop: Callable[[], bool] | None = None,
) -> Iterator[tuple[int, mx.array]]:
    """``generate_tokens`` with MTP drafts verified by the trunk: the same tokens (greedy) or the same distribution.

    ``sampler`` draws greedy tokens (temp 0); with temp > 0 ``sampling`` gives the distribution the rule needs.
    At each yield the cache holds only emitted tokens (as ``generate_tokens``'s does), so a caller that stops
    iterating anywhere leaves a cache that a conversation can continue from.
    """
    lm, head = model.language_model, model.mtp
    stats = stats if stats is not None else MTPStats()
    policy = DraftPolicy(mtp, stats)
    greedy = sampling.temp == 0
    probabilities = None if greedy else sampling_probabilities(sampling, model.config.text.vocab_size)
    head_cache = make_mtp_cache(head)
    ids = list(prompt.input_ids)
    history = mx.array((list(context_tokens) + ids)[-PENALTY_CONTEXT:])
    prompt_ids = mx.array(ids)

    def head_reads_prompt(hidden: mx.array, chunk: slice) -> None:
        """The head's cache over the prompt: the pair (h_t, x_{t+1}) for every prefilled position t."""
        nxt = prompt_ids[chunk.start + 1 : chunk.start + 1 + hidden.shape[1]]
        head.draft(hidden, lm.embed_tokens(nxt[None]).astype(hidden.dtype), head_cache)
        mx.eval([c.state for c in head_cache])

    def processed_logprobs(logits: mx.array, window: mx.array) -> mx.array:
        logits = logits.astype(mx.float32)
        for process in logits_processors:
            logits = process(window, logits)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    prefill_prompt(
        model, prompt.span(0, len(ids) - 1, model.config), cache, prefill_step_size, should_stop, head_reads_prompt
    )
    hidden = lm(history[None, -1:], cache)  # the last prompt token, as generate_tokens's first step
    logprobs = processed_logprobs(lm.logits(hidden)[:, -1], history)
    first = sampler(logprobs) if greedy else mx.random.categorical(mx.log(probabilities(logprobs)))
    mx.eval(first, logprobs)
    sampled = first.item()
    token = choose_token(sampled) if choose_token is not None else sampled
    stats.record(0, [])
    n = 1
    last = token in stop_tokens or n == max_tokens
    yield token, logprobs.squeeze(0)
    if last:
        return
    pending_hidden, pending_tokens = [hidden], [token]  # pairs the head has not read yet

    while True:
        if policy.drafting_off and max_tokens - n > 1:
            # Drafting does not pay: plain decoding, one step ahead as generate_tokens runs it, for a while.
            burst = generate_tokens(
                model,
                ModelInputs([token]),
                cache,
                sampler,
                logits_processors,
                max_tokens=min(PLAIN_BURST, max_tokens - n - 1),  # leaves one step to see the last hidden state
                stop_tokens=stop_tokens,
                context_tokens=history.tolist(),
                choose_token=choose_token,
            )
            fed = [token]
            for chosen, token_logprobs in burst:
                n += 1
                stats.record(0, [])
                fed.append(chosen)
                yield chosen, token_logprobs
                if chosen in stop_tokens:
                    return
            token = fed.pop()  # the burst's last token is not in the cache, as after any step
            history = mx.concatenate([history, mx.array(fed, dtype=history.dtype)])[-PENALTY_CONTEXT:]
            pending_hidden, pending_tokens = [], []  # the head skips these positions (only relative ones matter)
            policy.drafting_off = False
            k = 0  # a plain step of ours: it gives the hidden state the next draft starts from
        else:
            k = policy.choose()
        started = time.perf_counter()
        k = min(k, max_tokens - n - 1)  # a step emits at most k + 1 tokens
        drafts, draft_probs = [], []
        if k > 0 or len(pending_tokens) >= PENDING_PAIRS:
            pairs = mx.concatenate(pending_hidden, axis=1)
            nxt = lm.embed_tokens(mx.array(pending_tokens)[None]).astype(pairs.dtype)
            drafted_hidden = head.draft(pairs, nxt, head_cache)[:, -1:]
            pending_hidden, pending_tokens = [], []
            for depth in range(k):
                draft_logprobs = lm.logits(drafted_hidden)[:, -1].astype(mx.float32)
                if greedy:
                    draft = mx.argmax(draft_logprobs, axis=-1)
                else:
                    q = probabilities(draft_logprobs - mx.logsumexp(draft_logprobs, axis=-1, keepdims=True))
                    draft = mx.random.categorical(mx.log(q))
                    draft_probs.append(q)
                drafts.append(draft)
                if depth < k - 1:  # chain: the head's output is the next step's hidden state
                    next_embed = lm.embed_tokens(draft[None]).astype(drafted_hidden.dtype)
                    drafted_hidden = head.draft(drafted_hidden, next_embed, head_cache)
        inputs = mx.concatenate([mx.array([token], dtype=mx.uint32)] + [d.astype(mx.uint32) for d in drafts])
        start = cache_length(cache)
        if k > 0:
            hidden, states = lm.verify(inputs[None], cache)
        else:
            hidden, states = lm(inputs[None], cache), None
        logits = lm.logits(hidden)
        windows = [mx.concatenate([history, inputs[: i + 1]])[-PENALTY_CONTEXT:] for i in range(k + 1)]
        all_logprobs = [processed_logprobs(logits[:, i], windows[i]) for i in range(k + 1)]
        if greedy:
            choices = [sampler(lp) for lp in all_logprobs]  # the trunk's token at each position
            accepts = [mx.array([True])] * k
        else:
            target = [probabilities(lp) for lp in all_logprobs]
            ruled = [speculative_choice(target[i], draft_probs[i], drafts[i]) for i in range(k)]
            accepts = [a for a, _ in ruled]
            choices = [c for _, c in ruled] + [mx.random.categorical(mx.log(target[k]))]
        mx.eval(choices, accepts, all_logprobs, drafts, hidden, [c.state for c in head_cache])
        if states is not None:
            mx.eval([s for s in states if s is not None])

        # Walk the positions in order: each emitted token goes through choose_token once, as generate_tokens does.
        emitted, matches, finished = [], [], False
        for i in range(k + 1):
            draft_id = drafts[i].item() if i < k else None
            if greedy or i == k or not accepts[i].item():
                sampled = choices[i].item()
            else:
                sampled = draft_id
            chosen = choose_token(sampled) if choose_token is not None else sampled
            emitted.append(chosen)
            n += 1
            finished = chosen in stop_tokens or n == max_tokens
            if i < k:
                matches.append(chosen == draft_id and (greedy or accepts[i].item()))
            if finished or i == k or not matches[-1]:
                break
        stats.record(k, matches)
        policy.record_time(k, time.perf_counter() - started)
        if k > 0:
            head_cache[0].trim(k - 1)  # the chained drafts' entries; the next step reads the accepted pairs
        kept = len(emitted)  # positions the cache keeps: the step's input token and the accepted drafts
        history = mx.concatenate([history, inputs[:kept]])[-PENALTY_CONTEXT:]
        pending_hidden.append(hidden[:, :kept])
        pending_tokens.extend(emitted)

        for j, chosen in enumerate(emitted):
            if states is not None:  # holds only emitted tokens at each yield: up to this one, or up to the last
                keep_verified(cache, start, states, min(j + 2, kept))
            last = finished and j == kept - 1
            yield chosen, all_logprobs[j].squeeze(0)
            if last:
                return
        token = emitted[-1]
