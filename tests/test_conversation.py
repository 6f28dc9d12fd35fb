"""The conversation engine: cache reuse across turns, retry, edit, reset and interruption give the
logits of a fresh prefill of the whole rendered conversation (float32 tiny model; both sides are ours on
MLX: max |Δ log-probability| ≤ 1e-4, measured ≤ 1.4e-5, 7× headroom)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from checkpoints import convert_tiny
from mlx_lm.generate import GenerationResponse
from typer.testing import CliRunner

from mlx_qwen35 import load, stream_generate
from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.runtime.conversation import Conversation, ConversationSettings
from mlx_qwen35.surfaces.cli import app

LOGITS_TOLERANCE = 1e-4
MAX_TOKENS = 10
THINKING_BUDGET = 2  # forces "</think>" early, so the tiny random model writes an answer the history keeps
GREEDY = {"temp": 0.0}  # greedy, with the preset's presence penalty: it must see the reused tokens too
SYSTEM = "You are terse."


@pytest.fixture(scope="module")
def model_dir(tiny_moe_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("conversation") / "model"
    convert_tiny(tiny_moe_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(str(model_dir))


def new_conversation(loaded, thinking: bool, **overrides) -> Conversation:
    model, processor = loaded
    settings = ConversationSettings(
        system=SYSTEM,
        enable_thinking=thinking,
        sampling=dict(GREEDY),
        max_tokens=MAX_TOKENS,
        thinking_budget=THINKING_BUDGET,
        **overrides,
    )
    return Conversation(model, processor, settings)


def run(events) -> list:
    """The token responses of a streamed reply (one per token)."""
    responses = []
    for event in events:
        if not responses or responses[-1] is not event.response:
            responses.append(event.response)
    return responses


def assert_same_as_fresh_prefill(loaded, conversation: Conversation, tokens: list[int], responses: list) -> None:
    """The reply's tokens and per-step log-probabilities equal those of a fresh cache fed the whole rendering."""
    model, processor = loaded
    s = conversation.settings
    fresh = list(
        stream_generate(
            model,
            processor,
            tokens,
            max_tokens=s.max_tokens,
            enable_thinking=s.enable_thinking,
            thinking_budget=s.thinking_budget,
            **conversation.sampling(),
        )
    )
    assert [r.token for r in responses] == [r.token for r in fresh]
    for ours, theirs in zip(responses, fresh):
        a, b = np.array(ours.logprobs), np.array(theirs.logprobs)
        finite = np.isfinite(b)
        assert np.array_equal(finite, np.isfinite(a))
        assert np.abs(a[finite] - b[finite]).max() <= LOGITS_TOLERANCE


def reply_start(processor, settings: ConversationSettings, messages: list[dict]) -> int:
    """Tokens of ``messages`` rendered up to and including the reply's ``<|im_start|>assistant\\n``."""
    system = [{"role": "system", "content": settings.system}]
    text = processor.apply_chat_template(system + messages, add_generation_prompt=False)
    return len(processor.encode(text + "<|im_start|>assistant\n"))


@pytest.mark.parametrize("thinking", [True, False], ids=["thinking", "no-thinking"])
def test_second_turn_reuses_the_cache_up_to_the_reply_and_matches_a_full_prefill(loaded, thinking):
    _, processor = loaded
    conversation = new_conversation(loaded, thinking)
    first = conversation.send("What is MLX?")
    first_tokens = conversation.prompt_tokens()
    run(first)
    assert conversation.last_stats.reused_tokens == 0
    assert conversation.messages[-1]["content"], "the reply should have an answer the next rendering keeps"

    second = conversation.send("And Metal?")
    second_tokens = conversation.prompt_tokens()
    # The template re-renders reply 1 without its <think> block, so the rendering diverges right after
    # "<|im_start|>assistant\n" of turn 1: that much is shared, the rest (reply 1 as re-rendered, turn 2) is prefilled.
    shared = reply_start(processor, conversation.settings, conversation.messages[:1])
    assert first_tokens[:shared] == second_tokens[:shared] and first_tokens[shared] != second_tokens[shared]
    responses = run(second)
    stats = conversation.last_stats
    assert (stats.prompt_tokens, stats.reused_tokens, stats.prefilled_tokens) == (
        len(second_tokens),
        shared,
        len(second_tokens) - shared,
    )
    assert_same_as_fresh_prefill(loaded, conversation, second_tokens, responses)
    # The last token (EOS, or the one at max_tokens) is never fed back.
    assert stats.context_tokens == conversation.context_tokens == len(second_tokens) + len(responses) - 1


def test_retry_restores_the_reply_start_and_matches_a_full_prefill(loaded):
    conversation = new_conversation(loaded, thinking=True)
    run(conversation.send("What is MLX?"))
    run(conversation.send("And Metal?"))
    conversation.messages.pop()
    tokens = conversation.prompt_tokens()
    responses = run(conversation.retry())
    shared = reply_start(loaded[1], conversation.settings, conversation.messages[:3])
    assert conversation.last_stats.reused_tokens == shared
    assert conversation.last_stats.prefilled_tokens == len(tokens) - shared == 2  # "<think>\n"
    assert len(conversation.messages) == 4
    assert_same_as_fresh_prefill(loaded, conversation, tokens, responses)
    # Again: the snapshot at the reply start survives its own restore.
    responses = run(conversation.retry())
    assert conversation.last_stats.reused_tokens == shared
    assert_same_as_fresh_prefill(loaded, conversation, tokens, responses)


def test_edit_restores_the_end_of_the_previous_turn_and_matches_a_full_prefill(loaded):
    _, processor = loaded
    conversation = new_conversation(loaded, thinking=False)
    run(conversation.send("What is MLX?"))
    run(conversation.send("And Metal?"))
    events = conversation.edit("And CUDA?")
    tokens = conversation.prompt_tokens()
    assert conversation.messages[2:] == [{"role": "user", "content": "And CUDA?"}]
    rendered = processor.apply_chat_template([{"role": "system", "content": SYSTEM}] + conversation.messages)
    previous_turn_end = len(processor.encode(rendered[: rendered.rindex("<|im_start|>user")]))
    responses = run(events)
    assert conversation.last_stats.reused_tokens == previous_turn_end
    assert_same_as_fresh_prefill(loaded, conversation, tokens, responses)


def test_reset_keeps_the_system_prompt_and_an_interrupted_reply_keeps_the_session(loaded):
    _, processor = loaded
    conversation = new_conversation(loaded, thinking=True)
    events = conversation.send("What is MLX?")
    next(events), next(events)
    events.close()  # what Ctrl-C in the REPL does: stop mid-reply
    assert [m["role"] for m in conversation.messages] == ["user", "assistant"]
    tokens_after_interrupt = conversation.prompt_tokens
    second = conversation.send("And Metal?")
    tokens = tokens_after_interrupt()
    assert_same_as_fresh_prefill(loaded, conversation, tokens, run(second))

    conversation.reset()
    assert conversation.messages == []
    events = conversation.send("Hello")
    tokens = conversation.prompt_tokens()
    rendered = processor.apply_chat_template([{"role": "system", "content": SYSTEM}] + conversation.messages)
    system_turn = len(processor.encode(rendered[: rendered.index("<|im_start|>user")]))
    responses = run(events)
    assert conversation.last_stats.reused_tokens == system_turn
    assert_same_as_fresh_prefill(loaded, conversation, tokens, responses)


def test_events_split_reasoning_from_content_and_carry_every_token(loaded):
    conversation = new_conversation(loaded, thinking=True)
    events = list(conversation.send("What is MLX?"))
    kinds = [e.kind for e in events]
    assert kinds[0] == "reasoning" and "content" in kinds
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert len({id(e.response) for e in events}) == MAX_TOKENS
    reply = conversation.messages[-1]
    assert reply["content"] == "".join(e.text for e in events if e.kind == "content").strip()
    assert reply["reasoning_content"] == "".join(e.text for e in events if e.kind == "reasoning").strip()


def test_thinking_toggle_applies_the_matching_preset_under_overrides(loaded):
    conversation = new_conversation(loaded, thinking=True)
    assert conversation.sampling()["top_p"] == 0.95 and conversation.sampling()["temp"] == 0.0
    conversation.set_thinking(False)
    assert conversation.sampling()["top_p"] == 0.8 and conversation.sampling()["temp"] == 0.0


def test_misuse_raises_our_error(loaded):
    conversation = new_conversation(loaded, thinking=False)
    for call in (conversation.retry, lambda: conversation.edit("x"), lambda: conversation.send_tool_results(["{}"])):
        with pytest.raises(Qwen35Error):
            call()


def test_quantised_kv_cache_reuses_the_same_way(loaded):
    conversation = new_conversation(loaded, thinking=False, kv_bits=8, kv_group_size=32)  # head_dim 32
    run(conversation.send("What is MLX?"))
    run(conversation.send("And Metal?"))
    shared = reply_start(loaded[1], conversation.settings, conversation.messages[:1])
    assert conversation.last_stats.reused_tokens == shared
    assert conversation.context_tokens > shared


def test_cli_tools_prints_each_call_as_json(model_dir, tmp_path, monkeypatch):
    """``generate --tools``: the calls in the reply come out as JSON lines, and in --json's ``tool_calls``."""
    import mlx_qwen35.runtime.generation as generation

    tools = [
        {
            "type": "function",
            "function": {"name": "get_weather", "parameters": {"properties": {"days": {"type": "integer"}}}},
        }
    ]
    (tmp_path / "tools.json").write_text(json.dumps(tools))
    reply = "Checking.\n</think>\n\nLet me look.\n\n<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"

    def scripted_reply(*args, **kwargs):  # the tiny random model never writes a call: script the text
        for n, i in enumerate(range(0, len(reply), 7), start=1):
            end = i + 7 >= len(reply)
            yield GenerationResponse(
                reply[i : i + 7], 0, mx.zeros(1), False, 5, 1.0, n, 1.0, 0.0, "stop" if end else None
            )

    monkeypatch.setattr(generation, "stream_text", scripted_reply)
    base = ["generate", "--model", str(model_dir), "-p", "Weather?", "--tools", str(tmp_path / "tools.json")]
    printed = CliRunner().invoke(app, base)
    assert printed.exit_code == 0, printed.output
    assert '{"name": "get_weather", "arguments": {"days": 3}}' in printed.stdout.splitlines()
    assert "<tool_call>" not in printed.stdout
    as_json = CliRunner().invoke(app, base + ["--json"])
    assert json.loads(as_json.stdout)["tool_calls"] == [{"name": "get_weather", "arguments": {"days": 3}}]


def test_cli_tools_puts_a_call_on_its_own_line_when_one_token_completes_several_pieces(
    model_dir, tmp_path, monkeypatch
):
    """``generate --tools``: reasoning, text and a call finished by the same token still come out on separate lines."""
    import mlx_qwen35.runtime.generation as generation

    (tmp_path / "tools.json").write_text(json.dumps([{"type": "function", "function": {"name": "f"}}]))
    reply = "Hm.\n</think>\n\nLet me look.\n\n<tool_call>\n<function=f>\n</function>\n</tool_call>"

    def scripted_reply(*args, **kwargs):
        yield GenerationResponse(reply, 0, mx.zeros(1), False, 5, 1.0, 1, 1.0, 0.0, "stop")

    monkeypatch.setattr(generation, "stream_text", scripted_reply)
    printed = CliRunner().invoke(
        app, ["generate", "--model", str(model_dir), "-p", "?", "--tools", str(tmp_path / "tools.json")]
    )
    assert printed.exit_code == 0, printed.output
    assert printed.stdout.splitlines() == ["Thinking:", "Hm.", "", "Let me look.", '{"name": "f", "arguments": {}}']
