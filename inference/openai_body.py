"""The common OpenAI request body, validated without DRF's serializer machinery.

Every /v1/chat/completions and /v1/completions request is validated; through
the views' DRF serializers (inference.apis `_GenerationInput`) that cost
about 0.28 ms of CPU per request (building the serializer deep-copies every
field), several percent of the API process's CPU per inference request
(docs/BENCHMARKS.md). This module accepts the ordinary body (known fields,
JSON types, values in range) and returns exactly what the serializer's
`validated_data` would be. Anything else, every error included, returns None
and the caller validates with the serializer, which stays the one reference:
its errors (a message's keys other than role and content included), its
coercions ("16" as an integer) and its OpenAPI schema. tests/inference/test_openai_body.py checks both agree.
"""

from __future__ import annotations

import json
from typing import Any

from accounts.models import Priority

_ROLES = frozenset({"system", "user", "assistant", "developer"})
_PRIORITIES = frozenset(Priority.values)
_STANDARD = Priority.STANDARD.value  # a plain str, as a client sends it
_MAX_TEXT = 200_000
_MAX_MESSAGES = 512

# OpenAI's parameters that this API does not act on, each with its neutral values (those
# that ask for nothing more than leaving it out does), which clients send by default and
# which are taken and dropped, as null is; any other value is refused,
# `unsupported_parameter` (neutral_refusal, for both this module and inference.apis
# `_Neutral`). `types`: the JSON types the parameter has at OpenAI; `valid` (optional): what
# else OpenAI requires of a value (an enum's strings, a map's limits); a value failing
# either is malformed, `invalid_request`, and `form` (optional) says what it must be.
# `neutral`: the neutral values, or EVERY_VALID where any well-formed value asks for
# nothing. `why`: what the refusal says. `by_kind` (optional): what differs at one kind's
# endpoint (NEUTRAL_BY_KIND), replacing the keys it names. Types and values as in OpenAI's
# API reference (and the official `openai` SDK's request types); where a value is taken as
# neutral by our own reading, the entry says so.
EVERY_VALID = None


def _strings_in(*choices: str):
    # An enum's strings; a value of another of the parameter's types is not checked here.
    return lambda value: type(value) is not str or value in choices


def _logit_bias_valid(value: dict) -> bool:
    # Token ids (as JSON object keys) to a bias from -100 to 100.
    return all(
        key.isascii() and key.isdigit() and type(bias) is int and -100 <= bias <= 100
        for key, bias in value.items()
    )


def _metadata_valid(value: dict) -> bool:
    # OpenAI's limits on its tags: 16 keys of up to 64 characters, string values of up to 512.
    return len(value) <= 16 and all(
        len(key) <= 64 and type(tag) is str and len(tag) <= 512 for key, tag in value.items()
    )


NEUTRAL: dict[str, dict] = {
    "logprobs": {
        # A boolean for chat, an integer (how many) for text completions (whose `false` is
        # taken too, as it always was).
        "types": (bool, int),
        "by_kind": {"chat": {"types": (bool,), "form": "a boolean"}},
        "neutral": (False,),
        "why": "this API returns no log probabilities",
    },
    "top_logprobs": {
        "types": (int,),
        "neutral": (0,),
        "why": "this API returns no log probabilities",
    },
    "response_format": {
        "types": (dict,),
        "neutral": ({"type": "text"},),
        "why": "these models answer in text; JSON modes and schemas are not enforced here",
    },
    "parallel_tool_calls": {
        # Without tools (which this API does not take) either value asks for nothing.
        "types": (bool,),
        "neutral": (True, False),
        "why": "tools are not supported",
    },
    "echo": {
        "types": (bool,),
        "neutral": (False,),
        "why": "the prompt is not echoed in the answer",
    },
    "best_of": {
        "types": (int,),
        "neutral": (1,),
        "why": "each request generates one candidate",
    },
    "tools": {
        "types": (list,),
        "form": "a list of tools",
        "neutral": ([],),
        "why": "function calling is not served: these models answer in text",
    },
    "tool_choice": {
        # Our reading: "auto" with no tools (the only tools taken) generates a message, as
        # "none" does. An object names a tool, of which there is none: refused whatever its
        # shape.
        "types": (str, dict),
        "valid": _strings_in("none", "auto", "required"),
        "form": '"none", "auto", "required" or an object naming a tool',
        "neutral": ("none", "auto"),
        "why": "tools are not supported, so none can be chosen",
    },
    "functions": {
        # OpenAI's deprecated forms of tools and tool_choice, as the two above.
        "types": (list,),
        "form": "a list of functions",
        "neutral": ([],),
        "why": "function calling is not served: these models answer in text",
    },
    "function_call": {
        "types": (str, dict),
        "valid": _strings_in("none", "auto"),
        "form": '"none", "auto" or an object naming a function',
        "neutral": ("none", "auto"),
        "why": "functions are not supported, so none can be called",
    },
    "logit_bias": {
        "types": (dict,),
        "valid": _logit_bias_valid,
        "form": "an object mapping token ids to integers from -100 to 100",
        "neutral": ({},),
        "why": "these engines take no token biases",
    },
    "store": {
        "types": (bool,),
        "neutral": (False,),
        "why": "nothing is stored for OpenAI's distillation or evals",
    },
    "metadata": {
        # OpenAI's tags for a stored completion (store: true), which nothing here is: our
        # choice is to take a well-formed object as asking for nothing and drop it, since
        # clients attach tags by default, and to refuse a malformed one as OpenAI does.
        "types": (dict,),
        "valid": _metadata_valid,
        "form": "an object of at most 16 keys of up to 64 characters, each with a string "
        "value of up to 512 characters",
        "neutral": EVERY_VALID,  # so never refused as unsupported: no `why`
    },
    "service_tier": {
        # "auto" and "default" both mean the standard processing OpenAI serves by default.
        "types": (str,),
        "valid": _strings_in("auto", "default", "flex", "scale", "priority", "fast"),
        "form": '"auto", "default", "flex", "scale", "priority" or "fast"',
        "neutral": ("auto", "default"),
        "why": "OpenAI's service tiers are not served here; this API's own `priority` field "
        "chooses how a request is queued and priced",
    },
    "modalities": {
        "types": (list,),
        "valid": lambda value: all(m in ("text", "audio") for m in value),
        "form": 'a list of "text" and "audio"',
        "neutral": (["text"],),
        "why": "these models answer in text only",
    },
    "prediction": {
        "types": (dict,),
        "form": "an object",
        "neutral": (),
        "why": "predicted outputs are not used",
    },
    "audio": {
        "types": (dict,),
        "form": "an object",
        "neutral": (),
        "why": "these models answer in text only",
    },
    "reasoning_effort": {
        # Our choice: null only. "none" asks a reasoning model to skip its reasoning, which
        # this API could not make an engine of the catalog do.
        "types": (str,),
        "valid": _strings_in("none", "minimal", "low", "medium", "high", "xhigh", "max"),
        "form": '"none", "minimal", "low", "medium", "high", "xhigh" or "max"',
        "neutral": (),
        "why": "reasoning effort is not set on these engines",
    },
    "web_search_options": {
        "types": (dict,),
        "form": "an object",
        "neutral": (),
        "why": "these models do not search the web",
    },
    "safety_identifier": {
        # An id of the application's end user for OpenAI's abuse detection (which
        # replaces `user` there): nothing here acts on it, so any well-formed one is taken.
        "types": (str,),
        "valid": lambda value: len(value) <= 64,
        "form": "a string of at most 64 characters",
        "neutral": EVERY_VALID,
    },
    "prompt_cache_key": {
        # A hint that groups requests sharing a prompt prefix for OpenAI's cache; the
        # engines here reuse cached prefixes without one, so any string asks for nothing.
        "types": (str,),
        "form": "a string",
        "neutral": EVERY_VALID,
    },
    "prompt_cache_retention": {
        # "in-memory" is OpenAI's default retention; "24h" asks for an extended cache
        # (and its price), which is not offered here.
        "types": (str,),
        "valid": _strings_in("in-memory", "24h"),
        "form": '"in-memory" or "24h"',
        "neutral": ("in-memory",),
        "why": "the extended prompt cache is not offered; prefixes are cached by the engine",
    },
    "verbosity": {
        # Our reading: "medium" is OpenAI's default, so it asks for nothing more than
        # leaving it out; "low" and "high" steer a reasoning model's length, which these
        # engines do not take.
        "types": (str,),
        "valid": _strings_in("low", "medium", "high"),
        "form": '"low", "medium" or "high"',
        "neutral": ("medium",),
        "why": "verbosity is not set on these engines; `max_tokens` bounds an answer's length",
    },
    "suffix": {
        # Our reading: an empty suffix inserts before nothing, as leaving it out does.
        "types": (str,),
        "neutral": ("",),
        "why": "an answer is not inserted before a suffix (no fill-in-the-middle)",
    },
}
NEUTRAL_BY_KIND = {
    "chat": frozenset(
        {
            "logprobs",
            "top_logprobs",
            "response_format",
            "parallel_tool_calls",
            "tools",
            "tool_choice",
            "functions",
            "function_call",
            "logit_bias",
            "store",
            "metadata",
            "service_tier",
            "modalities",
            "prediction",
            "audio",
            "reasoning_effort",
            "web_search_options",
            "safety_identifier",
            "prompt_cache_key",
            "prompt_cache_retention",
            "verbosity",
        }
    ),
    "completion": frozenset({"logprobs", "echo", "best_of", "logit_bias", "suffix"}),
}

_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "stop",
        "n",
        "stream",
        "stream_options",
        "user",
        "priority",
    }
)

# Between the text parts of a message's content (`[{"type": "text", "text": ...}, ...]`),
# as vLLM joins them: adjacent parts do not run their words together.
CONTENT_PART_SEPARATOR = "\n"


def content_parts_text(texts: list[str]) -> str:
    """A message's text parts as the one string its chat template renders."""
    return CONTENT_PART_SEPARATOR.join(texts)


def neutral_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def is_neutral(value: Any, neutral: tuple) -> bool:
    # Compared as JSON text: `false` is not `0`, nor `1.0` the `1` best_of takes. A value
    # of another Python type or size than a neutral one cannot have its text, and is told
    # so without writing it out: a refused megabyte of logit_bias costs no serializing.
    return any(
        type(value) is type(n)
        and (not isinstance(n, list | dict) or len(value) == len(n))
        and neutral_json(value) == neutral_json(n)
        for n in neutral
    )


def neutral_spec(name: str, kind: str | None) -> dict:
    """A NEUTRAL parameter's entry at a kind's endpoint; kind None: at either's."""
    spec = NEUTRAL[name]
    return {**spec, **spec.get("by_kind", {}).get(kind, {})}


def neutral_refusal(name: str, value: Any, kind: str | None) -> tuple[str, str] | None:
    """Why a NEUTRAL parameter's value is refused at a kind's endpoint, as (code, message),
    or None: it is taken (and dropped), being null or asking for nothing. The code is
    "invalid" (malformed) or "unsupported_parameter" (a well-formed value asking for what
    this API does not serve)."""
    if value is None:
        return None
    spec = neutral_spec(name, kind)
    neutral = spec["neutral"]
    if type(value) not in spec["types"] or not spec.get("valid", _anything)(value):
        return "invalid", f"{name} must be {spec.get('form') or _listed(neutral)}."
    if neutral is EVERY_VALID or is_neutral(value, neutral):
        return None
    return "unsupported_parameter", (
        f"{name}={_shown(value)} is not supported: {spec['why']}. Send {_listed(neutral)}, "
        "or leave it out."
    )


def neutral_taken(name: str) -> str:
    """What a NEUTRAL parameter is taken at, as the API's schema says it."""
    neutral = NEUTRAL[name]["neutral"]
    if neutral is EVERY_VALID:
        return f"null or {NEUTRAL[name]['form']}"
    return " or ".join(neutral_json(n) for n in (None, *neutral))


def _anything(value: Any) -> bool:
    return True


def _listed(neutral: tuple) -> str:
    # A parameter taken at null only (prediction) lists that.
    return " or ".join(neutral_json(n) for n in neutral or (None,))


def _shown(value: Any) -> str:
    # A refused list of tools can run to megabytes: the message shows its start, and only
    # that much of it is written out (the encoder yields its text piece by piece).
    text = ""
    for piece in json.JSONEncoder(ensure_ascii=False).iterencode(value):
        text += piece
        if len(text) > 100:
            return f"{text[:97]}..."
    return text


class _Defer(Exception):
    """Not the ordinary case: the serializer decides."""


def generation_body(data: Any, *, kind: str) -> dict | None:
    """The validated body of a chat ("chat") or text ("completion") request, or None.

    None means: validate with the endpoint's serializer instead.
    """
    if type(data) is not dict:
        return None
    text_field = "messages" if kind == "chat" else "prompt"
    try:
        neutral = NEUTRAL_BY_KIND[kind]
        if not data.keys() <= _COMMON | neutral | {text_field}:
            raise _Defer
        for name in neutral & data.keys():
            # Taken and dropped at a neutral value (or null), as the serializer does.
            if neutral_refusal(name, data[name], kind) is not None:
                raise _Defer
        out: dict = {"model": _name(data.get("model"), 128)}
        if kind == "chat":
            out["messages"] = _messages(data.get("messages"))
        else:
            prompt = data.get("prompt")
            if type(prompt) is list and len(prompt) == 1:
                prompt = prompt[0]  # OpenAI's SDK allows a list of one prompt
            out["prompt"] = _text(prompt, allow_blank=False)
        for name in ("max_tokens", "max_completion_tokens"):
            if name in data:
                out[name] = _int(data[name], low=1)
        limits = (out.get("max_tokens"), out.get("max_completion_tokens"))
        if None not in limits and limits[0] != limits[1]:
            raise _Defer  # two different limits: refused
        if "temperature" in data:
            out["temperature"] = _float(data["temperature"], 0, 2)
        if "top_p" in data:
            out["top_p"] = _float(data["top_p"], 0, 1)
        if "seed" in data:
            out["seed"] = _int(data["seed"], low=0, high=2**63 - 1)
        for name in ("presence_penalty", "frequency_penalty"):
            if name in data:
                out[name] = _float(data[name], -2, 2)
        if "stop" in data:
            out["stop"] = _stop(data["stop"])
        if "n" in data:
            out["n"] = _int(data["n"], low=1, high=1)
        out["stream"] = _bool(data.get("stream", False))
        if "stream_options" in data:
            out["stream_options"] = _stream_options(data["stream_options"])
            if out["stream_options"] is not None and not out["stream"]:
                raise _Defer  # refused: only with stream
        if "user" in data:
            out["user"] = _name(data["user"], 256, allow_blank=True)
        priority = data.get("priority", _STANDARD)
        if type(priority) is not str or priority not in _PRIORITIES:
            raise _Defer
        out["priority"] = priority
    except _Defer:
        return None
    return out


def text_storable(text: str) -> bool:
    """Text PostgreSQL stores: no NUL, and valid UTF-8 (encode() refuses a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def _text(value: Any, *, allow_blank: bool, max_length: int = _MAX_TEXT) -> str:
    # As DRF's CharField(trim_whitespace=False): a string, storable, at most
    # max_length characters.
    if type(value) is not str or len(value) > max_length or not text_storable(value):
        raise _Defer
    if not value and not allow_blank:
        raise _Defer
    return value


def _name(value: Any, max_length: int, *, allow_blank: bool = False) -> str:
    # CharField trims surrounding whitespace: only a value it would keep as is.
    text = _text(value, allow_blank=allow_blank, max_length=max_length)
    if text != text.strip():
        raise _Defer
    return text


def _messages(value: Any) -> list[dict]:
    if type(value) is not list or not value or len(value) > _MAX_MESSAGES:
        raise _Defer
    messages = []
    for message in value:
        if type(message) is not dict or message.keys() != {"role", "content"}:
            raise _Defer
        role = message["role"]
        if type(role) is not str or role not in _ROLES:
            raise _Defer
        content = message["content"]
        if type(content) is list:
            content = _content_parts(content)
        messages.append({"role": role, "content": _text(content, allow_blank=True)})
    return messages


def _content_parts(parts: list) -> str:
    # Text parts only, each exactly {"type": "text", "text": str}; anything else defers.
    if not parts:
        raise _Defer
    texts = []
    for part in parts:
        if type(part) is not dict or part.keys() != {"type", "text"} or part["type"] != "text":
            raise _Defer
        if type(part["text"]) is not str:
            raise _Defer
        texts.append(part["text"])
    return content_parts_text(texts)


def _int(value: Any, *, low: int, high: int | None = None) -> int | None:
    if value is None:
        return None
    if type(value) is not int or value < low or (high is not None and value > high):
        raise _Defer
    return value


def _float(value: Any, low: float, high: float) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not low <= value <= high:  # NaN fails too
        raise _Defer
    return float(value)


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _Defer
    return value


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if type(value) is str else value
    if type(stops) is not list or len(stops) > 4:
        raise _Defer
    for stop in stops:
        _text(stop, allow_blank=False, max_length=64)
    return list(stops)


def _stream_options(value: Any) -> dict | None:
    if value is None:
        return None
    if type(value) is not dict or not value.keys() <= {"include_usage", "include_obfuscation"}:
        raise _Defer
    if "include_obfuscation" in value:
        _bool(value["include_obfuscation"])  # taken and ignored, as the serializer does
    return {"include_usage": _bool(value.get("include_usage", False))}
