"""The context check's edges that need no server: an unreadable tokenizer, the uncounted refusal."""

from __future__ import annotations

import logging

import pytest

from accounts.errors import ApplicationError
from inference.models import CatalogModel
from inference.services import jobs

pytestmark = pytest.mark.usefixtures("fresh_tokenizer_caches")

TOKENIZER = "inference/engine/tokenizer.json"


def test_an_unreadable_tokenizer_leaves_the_check_to_the_engine_and_is_logged_once(caplog):
    # given a catalog entry whose tokenizer file is missing on this host
    model = CatalogModel(name="m", context_limit=8, tokenizer_file="var/missing-tokenizer.json")
    prompt = "squat " * 50

    # when two long prompts are checked
    with caplog.at_level(logging.ERROR, logger="inference.services.jobs"):
        first = jobs._within_context(model, prompt, len(prompt), 4, requested=4)
        second = jobs._within_context(model, prompt, len(prompt), 4, requested=4)

    # then both pass on to the engine untouched, and the failure is logged once
    assert (first, second) == (4, 4)
    assert jobs.prompt_tokens_count(model=model, prompt=prompt) is None
    assert [r.message for r in caplog.records].count(
        "tokenizer 'var/missing-tokenizer.json' could not be loaded; counting without it"
    ) == 1


def test_a_prompt_whose_bytes_prove_it_too_long_is_refused_without_tokenizing(monkeypatch):
    # given a 64-token context, and a tokenizer whose longest token is 13 bytes
    model = CatalogModel(name="m", context_limit=64, tokenizer_file=TOKENIZER)
    assert jobs._longest_token_bytes(TOKENIZER) == 13
    encoded = []
    count = jobs.prompt_tokens_count  # the real count, its calls recorded
    monkeypatch.setattr(jobs, "prompt_tokens_count", lambda **kw: encoded.append(kw) or count(**kw))
    prompt = "x" * (64 * 26)  # at least 64 tokens even at 26 bytes a token

    # when / then: refused, uncounted
    with pytest.raises(ApplicationError) as refused:
        jobs._within_context(model, prompt, len(prompt), 4, requested=4, param="prompt")
    assert refused.value.code == "context_length_exceeded"
    assert "your prompt is 64 tokens or more" in str(refused.value)
    assert encoded == []

    # and one that might fit at 26 bytes a token is counted exactly (and
    # refused for its real count)
    shorter = prompt[: 63 * 26]
    with pytest.raises(ApplicationError) as counted:
        jobs._within_context(model, shorter, len(shorter), 4, requested=4)
    assert len(encoded) == 1
    assert "in the prompt, 4 for the completion" in str(counted.value)
