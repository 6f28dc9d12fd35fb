"""Structured output: a JSON schema (or "any JSON object") enforced token by token with llguidance.

``JsonConstraint`` is a logits processor for ``generate_tokens``: it sets every token the grammar forbids
to -inf, so whatever the sampler draws keeps the answer valid, and once the JSON is complete only an end
token is left. Thinking is left free: the grammar starts after the ``</think>`` that closes an open block
(a few newlines may come first, as the model writes them). llguidance was picked by measurement
(benchmarks/bench_grammar.py, 248k vocabulary): ~0.2 ms per token of its own (xgrammar ~0, outlines-core ~0.9)
beside the 0.7 ms every engine's mask costs in MLX, a schema compiled in 1.4 ms (xgrammar 34 ms, outlines-core
2 s), and no dependencies (xgrammar needs torch).

The processor reads the token each step is built on, so a constrained generation gives up the overlap of
the next step with reading this token back; unconstrained generations are unchanged.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

import mlx.core as mx
import numpy as np

from ..errors import Qwen35Error

ANY_OBJECT: dict = {"type": "object"}  # response_format json_object
LEADING_WHITESPACE = r"/[ \t\n]{1,4}/"  # what may come between </think> and the JSON


@functools.lru_cache(maxsize=2)
def grammar_tokenizer(processor) -> Any:
    """llguidance's view of the processor's tokenizer (about a second for a 250k vocabulary, so made once)."""
    from llguidance import LLTokenizer

    fast = processor.tokenizer._tokenizer  # transformers' PreTrainedTokenizerFast
    return LLTokenizer(fast.backend_tokenizer.to_str(), eos_token=sorted(processor.eos_token_ids))


def json_grammar(schema: dict) -> str:
    """A Lark grammar for ``schema``'s JSON (compact: no whitespace inside), optionally after a little whitespace."""
    compact = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return f"start: WS? answer\nWS: {LEADING_WHITESPACE}\nanswer: %json {json.dumps(compact)}\n"


def check_schema(schema: dict) -> None:
    """Raise a one-line ``Qwen35Error`` if llguidance cannot compile ``schema`` (no tokenizer needed: cheap)."""
    from llguidance import LLMatcher

    is_error, messages = LLMatcher.validate_grammar_with_warnings(json_grammar(schema))
    if is_error:
        # llguidance's message is the reason, then our grammar with a caret under the spot: keep the reason.
        reason = re.sub(r"^at \d+\(\d+\): ", "", messages[0].splitlines()[0])
        raise Qwen35Error(f"the JSON schema cannot be enforced: {reason}")


class JsonConstraint:
    """Masks the logits so the answer is JSON matching ``schema``; ``choose`` is the ``choose_token`` it needs.

    ``generate_tokens`` calls the processor with the token a step is built on before calling ``choose_token``
    for that token, and builds the step again if ``choose_token`` replaces it (the thinking budget forcing
    ``</think>``). So a token is consumed tentatively when a step is built on it, and ``choose`` takes it back
    if the token is replaced; every token the reply keeps is consumed exactly once, in order.
    """

    def __init__(self, processor, schema: dict, vocab_size: int, thinking: bool):
        from llguidance import LLMatcher

        convert = processor.tokenizer.convert_tokens_to_ids
        self._close_think = convert("</think>")
        self._matcher = LLMatcher(grammar_tokenizer(processor), json_grammar(schema), log_level=0)
        if self._matcher.is_error():
            raise Qwen35Error(f"the JSON schema cannot be enforced: {self._matcher.get_error()}")
        self._vocab_size = vocab_size
        self._end_tokens = processor.eos_token_ids
        self._thinking = thinking  # the prompt left a <think> block open: free text until it closes
        self._started = False  # the first call is built on the prompt's last token, not a generated one
        self._tentative: tuple[int, bool] | None = None  # (token, thinking before it) not yet confirmed

    def __call__(self, history: mx.array, logits: mx.array) -> mx.array:
        """``logits`` [1, vocab] with the tokens the grammar forbids after ``history[-1]`` at -inf."""
        if self._started:
            self._consume(int(history[-1].item()))
        self._started = True
        if self._thinking:
            return logits
        return mx.where(self._allowed(), logits, -mx.inf)

    def choose(self, token: int) -> int:
        """``token`` unchanged; if a step was built on another token, undo that token."""
        if self._tentative is not None and self._tentative[0] != token:
            _, self._thinking = self._tentative
            if not self._thinking:
                self._matcher.rollback(1)
        self._tentative = None
        return token

    def _consume(self, token: int) -> None:
        if token in self._end_tokens:
            # The reply ends here and nothing after it is held to the grammar; ranks stopping a reply early
            # (``distributed.stop_reply``) give one wherever the answer is, and the look-ahead step reads it.
            self._tentative = None
            return
        before = self._thinking
        if self._thinking:
            self._thinking = token != self._close_think
        elif not self._matcher.consume_token(token):
            raise Qwen35Error(f"structured output: the grammar refused token {token} ({self._matcher.get_error()})")
        self._tentative = (token, before)

    def _allowed(self) -> mx.array:
        """The grammar's next-token bitmask as a bool [vocab] (the LM head's padding rows never allowed)."""
        bits = np.unpackbits(np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8), bitorder="little")
        allowed = np.zeros(self._vocab_size, dtype=bool)
        n = min(len(bits), self._vocab_size)
        allowed[:n] = bits[:n]
        return mx.array(allowed)
