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

from typing import Any

from accounts.models import Priority

_ROLES = frozenset({"system", "user", "assistant", "developer"})
_PRIORITIES = frozenset(Priority.values)
_STANDARD = Priority.STANDARD.value  # a plain str, as a client sends it
_MAX_TEXT = 200_000
_MAX_MESSAGES = 512

_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "user",
        "priority",
    }
)


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
        if not data.keys() <= _COMMON | {text_field}:
            raise _Defer
        out: dict = {"model": _name(data.get("model"), 128)}
        if kind == "chat":
            out["messages"] = _messages(data.get("messages"))
        else:
            out["prompt"] = _text(data.get("prompt"), allow_blank=False)
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
        messages.append({"role": role, "content": _text(message["content"], allow_blank=True)})
    return messages


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
