"""Chat templates: a catalog model's Django template over `messages`, compiled as the
API compiles it, so the admin refuses one that every chat request would fail on."""

from __future__ import annotations

import functools

from django.template import Context, Engine

# Chat templates are plain text, not HTML: nothing may be escaped.
_TEMPLATES = Engine(autoescape=False)


@functools.lru_cache(maxsize=128)
def chat_template_compile(source: str):
    # Compiled once per template text, not per request (it was about 4% of
    # the API process's CPU per chat request): keyed by the text itself, so
    # an edit in the admin is a new entry, never a stale one. A compiled
    # Django template renders safely from many threads at once.
    return _TEMPLATES.from_string(source)


def chat_template_render(source: str, messages: list[dict]) -> str:
    return chat_template_compile(source).render(Context({"messages": messages}))
