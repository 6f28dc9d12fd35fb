"""A small byte-level BPE tokenizer shaped like Qwen3.5's, trained on an embedded English corpus.

The demo and the test checkpoints need a real tokenizer without a download. The pipeline is the
family's (docs/architecture.md §1.5): NFC normaliser, the Qwen split regex then ByteLevel without prefix
space, ByteLevel decoder, no BOS; Qwen's added tokens follow the base vocabulary in the released
order, so every id relation of the real tokenizer (specials right after the base tokens) holds.
Only the `tokenizers` library is needed — no torch, no transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from ..errors import Qwen35Error

# transformers' Qwen3_5Tokenizer regex: Qwen2's with combining marks (\p{M}) kept inside letter runs.
QWEN35_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen's added tokens in id order after the base vocabulary, with their `special` flag (§1.5).
# The audio/TTS markers that follow in the real tokenizer are unused by Qwen3.5 and left out.
QWEN_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)

CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# Public-domain-style English prose written for this file: enough distinct words that BPE can learn
# ~750 merges, with digits, punctuation, code and chat-shaped text so round trips exercise every path.
CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still tell a long story, one token at a time.
Once upon a time there was a quiet village by the sea. Every morning the fishermen pushed their boats into
the water, and every evening they came back with baskets full of silver fish. The children ran along the
beach, collecting shells and counting the waves. Their grandmother told them stories about the old
lighthouse, about storms that lasted for days, and about a ship that sailed beyond the horizon and never
returned. "Where did it go?" asked the youngest girl. "Nobody knows," said the grandmother, "but some say
it found an island where the summer never ends."

In the city, people hurried through crowded streets. Buses stopped and started, bicycles slipped between
cars, and the smell of fresh bread drifted out of a bakery on the corner. A man in a grey coat bought a
newspaper and read the weather report: cloudy in the morning, sunny in the afternoon, a chance of rain at
night. He folded the paper, checked his watch, and walked quickly toward the station.

Machine learning models learn patterns from data. A language model predicts the next word given the
previous words. Attention lets every position look at every other position; recurrent layers carry a
state forward through time. Mixture-of-experts layers route each token to a few specialised experts,
which keeps the computation small while the number of parameters grows large. Training requires careful
choices: the learning rate, the batch size, the schedule, and the initialisation all matter.

Apple silicon shares one pool of unified memory between the CPU and the GPU, so large models can run on a
laptop without copying weights back and forth. Quantisation stores each weight in four or three bits
with a scale and a bias per group, trading a little accuracy for a lot of memory. Streaming conversion
reads one tensor at a time and writes shards of bounded size, so peak memory stays near a single shard.

Recipe for a simple soup: chop two onions, three carrots, and four potatoes. Warm some olive oil in a
large pot, add the onions, and cook them gently until they are soft and golden. Add the carrots and the
potatoes, pour in one litre of water or stock, season with salt and pepper, and let everything simmer for
about thirty minutes. Blend until smooth, taste it, and serve it hot with bread.

Numbers appear everywhere: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 256, 1024, 2048, 3.14159, 2.71828, -7, +12,
1,000,000 and 12:30 on 2026-02-16. Prices like $4.99 or 15% off; ratios such as 3/4 and 16:9.
Punctuation matters too! Does it? Yes... (parentheses), [brackets], {braces}, <angles>, "quotes",
'single quotes', semi;colons, colons: dashes - and -- em dashes, hash #tags, @mentions, and 100% sure.

def greet(name: str) -> str:
    \"\"\"Return a friendly greeting.\"\"\"
    return f"Hello, {name}! How are you today?"

for i in range(10):
    if i % 2 == 0:
        print(i, "is even")
    else:
        print(i, "is odd")

{"role": "user", "content": "What is the capital of France?"}
{"role": "assistant", "content": "The capital of France is Paris."}
User: Can you help me write an email to my team about the meeting on Monday?
Assistant: Of course. Here is a short draft you can adapt to your needs.
User: Please summarise this article in three sentences.
Assistant: Sure. The article describes how the project started, what problems the team solved, and what
they plan to build next.
User: Think step by step: if a train leaves at nine and travels for two hours, when does it arrive?
Assistant: It leaves at nine, travels two hours, so it arrives at eleven.

Autumn leaves turned red and yellow, then brown, and finally fell to the ground. Winter brought snow,
short days, and long evenings by the fire. In spring the garden woke up: tulips, daffodils, and cherry
blossoms. Summer was warm and bright, with long walks, cold lemonade, and music in the park.
The library was quiet except for the turning of pages. A student searched for a book about mountains,
another studied chemistry, and an old professor wrote notes in the margin of a history of mathematics.
Questions lead to answers, and answers lead to better questions. Science, art, music, philosophy,
engineering, medicine, economics, geography, literature, and language all begin with curiosity.
"""


@dataclass(frozen=True)
class TokenizerInfo:
    """What a checkpoint's config needs from the tokenizer: its size and Qwen's special ids."""

    base_vocab_size: int
    size: int  # base + added tokens; the model's vocab_size is this rounded up with padding rows
    ids: dict[str, int]  # added token text -> id

    @property
    def endoftext_id(self) -> int:
        return self.ids["<|endoftext|>"]

    @property
    def im_start_id(self) -> int:
        return self.ids["<|im_start|>"]

    @property
    def im_end_id(self) -> int:
        return self.ids["<|im_end|>"]

    @property
    def image_token_id(self) -> int:
        return self.ids["<|image_pad|>"]

    @property
    def video_token_id(self) -> int:
        return self.ids["<|video_pad|>"]

    @property
    def vision_start_token_id(self) -> int:
        return self.ids["<|vision_start|>"]

    @property
    def vision_end_token_id(self) -> int:
        return self.ids["<|vision_end|>"]

    @property
    def eos_token_ids(self) -> list[int]:
        """Chat stop tokens, in generation_config order (§14): `<|im_end|>` then `<|endoftext|>`."""
        return [self.im_end_id, self.endoftext_id]


def build_tokenizer(base_vocab_size: int = 512) -> tuple[Tokenizer, TokenizerInfo]:
    """Train the byte-level BPE to exactly ``base_vocab_size`` tokens, then append Qwen's added tokens."""
    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if base_vocab_size < len(byte_alphabet):
        raise Qwen35Error(
            f"base_vocab_size={base_vocab_size}: must be at least {len(byte_alphabet)} (the byte alphabet)"
        )
    tokenizer = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN35_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = trainers.BpeTrainer(
        vocab_size=base_vocab_size, min_frequency=1, initial_alphabet=byte_alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tokenizer.get_vocab_size() != base_vocab_size:
        raise Qwen35Error(
            f"base_vocab_size={base_vocab_size}: the embedded corpus only supports "
            f"{tokenizer.get_vocab_size()} base tokens; ask for fewer"
        )
    for text, special in QWEN_ADDED_TOKENS:
        token = AddedToken(text, special=special, normalized=False, single_word=False, lstrip=False, rstrip=False)
        # Both kinds are atomic (never split by BPE); only `special` ones are skipped when decoding.
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    ids = {text: tokenizer.token_to_id(text) for text, _ in QWEN_ADDED_TOKENS}
    expected = {text: base_vocab_size + i for i, (text, _) in enumerate(QWEN_ADDED_TOKENS)}
    assert ids == expected, f"added tokens landed at unexpected ids: {ids}"
    info = TokenizerInfo(base_vocab_size=base_vocab_size, size=tokenizer.get_vocab_size(), ids=ids)
    return tokenizer, info


def write_tokenizer_files(path: str | Path, base_vocab_size: int = 512, max_model_len: int = 262_144) -> TokenizerInfo:
    """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``path`` (a checkpoint dir)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer, info = build_tokenizer(base_vocab_size)
    tokenizer.save(str(path / "tokenizer.json"))
    added_tokens_decoder = {
        str(info.ids[text]): {
            "content": text,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for text, special in QWEN_ADDED_TOKENS
    }
    # Shaped like the released tokenizer_config.json; the chat template ships as its own file (§2.1).
    tokenizer_config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": max_model_len,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE_PATH.read_text())
    return info


def write_generation_config(path: str | Path, info: TokenizerInfo) -> None:
    """Write generation_config.json with the family's stop tokens and sampling defaults (§14, §17.6)."""
    generation_config = {
        "bos_token_id": info.endoftext_id,
        "eos_token_id": info.eos_token_ids,
        "pad_token_id": info.endoftext_id,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 20,
        "top_p": 0.95,
    }
    (Path(path) / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n")
