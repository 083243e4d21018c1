"""inference.openai_body agrees with the endpoints' serializers, which stay the reference.

Whatever the fast validator accepts, the serializer accepts too, with the
same validated data; whatever the serializer refuses, the fast validator
defers (returns None), so every error is the serializer's. No database.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference.apis import ChatCompletionsApi, CompletionsApi
from inference.openai_body import generation_body

SERIALIZERS = {"chat": ChatCompletionsApi.Input, "completion": CompletionsApi.Input}


def _plain(value):
    # validated_data nests OrderedDicts; compare as plain JSON values.
    return json.loads(json.dumps(value))


def _reference(body, kind):
    serializer = SERIALIZERS[kind](data=body)
    return _plain(serializer.validated_data) if serializer.is_valid() else None


ORDINARY = [
    ("chat", {"model": "gym-tiny", "messages": [{"role": "user", "content": "Hi"}]}),
    (
        "chat",
        {
            "model": "gym-tiny",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Plan a squat day ✓"},
                {"role": "assistant", "content": ""},
            ],
            "max_tokens": 16,
            "max_completion_tokens": None,
            "temperature": 1,
            "top_p": 0.9,
            "seed": 7,
            "stop": "\n",
            "n": 1,
            "stream": True,
            "stream_options": {"include_usage": True},
            "user": "member-42",
            "priority": "batch",
        },
    ),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": None}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "bc"]}),
    (
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": None},
    ),
    (
        "chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream": True,
            "stream_options": {},
        },
    ),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": None}),
    ("completion", {"model": "gym-tiny", "prompt": "Once upon a time", "max_tokens": 8}),
    ("completion", {"model": "gym-tiny", "prompt": "   ", "user": ""}),
    # OpenAI's content parts, text only, joined into the one content string
    (
        "chat",
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Plan"},
                        {"type": "text", "text": "a week"},
                    ],
                },
            ],
        },
    ),
    # the penalties, and the neutral values of what this API does not act on, as
    # clients send them by default
    (
        "chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "presence_penalty": 0,
            "frequency_penalty": -0.5,
            "n": 1,
            "logprobs": False,
            "top_logprobs": 0,
            "response_format": {"type": "text"},
            "parallel_tool_calls": True,
            "user": "member-42",
        },
    ),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": None}),
    # what the openai SDK, LangChain, LiteLLM and the Vercel AI SDK send asking for nothing
    (
        "chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [],
            "tool_choice": "none",
            "functions": [],
            "function_call": "none",
            "logit_bias": {},
            "store": False,
            "metadata": {"team": "strength", "k" * 64: "v" * 512},
            "service_tier": "auto",
            "modalities": ["text"],
            "prediction": None,
            "audio": None,
            "reasoning_effort": None,
            "web_search_options": None,
            "safety_identifier": "u" * 64,
            "prompt_cache_key": "coach-v2",
            "prompt_cache_retention": "in-memory",
            "verbosity": "medium",
        },
    ),
    (
        "chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tool_choice": "auto",
            "function_call": "auto",
            "logit_bias": None,
            "metadata": {},
            "service_tier": "default",
            "parallel_tool_calls": False,
        },
    ),
    ("completion", {"model": "m", "prompt": ["Once"], "echo": False, "best_of": 1}),
    ("completion", {"model": "m", "prompt": "x", "logit_bias": {}, "suffix": ""}),
    ("completion", {"model": "m", "prompt": "x", "logit_bias": None, "suffix": None}),
    ("completion", {"model": "m", "prompt": "x", "logprobs": False, "presence_penalty": 2}),
]

REFUSED = [
    ("chat", []),
    ("chat", {"model": "m"}),
    ("chat", {"model": "m", "messages": []}),
    ("chat", {"model": "m", "messages": [{"role": "robot", "content": "x"}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "bogus": 1}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": "\x00"}),
    ("completion", {"model": "m", "prompt": "x", "stop": ["ok", "\ud800"]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": 1}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {}}),
    (
        "chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": "true"},
        },
    ),
    # A message's fields beyond role and content (OpenAI's name, tool_call_id and
    # tool_calls change what its model sees): refused, never dropped.
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x", "name": "alice"}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x", "tool_call_id": "c"}]}),
    (
        "chat",
        {"model": "m", "messages": [{"role": "assistant", "content": "", "tool_calls": []}]},
    ),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "a\x00b"}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]}),
    ("chat", {"model": "", "messages": [{"role": "user", "content": "x"}]}),
    ("chat", {"model": "m" * 129, "messages": [{"role": "user", "content": "x"}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "priority": "vip"}),
    ("completion", {"model": "m", "prompt": ""}),
    ("completion", {"model": "m", "prompt": ["a", "b"]}),
    ("completion", {"model": "m", "prompt": [""]}),
    ("completion", {"model": "m", "prompt": [7]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": ["x"]}]}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": True}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "logprobs": 0}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "echo": False}),
    (
        "chat",
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "presence_penalty": 3},
    ),
    (
        "chat",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
        },
    ),
    ("completion", {"model": "m", "prompt": "x", "best_of": 1.0}),
    ("completion", {"model": "m", "prompt": "x", "response_format": {"type": "text"}}),
    # chat's parameters not acted on are not a text completion's, even at a neutral value
    ("completion", {"model": "m", "prompt": "x", "tools": []}),
    ("completion", {"model": "m", "prompt": "x", "store": False}),
    ("chat", {"model": "m", "messages": [{"role": "user", "content": "x"}], "suffix": ""}),
    ("completion", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
]


@pytest.mark.parametrize(("kind", "body"), ORDINARY)
def test_an_ordinary_body_is_validated_without_the_serializer_and_as_it_would(kind, body):
    fast = generation_body(body, kind=kind)
    assert fast is not None
    assert _plain(fast) == _reference(body, kind)


@pytest.mark.parametrize(("kind", "body"), REFUSED)
def test_a_refused_body_is_left_to_the_serializer(kind, body):
    assert _reference(body, kind) is None
    assert generation_body(body, kind=kind) is None


# Any JSON-like value for each field, ordinary or not, so both sides are pushed
# through their edges: strings with whitespace, NUL and surrogates, bools
# posing as numbers, numbers as strings, nested junk.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=2**64)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", " m ", "m", "16", "user", "batch", "standard", "\x00", "\ud800", "é"])
    | st.text(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(["role", "content", "include_usage", "name", "x"]), inner, max_size=3
        )
    ),
    max_leaves=8,
)
_messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "system", "robot", 1]), "content": _values}
    )
    | _values,
    max_size=3,
)


def _either(valid):
    # Mostly a value the field takes, sometimes anything at all.
    return st.one_of(valid, valid, valid, _values)


_valid_messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "developer"]),
            "content": st.text(max_size=20),
        }
    ),
    min_size=1,
    max_size=3,
)
_fields = {
    "messages": st.one_of(_valid_messages, _valid_messages, _valid_messages, _messages),
    "prompt": _either(st.text(min_size=1, max_size=20)),
    "max_tokens": _either(st.none() | st.integers(min_value=1, max_value=10**6)),
    "max_completion_tokens": _either(st.none() | st.integers(min_value=1, max_value=10**6)),
    "temperature": _either(
        st.none() | st.floats(min_value=0, max_value=2) | st.integers(min_value=0, max_value=2)
    ),
    "top_p": _either(st.none() | st.floats(min_value=0, max_value=1)),
    "seed": _either(st.none() | st.integers(min_value=0, max_value=2**63 - 1)),
    "stop": _either(
        st.none()
        | st.text(min_size=1, max_size=64)
        | st.lists(st.text(min_size=1, max_size=64), max_size=4)
    ),
    "n": _either(st.sampled_from([None, 1])),
    "stream": _either(st.booleans()),
    "stream_options": _either(
        st.none() | st.fixed_dictionaries({}, optional={"include_usage": st.booleans()})
    ),
    "user": _either(st.text(max_size=8)),
    "priority": _either(st.sampled_from(["batch", "standard", "priority"])),
    "presence_penalty": _either(st.none() | st.floats(min_value=-2, max_value=2)),
    "frequency_penalty": _either(st.none() | st.integers(min_value=-2, max_value=2)),
    "logprobs": _either(st.sampled_from([None, False])),
    "response_format": _either(st.sampled_from([None, {"type": "text"}])),
    "echo": _either(st.sampled_from([None, False])),
    "tools": _either(st.sampled_from([None, [], [{"type": "function"}]])),
    "tool_choice": _either(st.sampled_from([None, "none", "auto", "required"])),
    "logit_bias": _either(
        st.none() | st.dictionaries(st.sampled_from(["1", "50256", "x"]), st.integers(-101, 101))
    ),
    "store": _either(st.sampled_from([None, False, True])),
    "metadata": _either(
        st.none()
        | st.dictionaries(
            st.text(max_size=2) | st.just("k" * 65), st.text(max_size=3) | st.just("v" * 513)
        )
    ),
    "service_tier": _either(st.sampled_from([None, "auto", "default", "flex", "turbo"])),
    "modalities": _either(st.sampled_from([None, ["text"], ["text", "audio"], []])),
    "suffix": _either(st.sampled_from([None, "", "end"])),
}
_TEXT_FIELD = {"chat": "messages", "completion": "prompt"}


@st.composite
def _body(draw, kind: str):
    # The endpoint's own text field always, the other one now and then.
    text_field = _TEXT_FIELD[kind]
    optional = {n: s for n, s in _fields.items() if n != text_field}
    other = "prompt" if kind == "chat" else "messages"
    if draw(st.integers(0, 9)):
        optional.pop(other)
    return draw(
        st.fixed_dictionaries(
            {
                "model": st.sampled_from(["gym-tiny", "gym-tiny", "gym-tiny", " gym-tiny", ""]),
                text_field: _fields[text_field],
            },
            optional=optional,
        )
    )


_kind_and_body = st.sampled_from(["chat", "completion"]).flatmap(
    lambda kind: st.tuples(st.just(kind), _body(kind))
)


@settings(max_examples=400, deadline=None)
@given(kind_and_body=_kind_and_body)
def test_whatever_the_fast_path_accepts_the_serializer_accepts_alike(kind_and_body):
    kind, body = kind_and_body
    fast = generation_body(body, kind=kind)
    if fast is not None:
        assert _plain(fast) == _reference(body, kind)


@settings(max_examples=200, deadline=None)
@given(
    kind_and_body=_kind_and_body,
    extra=st.sampled_from(["tool", "logit_biases", "function", "bogus"]),
    value=_values,
)
def test_a_field_the_endpoint_does_not_know_is_left_to_the_serializer(kind_and_body, extra, value):
    kind, body = kind_and_body
    body = {**body, extra: value}
    assert generation_body(body, kind=kind) is None
    assert _reference(body, kind) is None


# Each parameter this API does not act on, at a value asking for something (refused:
# unsupported_parameter) and at one OpenAI would not take (malformed: invalid).
NOT_ACTED_ON = [
    ("chat", "tools", [{"type": "function", "function": {"name": "lookup"}}], "unsupported"),
    ("chat", "tools", {}, "invalid"),
    ("chat", "tool_choice", "required", "unsupported"),
    ("chat", "tool_choice", {"type": "function", "function": {"name": "f"}}, "unsupported"),
    ("chat", "tool_choice", "maybe", "invalid"),
    ("chat", "tool_choice", True, "invalid"),
    ("chat", "functions", [{"name": "lookup"}], "unsupported"),
    ("chat", "functions", "lookup", "invalid"),
    ("chat", "function_call", {"name": "lookup"}, "unsupported"),
    ("chat", "function_call", "required", "invalid"),
    ("chat", "logit_bias", {"50256": -100}, "unsupported"),
    ("chat", "logit_bias", {"50256": 101}, "invalid"),
    ("chat", "logit_bias", {"the": 5}, "invalid"),
    ("chat", "logit_bias", {"50256": 1.5}, "invalid"),
    ("chat", "logit_bias", [], "invalid"),
    ("chat", "store", True, "unsupported"),
    ("chat", "store", 0, "invalid"),
    ("chat", "metadata", {f"k{i}": "v" for i in range(17)}, "invalid"),
    ("chat", "metadata", {"k" * 65: "v"}, "invalid"),
    ("chat", "metadata", {"k": "v" * 513}, "invalid"),
    ("chat", "metadata", {"k": 1}, "invalid"),
    ("chat", "metadata", "team", "invalid"),
    ("chat", "service_tier", "flex", "unsupported"),
    ("chat", "service_tier", "priority", "unsupported"),
    ("chat", "service_tier", "scale", "unsupported"),
    ("chat", "service_tier", "turbo", "invalid"),
    ("chat", "modalities", ["text", "audio"], "unsupported"),
    ("chat", "modalities", ["audio"], "unsupported"),
    ("chat", "modalities", ["video"], "invalid"),
    ("chat", "modalities", "text", "invalid"),
    ("chat", "prediction", {"type": "content", "content": "x"}, "unsupported"),
    ("chat", "prediction", "x", "invalid"),
    ("chat", "audio", {"voice": "alloy", "format": "wav"}, "unsupported"),
    ("chat", "reasoning_effort", "low", "unsupported"),
    ("chat", "reasoning_effort", "none", "unsupported"),
    ("chat", "reasoning_effort", "extreme", "invalid"),
    ("chat", "web_search_options", {}, "unsupported"),
    ("chat", "web_search_options", [], "invalid"),
    ("chat", "safety_identifier", "u" * 65, "invalid"),
    ("chat", "safety_identifier", 42, "invalid"),
    ("chat", "prompt_cache_key", ["k"], "invalid"),
    ("chat", "prompt_cache_retention", "24h", "unsupported"),
    ("chat", "prompt_cache_retention", "forever", "invalid"),
    ("chat", "verbosity", "low", "unsupported"),
    ("chat", "verbosity", "high", "unsupported"),
    ("chat", "verbosity", "terse", "invalid"),
    ("completion", "logit_bias", {"50256": -100}, "unsupported"),
    ("completion", "suffix", "\n# end", "unsupported"),
    ("completion", "suffix", 5, "invalid"),
]
_BASE = {"chat": {"messages": [{"role": "user", "content": "x"}]}, "completion": {"prompt": "x"}}


@pytest.mark.parametrize(("kind", "name", "value", "code"), NOT_ACTED_ON)
def test_a_parameter_not_acted_on_is_refused_at_a_value_asking_for_something(
    kind, name, value, code
):
    # given a body that is ordinary but for that parameter's value
    body = {"model": "m", **_BASE[kind], name: value}

    # when
    serializer = SERIALIZERS[kind](data=body)

    # then the serializer refuses it with that code, naming it, and the fast path defers
    assert not serializer.is_valid()
    assert list(serializer.errors) == [name]
    assert serializer.errors[name][0].code == (
        "unsupported_parameter" if code == "unsupported" else "invalid"
    )
    assert generation_body(body, kind=kind) is None
