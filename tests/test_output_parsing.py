"""Reasoning / answer split and the qwen3_coder tool-call parser, on text the Qwen3.5 chat template writes."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from mlx_qwen35.processing.output import OutputParser, ShownAnswer, collect, parse_output, parse_tool_call
from mlx_qwen35.weights.tokenizer_builder import write_tokenizer_files

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "units": {"type": "string", "enum": ["metric", "imperial"]},
                "options": {"type": "object"},
            },
            "required": ["city"],
        },
    },
}

NESTED_ARGUMENTS = {
    "city": "Paris",
    "days": 3,
    "options": {"hourly": True, "fields": ["temp", "wind"], "limits": {"min": -2.5, "max": None}},
}
SEARCH_ARGUMENTS = {"query": "line one\nline two", "tags": ["a", "b"], "limit": 5}


@pytest.fixture(scope="module")
def template_tokenizer(tmp_path_factory):
    """The tiny tokenizer with the real Qwen3.5 chat template, loaded by transformers."""
    path = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(path)
    return AutoTokenizer.from_pretrained(path)


def rendered_reply(tokenizer, content: str, calls: list[tuple[str, dict]], reasoning: str = "") -> str:
    """The reply text as the chat template renders an assistant turn after the last query (what the model learnt to write)."""
    message = {
        "role": "assistant",
        "content": content,
        "reasoning_content": reasoning,
        "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls],
    }
    text = tokenizer.apply_chat_template([{"role": "user", "content": "q"}, message], tokenize=False)
    reply = text.split("<|im_start|>assistant\n", 1)[1].removesuffix("<|im_end|>\n")
    return reply.removeprefix("<think>\n")  # the generation prompt opened it; the model writes the rest


def stream_in_pieces(text: str, cuts: list[int], thinking: bool, tools=None):
    """Feed ``text`` cut at ``cuts`` and return (pieces, every text piece emitted)."""
    parser = OutputParser(thinking, tools)
    pieces = []
    for start, end in zip([0] + cuts, cuts + [len(text)]):
        pieces += parser.feed(text[start:end])
    return pieces + parser.finish()


def test_complete_call_in_the_template_format(template_tokenizer):
    reply = rendered_reply(
        template_tokenizer, "Let me check.", [("get_weather", NESTED_ARGUMENTS)], reasoning="Need weather."
    )
    assert "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n" in reply
    parsed = parse_output(reply, thinking=True, tools=[WEATHER_TOOL])
    assert parsed.reasoning == "Need weather."
    assert parsed.content == "Let me check."
    assert [c.to_dict() for c in parsed.tool_calls] == [{"name": "get_weather", "arguments": NESTED_ARGUMENTS}]


def test_several_calls_without_schema_decode_json_values(template_tokenizer):
    calls = [("get_weather", NESTED_ARGUMENTS), ("search", SEARCH_ARGUMENTS)]
    reply = rendered_reply(template_tokenizer, "", calls)
    parsed = parse_output(reply, thinking=True)
    assert parsed.content == "" and parsed.reasoning == ""
    assert [c.to_dict() for c in parsed.tool_calls] == [{"name": n, "arguments": a} for n, a in calls]


def test_every_split_point_streams_the_same_pieces_and_never_leaks_a_tag(template_tokenizer):
    calls = [("get_weather", NESTED_ARGUMENTS), ("search", SEARCH_ARGUMENTS)]
    reply = rendered_reply(template_tokenizer, "Checking both.", calls, reasoning="Two tools.")
    whole = collect(stream_in_pieces(reply, [], thinking=True))
    for cut in range(1, len(reply)):
        pieces = stream_in_pieces(reply, [cut], thinking=True)
        assert collect(pieces) == whole, cut
        for piece in pieces:
            if piece.kind != "tool_call":
                assert "<" not in piece.text and "think>" not in piece.text, (cut, piece)
    # One character at a time, too.
    assert collect(stream_in_pieces(reply, list(range(1, len(reply))), thinking=True)) == whole


def test_schema_types_win_over_json_looks():
    block = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\n1234\n</parameter>\n"
        "<parameter=days>\n7\n</parameter>\n<parameter=units>\nnull\n</parameter>\n</function>\n</tool_call>"
    )
    call = parse_tool_call(block, [WEATHER_TOOL])
    assert call.arguments == {"city": "1234", "days": 7, "units": "null"}
    assert parse_tool_call(block).arguments == {"city": 1234, "days": 7, "units": None}


def test_booleans_as_json_or_as_the_template_renders_them(template_tokenizer):
    tool = {"name": "search", "parameters": {"properties": {"exact": {"type": "boolean"}}}}
    reply = rendered_reply(template_tokenizer, "", [("search", {"exact": False})])
    assert "<parameter=exact>\nFalse\n</parameter>" in reply  # Python-style, from `| string`
    assert parse_output(reply, thinking=True, tools=[tool]).tool_calls[0].arguments == {"exact": False}
    block = "<tool_call>\n<function=search>\n<parameter=exact>\ntrue\n</parameter>\n</function>\n</tool_call>"
    assert parse_tool_call(block).arguments == {"exact": True}


def test_string_values_keep_inner_whitespace_and_non_json_text():
    block = (
        "<tool_call>\n<function=write>\n<parameter=text>\n  indented\n\nlast\n</parameter>\n</function>\n</tool_call>"
    )
    assert parse_tool_call(block).arguments == {"text": "  indented\n\nlast"}


@pytest.mark.parametrize(
    "block, error",
    [
        ("<tool_call>\n{not xml}\n</tool_call>", "expected <function=NAME>"),
        ("<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>", "unexpected text"),
        (
            "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=a>\n2\n</parameter>\n</function>\n</tool_call>",
            "twice",
        ),
    ],
)
def test_malformed_calls_are_reported_with_their_raw_text(block, error):
    parsed = parse_output(f"Sure.\n\n{block}", thinking=False)
    assert parsed.content == "Sure."
    (call,) = parsed.tool_calls
    assert error in call.error and call.raw == block
    assert call.to_dict() == {"error": call.error, "raw": block}


def test_output_ending_inside_a_call_is_reported_not_swallowed():
    text = "Sure.\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    parsed = parse_output(text, thinking=False)
    assert parsed.content == "Sure."
    (call,) = parsed.tool_calls
    assert "ended inside <tool_call>" in call.error and call.raw == text[len("Sure.\n\n") :]


def test_thinking_split_and_unclosed_thinking():
    assert parse_output("step 1\nstep 2\n</think>\n\nAnswer.", thinking=True).reasoning == "step 1\nstep 2"
    assert parse_output("step 1\nstep 2\n</think>\n\nAnswer.", thinking=True).content == "Answer."
    unclosed = parse_output("still thinking </thi", thinking=True)
    assert (unclosed.reasoning, unclosed.content) == ("still thinking </thi", "")
    assert parse_output("Plain answer with a < sign.", thinking=False).content == "Plain answer with a < sign."


def test_text_between_calls_stays_separate():
    block = "<tool_call>\n<function=f>\n</function>\n</tool_call>"
    parsed = parse_output(f"First.\n\n{block}\nThen more.", thinking=False)
    assert parsed.content == "First.\n\nThen more."
    assert [c.to_dict() for c in parsed.tool_calls] == [{"name": "f", "arguments": {}}]


GOOD_CALL = "<tool_call>\n<function=f>\n</function>\n</tool_call>"
BAD_CALL = "<tool_call>\n{not xml}\n</tool_call>"
# A reply, and the answer a reader sees: a malformed call stays as text where it was, a blank line around each call.
SHOWN_ANSWERS = [
    (f"First.\n\n{GOOD_CALL}\nThen more.", "First.\n\nThen more."),
    (f"First.\n\n{BAD_CALL}\nThen more.", f"First.\n\n{BAD_CALL}\n\nThen more."),
    (f"{BAD_CALL}\n{GOOD_CALL}\nDone.", f"{BAD_CALL}\n\nDone."),
    (f"Sure.\n\n{GOOD_CALL}", "Sure."),
    ("Sure.\n\n<tool_call>\n<function=f>\n<param", "Sure.\n\n<tool_call>\n<function=f>\n<param"),
]


@pytest.mark.parametrize("reply, shown", SHOWN_ANSWERS)
def test_a_malformed_call_stays_in_the_shown_answer_where_it_was(reply, shown):
    for cuts in ([], list(range(1, len(reply)))):  # whole, and one character at a time
        parser, answer, added = OutputParser(thinking=False), ShownAnswer(), []
        for start, end in zip([0, *cuts], [*cuts, len(reply)]):
            added += [answer.add(piece) for piece in parser.feed(reply[start:end])]
        added += [answer.add(piece) for piece in parser.finish()]
        assert answer.text == "".join(added) == ShownAnswer.of(parser.pieces).text == shown, cuts[:1]
