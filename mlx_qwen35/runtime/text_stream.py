"""Streaming detokenisation: generated token ids in, text segments out, joined equal to ``tokenizer.decode``.

Qwen3.5's tokenizer is byte-level BPE. Each token stands for bytes, spelt in GPT-2's alphabet of 256
printable characters (one per byte); ``decode`` maps every token's characters back to bytes (an added
token whose characters are not all in the alphabet gives its own UTF-8 instead), joins the bytes of all
tokens and decodes them as UTF-8, invalid bytes becoming U+FFFD. ``TextStream`` does exactly that, one
token at a time: the token's bytes go into an incremental UTF-8 decoder, which hands out every character
whose bytes are complete and holds back at most the three bytes of an unfinished one. So at every token
where the bytes so far form whole characters the segments joined equal ``decode`` of the ids so far, and
after ``finalize`` they always do; a token costs its own length, never a re-decode of the reply.

It replaces mlx-lm's ``BPEStreamingDetokenizer``, which drops the leading space of the first token (a
``--raw`` continuation " is Paris" came out "is Paris").
"""

from __future__ import annotations

import codecs
from functools import cache

from tokenizers import decoders

from ..errors import Qwen35Error


@cache
def byte_of_character() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte: printable Latin-1 bytes are themselves, the rest 256 + n."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def _check_byte_level(tokenizer) -> None:
    """The stream spells bytes the way a byte-level decoder without clean-up does; refuse any other tokenizer."""
    decoder = tokenizer.backend_tokenizer.decoder
    clean_up = getattr(tokenizer, "clean_up_tokenization_spaces", False)
    if not isinstance(decoder, decoders.ByteLevel) or clean_up:
        raise Qwen35Error(
            f"the checkpoint's tokenizer decodes with {decoder!r}{' and cleans up spaces' if clean_up else ''}; "
            "Qwen3.5's is byte-level BPE without clean-up: copy tokenizer.json and tokenizer_config.json "
            "from the original checkpoint"
        )


class TextStream:
    """The text of token ids added one at a time, read in segments (mlx-lm's ``StreamingDetokenizer`` interface)."""

    def __init__(self, tokenizer):
        _check_byte_level(tokenizer)
        self._tokenizer = tokenizer
        self._bytes: dict[int, bytes] = {}  # token id → its bytes, looked up on first use
        self.reset()

    def reset(self) -> None:
        """Start a new text."""
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""  # decoded, not yet read through last_segment

    def add_token(self, token_id: int) -> None:
        """Append a token; its text is readable as soon as its characters are complete."""
        self._pending += self._utf8.decode(self.token_bytes(token_id))
        held, _ = self._utf8.getstate()
        # CPython holds ED A0..BF (a UTF-16 surrogate's first two bytes) as if a third could complete it; none can,
        # and decode has already rendered both as U+FFFD.
        if len(held) == 2 and held[0] == 0xED and held[1] >= 0xA0:
            self._pending += "\ufffd\ufffd"
            self._utf8.reset()

    def finalize(self) -> None:
        """End the text: bytes of an unfinished character become U+FFFD, as ``decode`` renders them."""
        self._pending += self._utf8.decode(b"", final=True)

    @property
    def last_segment(self) -> str:
        """The text decoded since the previous read."""
        segment, self._pending = self._pending, ""
        return segment

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for (an added token: its UTF-8; past the vocabulary: none)."""
        spelt = self._bytes.get(token_id)
        if spelt is None:
            token = self._tokenizer.convert_ids_to_tokens(token_id)  # None past the vocabulary: decode skips it
            alphabet = byte_of_character()
            if token is None:
                spelt = b""
            elif all(c in alphabet for c in token):
                spelt = bytes(alphabet[c] for c in token)
            else:
                spelt = token.encode("utf-8")
            self._bytes[token_id] = spelt
        return spelt
