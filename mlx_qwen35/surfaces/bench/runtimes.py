"""The runtimes `bench` can time, each behind a ``Runner``: ours, mlx-lm and mlx-vlm, greedy, no stop tokens.

Each is driven the way its users drive it: ours through ``generate_tokens`` (what ``stream_generate``,
the chat and the server run on), mlx-lm through ``mlx_lm.generate.generate_step``, mlx-vlm through
``mlx_vlm.generate.generate_step``; all prefill in chunks of 2048 tokens, their shared default.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from ...errors import Qwen35Error
from .measure import Runner, StepGraph, count_primitives

OURS = "mlx-qwen35"
PEERS = {"mlx-lm": "mlx_lm", "mlx-vlm": "mlx_vlm"}  # --compare name → the module it needs


def require_peer(name: str) -> None:
    """``name`` is a peer we know and it is installed."""
    if name not in PEERS:
        raise Qwen35Error(f"--compare {name}: unknown runtime; choose {' or '.join(PEERS)}")
    if importlib.util.find_spec(PEERS[name]) is None:
        raise Qwen35Error(f"--compare {name}: {name} is not installed; pip install {name}")


def _weights_bytes(model) -> int:
    return sum(a.nbytes for _, a in tree_flatten(model.parameters()))


def _greedy():
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(temp=0.0)


def decode_step_graph(forward: Callable, make_cache: Callable, builds: int = 6) -> Callable[[list[int]], StepGraph]:
    """One decode step after ``prompt``: the primitives of its graph (logits and every cache array it updates) and
    the host time to build it (the best of ``builds`` − 1 builds after the first, which may trace a compile)."""

    def graph(prompt: list[int]) -> StepGraph:
        cache = make_cache()
        forward(mx.array([prompt[:-1]]), cache)
        mx.eval([c.state for c in cache])
        token = mx.array([prompt[-1:]])
        times, primitives = [], None
        for _ in range(builds):  # each build chains on the last one's (unevaluated) cache; none is evaluated
            start = time.perf_counter()
            logits = forward(token, cache)
            times.append(time.perf_counter() - start)
            if primitives is None:  # now: a cache's arrays are updated in place by the next build
                primitives = count_primitives(
                    [logits, *(a for c in cache for _, a in tree_flatten(c.state) if isinstance(a, mx.array))]
                )
        return StepGraph(primitives, min(times[1:]))

    return graph


def load_ours(model_dir: Path) -> Runner:
    """Our runtime on ``model_dir``."""
    from ...model.inputs import ModelInputs
    from ...runtime.generation import generate_tokens
    from ...weights.loading import load

    model, _ = load(str(model_dir))
    mx.eval(model.parameters())
    greedy = _greedy()

    def generate(prompt: list[int], max_tokens: int):
        steps = generate_tokens(model, ModelInputs(prompt), model.make_cache(), greedy, max_tokens=max_tokens)
        return (token for token, _ in steps)

    return Runner(OURS, _weights_bytes(model), generate, decode_step_graph(model, model.make_cache))


def load_mlx_lm(model_dir: Path) -> Runner:
    """mlx-lm on ``model_dir`` (its own conversion, or an mlx-community one)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    model, _ = load(str(model_dir))
    mx.eval(model.parameters())
    greedy = _greedy()

    def generate(prompt: list[int], max_tokens: int):
        return (int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=greedy))

    return Runner("mlx-lm", _weights_bytes(model), generate, decode_step_graph(model, lambda: make_prompt_cache(model)))


def load_mlx_vlm(model_dir: Path) -> Runner:
    """mlx-vlm on ``model_dir`` (its own conversion, with the vision tower)."""
    from mlx_vlm import load
    from mlx_vlm.generate import generate_step
    from mlx_vlm.models.cache import make_prompt_cache

    model, _ = load(str(model_dir))
    mx.eval(model.parameters())
    greedy = _greedy()
    language = model.language_model

    def generate(prompt: list[int], max_tokens: int):
        steps = generate_step(mx.array([prompt]), model, None, None, max_tokens=max_tokens, sampler=greedy)
        return (int(t) for t, _ in steps)

    def forward(ids: mx.array, cache: list) -> mx.array:
        return language(ids, cache=cache).logits

    return Runner(
        "mlx-vlm", _weights_bytes(model), generate, decode_step_graph(forward, lambda: make_prompt_cache(language))
    )


LOADERS = {OURS: load_ours, "mlx-lm": load_mlx_lm, "mlx-vlm": load_mlx_vlm}
