"""Per-token cost of constrained decoding with each grammar engine: llguidance, xgrammar, outlines-core.

What a constrained decode step adds on top of the forward pass: advance the engine by the chosen token,
compute the next-token mask, and apply it to the logits as an MLX array (-inf where forbidden). The
engines walk the same JSON answer to the same schema, tokenised with a byte-level BPE of ``--vocab``
tokens (Qwen3.5's is about 248k) grown deterministically from the byte alphabet by random merges, so no
download is needed. Also reports each engine's grammar compile time (paid once per request) and the
MLX mask application alone. Medians over ``--repeats`` walks; one JSON line per engine.

    PYTHONPATH=. python benchmarks/bench_grammar.py                   # all installed engines, 248k vocab
    PYTHONPATH=. python benchmarks/bench_grammar.py --vocab 50000 --engines llguidance
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import mlx.core as mx
import numpy as np

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "address", "active"],
}
ANSWER = {
    "name": "Ada Lovelace, née Byron",
    "age": 36,
    "tags": ["mathematician", "writer", "the first programmer"],
    "address": {"city": "London", "zip": "12345"},
    "active": True,
}
EOS = "<|im_end|>"


def synthetic_tokenizer(vocab: int, seed: int = 0):
    """A byte-level BPE of ``vocab`` tokens: the byte alphabet, then random merges of short tokens, then EOS."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    rng = random.Random(seed)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens, merges = list(alphabet), []
    known = set(tokens)
    # Merges of frequent-looking pieces first (letters, space-prefixed words, JSON punctuation), as BPE learns.
    seeds = [t for t in alphabet if t.isalnum() or t in 'Ġ"{}:,[]']
    while len(tokens) < vocab - 1:
        left = rng.choice(seeds if rng.random() < 0.5 else tokens)
        right = rng.choice(seeds)
        merged = left + right
        if len(merged) > 12 or merged in known:
            continue
        tokens.append(merged)
        known.add(merged)
        merges.append((left, right))
    model = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges)
    tokenizer = Tokenizer(model)
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(EOS, special=True)])
    return tokenizer


def apply_mask(logits: mx.array, allowed: np.ndarray) -> mx.array:
    """The MLX side every engine shares: forbidden logits to -inf."""
    return mx.where(mx.array(allowed), logits, -mx.inf)


def unpack(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    """A packed little-endian 32-bit bitmask as bool [vocab]."""
    return np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), bitorder="little")[:vocab].astype(bool)


def walk_llguidance(tokenizer, eos: int, ids: list[int], logits: mx.array):
    """(compile seconds, per-token seconds) for llguidance."""
    from llguidance import LLMatcher, LLTokenizer

    lltok = LLTokenizer(tokenizer.to_str(), eos_token=eos)
    start = time.perf_counter()
    grammar = LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})
    matcher = LLMatcher(lltok, grammar, log_level=0)
    compiled = time.perf_counter() - start
    vocab = logits.shape[-1]
    start = time.perf_counter()
    for token in ids:
        allowed = unpack(np.frombuffer(matcher.compute_bitmask(), dtype=np.uint32), vocab)
        assert allowed[token], "the walk left the grammar"
        mx.eval(apply_mask(logits, allowed))
        matcher.consume_token(token)
    return compiled, (time.perf_counter() - start) / len(ids)


def walk_xgrammar(tokenizer, eos: int, ids: list[int], logits: mx.array):
    """(compile seconds, per-token seconds) for xgrammar."""
    import xgrammar as xgr
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    info = xgr.TokenizerInfo.from_huggingface(fast, vocab_size=tokenizer.get_vocab_size(), stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1)
    start = time.perf_counter()
    compiled_grammar = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(",", ":"))
    matcher = xgr.GrammarMatcher(compiled_grammar)
    compiled = time.perf_counter() - start
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    start = time.perf_counter()
    for token in ids:
        matcher.fill_next_token_bitmask(bitmask)
        allowed = unpack(bitmask.numpy()[0], vocab)
        assert allowed[token], "the walk left the grammar"
        mx.eval(apply_mask(logits, allowed))
        matcher.accept_token(token)
    return compiled, (time.perf_counter() - start) / len(ids)


def walk_outlines_core(tokenizer, eos: int, ids: list[int], logits: mx.array):
    """(compile seconds, per-token seconds) for outlines-core (a regex index over the vocabulary)."""
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    byte_of = bytes_decoder()
    mapping: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id != eos:
            mapping.setdefault(bytes(byte_of[c] for c in token), []).append(token_id)
    vocabulary = Vocabulary(eos, mapping)
    start = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    guide = Guide(index)
    compiled = time.perf_counter() - start
    vocab = logits.shape[-1]
    start = time.perf_counter()
    for token in ids:
        allowed = np.zeros(vocab, dtype=bool)
        allowed[np.asarray(guide.get_tokens())] = True
        assert allowed[token], "the walk left the grammar"
        mx.eval(apply_mask(logits, allowed))
        if token != eos:  # the final state allows EOS but has no state after it
            guide.advance(token)
    return compiled, (time.perf_counter() - start) / len(ids)


def bytes_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


ENGINES = {"llguidance": walk_llguidance, "xgrammar": walk_xgrammar, "outlines-core": walk_outlines_core}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=248_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES))
    args = parser.parse_args()
    tokenizer = synthetic_tokenizer(args.vocab)
    eos = tokenizer.token_to_id(EOS)
    ids = tokenizer.encode(json.dumps(ANSWER, separators=(",", ":"), ensure_ascii=False)).ids + [eos]
    logits = mx.random.normal((1, tokenizer.get_vocab_size()), key=mx.random.key(0))
    mx.eval(logits)
    everything = np.ones(logits.shape[-1], dtype=bool)
    mx.eval(apply_mask(logits, everything))  # warm up
    start = time.perf_counter()
    for _ in range(100):
        mx.eval(apply_mask(logits, everything))
    mask_alone = (time.perf_counter() - start) / 100
    print(
        json.dumps({"vocab": tokenizer.get_vocab_size(), "tokens": len(ids), "mlx_mask_ms": round(mask_alone * 1e3, 3)})
    )
    for name in args.engines:
        try:
            runs = [ENGINES[name](tokenizer, eos, ids, logits) for _ in range(args.repeats)]
        except ImportError as e:
            print(json.dumps({"engine": name, "skipped": f"not installed ({e})"}))
            continue
        print(
            json.dumps(
                {
                    "engine": name,
                    "compile_ms": round(statistics.median(r[0] for r in runs) * 1e3, 2),
                    "per_token_ms": round(statistics.median(r[1] for r in runs) * 1e3, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
