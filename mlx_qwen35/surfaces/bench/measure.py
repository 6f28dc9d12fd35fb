"""What `bench` measures of any runtime: prefill, time to first token, decode, peak memory, launches per token.

A runtime is reached only through a ``Runner``: a token generator (prompt ids, how many tokens) and a
one-step graph builder, so ours and the peers are timed by the same code in the same process.
"""

from __future__ import annotations

import os
import re
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import mlx.core as mx

# Primitives that only change how an array is viewed: on Metal they launch no kernel.
VIEW_PRIMITIVES = frozenset(
    {"Broadcast", "Reshape", "ExpandDims", "Squeeze", "Transpose", "Slice", "AsStrided", "Flatten", "Unflatten"}
)
_PRIMITIVE_NODE = re.compile(r'^\{ (\d+) \[label ="(\w+)"', re.M)


@dataclass
class StepGraph:
    """One decode step: the primitives of its graph, by name, and the host time it took to build it."""

    primitives: Counter
    build_s: float


@dataclass
class Runner:
    """One runtime with its model loaded: how to generate tokens, and the graph of one decode step."""

    name: str
    weights_bytes: int
    generate: Callable[[list[int], int], Iterator[int]]  # (prompt ids, max tokens) → generated ids
    decode_step_graph: Callable[[list[int]], StepGraph]  # prompt ids → one decode step after them


@dataclass
class Run:
    """One prompt through one runtime: prefill to the first token, then ``decode_tokens`` more."""

    ttft_s: float
    decode_tokens_per_s: float
    peak_memory_bytes: int
    prompt_tokens: int

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.ttft_s


def measure_run(runner: Runner, prompt: list[int], decode_tokens: int) -> Run:
    """Time one generation; peak memory is the runner's weights plus what the run allocated beyond them."""
    mx.clear_cache()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    start = time.perf_counter()
    tokens = runner.generate(prompt, decode_tokens + 1)
    next(tokens)
    first = time.perf_counter()
    n = sum(1 for _ in tokens)
    end = time.perf_counter()
    peak = runner.weights_bytes + max(0, mx.get_peak_memory() - before)
    return Run(first - start, n / (end - first) if n else 0.0, peak, len(prompt))


def count_primitives(outputs: Sequence[mx.array]) -> Counter:
    """Primitives in the graph that computes ``outputs`` (from ``mx.export_to_dot``), by name."""
    fd, path = tempfile.mkstemp(suffix=".dot")
    os.close(fd)
    try:
        mx.export_to_dot(path, *outputs)
        with open(path) as f:
            nodes = dict(_PRIMITIVE_NODE.findall(f.read()))
    finally:
        os.remove(path)
    return Counter(nodes.values())


def launches(counts: Counter) -> int:
    """Non-view primitives: each is roughly one kernel launch on Metal."""
    return sum(n for name, n in counts.items() if name not in VIEW_PRIMITIVES)


@dataclass
class Summary:
    """median / min / max of repeated measurements."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    def as_dict(self) -> dict:
        return {"median": self.median, "min": min(self.values), "max": max(self.values), "runs": self.values}
