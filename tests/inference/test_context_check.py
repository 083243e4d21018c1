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
        first = jobs._within_context(model, prompt, len(prompt), 4, requested=4).max_tokens
        second = jobs._within_context(model, prompt, len(prompt), 4, requested=4).max_tokens

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


@pytest.mark.parametrize(
    ("prompt_bytes", "default"),
    [
        (1_000, 1_024),  # fits whole: the model's output limit
        (3_500, 596),  # cut to what the bound leaves, more than 256
        (3_840, 256),  # cut to 256 exactly
        (4_000, 256),  # was 96: a quarter of the context in tokens
        (4_095, 256),  # was 1 (billed, finish_reason "length")
        (4_096, 256),
        (4_097, 256),  # was 1,024: past the context in bytes, the cut was skipped
        (14_000, 256),  # was 1,024, which the engine refused where 256 fitted
    ],
)
def test_without_a_tokenizer_the_default_max_tokens_is_never_cut_below_the_old_256(
    prompt_bytes, default
):
    # given a model with no tokenizer: a 4,096 context and an output limit of 1,024
    model = CatalogModel(name="m", context_limit=4096, max_output_tokens=1024)
    prompt = "x" * prompt_bytes

    # when a request leaves max_tokens out
    got = jobs._within_context(model, prompt, len(prompt), 1024, requested=None).max_tokens

    # then its default is what the bytes leave of the context, and 256 at least (the
    # engine decides, as it did for 256, where the bytes overstate the tokens)
    assert got == default


def test_without_a_tokenizer_the_default_shrinks_as_the_prompt_grows_and_keeps_the_catalogs():
    # given a model with no tokenizer
    model = CatalogModel(name="m", context_limit=4096, max_output_tokens=1024)

    # when prompts of every length around the context leave max_tokens out
    defaults = [
        jobs._within_context(model, "x" * n, n, 1024, requested=None).max_tokens
        for n in range(0, 5000, 7)
    ]

    # then a longer prompt never gets more, and none less than 256
    assert defaults == sorted(defaults, reverse=True)
    assert (defaults[0], defaults[-1]) == (1024, 256)

    # and a catalog default below 256 is kept whole, not raised to 256
    assert jobs._within_context(model, "x" * 9000, 9000, 100, requested=None).max_tokens == 100
    # while a max_tokens the client asked for is the engine's to refuse, untouched
    assert jobs._within_context(model, "x" * 4000, 4000, 1024, requested=1024).max_tokens == 1024
