"""The server as the official ``openai`` client sees it: logprobs, structured output, the peers' field names,
model lookup, OpenAI-shaped errors, CORS and the operator's log, on the tiny MoE model.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import mlx.core as mx
import openai
import pytest
from checkpoints import convert_tiny
from test_server import ServerProcess, scripted_server

from mlx_qwen35 import load, stream_generate
from mlx_qwen35.runtime.settings import recommended_sampling
from mlx_qwen35.surfaces.server.protocol import ApiError, ChatMessage, template_messages

SERVED_NAME = "qwen-under-test"
MESSAGES = [{"role": "user", "content": "Name a colour."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "sure": {"type": "boolean"}},
    "required": ["answer", "sure"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model_dir(tiny_moe_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("server-openai") / "tiny-moe"
    convert_tiny(tiny_moe_checkpoint, out)
    return out


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load(str(model_dir))


@pytest.fixture(scope="module")
def server(model_dir):
    running = ServerProcess(model_dir, "--max-tokens", "64", "--served-model-name", SERVED_NAME)
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def reference_logprobs(loaded, max_tokens: int) -> list:
    """(token, logprobs [vocab]) of the in-process generation with the server's non-thinking sampling, greedy."""
    model, processor = loaded
    sampling = recommended_sampling(False, {"temp": 0.0}).keywords()
    responses = stream_generate(model, processor, MESSAGES, max_tokens=max_tokens, enable_thinking=False, **sampling)
    return [(r.token, r.logprobs) for r in responses]


def test_logprobs_are_the_generations_own(client, loaded):
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        extra_body=NO_THINKING,
    )
    entries = reply.choices[0].logprobs.content
    reference = reference_logprobs(loaded, 5)
    assert len(entries) == len(reference) == 5
    _, processor = loaded
    for entry, (token, logprobs) in zip(entries, reference):
        assert entry.token == processor.decode([token])
        # The server prefills through its conversation cache, so float32 rounding differs a little:
        # measured at most 1.2e-6 apart; 1e-5 is 8x that.
        assert entry.logprob == pytest.approx(logprobs[token].item(), abs=1e-5)
        top = sorted(logprobs.tolist(), reverse=True)[:3]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=1e-5)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token is the likeliest

    stream = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=5,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        extra_body=NO_THINKING,
    )
    streamed = [
        entry
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in entries]
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in entries], abs=1e-5)


def test_text_completion_logprobs_in_the_legacy_shape(client, loaded):
    reply = client.completions.create(model=SERVED_NAME, prompt="Once upon", max_tokens=3, temperature=0, logprobs=2)
    logprobs = reply.choices[0].logprobs
    model, processor = loaded
    sampling = recommended_sampling(False, {"temp": 0.0}).keywords()
    reference = list(stream_generate(model, processor, "Once upon", max_tokens=3, **sampling))
    expected = [r.logprobs[r.token].item() for r in reference]
    assert logprobs.token_logprobs == pytest.approx(expected, abs=1e-5)  # headroom as in the chat test
    assert "".join(logprobs.tokens) == reply.choices[0].text and logprobs.text_offset[0] == 0
    assert all(len(top) == 2 for top in logprobs.top_logprobs)
    stream = client.completions.create(
        model=SERVED_NAME, prompt="Once upon", max_tokens=3, temperature=0, logprobs=2, stream=True
    )
    chunks = [chunk.choices[0].logprobs for chunk in stream if chunk.choices]
    assert [c.tokens[0] for c in chunks] == logprobs.tokens
    assert [c.text_offset[0] for c in chunks] == logprobs.text_offset  # offsets run on across chunks


def matches_schema(value) -> bool:
    """SCHEMA, checked by hand (no jsonschema in the test environment)."""
    return (
        isinstance(value, dict)
        and set(value) == {"answer", "sure"}
        and value["answer"] in ("yes", "no")
        and isinstance(value["sure"], bool)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_answers_parse_and_match_even_from_random_weights(client, seed):
    response_format = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA, "strict": True}}
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        temperature=1.0,
        seed=seed,
        response_format=response_format,
        extra_body=NO_THINKING,
    )
    assert matches_schema(json.loads(reply.choices[0].message.content)), reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    # Thinking stays free; the budget closes it and the answer after it is held to the schema.
    thought = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        temperature=1.0,
        seed=seed,
        response_format=response_format,
        extra_body={"thinking_budget": 4},
    )
    assert matches_schema(json.loads(thought.choices[0].message.content)), thought.choices[0].message.content


def test_an_end_of_text_token_inside_the_json_ends_the_reply_instead_of_failing(loaded):
    """Ranks stopping a reply early (distributed.stop_reply) give an end-of-text token wherever the answer is; the
    step run ahead on it passes it to the constraint, which must not refuse it (every rank would fail)."""
    from mlx_qwen35.runtime.structured_output import JsonConstraint

    model, processor = loaded
    vocab = model.config.text.vocab_size
    constraint = JsonConstraint(processor, SCHEMA, vocab, thinking=False)
    logits = mx.zeros((1, vocab))
    prompt = processor.encode("<|im_start|>assistant\n")
    constraint(mx.array(prompt), logits)  # the first step, built on the prompt
    brace = processor.encode("{")
    constraint(mx.array(prompt + brace), logits)  # the answer has begun: the grammar now refuses an end
    end = min(processor.eos_token_ids)
    masked = constraint(mx.array(prompt + brace + [end]), logits)  # the step ahead, built on the end token
    assert constraint.choose(end) == end and masked.shape == (1, vocab)


def test_json_object_answers_are_objects(client):
    reply = client.chat.completions.create(
        model=SERVED_NAME,
        messages=MESSAGES,
        temperature=1.0,
        seed=5,
        max_tokens=64,
        response_format={"type": "json_object"},
        extra_body=NO_THINKING,
    )
    if reply.choices[0].finish_reason == "stop":  # random weights may write a long object; cut, it cannot parse
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    assert reply.choices[0].message.content.lstrip().startswith("{")


def test_frequency_penalty_lowers_each_token_by_its_count(loaded):
    model, processor = loaded
    prompt = "red red red blue"
    ids = processor.encode(prompt)
    first = lambda **penalty: next(iter(stream_generate(model, processor, prompt, max_tokens=1, **penalty))).logprobs  # noqa: E731
    shift = first(frequency_penalty=2.0) - first()
    counts = mx.zeros(shift.shape[0]).at[mx.array(ids)].add(1.0)
    # log-softmax shifts every logit by the same constant, so shift + 2 * count is flat where logits are finite.
    restored = (shift + 2.0 * counts)[: len(processor.tokenizer._tokenizer)]
    assert mx.max(restored).item() - mx.min(restored).item() < 1e-4  # measured 2e-6 (float32 of logits ~10)
    assert counts.max().item() >= 2


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"logit_bias": {"1": 5}}, "logit_bias is not supported by this server; leave it out"),
        ({"n": 2}, "n: Input should be 1"),
        (
            {"chat_template_kwargs": {"reasoning_effort": "low"}},
            "chat_template_kwargs.reasoning_effort is not supported",
        ),
        ({"response_format": {"type": "json_schema"}}, "needs a json_schema object"),
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs: true"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}}},
            "the JSON schema cannot be enforced",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "'required' is not"),
    ],
)
def test_unsupported_options_are_a_400_naming_them(client, body, fragment):
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=1, extra_body=body)
    assert fragment in refused.value.body["message"]


def test_bookkeeping_fields_are_accepted(client):
    reply = client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, max_tokens=1, user="u1", metadata={"k": "v"}, store=False
    )
    assert reply.system_fingerprint.startswith("mlx-qwen35-")


def test_the_model_is_found_by_its_served_name(client, server, loaded):
    health = httpx.get(f"{server.url}/health").json()  # the chat page shows these
    assert health["model"] == SERVED_NAME
    assert health["context_length"] == loaded[0].config.text.max_position_embeddings
    assert client.models.retrieve(SERVED_NAME).id == SERVED_NAME
    assert [m.id for m in client.models.list()] == [SERVED_NAME]
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-4o")
    assert missing.value.body["message"] == f"the model 'gpt-4o' is not served here; this server holds '{SERVED_NAME}'"


@pytest.mark.parametrize(
    "method, path, status, fragment",
    [
        ("GET", "/v1/embeddings", 404, "nothing at /v1/embeddings"),
        ("POST", "/v1/nothing", 404, "nothing at /v1/nothing"),
        ("GET", "/v1/chat/completions", 405, "GET is not allowed on /v1/chat/completions"),
        ("DELETE", "/v1/models", 405, "DELETE is not allowed"),
    ],
)
def test_every_error_status_has_the_openai_shape(server, method, path, status, fragment):
    response = httpx.request(method, f"{server.url}{path}")
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_the_log_has_a_startup_line_and_one_line_per_request(server, client):
    client.chat.completions.create(model=SERVED_NAME, messages=MESSAGES, max_tokens=3, extra_body=NO_THINKING)
    lines = server.log.read_text().splitlines()
    assert f"mlx-qwen35: chat page {server.url}/ · API {server.url}/v1 · model {SERVED_NAME}" in lines
    served = [line for line in lines if line.startswith("POST /v1/chat/completions: prompt ")]
    assert served and ", generated 3, TTFT " in served[-1] and " tok/s, length" in served[-1], served[-3:]


THINKING_SCRIPT = "Let me see.\n</think>\n\nBlue."


@pytest.mark.parametrize(
    "field, present, absent",
    [("both", ("reasoning_content", "reasoning"), ()), ("reasoning", ("reasoning",), ("reasoning_content",))],
)
def test_the_thinking_is_in_the_reasoning_fields_the_server_was_told(loaded, field, present, absent):
    running = scripted_server(loaded, THINKING_SCRIPT, reasoning_field=field)
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0)
        message = client.chat.completions.create(model="scripted", messages=MESSAGES).choices[0].message.model_dump()
        stream = client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True)
        deltas = [chunk.choices[0].delta.model_dump() for chunk in stream if chunk.choices]
    finally:
        running.close()
    assert message["content"] == "Blue."
    for name in present:
        assert message[name] == "Let me see."
        assert "".join(d.get(name) or "" for d in deltas) == "Let me see."
    for name in absent:
        assert name not in message and all(name not in d for d in deltas)


ORIGIN = "http://localhost:3000"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization",
}


def test_cors_is_off_unless_origins_are_allowed(loaded):
    closed = scripted_server(loaded, "ok")
    opened = scripted_server(loaded, "ok", allowed_origins=(ORIGIN,), api_key="sesame")
    try:
        refused = httpx.options(f"{closed.url}/v1/chat/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in refused.headers
        allowed = httpx.options(f"{opened.url}/v1/chat/completions", headers=PREFLIGHT)  # no key: preflights carry none
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
        other = httpx.options(f"{opened.url}/v1/chat/completions", headers={**PREFLIGHT, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers
        answer = httpx.post(
            f"{opened.url}/v1/chat/completions",
            json={"messages": MESSAGES},
            headers={"Origin": ORIGIN, "Authorization": "Bearer sesame"},
        )
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == ORIGIN
    finally:
        closed.close()
        opened.close()


def test_video_url_parts_name_a_file_inside_the_allowed_directory(tmp_path: Path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"not decoded here")
    message = ChatMessage(
        role="user",
        content=[{"type": "video_url", "video_url": {"url": "clip.mp4"}}, {"type": "text", "text": "What happens?"}],
    )
    assert template_messages([message], tmp_path)[0]["content"] == [
        {"type": "video", "video": str(clip)},
        {"type": "text", "text": "What happens?"},
    ]
    for url in ("data:video/mp4;base64,AAAA", "https://example.com/clip.mp4"):
        inline = ChatMessage(role="user", content=[{"type": "video_url", "video_url": {"url": url}}])
        with pytest.raises(ApiError, match="videos are read from files only"):
            template_messages([inline], tmp_path)
