"""Images in a conversation: the cache keeps their effect, so a later turn, a retry or a loaded
conversation reuses it without running the vision tower again, and still gives the logits of a fresh
prefill of the whole rendered conversation.

Both sides are our float32 on MLX (no transformers, so no machine's torch kernels in the comparison):
max |Δ log-probability| ≤ 1e-4, measured ≤ 2.1e-5 (4.8× headroom). That the multimodal forward after
cached tokens is right is judged against float64 transformers in ``test_vision_model.py``."""

from __future__ import annotations

import numpy as np
import pytest
from checkpoints import convert_tiny
from PIL import Image

from mlx_qwen35 import load, stream_generate
from mlx_qwen35.model.vision import VisionModel
from mlx_qwen35.runtime.conversation import Conversation, ConversationSettings
from mlx_qwen35.runtime.sessions import load_conversation, save_conversation

LOGITS_TOLERANCE = 1e-4
MAX_TOKENS = 6
# Greedy with the preset's presence penalty on: the cache's tokens count for it as a fresh run's prompt does.
SAMPLING = {"temp": 0.0}


@pytest.fixture(scope="module")
def loaded(tiny_moe_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("conversation-vision") / "model"
    convert_tiny(tiny_moe_checkpoint, out)
    return load(str(out))


@pytest.fixture
def tower_calls(monkeypatch) -> list:
    """Each call of the vision tower, as its grid_thw."""
    calls = []
    original = VisionModel.__call__

    def counted(self, pixel_values, grid_thw):
        calls.append(np.array(grid_thw).tolist())
        return original(self, pixel_values, grid_thw)

    monkeypatch.setattr(VisionModel, "__call__", counted)
    return calls


def png(path, seed: int, size: tuple[int, int] = (64, 48)) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def asking(image: str, text: str) -> list[dict]:
    return [{"type": "image", "image": image}, {"type": "text", "text": text}]


def new_conversation(loaded) -> Conversation:
    settings = ConversationSettings(
        system="You are terse.", enable_thinking=False, sampling=dict(SAMPLING), max_tokens=MAX_TOKENS
    )
    return Conversation(*loaded, settings)


def turn(conversation: Conversation, events, tower_calls: list) -> tuple[list, list, list]:
    """Run one reply: (its token responses, a fresh prefill's responses to the same prompt, the tower calls of the reply)."""
    inputs = conversation.prompt_inputs()  # the messages change at send/retry/edit; the reply is rendered lazily
    before = len(tower_calls)
    responses = []
    for event in events:
        if not responses or responses[-1] is not event.response:
            responses.append(event.response)
    calls = tower_calls[before:]
    model, processor = conversation.model, conversation.processor
    s = conversation.settings
    fresh = list(
        stream_generate(
            model, processor, inputs, max_tokens=s.max_tokens, enable_thinking=False, **conversation.sampling()
        )
    )
    return responses, fresh, calls


def assert_same(responses: list, fresh: list) -> None:
    assert [r.token for r in responses] == [r.token for r in fresh]
    for ours, theirs in zip(responses, fresh):
        a, b = np.array(ours.logprobs), np.array(theirs.logprobs)
        finite = np.isfinite(b)
        assert np.array_equal(finite, np.isfinite(a))
        assert np.abs(a[finite] - b[finite]).max() <= LOGITS_TOLERANCE


def reply_start(conversation: Conversation) -> int:
    """Tokens of the current prompt up to and including the reply's ``<|im_start|>assistant\\n``."""
    ids = conversation.prompt_tokens()
    header = conversation.processor.encode("<|im_start|>assistant\n")
    return max(i for i in range(len(ids)) if ids[i : i + len(header)] == header) + len(header)


def test_image_turn_then_text_turn_reuses_the_encoded_image(loaded, tower_calls, tmp_path):
    conversation = new_conversation(loaded)
    events = conversation.send(asking(png(tmp_path / "a.png", 0), "What is it?"))
    shared = reply_start(conversation)  # where the next turn's rendering parts from this one
    responses, fresh, calls = turn(conversation, events, tower_calls)
    assert_same(responses, fresh)
    assert len(calls) == 1  # the image, encoded once
    assert conversation.last_stats.reused_tokens == 0

    responses, fresh, calls = turn(conversation, conversation.send("And its colour?"), tower_calls)
    assert_same(responses, fresh)
    assert calls == []  # the image's effect came from the cache
    assert conversation.last_stats.reused_tokens == shared
    assert conversation.last_stats.prefilled_tokens == conversation.last_stats.prompt_tokens - shared


def test_text_turn_then_image_turn_encodes_only_the_new_image(loaded, tower_calls, tmp_path):
    conversation = new_conversation(loaded)
    _, _, calls = turn(conversation, conversation.send("Hello"), tower_calls)
    assert calls == []
    responses, fresh, calls = turn(
        conversation, conversation.send(asking(png(tmp_path / "b.png", 1), "This?")), tower_calls
    )
    assert_same(responses, fresh)
    assert len(calls) == 1 and conversation.last_stats.reused_tokens > 0  # the prefix ends before the image


def test_retry_after_an_image_turn_restores_the_reply_start(loaded, tower_calls, tmp_path):
    conversation = new_conversation(loaded)
    turn(conversation, conversation.send(asking(png(tmp_path / "c.png", 2), "What is it?")), tower_calls)
    events = conversation.retry()
    shared = reply_start(conversation)
    responses, fresh, calls = turn(conversation, events, tower_calls)
    assert_same(responses, fresh)
    assert calls == []
    assert conversation.last_stats.reused_tokens == shared


def test_edit_to_another_image_of_the_same_size_encodes_it(loaded, tower_calls, tmp_path):
    """Placeholders are one token id for every image: the cache must tell the two images apart by their pixels."""
    conversation = new_conversation(loaded)
    turn(conversation, conversation.send(asking(png(tmp_path / "d.png", 3), "What is it?")), tower_calls)
    events = conversation.edit(asking(png(tmp_path / "e.png", 4), "What is it?"))
    first_placeholder = conversation.prompt_tokens().index(conversation.model.config.image_token_id)
    responses, fresh, calls = turn(conversation, events, tower_calls)
    assert_same(responses, fresh)
    assert len(calls) == 1
    assert 0 < conversation.last_stats.reused_tokens < first_placeholder  # back to the end of the system turn


def test_saved_conversation_with_an_image_goes_on_without_encoding_it(loaded, tower_calls, tmp_path):
    """Saved: the message with the image's path, and the cache holding its effect (no pixels)."""
    conversation = new_conversation(loaded)
    image = png(tmp_path / "f.png", 5)
    turn(conversation, conversation.send(asking(image, "What is it?")), tower_calls)
    save_conversation(conversation, tmp_path / "saved")

    restored = load_conversation(tmp_path / "saved", *loaded)
    assert restored.messages[0]["content"][0] == {"type": "image", "image": image}
    responses, fresh, calls = turn(restored, restored.send("And its colour?"), tower_calls)
    assert_same(responses, fresh)
    assert calls == []
    assert restored.last_stats.reused_tokens > 0

    png(image, 6)  # the file changed since: the cache past it is not reused, the new pixels are encoded
    responses, fresh, calls = turn(restored, restored.retry(), tower_calls)
    assert_same(responses, fresh)
    assert len(calls) == 1
