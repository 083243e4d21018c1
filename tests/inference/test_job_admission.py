"""job_submit's admission: the token reservation and the concurrency slot, both or neither;
the priorities a plan allows; prompts kept only for organizations that opted in.

One database transaction, never committed, as in test_job_cancel.py: the
Celery task of an admitted job is never sent.
"""

from __future__ import annotations

import pytest

from accounts.errors import ApplicationError
from accounts.ratelimits import Limit, concurrency_release, rate_limit_consume
from accounts.redis import get_redis
from inference.models import Job
from inference.services import job_submit, jobs
from inference.services.jobs import (
    SubmitParams,
    job_quote,
    prompt_token_bound,
    prompt_tokens_count,
)
from metering.models import Hold
from metering.selectors import model_price, organization_balance
from metering.services import Rates, credits_worst_case
from tests.factories import OrganizationFactory
from tests.helpers import credits, ledger_rows, served_model, submit_job

pytestmark = pytest.mark.django_db

MODEL = "gym-admission"


def test_a_job_past_the_concurrency_limit_takes_no_tokens_and_no_credits(grant, fresh_window):
    # given an organization allowed one job at a time, running one
    served_model(MODEL)
    org = OrganizationFactory(tokens_per_minute=1_000, concurrent_jobs=1)
    grant(org, credits(10))
    running = submit_job(org, MODEL)
    tokens = [Limit(scope=f"org:{org.pk}", limit=org.tokens_per_minute)]
    tokens_left = rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining
    rows, balance = ledger_rows(), organization_balance(organization=org)

    # when a second job is submitted
    with pytest.raises(ApplicationError) as refused:
        submit_job(org, MODEL)

    # then it is refused for concurrency, and took no tokens, no hold, no row
    assert (refused.value.code, refused.value.status) == ("too_many_concurrent_jobs", 429)
    assert rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining == tokens_left
    assert ledger_rows() == rows
    assert organization_balance(organization=org) == balance

    # and once the first ends (its slot given back), the next is admitted
    concurrency_release(scope=f"org:{org.pk}", job_id=running.public_id)
    assert submit_job(org, MODEL).status == "queued"


def test_a_priority_above_the_plans_is_refused_and_takes_nothing(grant, fresh_window):
    # given an organization whose plan allows up to standard priority
    served_model(MODEL)
    org = OrganizationFactory(max_priority="standard", tokens_per_minute=1_000)
    grant(org, credits(10))
    tokens = [Limit(scope=f"org:{org.pk}", limit=org.tokens_per_minute)]
    rows, balance = ledger_rows(), organization_balance(organization=org)

    # when a job asks for priority
    with pytest.raises(ApplicationError) as refused:
        submit_job(org, MODEL, priority="priority")

    # then it is refused, and took nothing: no tokens, no slot, no hold, no row
    assert (refused.value.code, refused.value.status) == ("priority_not_in_plan", 403)
    assert rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining == 1_000
    assert get_redis().zcard(f"conc:org:{org.pk}") == 0
    assert (ledger_rows(), organization_balance(organization=org)) == (rows, balance)
    assert not Job.objects.filter(organization=org).exists()
    # while batch and standard are admitted, each on its own priority
    assert [submit_job(org, MODEL, priority=p).priority for p in ("batch", "standard")] == [
        "batch",
        "standard",
    ]


@pytest.mark.parametrize("opted_in", [False, True], ids=["default", "opted-in"])
def test_a_prompt_is_kept_only_for_an_organization_that_opted_in(grant, opted_in):
    # given
    served_model(MODEL)
    org = OrganizationFactory(store_prompts=opted_in)
    grant(org, credits(10))

    # when
    job = submit_job(org, MODEL, prompt="My private training plan")

    # then the job row holds the prompt only if the organization asked for it
    stored = Job.objects.get(pk=job.pk).prompt
    assert stored == ("My private training plan" if opted_in else "")


TOKENIZER = "inference/engine/tokenizer.json"


def test_a_long_prompt_is_counted_against_the_token_limit_by_its_tokens_not_its_bytes(
    grant, fresh_window
):
    # given an organization allowed 1,000 tokens a minute, and a prompt of about 2,000
    # bytes that the model's tokenizer counts at far fewer tokens
    served_model(MODEL, tokenizer_file=TOKENIZER, context_limit=8192)
    org = OrganizationFactory(tokens_per_minute=1_000)
    grant(org, credits(10))
    prompt = "Squats and deadlifts build strength. " * 54
    assert len(prompt.encode()) > 1_000
    tokens = [Limit(scope=f"org:{org.pk}", limit=org.tokens_per_minute)]

    # when it is submitted with 16 tokens for the completion
    job = submit_job(org, MODEL, prompt=prompt, max_tokens=16)

    # then it is admitted, and reserved its counted tokens and max_tokens, not its bytes
    counted = prompt_tokens_count(model=job.model, prompt=prompt)
    assert counted + 16 < 1_000
    assert job.params["reserved_tokens"] == counted + 16
    left = rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining
    assert left == 1_000 - counted - 16


@pytest.mark.parametrize("tokenizer", [TOKENIZER, ""], ids=["counted", "no-tokenizer"])
def test_a_request_larger_than_the_whole_token_limit_is_refused_as_one_no_retry_can_serve(
    grant, fresh_window, tokenizer
):
    # given an organization allowed 100 tokens a minute, and nothing counted yet
    served_model(MODEL, tokenizer_file=tokenizer, context_limit=8192)
    org = OrganizationFactory(tokens_per_minute=100)
    grant(org, credits(10))
    tokens = [Limit(scope=f"org:{org.pk}", limit=org.tokens_per_minute)]
    rows, balance = ledger_rows(), organization_balance(organization=org)

    # when a request needs more than that however it is counted
    with pytest.raises(ApplicationError) as refused:
        submit_job(org, MODEL, prompt="Squats and deadlifts build strength. " * 20, max_tokens=64)

    # then it is refused, not as a rate limit to wait out (no Retry-After), and took
    # no tokens, no hold, no row
    error = refused.value
    assert (error.code, error.status) == ("request_exceeds_rate_limit", 429)
    assert "retry_after" not in error.extra
    assert error.extra["limit"] == 100 and error.extra["requested"] > 100
    assert rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining == 100
    assert (ledger_rows(), organization_balance(organization=org)) == (rows, balance)
    assert not Job.objects.filter(organization=org).exists()


@pytest.mark.parametrize("tokenizer", [TOKENIZER, ""], ids=["counted", "no-tokenizer"])
@pytest.mark.parametrize("long", [False, True], ids=["short-prompt", "long-prompt"])
def test_a_default_max_tokens_under_a_tight_token_limit_is_the_old_256_at_most(
    grant, fresh_window, tokenizer, long
):
    # given an organization allowed 600 tokens a minute, fewer than a prompt and the
    # model's output limit (1,024), which a request without max_tokens defaults to; a
    # short prompt leaves more than the old default of 256 of it, a long one less
    model = served_model(MODEL, tokenizer_file=tokenizer, context_limit=8192)
    org = OrganizationFactory(tokens_per_minute=600)
    grant(org, credits(10))
    prompt = "Squats and deadlifts build strength. " * ((20 if tokenizer else 10) if long else 1)
    bound = prompt_token_bound(prompt, model=model)
    counted = prompt_tokens_count(model=model, prompt=prompt)
    prompt_tokens = counted if tokenizer else bound
    assert prompt_tokens < 600 < prompt_tokens + 1024
    assert (600 - prompt_tokens < 256) == long
    tokens = [Limit(scope=f"org:{org.pk}", limit=org.tokens_per_minute)]

    # when it is quoted, then submitted, leaving max_tokens out
    quote = job_quote(
        organization=org, model_name=MODEL, prompt=prompt, max_tokens=None, priority="standard"
    )
    job = submit_job(org, MODEL, prompt=prompt, max_tokens=None)

    # then it is admitted (at the whole output limit it was a 429 no retry could serve),
    # with max_tokens the old 256, or what the limit leaves after the prompt when less;
    # the reservation, the hold and the engine's max_tokens are that one figure, and the
    # quote says it
    cut = min(256, 600 - prompt_tokens)
    assert job.params["max_tokens"] == cut == quote["max_tokens"]
    assert job.params["reserved_tokens"] == prompt_tokens + cut
    held = credits_worst_case(
        rates=Rates.of(model_price(model_name=MODEL), "standard"),
        prompt_tokens=bound,
        max_output_tokens=cut,
    )
    assert Hold.objects.get(key=job.public_id).amount == job.hold_amount == held
    assert quote["max_credits"] == held
    if not long:
        # and a second in the same minute is admitted alike (cut to all the limit left,
        # the first took the whole minute's budget and the second was rate_limited)
        second = submit_job(org, MODEL, prompt=prompt, max_tokens=None)
        assert (second.params["max_tokens"], second.hold_amount) == (256, held)
    left = rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining
    assert left == 600 - (prompt_tokens + cut) * (1 if long else 2)


def test_a_long_prompt_is_tokenized_once_for_the_context_and_the_token_limit(
    grant, fresh_window, monkeypatch
):
    # given a prompt whose bytes are past both the model's context and the organization's
    # tokens per minute, so that both checks need its count by the tokenizer
    served_model(MODEL, tokenizer_file=TOKENIZER, context_limit=2048)
    org = OrganizationFactory(tokens_per_minute=1_100)
    grant(org, credits(10))
    prompt = "Squats and deadlifts build strength. " * 56
    assert len(prompt.encode()) > 2048
    counts = []
    count = jobs.prompt_tokens_count  # the real count, its calls recorded
    monkeypatch.setattr(jobs, "prompt_tokens_count", lambda **kw: counts.append(kw) or count(**kw))

    # when it is submitted
    job = submit_job(org, MODEL, prompt=prompt, max_tokens=16)

    # then it is admitted on its counted tokens, counted once (the GIL held once)
    assert job.params["reserved_tokens"] == count(model=job.model, prompt=prompt) + 16
    assert len(counts) == 1


def test_a_prompt_that_fills_the_token_limit_alone_is_refused_naming_the_prompt(
    grant, fresh_window
):
    # given an organization allowed 100 tokens a minute, and a prompt over that alone
    served_model(MODEL, context_limit=8192)
    org = OrganizationFactory(tokens_per_minute=100)
    grant(org, credits(10))
    rows, balance = ledger_rows(), organization_balance(organization=org)

    # when a request leaves max_tokens out, which no cut can make fit
    with pytest.raises(ApplicationError) as refused:
        job_submit(
            organization=org,
            api_key=None,
            model_name=MODEL,
            prompt="Squats and deadlifts build strength. " * 3,
            params=SubmitParams(max_tokens=None, max_tokens_param="max_completion_tokens"),
            prompt_field="prompt",
        )

    # then it is refused as before, saying that max_tokens was left out and cut, and
    # naming the prompt, the one thing a client can change; nothing taken
    error = refused.value
    assert (error.code, error.status, error.param) == ("request_exceeds_rate_limit", 429, "prompt")
    assert "prompt alone is 111 tokens, at most" in error.message
    assert "left max_completion_tokens out" in error.message
    assert error.extra["requested"] == 112 and "retry_after" not in error.extra
    assert (ledger_rows(), organization_balance(organization=org)) == (rows, balance)
    assert not Job.objects.filter(organization=org).exists()
