"""The streamed text of token ids equals ``tokenizer.decode`` of them, at every token where that is decided.

The tokenizer is the tiny byte-level BPE one (as ``load`` wraps it, mlx-lm's ``TokenizerWrapper``) with
two extra added tokens whose text is not ASCII, so every spelling ``decode`` handles comes up: merged
tokens with and without a leading space, the 256 single-byte tokens (which split a multi-byte character
or make invalid UTF-8), Qwen's special and added tokens, and ids past the vocabulary (padding rows).
"""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mlx_lm.tokenizer_utils import load as load_tokenizer
from tokenizers import AddedToken

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.runtime.text_stream import TextStream, byte_of_character
from mlx_qwen35.weights.tokenizer_builder import write_tokenizer_files

# Not ASCII: "é" is in the byte alphabet (decode spells it as the lone byte 0xE9), "€" is not (its UTF-8).
EXTRA_ADDED = [AddedToken("<é>", special=True), AddedToken("€uro", special=False)]
CHARACTER_OF_BYTE = {b: c for c, b in byte_of_character().items()}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("text-stream-tokenizer")
    write_tokenizer_files(path)
    wrapper = load_tokenizer(path)
    wrapper.add_tokens(EXTRA_ADDED)
    return wrapper


def byte_tokens(tokenizer, data: bytes) -> list[int]:
    """One single-byte token per byte of ``data``."""
    return tokenizer.convert_tokens_to_ids([CHARACTER_OF_BYTE[b] for b in data])


def streamed(tokenizer, ids: list[int]) -> tuple[list[str], str]:
    """(text read after each token, text read after finalize)."""
    stream = TextStream(tokenizer)
    after_each = []
    for token_id in ids:
        stream.add_token(token_id)
        after_each.append(stream.last_segment)
    stream.finalize()
    return after_each, stream.last_segment


def ends_between_characters(tokenizer, ids: list[int]) -> bool:
    """Whether the bytes of ``ids`` end on a character boundary, asked of ``decode`` alone.

    After a boundary a stray continuation byte decodes as one more U+FFFD; an unfinished character takes
    it in instead, and one of 0x80 and 0xA0 continues every unfinished UTF-8 prefix (only a lead E0 or F0
    refuses 0x80, and both take 0xA0).
    """
    text = tokenizer.decode(ids)
    return all(tokenizer.decode(ids + byte_tokens(tokenizer, bytes([p]))) == text + "\ufffd" for p in (0x80, 0xA0))


# A token sequence, drawn without the tokenizer as runs of (kind, value); ``ids`` spells them with it.
RUNS = st.lists(
    st.one_of(
        st.tuples(st.just("ordinary"), st.lists(st.integers(0, 10_000), min_size=1, max_size=4)),
        st.tuples(st.just("spaced"), st.lists(st.integers(0, 10_000), min_size=1, max_size=3)),
        st.tuples(st.just("added"), st.lists(st.integers(0, 10_000), min_size=1, max_size=2)),
        st.tuples(st.just("bytes"), st.text(min_size=1, max_size=4).map(lambda s: s.encode("utf-8"))),
        st.tuples(st.just("bytes"), st.binary(min_size=1, max_size=4)),
        st.tuples(st.just("padding"), st.just([3])),
    ),
    max_size=10,
)


def ids(tokenizer, runs: list[tuple[str, object]]) -> list[int]:
    """Token ids of ``runs``: any base token, one with a leading space, a special or added token, the
    single-byte tokens of some bytes (a character split across tokens, or invalid UTF-8), or an id past the vocabulary."""
    base, size = tokenizer.convert_tokens_to_ids("<|endoftext|>"), len(tokenizer)
    spaced = [i for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(base)))) if t.startswith("Ġ")]
    out: list[int] = []
    for kind, value in runs:
        if kind == "bytes":
            out += byte_tokens(tokenizer, value)
        else:
            pick = {"ordinary": range(base), "spaced": spaced, "added": range(base, size), "padding": [size + 3]}[kind]
            out += [pick[v % len(pick)] for v in value]
    return out


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(runs=RUNS)
@example(runs=[("spaced", [0, 1, 2])])  # the first token's leading space (mlx-lm's detokenizer dropped it)
@example(runs=[("bytes", "🙂".encode())])  # one character in four tokens
@example(runs=[("bytes", b"\xef\xbf\xbd")])  # a real U+FFFD, whole characters: not held back
@example(runs=[("bytes", b"\xe2\x82"), ("ordinary", [65])])  # an unfinished character cut off by another token
@example(runs=[("added", [2, 25, 26, 27]), ("bytes", b" \xc3")])  # <|im_end|>, </think>, <é>, €uro, a lone lead byte
@example(runs=[("bytes", b"\xed\xa0"), ("bytes", b"\x80")])  # a surrogate's bytes: invalid UTF-8 CPython holds back
def test_streamed_segments_join_to_decode(tokenizer, runs):
    token_ids = ids(tokenizer, runs)
    after_each, last = streamed(tokenizer, token_ids)
    assert "".join(after_each) + last == tokenizer.decode(token_ids)
    read = ""
    for n, segment in enumerate(after_each, start=1):
        read += segment
        decoded = tokenizer.decode(token_ids[:n])
        assert decoded.startswith(read)  # never ahead of decode, never different
        if ends_between_characters(tokenizer, token_ids[:n]):
            assert read == decoded  # and never behind it once the bytes form whole characters


def test_a_reply_opening_with_a_space_keeps_it(tokenizer):
    """The three tokens of " strings_value warning" (the issue's example) stream back with their leading space."""
    token_ids = tokenizer.encode(" strings_value warning", add_special_tokens=False)
    after_each, last = streamed(tokenizer, token_ids)
    assert "".join(after_each) + last == " strings_value warning"
    assert after_each[0].startswith(" ")


def test_a_character_split_over_tokens_comes_out_once_complete(tokenizer):
    after_each, last = streamed(tokenizer, byte_tokens(tokenizer, "a🙂".encode()))
    assert after_each == ["a", "", "", "", "🙂"] and last == ""
    after_each, last = streamed(tokenizer, byte_tokens(tokenizer, "🙂".encode()[:2]))
    assert after_each == ["", ""] and last == "\ufffd"  # cut off: decode renders the unfinished bytes so


def test_reset_starts_a_new_text(tokenizer):
    stream = TextStream(tokenizer)
    for token_id in byte_tokens(tokenizer, "x\xe2".encode("latin-1")):
        stream.add_token(token_id)
    stream.reset()
    stream.add_token(tokenizer.convert_tokens_to_ids("A"))
    assert stream.last_segment == "A"  # neither the unread "x" nor the unfinished byte survive


def test_a_tokenizer_that_is_not_byte_level_is_refused(tokenizer, monkeypatch):
    from tokenizers import decoders

    monkeypatch.setattr(tokenizer._tokenizer.backend_tokenizer, "decoder", decoders.Metaspace())
    with pytest.raises(Qwen35Error, match="byte-level BPE"):
        TextStream(tokenizer)
