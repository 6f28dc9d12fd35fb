"""Generation settings: each option's rule is checked once, when the settings are built, and the server's
request fields follow the same rules (so no request the API accepts can fail in the runtime)."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from mlx_qwen35.errors import Qwen35Error
from mlx_qwen35.runtime.conversation import ConversationSettings
from mlx_qwen35.runtime.settings import (
    DEFAULT_MAX_TOKENS,
    GenerationSettings,
    KVCacheSettings,
    Sampling,
    max_tokens_within_context,
    recommended_sampling,
)
from mlx_qwen35.surfaces.server.protocol import SamplingRequest
from mlx_qwen35.surfaces.server.routes import ServerSettings


@pytest.mark.parametrize(
    "build, option",
    [
        (lambda: Sampling(temp=-1.0), "temp"),
        (lambda: Sampling(temp=math.nan), "temp"),
        (lambda: Sampling(temp=math.inf), "temp"),
        (lambda: Sampling(top_p=2.0), "top_p"),
        (lambda: Sampling(top_p=-0.1), "top_p"),
        (lambda: Sampling(top_k=-1), "top_k"),
        (lambda: Sampling(top_k=2.5), "top_k"),
        (lambda: Sampling(min_p=2.0), "min_p"),
        (lambda: Sampling(repetition_penalty=0.0), "repetition_penalty"),
        (lambda: Sampling(repetition_penalty=-1.0), "repetition_penalty"),
        (lambda: Sampling(presence_penalty=math.inf), "presence_penalty"),
        (lambda: GenerationSettings(max_tokens=0), "max_tokens"),
        (lambda: GenerationSettings(max_tokens=-1), "max_tokens"),
        (lambda: GenerationSettings(seed=-1), "seed"),
        (lambda: GenerationSettings(seed=2**64), "seed"),
        (lambda: GenerationSettings(thinking_budget=-1), "thinking_budget"),
        (lambda: GenerationSettings(prefill_step_size=0), "prefill_step_size"),
        (lambda: KVCacheSettings(bits=3), "kv_bits"),
        (lambda: KVCacheSettings(bits=8, group_size=48), "kv_group_size"),
        (lambda: ConversationSettings(kv_bits=2), "kv_bits"),
        (lambda: ConversationSettings(max_tokens=0), "max_tokens"),
        (lambda: ConversationSettings(sampling={"top_p": 2.0}), "top_p"),
        (lambda: ConversationSettings(sampling={"temperature": 0.5}), "temperature"),
    ],
)
def test_an_option_out_of_range_is_one_line_naming_it(build, option):
    with pytest.raises(Qwen35Error) as error:
        build()
    message = str(error.value)
    assert option in message and "\n" not in message


def test_zero_keeps_its_meaning_off_and_the_bounds_are_allowed():
    """0 means greedy / off as in mlx-lm; top_p 1, min_p 1, a negative presence penalty are valid values."""
    assert Sampling() == Sampling(temp=0.0, top_p=0.0, top_k=0, min_p=0.0)
    Sampling(temp=0.0, top_p=1.0, top_k=0, min_p=1.0, repetition_penalty=1.0, presence_penalty=-1.5)
    GenerationSettings(max_tokens=1, seed=0, thinking_budget=0, kv_cache=KVCacheSettings(bits=4, group_size=32))


def test_the_model_cards_preset_under_overrides():
    assert recommended_sampling(True, {"temp": 0.0, "top_k": None}) == Sampling(
        temp=0.0, top_p=0.95, top_k=20, min_p=0.0, presence_penalty=1.5
    )
    assert recommended_sampling(False).keywords() == dict(
        temp=0.7, top_p=0.8, top_k=20, min_p=0.0, presence_penalty=1.5
    )


def test_every_surface_defaults_to_the_same_max_tokens():
    assert ConversationSettings().max_tokens == ServerSettings("m").max_tokens == DEFAULT_MAX_TOKENS


# The request field, the settings option, and the API's own (OpenAI) limit where it is tighter.
REQUEST_FIELDS = [
    ("temperature", "temp", (0, 2)),
    ("top_p", "top_p", None),
    ("top_k", "top_k", None),
    ("min_p", "min_p", None),
    ("repetition_penalty", "repetition_penalty", (-math.inf, 10)),
    ("presence_penalty", "presence_penalty", (-2, 2)),
]
VALUES = [-3.0, -1.0, -0.0, 0.0, 0.05, 0.5, 1.0, 1.5, 2.0, 3.0, 11.0, math.inf, -math.inf, math.nan, -1, 0, 1, 3, 600]


@pytest.mark.parametrize("field, option, api_limit", REQUEST_FIELDS, ids=[f[0] for f in REQUEST_FIELDS])
def test_the_server_accepts_a_value_only_if_the_runtime_does(field, option, api_limit):
    """One rule per option: the request model's bounds are the settings' bounds, narrowed only by the API's limit."""
    for value in VALUES:
        if option == "top_k" and isinstance(value, float):
            continue  # pydantic turns 1.0 into 1 for an int field: the runtime's integer rule is not the API's
        try:
            SamplingRequest(**{field: value})
            api_accepts = True
        except ValidationError:
            api_accepts = False
        try:
            Sampling(**{option: value})
            runtime_accepts = True
        except Qwen35Error:
            runtime_accepts = False
        within_api_limit = api_limit is None or api_limit[0] <= value <= api_limit[1]
        assert api_accepts == (runtime_accepts and within_api_limit), (field, value)


def test_max_tokens_within_context():
    assert max_tokens_within_context(100, 20, None, fix="x") == 100
    assert max_tokens_within_context(100, 20, 50, fix="x") == 30
    assert max_tokens_within_context(10, 20, 50, fix="x") == 10
    with pytest.raises(Qwen35Error, match=r"the conversation \(50 tokens\) fills the context \(50\); /reset"):
        max_tokens_within_context(10, 50, 50, what="the conversation", fix="/reset")
