"""Speculative decoding with the MTP head (runtime/speculative.py): exact tokens, exact caches, the exact sampling rule.

Greedy with MTP on must give the tokens and log-probabilities of MTP off bit for bit: the verify forward runs
each position with a decode step's numbers (``LanguageModel.verify``), so nothing here needs a tolerance.
The random tiny checkpoints' heads draft almost nothing right (their rejections exercise the rollback); the
trained demo model's head drafts about half right, which exercises acceptance of every depth.
"""

from __future__ import annotations

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import convert_tiny
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.cache import ArraysCache

from mlx_qwen35 import load
from mlx_qwen35.model.cache import cache_length, keep_verified, make_cache, restore, snapshot
from mlx_qwen35.model.inputs import ModelInputs
from mlx_qwen35.runtime.generation import generate_tokens, sampling_functions, stream_text
from mlx_qwen35.runtime.prefill import prefill
from mlx_qwen35.runtime.settings import GenerationSettings, MTPSettings, Sampling
from mlx_qwen35.runtime.speculative import MTPStats, generate_tokens_speculative, speculative_choice
from mlx_qwen35.surfaces.demo import DEMO_PROMPT, DEMO_WEIGHTS_DIR
from mlx_qwen35.weights.convert import convert

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def tiny_moe(tiny_moe_checkpoint, tmp_path_factory):
    return load(
        str(convert_tiny(tiny_moe_checkpoint, tmp_path_factory.mktemp("spec-moe") / "mlx"))
    ), tiny_moe_checkpoint


@pytest.fixture(scope="module")
def tiny_dense(tiny_dense_checkpoint, tmp_path_factory):
    return load(
        str(convert_tiny(tiny_dense_checkpoint, tmp_path_factory.mktemp("spec-dense") / "mlx"))
    ), tiny_dense_checkpoint


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec-demo") / "mlx-4bit"
    convert(hf_path=str(DEMO_WEIGHTS_DIR), mlx_path=out, recipe="4bit", shard_size_gb=0.01)
    return load(str(out))


def cache_arrays(cache: list) -> list[np.ndarray]:
    """Every array a cache holds for its tokens: K/V up to its length (quantised: data, scales, biases), conv windows,
    recurrent states. (mlx-lm's ``state`` of a K/V cache is its whole buffer, past the length too.)"""
    held = [
        c.cache if isinstance(c, ArraysCache) else tree_map(lambda x, n=c.offset: x[..., :n, :], (c.keys, c.values))
        for c in cache
    ]
    return [np.array(x) for _, x in tree_flatten(held)]


def run(model, processor, prompt, settings: GenerationSettings, cache=None) -> tuple[list, list, MTPStats]:
    stats = MTPStats()
    responses = list(stream_text(model, processor, prompt, settings, cache=cache, mtp_stats=stats))
    return [r.token for r in responses], [np.array(r.logprobs) for r in responses], stats


def mtp_on(settings: GenerationSettings, k: int) -> GenerationSettings:
    # Not adaptive: every step drafts k, so every step verifies and rolls back.
    return replace(settings, mtp=MTPSettings(enabled=True, mtp_tokens=k, adaptive=False))


@pytest.mark.parametrize("member", ["tiny_moe", "tiny_dense"])
@pytest.mark.parametrize("kv_bits", [None, 8])
def test_verify_forward_gives_decode_steps_hidden_states_and_caches(member, kv_bits, request):
    """T positions verified at once = T decode steps, bit for bit; keeping j of them = a cache that decoded j."""
    (model, _), checkpoint = request.getfixturevalue(member)
    lm = model.language_model
    prompt = mx.array(checkpoint.prompt_ids(16))[None]
    tokens = checkpoint.prompt_ids(20)[16:20]
    verified, stepped = (make_cache(model, kv_bits, kv_group_size=32) for _ in range(2))
    for cache in (verified, stepped):
        model(prompt, cache)
        lm(mx.array([[tokens[0]]]), cache)  # the verify comes after a decode step (every DeltaNet state exists)
    start = cache_length(verified)
    hidden, states = lm.verify(mx.array([tokens[1:]]), verified)
    after_each = []
    decoded = []
    for t in tokens[1:]:
        decoded.append(lm(mx.array([[t]]), stepped))
        after_each.append(cache_arrays(stepped))
    assert np.array_equal(np.array(hidden), np.array(mx.concatenate(decoded, axis=1)))
    for kept in (3, 1, 2):  # down, then back up within what the verify wrote
        keep_verified(verified, start, states, kept)
        assert cache_length(verified) == start + kept
        # K/V past the kept length are still in the buffer, but state (what the cache holds) ends at it.
        assert all(np.array_equal(a, b) for a, b in zip(cache_arrays(verified), after_each[kept - 1], strict=True))


@pytest.mark.parametrize("member", ["tiny_moe", "tiny_dense"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_and_logprobs_with_mtp_equal_without(member, k, request):
    (model, processor), checkpoint = request.getfixturevalue(member)
    prompt = checkpoint.prompt_ids(24)
    settings = GenerationSettings(max_tokens=MAX_TOKENS)
    plain_tokens, plain_logprobs, plain_stats = run(model, processor, prompt, settings)
    tokens, logprobs, stats = run(model, processor, prompt, mtp_on(settings, k))
    assert tokens == plain_tokens
    assert all(np.array_equal(a, b) for a, b in zip(logprobs, plain_logprobs, strict=True))
    assert plain_stats.drafted == 0
    assert stats.drafted >= k * (len(tokens) - 1) // (k + 1)  # it did draft at every step
    assert stats.steps == len(tokens) - stats.accepted  # each step emits its accepted drafts + one token


@pytest.mark.parametrize("k", [1, 2, 3])
def test_trained_head_drafts_are_accepted_and_output_is_unchanged(demo, k):
    model, processor = demo
    messages = [{"role": "user", "content": DEMO_PROMPT}]
    settings = GenerationSettings(max_tokens=48, enable_thinking=False)
    plain, plain_logprobs, _ = run(model, processor, messages, settings)
    tokens, logprobs, stats = run(model, processor, messages, mtp_on(settings, k))
    assert tokens == plain
    assert all(np.array_equal(a, b) for a, b in zip(logprobs, plain_logprobs, strict=True))
    # Measured acceptance of the first draft 0.5–0.6 on this model; both branches ran many times.
    assert 0.2 < stats.acceptance(0) < 0.95
    assert len(stats.tested_at) == k and all(stats.accepted_at), stats  # every depth accepted some drafts


def test_speculative_choice_draws_from_the_target_distribution():
    """Drafts from q, kept or resampled by the rule, are distributed as p: chi-square over 6 tokens, 60 000 draws."""
    mx.random.seed(3)
    p = mx.array([[0.40, 0.25, 0.15, 0.10, 0.07, 0.03]])
    q = mx.array([[0.05, 0.05, 0.30, 0.30, 0.20, 0.10]])  # far from p: most drafts are rejected, some kept
    n = 60_000
    P, Q = mx.broadcast_to(p, (n, 6)), mx.broadcast_to(q, (n, 6))
    drafts = mx.random.categorical(mx.log(Q))
    accepted, resampled = speculative_choice(P, Q, drafts)
    emitted = np.array(mx.where(accepted, drafts, resampled))
    observed = np.bincount(emitted, minlength=6)
    expected = np.array(p)[0] * n
    chi2 = ((observed - expected) ** 2 / expected).sum()
    # 5 degrees of freedom: P(chi2 > 20.5) = 0.001. Drafts alone (no rule) give chi2 in the tens of thousands.
    assert chi2 < 20.5, (observed, expected)
    assert 0.2 < np.array(accepted).mean() < 0.6  # the rule kept Σ min(p, q) = 0.43 of the drafts
    naive = np.bincount(np.array(drafts), minlength=6)
    assert ((naive - expected) ** 2 / expected).sum() > 1000


def test_sampled_tokens_with_mtp_follow_the_model_distribution(demo):
    """The first two sampled tokens (the second one decided by a verify) have the same distribution with MTP on.

    top-k 3 at temperature 1 leaves at most 3 × 3 outcomes; 250 runs each way from one prefilled cache
    (restored before each run), a two-sample chi-square at significance 0.001 (8 degrees of freedom: 26.1)."""
    model, processor = demo
    ids = processor.encode('def read_file(path):\n    """Return')
    sampling = Sampling(temp=1.0, top_k=3)
    sampler, processors = sampling_functions(model, processor, sampling)
    cache = make_cache(model)
    prefill(model, mx.array(ids[:-1]), cache)
    prefilled = snapshot(cache)
    runs, counts, stats = 250, [], MTPStats()
    for mtp in (None, MTPSettings(enabled=True, mtp_tokens=1, adaptive=False)):
        mx.random.seed(5)
        pairs = []
        for _ in range(runs):
            restore(cache, prefilled)
            last = ModelInputs(ids[-1:])
            # Three tokens: with two, the step after the first one may emit only one token, so it drafts none.
            if mtp is None:
                steps = generate_tokens(model, last, cache, sampler, processors, max_tokens=3, context_tokens=ids[:-1])
            else:
                steps = generate_tokens_speculative(
                    model,
                    last,
                    cache,
                    sampler,
                    processors,
                    max_tokens=3,
                    mtp=mtp,
                    sampling=sampling,
                    stats=stats,
                    context_tokens=ids[:-1],
                )
            pairs.append(tuple(token for token, _ in steps)[:2])
        counts.append(pairs)
    assert stats.tested_at == [runs]  # every second token went through the rule
    outcomes = sorted(set(counts[0]) | set(counts[1]))
    a = np.array([counts[0].count(o) for o in outcomes], dtype=float)
    b = np.array([counts[1].count(o) for o in outcomes], dtype=float)
    pooled = (a + b) / 2
    chi2 = (((a - pooled) ** 2 + (b - pooled) ** 2) / pooled).sum()
    assert 4 <= len(outcomes) <= 9, outcomes  # the second token varies: the test can see a wrong distribution
    assert chi2 < 26.1, (outcomes, a, b)
