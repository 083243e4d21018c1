"""job_cancel on a job no worker has run yet, and on one a worker has just started.

No worker and no engine: the tests run inside one database transaction that
is never committed, so the job's Celery task (enqueued on commit) is never
sent. The cancellation of a running job, end to end, is in
tests/reliability/test_inference_cancel.py.
"""

from __future__ import annotations

import json
import threading

import pytest
import redis

from accounts.errors import ApplicationError
from accounts.models import Scope
from accounts.redis import get_redis
from accounts.services import apikey_create
from inference import apis, relay
from inference.models import InputTokensSource, Job, JobStatus
from inference.services import job_cancel, job_settle, job_start, jobs
from inference.services.jobs import Outcome
from metering.models import Hold, HoldStatus
from metering.selectors import organization_balance
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory
from tests.helpers import credits, served_model, submit_job

pytestmark = pytest.mark.django_db

MODEL = "gym-cancel-unit"


@pytest.fixture
def queued_job(grant):
    served_model(MODEL, access_tier="basic")
    org = OrganizationFactory(tokens_per_minute=1_000_000, concurrent_jobs=10)
    grant(org, credits(10))
    return submit_job(org, MODEL)


def _cancel_requested(job: Job) -> bool:
    return bool(get_redis().exists(f"jobcancel:{job.public_id}"))


def test_cancelling_a_queued_job_releases_its_hold_at_once(queued_job):
    # when
    job = job_cancel(job=queued_job)

    # then it is over, nothing billed, the whole hold released
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    assert job.input_tokens_source == InputTokensSource.NONE
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED
    assert organization_balance(organization=job.organization).held == 0
    assert _cancel_requested(job)


def test_a_job_a_worker_started_meanwhile_is_left_to_the_worker_to_settle(queued_job):
    # given: the API read the job as queued, then a worker started it
    seen_by_the_api = Job.objects.get(pk=queued_job.pk)
    assert job_start(job_pk=queued_job.pk)

    # when the API cancels it with what it read
    job = job_cancel(job=seen_by_the_api)

    # then it is still running, its hold still held, and the worker was told
    assert job.status == JobStatus.RUNNING
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.PENDING
    assert _cancel_requested(job)

    # and the worker's settlement, for what the engine took, is the only one
    outcome = Outcome(
        input_tokens=4,
        finish_reason="cancelled",
        input_tokens_source=InputTokensSource.TOKENIZER,
    )
    settled = job_settle(job=queued_job, outcome=outcome, status=JobStatus.CANCELED)
    hold = Hold.objects.get(key=job.public_id)
    assert (settled.status, settled.input_tokens) == (JobStatus.CANCELED, 4)
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, settled.credits_charged)
    assert settled.credits_charged > 0


def test_cancelling_a_job_that_ended_changes_nothing(queued_job):
    # given a job that succeeded and was billed
    job_start(job_pk=queued_job.pk)
    outcome = Outcome(input_tokens=4, output_tokens=3, finish_reason="stop")
    ended = job_settle(job=queued_job, outcome=outcome, status=JobStatus.SUCCEEDED)
    balance = organization_balance(organization=ended.organization)

    # when it is cancelled (a cancel that lost the race with its end)
    job = job_cancel(job=Job.objects.get(pk=ended.pk))

    # then it is answered as it ended, its charge and the balance as they
    # were, and no cancellation is left for a worker to find
    assert (job.status, job.credits_charged) == (JobStatus.SUCCEEDED, ended.credits_charged)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.CAPTURED
    assert organization_balance(organization=job.organization) == balance
    assert not _cancel_requested(job)


def _relay_down(_job_id, **_origin):
    # Stood in at the relay's one call that asks a worker to stop (relay_cancel):
    # Redis cannot be made to fail for one call here, and a real outage would
    # stop every other test's relay and broker.
    raise redis.ConnectionError("redis is down")


def test_a_queued_job_is_cancelled_even_when_redis_fails(queued_job, monkeypatch):
    # given Redis failing under the request to stop a worker
    monkeypatch.setattr(relay, "relay_cancel", _relay_down)

    # when a queued job is cancelled
    job = job_cancel(job=queued_job)

    # then it is over all the same, nothing billed, its hold released
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED
    assert organization_balance(organization=job.organization).held == 0


def test_a_running_job_whose_worker_cannot_be_told_is_a_503_not_a_cancel(queued_job, monkeypatch):
    # given a running job, an inference key of its organization, and Redis
    # failing under the request to stop its worker
    assert job_start(job_pk=queued_job.pk)
    _key, raw = apikey_create(
        organization=queued_job.organization, name="cancel", scopes=[Scope.INFERENCE]
    )
    monkeypatch.setattr(relay, "relay_cancel", _relay_down)

    # when it is cancelled
    response = key_client(raw).post(f"/api/v1/jobs/{queued_job.public_id}/cancel")

    # then the client is told that it runs on, and the job does
    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert error["code"] == "cancel_unavailable"
    assert Job.objects.get(pk=queued_job.pk).status == JobStatus.RUNNING
    assert Hold.objects.get(key=queued_job.public_id).status == HoldStatus.PENDING


def _reservations_redis_down(**kwargs):
    # Stood in at the two accounts.ratelimits calls that free a job's
    # reservations (its concurrency slot, its unused tokens), as the jobs
    # service imports them: Redis cannot be made to fail for one call here,
    # and a real outage would stop the request's own rate limit, every other
    # test's relay and the broker. With a pipeline they only queue a command,
    # which cannot fail; without one they talk to Redis.
    if kwargs.get("pipe") is None:
        raise redis.ConnectionError("redis is down")


def test_a_queued_job_cancelled_while_redis_fails_under_its_release_is_answered_canceled(
    queued_job, monkeypatch
):
    # given a queued job, an inference key of its organization, and Redis
    # failing under the release of the job's reservations once it settled
    _key, raw = apikey_create(
        organization=queued_job.organization, name="cancel", scopes=[Scope.INFERENCE]
    )
    monkeypatch.setattr(jobs, "concurrency_release", _reservations_redis_down)
    monkeypatch.setattr(jobs, "rate_limit_refund", _reservations_redis_down)

    # when it is cancelled
    response = key_client(raw).post(f"/api/v1/jobs/{queued_job.public_id}/cancel")

    # then the cancel, which committed, is answered as such: canceled, nothing
    # charged (its slot is freed later by concurrency_slots_sweep)
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["id"], body["status"], body["credits_charged"]) == (
        queued_job.public_id,
        JobStatus.CANCELED,
        0,
    )
    job = Job.objects.get(pk=queued_job.pk)
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    # and the ledger released the whole hold
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED
    balance = organization_balance(organization=job.organization)
    assert (balance.held, balance.available) == (0, credits(10))


def test_a_job_whose_answer_failed_is_cancelled_even_when_redis_fails(grant, monkeypatch):
    # given a chat request whose answer fails after its job was queued (the
    # relay it waits on failing), and Redis failing under the request to stop
    # a worker too; both stood in as above
    served_model(MODEL, access_tier="basic")
    org = OrganizationFactory(tokens_per_minute=1_000_000, concurrent_jobs=10)
    grant(org, credits(10))
    before = organization_balance(organization=org)
    _key, raw = apikey_create(organization=org, name="answer", scopes=[Scope.INFERENCE])

    def relay_failing(*_args, **_kwargs):
        raise redis.ConnectionError("redis is down")

    monkeypatch.setattr(apis, "relay_events", relay_failing)
    monkeypatch.setattr(relay, "relay_cancel", _relay_down)

    # when
    response = key_client(raw).post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        content_type="application/json",
    )

    # then the 502 says it was cancelled, and it was: nothing held or charged
    assert response.status_code == 502, response.content
    assert "it was cancelled" in response.json()["error"]["message"]
    job = Job.objects.get(organization=org)
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED
    assert organization_balance(organization=org) == before


def _waiting_request(job: Job, *, stream: bool) -> tuple[threading.Thread, list]:
    """A chat completion's request waiting for `job`'s answer (its view's answer, which reads
    only the relay until it ends) on a thread of its own; what it answers, or raises, goes
    to the list."""
    Job.objects.filter(pk=job.pk).update(kind="chat", stream=stream)
    job.kind, job.stream = "chat", stream
    answers: list = []

    def wait() -> None:
        try:
            answers.append(apis.ChatCompletionsApi().answer(job, {"stream": stream}))
        except ApplicationError as exc:
            answers.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, answers


def test_a_request_waiting_for_a_job_cancelled_while_queued_is_answered_at_once(
    queued_job, settings
):
    # given a chat completion waiting for its queued job's answer, for up to 30 s
    settings.INFERENCE_TIMEOUT_SECONDS = 30
    waiting, answers = _waiting_request(queued_job, stream=False)

    # when the job is cancelled (POST /api/v1/jobs/{id}/cancel)
    job_cancel(job=Job.objects.get(pk=queued_job.pk))

    # then the request answers at once (the bound only guards against a hang),
    # with a 409 that says it was cancelled and cost nothing, not a 504
    # saying the model did not answer in time
    waiting.join(timeout=10)
    assert not waiting.is_alive(), "the request still waits for the cancelled job"
    [error] = answers
    assert isinstance(error, ApplicationError)
    assert (error.code, error.status) == ("job_cancelled", 409)
    assert error.message == (
        f"The job was cancelled (POST /api/v1/jobs/{queued_job.public_id}/cancel) before it "
        "generated anything; nothing was charged."
    )
    assert not error.took_effect and error.headers["X-Gym-Credits-Charged"] == "0"
    # and the job is cancelled, its whole hold released
    job = Job.objects.get(pk=queued_job.pk)
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED


def test_a_stream_whose_queued_job_is_cancelled_ends_at_once_saying_so(
    queued_job, settings, monkeypatch
):
    # given a streamed chat completion whose 200 went out while its job was
    # queued (nothing came within the first event's wait), each event waited
    # for up to 30 s
    settings.INFERENCE_TIMEOUT_SECONDS = 30
    monkeypatch.setattr(apis, "STREAM_FIRST_EVENT_WAIT_S", 0)
    waiting, answers = _waiting_request(queued_job, stream=True)
    waiting.join(timeout=10)
    [response] = answers
    assert response.status_code == 200
    lines: list[bytes] = []
    reading = threading.Thread(target=lambda: lines.extend(response.streaming_content))
    reading.daemon = True
    reading.start()

    # when the job is cancelled
    job_cancel(job=Job.objects.get(pk=queued_job.pk))

    # then the stream ends at once, as the unstreamed answer does: with the
    # job_cancelled error (an event in OpenAI's error shape, not a finish_reason
    # outside OpenAI's set), nothing charged, [DONE]
    reading.join(timeout=10)
    assert not reading.is_alive(), "the stream still waits for the cancelled job"
    last = json.loads(lines[-2][len(b"data: ") :])
    assert (last["error"]["code"], last["error"]["job_id"]) == (
        "job_cancelled",
        queued_job.public_id,
    )
    assert "nothing was charged" in last["error"]["message"]
    assert lines[-1] == b"data: [DONE]\n\n"


def test_a_queued_job_is_cancelled_though_its_final_event_cannot_be_sent(queued_job, monkeypatch):
    # given Redis failing under the relay's publish (stood in there, as above)
    def publish_down(*_args, **_kwargs):
        raise redis.ConnectionError("redis is down")

    monkeypatch.setattr(relay, "relay_publish", publish_down)

    # when the queued job is cancelled
    job = job_cancel(job=queued_job)

    # then the cancel stands: cancelled, nothing charged, its hold released
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED


def _final_events(job: Job) -> list[dict]:
    """The events of the job's relay stream (inference.relay) that end it."""
    entries = get_redis().xrange(f"jobstream:{job.public_id}")
    events = [json.loads(fields[b"e"]) for _id, fields in entries]
    return [event for event in events if event["type"] in ("done", "error")]


def test_two_cancels_of_a_queued_job_send_its_final_event_once(queued_job):
    # given two cancel requests (POST /api/v1/jobs/{id}/cancel) that both read the job
    # while it was queued
    first_read = Job.objects.get(pk=queued_job.pk)
    second_read = Job.objects.get(pk=queued_job.pk)

    # when both cancel it, one after the other
    first = job_cancel(job=first_read)
    second = job_cancel(job=second_read)

    # then both answer it cancelled, nothing charged, and its stream holds one final
    # event: the one of the cancel that ended it
    assert (first.status, first.credits_charged) == (JobStatus.CANCELED, 0)
    assert (second.status, second.credits_charged) == (JobStatus.CANCELED, 0)
    [final] = _final_events(queued_job)
    assert (final["status"], final["finish_reason"]) == (JobStatus.CANCELED, "cancelled")
    assert get_redis().xlen(f"jobstream:{queued_job.public_id}") == 1
    assert Hold.objects.get(key=queued_job.public_id).status == HoldStatus.RELEASED
