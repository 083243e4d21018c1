"""The worker's job_run: a job fresh off the queue goes to the engine before it is marked running.

A message delivered within ENGINE_FIRST_WITHIN_S of being sent carries what
the engine call needs (job_engine_spec), so the job's start (its row marked
running) runs while the engine works; an older message, or one without it,
starts the job first, so a job cancelled while it waited is never sent. Either
way a job settles once and an ended job is never settled again.

The spec travels in a message header (a worker of a release before it ignores
it); a message without it is run too.
The task body runs in this process (`job_run.run`), on a tritonserver of its
own whose request counters only these requests move; the end-to-end path
through a real worker process is tests/inference/test_openai_api.py's.
Transactional: the job's statements commit as in the worker. The Job row and
its hold are written directly, so no Celery message is left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from datetime import timedelta

import psycopg
import pytest
import redis
from celery import uuid
from celery.worker.request import Request
from django.conf import settings
from django.db import OperationalError, connection
from django.utils import timezone
from kombu.message import Message
from kombu.serialization import dumps

from accounts.errors import ApplicationError, exception_handler
from accounts.ratelimits import Limit, Slot, rate_limit_consume
from accounts.redis import get_redis
from inference import apis, relay, tasks, triton
from inference.engine.tokenizer import count_tokens
from inference.models import DedicatedCapacity, InputTokensSource, Job, JobStatus, ServerPool
from inference.relay import CancelOrigin, relay_cancel, relay_events, relay_publish
from inference.services import job_settle
from inference.services.jobs import ENGINE_SPEC_HEADER, JOB_START_MARGIN, Outcome, job_engine_spec
from metering.models import AccountKind, Hold, HoldStatus, UsageRecord
from metering.selectors import model_price, organization_balance
from metering.services import hold_place, holds_expire
from metering.services.postings import accounts_for, amount_display
from tests.factories import OrganizationFactory
from tests.helpers import (
    credits,
    ledger_rows,
    on_own_connection,
    pause_after,
    redis_aged,
    served_model,
    wait_until,
)
from tests.inference.conftest import occupy_engine_workers, wait_for_engine_load
from tests.reliability.test_inference_faults import _expected_charge, _settled_once

pytestmark = pytest.mark.django_db(transaction=True)

PROMPT = "Strength training"
TOKENIZER = "inference/engine/tokenizer.json"


@pytest.fixture
def engine(private_triton_server):
    yield private_triton_server
    # Its streams must go before the server can stop.
    triton.close_pools()


@pytest.fixture
def paced_engine(paced_triton_server):
    """The paced server (a millisecond a streamed token): a busy stream of 3,000 tokens
    holds its engine worker at least 3 s on any machine, unpaced about one here."""
    yield paced_triton_server
    triton.close_pools()


@pytest.fixture(autouse=True)
def fresh_means_within_ten_seconds(monkeypatch):
    """A fresh message stays fresh however slowly this machine runs the test (the 0.25 s
    window is about an idle worker, not about these tests); a late one is a minute old."""
    monkeypatch.setattr(tasks, "ENGINE_FIRST_WITHIN_S", 10.0)


def _queued(org, model, **params) -> Job:
    """A queued job of `org` on `model` with its hold, written directly (no message sent)."""
    job = Job.objects.create(
        public_id=f"job_run_{time.monotonic_ns()}",
        organization=org,
        model=model,
        model_price=model_price(model_name=model.name),
        priority="standard",
        params={"max_tokens": 4, "seed": 1, "reserved_tokens": 0} | params,
        hold_amount=credits(1),
    )
    hold_place(organization=org, amount=credits(1), key=job.public_id, new_key=True)
    return job


def _queued_with_tokenizer(
    name: str, grpc_url: str, grant, *, tokenizer_file: str = TOKENIZER, **params
) -> Job:
    """A queued job (_queued) of an organization with credits, on a model `name` served at
    `grpc_url` whose catalog names `tokenizer_file` (blank: none)."""
    model = served_model(
        name, grpc_urls=[grpc_url], access_tier="basic", tokenizer_file=tokenizer_file
    )
    org = OrganizationFactory()
    grant(org, credits(10))
    return _queued(org, model, **params)


@pytest.fixture
def queued_job(engine, grant) -> Job:
    model = served_model("gym-run", grpc_urls=[engine.grpc_url], access_tier="basic")
    org = OrganizationFactory()
    grant(org, credits(10))
    return _queued(org, model)


def _spec(job: Job, *, age_s: float = 0.0) -> dict:
    """The job's task-message spec, as job_submit sends it, `age_s` old."""
    return job_engine_spec(job) | {"sent_at": time.time() - age_s}


def _run(job: Job, spec: dict | None, prompt: str = PROMPT) -> str:
    """The job's task message, with `spec` in its header (or none), run in this process as a
    worker runs one: Celery's own message building and its worker's Request, which makes the
    message's headers the task request's attributes."""
    task = tasks.job_run
    built = task.app.amqp.as_task_v2(
        uuid(), task.name, args=[job.pk, prompt], ignore_result=task.ignore_result
    )
    headers = dict(built.headers)
    if spec is not None:  # as apply_async(headers=...) adds it, on top of Celery's own
        headers[ENGINE_SPEC_HEADER] = spec
    content_type, encoding, body = dumps(built.body, serializer="json")
    message = Message(
        body=body, content_type=content_type, content_encoding=encoding, headers=headers
    )
    return Request(message, app=task.app, task=task).execute()


def _served(engine) -> float:
    """Requests the engine's models have answered (the ensemble and its steps each count)."""
    return triton.scrape_metrics(engine.metrics_url).get("nv_inference_request_success", 0)


def _served_when_idle(engine, count=_served) -> float:
    """`count` (the requests the engine's models answered, by default) once it has stopped
    moving for a second: everything sent was answered."""
    served, still_since = count(engine), time.monotonic()
    deadline = still_since + 15
    while time.monotonic() - still_since < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        now = count(engine)
        if now != served:
            served, still_since = now, time.monotonic()
    return served


@contextlib.contextmanager
def _watching_the_start(job: Job, in_flight_at_start: list[int]):
    """Appends the requests in flight at the job's engine each time its start statement runs."""
    pool = triton.pool_for([job.model.pool.grpc_urls[0]], job.model.triton_model)

    def watch(execute, sql, params, many, context):
        if sql.lstrip().startswith("UPDATE inference_job") and "started_at" in sql:
            in_flight_at_start.append(sum(server.inflight for server in pool._servers))
        return execute(sql, params, many, context)

    with connection.execute_wrapper(watch):
        yield


def _ended_while_queued(job: Job) -> None:
    """The job settled as cancelled while queued, as a cancellation does, but without its
    Redis cancel key: that key would stop the worker before it sends anything."""
    job_settle(
        job=job,
        outcome=Outcome(finish_reason="cancelled"),
        status=JobStatus.CANCELED,
        only_from=(JobStatus.QUEUED,),
    )


@pytest.mark.parametrize(
    "message", ["fresh", "late", "without spec"], ids=["fresh", "late", "without-spec"]
)
def test_a_job_runs_and_settles_once_whatever_its_message_carried(queued_job, message):
    # given: a message with the spec in its header, fresh or late, or without
    # it (an API of an earlier release)
    spec = {
        "fresh": _spec(queued_job),
        "late": _spec(queued_job, age_s=60),
        "without spec": None,
    }[message]

    # when
    status = _run(queued_job, spec)

    # then: succeeded, billed once for what the engine served
    job = Job.objects.get(pk=queued_job.pk)
    assert status == job.status == JobStatus.SUCCEEDED
    assert job.started_at is not None and job.started_at <= job.finished_at
    assert job.output_tokens == 4 and job.input_tokens > 0
    [record] = UsageRecord.objects.filter(job_id=job.public_id)
    assert record.output_tokens == 4 and record.credits == job.credits_charged > 0
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.CAPTURED


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_message_whose_job_was_lost_runs_nothing_on_the_job_that_took_its_key(
    queued_job, message
):
    # given a job whose primary key a lost job's message still names (that
    # job's hold and row lost in a database crash before their flush, the key
    # given again: job_start), the message carrying the lost job's public id
    lost = _spec(queued_job, age_s=0 if message == "fresh" else 60)
    lost["id"] = "job_lost_in_a_crash"

    # when it is run
    _run(queued_job, lost)

    # then the job of that key is neither started nor settled nor billed
    job = Job.objects.get(pk=queued_job.pk)
    assert (job.status, job.started_at, job.credits_charged) == (JobStatus.QUEUED, None, 0)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.PENDING
    assert not UsageRecord.objects.filter(job_id=job.public_id).exists()


def test_a_late_message_goes_to_the_pool_the_catalog_names_now(queued_job, dead_grpc_url):
    # given: a message that waited, naming a pool since taken away
    spec = _spec(queued_job, age_s=60) | {"pools": [[dead_grpc_url]]}

    # when
    status = _run(queued_job, spec)

    # then: served by the catalog's pool
    assert status == JobStatus.SUCCEEDED
    assert Job.objects.get(pk=queued_job.pk).output_tokens == 4


def test_a_fresh_message_no_server_takes_starts_the_job_and_fails_it_unbilled(
    queued_job, dead_grpc_url
):
    # given: a fresh message whose pool has no live server
    spec = _spec(queued_job) | {"pools": [[dead_grpc_url]]}

    # when
    status = _run(queued_job, spec)

    # then: started and settled as failed, its whole hold released, nothing billed
    job = Job.objects.get(pk=queued_job.pk)
    assert status == job.status == JobStatus.FAILED
    assert job.error_code == "engine_unavailable" and job.started_at is not None
    assert job.credits_charged == 0
    hold = Hold.objects.get(key=job.public_id)
    assert hold.status == HoldStatus.RELEASED and hold.captured == 0


def test_a_fresh_message_reaches_the_engine_before_the_job_is_marked_running(queued_job):
    # given: the engine's in-flight count, read when the job's start statement runs
    in_flight_at_start: list[int] = []

    # when
    with _watching_the_start(queued_job, in_flight_at_start):
        status = _run(queued_job, _spec(queued_job))

    # then: the request was out when the job was started, and it succeeded
    assert in_flight_at_start == [1]
    assert status == JobStatus.SUCCEEDED


def test_a_fresh_streamed_job_relays_its_tokens_and_settles_once(queued_job):
    # given: a streamed job, its row marked so, and its spec with it
    Job.objects.filter(pk=queued_job.pk).update(stream=True)
    queued_job.stream = True
    in_flight_at_start: list[int] = []

    # when
    with _watching_the_start(queued_job, in_flight_at_start):
        status = _run(queued_job, _spec(queued_job))
    events = list(relay_events(queued_job.public_id, timeout_s=10))

    # then: sent before it was started, its deltas relayed in order, then the
    # final event with the text they make, billed once
    assert in_flight_at_start == [1]
    job = Job.objects.get(pk=queued_job.pk)
    assert status == job.status == JobStatus.SUCCEEDED and job.first_token_at is not None
    *deltas, final = events
    assert deltas and {event["type"] for event in deltas} == {"delta"}
    assert final["type"] == "done" and final["output_tokens"] == job.output_tokens == 4
    assert "".join(event["text"] for event in deltas) == final["text"] != ""
    [record] = UsageRecord.objects.filter(job_id=job.public_id)
    assert record.output_tokens == 4 and record.credits == job.credits_charged > 0


def test_a_streamed_job_whose_relay_fails_is_stopped_and_billed_for_what_it_produced(
    queued_job, monkeypatch
):
    # given a streamed job of 8 tokens, and a relay whose Redis fails from its
    # second token on. Stood in at the relay's publish: a real Redis outage
    # would stop every other test's relay too.
    Job.objects.filter(pk=queued_job.pk).update(
        stream=True, params=queued_job.params | {"max_tokens": 8}
    )
    queued_job.refresh_from_db()
    published = []

    def failing_after_one(job_id, event, pipe=None):
        if pipe is None and event["type"] == "delta" and published:
            raise redis.ConnectionError("Connection reset by peer")
        published.append(event)
        relay_publish(job_id, event, pipe=pipe)

    monkeypatch.setattr(tasks, "relay_publish", failing_after_one)

    # when it runs
    status = _run(queued_job, _spec(queued_job))

    # then the engine was stopped, and the job settled once for what it
    # produced (at least the relayed token, fewer than asked)
    job = Job.objects.get(pk=queued_job.pk)
    assert status == job.status == JobStatus.CANCELED
    assert 1 <= job.output_tokens < 8 and job.credits_charged > 0
    hold = Hold.objects.get(key=job.public_id)
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, job.credits_charged)
    [record] = UsageRecord.objects.filter(job_id=job.public_id)
    assert record.output_tokens == job.output_tokens


class WorkerKilled(BaseException):
    """Stands for the SIGKILL of the worker's pool process after its run relayed the job's
    tokens, before its settlement: nothing after it in the run happens (a BaseException,
    which the task's own handlers do not catch). tests/reliability kills a real one."""


def _killed_before_settling(job: Job, spec: dict, monkeypatch) -> None:
    """The job's first run, relaying what it streams, killed before it settles."""

    def killed(**_kwargs):
        raise WorkerKilled

    with monkeypatch.context() as patched:
        patched.setattr(tasks, "_settle", killed)
        with pytest.raises(WorkerKilled):
            tasks._job_run(job.pk, PROMPT, spec)


@pytest.mark.parametrize("tokenizer_file", [TOKENIZER, ""], ids=["tokenizer", "no-tokenizer"])
@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_streamed_job_whose_worker_died_after_relaying_is_not_streamed_twice(
    engine, grant, monkeypatch, message, tokenizer_file
):
    # given a streamed job, on a model with a tokenizer or none, whose worker
    # relayed its tokens and died before settling (the task comes back:
    # reject_on_worker_lost), its message fresh (the engine first) or late
    # (the job started first)
    job = _queued_with_tokenizer(
        "gym-run-lost", engine.grpc_url, grant, tokenizer_file=tokenizer_file, max_tokens=8
    )
    org = job.organization
    Job.objects.filter(pk=job.pk).update(stream=True)
    job.refresh_from_db()
    spec = _spec(job, age_s=0 if message == "fresh" else 60)
    _killed_before_settling(job, spec, monkeypatch)
    before = organization_balance(organization=org)
    served = _served_when_idle(engine)

    # when the task runs again
    status = _run(job, spec)

    # then what the client reads is the first run's text once, ended by an
    # error that says why: the job failed, worker_lost
    *deltas, final = relay_events(job.public_id, timeout_s=10)
    relayed = "".join(event["text"] for event in deltas)
    assert {event["type"] for event in deltas} == {"delta"} and relayed != ""
    assert final["type"] == "error" and final["error_code"] == "worker_lost"
    assert final["text"] == relayed
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.FAILED and job.error_code == "worker_lost"
    assert (final["output_tokens"], final["credits_charged"]) == (
        job.output_tokens,
        job.credits_charged,
    )
    if tokenizer_file:
        # and it was billed, once, for what its client got: the relayed text
        # and the prompt, counted by the model's tokenizer (the dead run's
        # engine counts died with it), within its max_tokens and its hold
        assert job.output_tokens == count_tokens(relayed) > 0
        assert job.output_tokens <= 8
        assert f"{job.output_tokens} output and {job.input_tokens} prompt" in job.error_message
        _billed_the_prompt_by_tokenizer(job, org, before)
    else:
        # and without a tokenizer nothing could be counted: nothing charged,
        # and the job says so; its hold released once, the held credits back
        assert (job.credits_charged, job.input_tokens, job.output_tokens) == (0, 0, 0)
        assert job.input_tokens_source == InputTokensSource.UNMETERED
        _settled_once(job, status=HoldStatus.RELEASED, captured=0)
        after = organization_balance(organization=org)
        assert (after.available, after.held) == (before.available + before.held, 0)
    # and a late message never reached the engine again (a fresh one was sent
    # before the job's start, and abandoned before its first response)
    if message == "late":
        assert _served_when_idle(engine) == served


def test_a_dead_workers_stream_is_billed_when_its_message_is_back_after_the_gateway_gave_up(
    engine, grant, monkeypatch
):
    # given a streamed job on a model with a tokenizer whose threads-pool
    # worker relayed its tokens and died before settling; its stream kept
    # past the orphaned jobs' grace while the job runs
    job = _queued_with_tokenizer("gym-run-vt", engine.grpc_url, grant, max_tokens=8)
    org = job.organization
    Job.objects.filter(pk=job.pk).update(stream=True)
    job.refresh_from_db()
    _killed_before_settling(job, _spec(job, age_s=60), monkeypatch)
    stream, cancel_key = f"jobstream:{job.public_id}", f"jobcancel:{job.public_id}"
    assert get_redis().ttl(stream) > settings.INFERENCE_ORPHAN_GRACE_SECONDS
    # and its reader, hearing nothing more, timed out: the gateway's cancel set
    relay_cancel(job.public_id, origin=CancelOrigin.GATEWAY_TIMEOUT)
    before = organization_balance(organization=org)
    served = _served_when_idle(engine)

    # when its message comes back after the broker's visibility timeout
    visibility_s = settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]
    redis_aged(visibility_s, stream, cancel_key)
    status = _run(job, _spec(job, age_s=visibility_s))

    # then it ended worker_lost, billed for what its client was streamed (the
    # relayed text, counted by the model's tokenizer, and the prompt), not
    # engine_timeout unbilled as if the model had never answered
    *deltas, final = relay_events(job.public_id, timeout_s=10)
    relayed = "".join(event["text"] for event in deltas)
    assert relayed != ""
    assert (final["type"], final["error_code"], final["text"]) == ("error", "worker_lost", relayed)
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.FAILED and job.error_code == "worker_lost"
    assert job.output_tokens == min(count_tokens(relayed), len(deltas)) > 0
    _billed_the_prompt_by_tokenizer(job, org, before)
    # and nothing was sent to the engine again; its stream, ended, lives
    # only as long as a finished job's
    assert _served_when_idle(engine) == served
    assert 0 < get_redis().ttl(stream) <= relay.STREAM_TTL_SECONDS


def test_a_streamed_job_whose_worker_died_before_relaying_runs_again(queued_job):
    # given a streamed job started by a run that died before its first token
    Job.objects.filter(pk=queued_job.pk).update(stream=True)
    queued_job.refresh_from_db()
    assert tasks.job_start(job_pk=queued_job.pk, public_id=queued_job.public_id)

    # when its task runs again
    status = _run(queued_job, _spec(queued_job, age_s=60))

    # then it runs as a first run would: its text relayed once, billed for it
    *deltas, final = relay_events(queued_job.public_id, timeout_s=10)
    job = Job.objects.get(pk=queued_job.pk)
    assert status == job.status == JobStatus.SUCCEEDED
    assert final["type"] == "done" and final["output_tokens"] == job.output_tokens == 4
    assert "".join(event["text"] for event in deltas) == final["text"] != ""
    _settled_once(job, status=HoldStatus.CAPTURED, captured=_expected_charge(job))


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_second_message_while_the_first_run_is_alive_leaves_the_job_to_it(
    queued_job, monkeypatch, message
):
    # given a streamed job whose first run relayed its whole text and is about
    # to settle (held there, alive: its process renews its run lease)
    Job.objects.filter(pk=queued_job.pk).update(
        stream=True, params=queued_job.params | {"max_tokens": 8}
    )
    queued_job.refresh_from_db()
    spec = _spec(queued_job, age_s=0 if message == "fresh" else 60)
    generated, settle = pause_after(monkeypatch, tasks, "_generate", thread="first-run")
    first_status, errors = [], []
    first = threading.Thread(
        target=on_own_connection,
        args=(lambda: first_status.append(_run(queued_job, spec)), errors),
        name="first-run",
    )
    first.start()
    assert generated.wait(timeout=30), "the first run did not generate"

    # when a second copy of its message arrives (a push sent twice)
    second = _run(queued_job, spec)

    # then it is dropped: the job still runs under the first run, its hold
    # held, nothing settled, and its client's stream holds only the text
    assert second == tasks.DUPLICATE
    job = Job.objects.get(pk=queued_job.pk)
    assert (job.status, job.error_code) == (JobStatus.RUNNING, "")
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.PENDING
    assert not UsageRecord.objects.filter(job_id=job.public_id).exists()
    stream = get_redis().xrange(f"jobstream:{job.public_id}")
    assert stream and all(b'"delta"' in fields[b"e"] for _id, fields in stream)

    # and once the first run settles, it is billed as any run is, its stream
    # ended once, with its text
    settle.set()
    first.join(timeout=60)
    assert not errors and first_status == [JobStatus.SUCCEEDED]
    *deltas, final = relay_events(job.public_id, timeout_s=10)
    assert {event["type"] for event in deltas} == {"delta"}
    assert final["type"] == "done" and final["text"] == "".join(e["text"] for e in deltas)
    job = Job.objects.get(pk=queued_job.pk)
    assert (job.status, job.output_tokens) == (JobStatus.SUCCEEDED, 8)
    _settled_once(job, status=HoldStatus.CAPTURED, captured=_expected_charge(job))
    assert job.credits_charged == _expected_charge(job) > 0


def test_a_message_whose_runs_lease_lapsed_runs_the_job_again(queued_job):
    # given a job whose run died (its process killed): its lease, no longer
    # renewed, lapses within a second and a half
    assert tasks.job_start(job_pk=queued_job.pk, public_id=queued_job.public_id)
    get_redis().set(f"jobrun:{queued_job.pk}", "dead-run", px=1500)

    # when its message comes back
    status = _run(queued_job, _spec(queued_job, age_s=60))

    # then it runs the job once the lease lapsed, billed once
    job = Job.objects.get(pk=queued_job.pk)
    assert status == job.status == JobStatus.SUCCEEDED and job.output_tokens == 4
    _settled_once(job, status=HoldStatus.CAPTURED, captured=_expected_charge(job))


def test_a_run_lets_its_lease_go_with_its_final_event(queued_job, monkeypatch):
    # given a job's run, its run lease's own release (a round trip of its own) counted
    released_alone = []
    real_script = relay._script

    def script(source: str):
        if source == relay._RELEASE:
            released_alone.append(source)
        return real_script(source)

    monkeypatch.setattr(relay, "_script", script)

    # when it runs to its end
    status = _run(queued_job, _spec(queued_job))

    # then its lease is gone, let go in the pipeline that sent its final event,
    # not on its own: a duplicate message now finds nothing to wait for
    assert status == JobStatus.SUCCEEDED
    assert not get_redis().exists(f"jobrun:{queued_job.pk}")
    assert released_alone == []
    final = [e for e in relay_events(queued_job.public_id, timeout_s=10) if e["type"] == "done"]
    assert len(final) == 1


def _settled_for_its_charge(job: Job, org, before) -> None:
    """The job's hold captured its charge once (_settled_once), the rest released."""
    _settled_once(job, status=HoldStatus.CAPTURED, captured=job.credits_charged)
    # `before` was read with the hold placed: what it held comes back, less the charge
    after = organization_balance(organization=org)
    assert before.held == job.hold_amount
    assert (before.available + before.held - after.available, after.held) == (
        job.credits_charged,
        0,
    )


def _billed_the_prompt_by_tokenizer(job: Job, org, before) -> None:
    """The job was billed for PROMPT counted by the model's tokenizer (and what else it
    served), its charge captured once (_settled_for_its_charge)."""
    assert (job.input_tokens, job.input_tokens_source) == (
        count_tokens(PROMPT),
        InputTokensSource.TOKENIZER,
    )
    assert job.credits_charged == _expected_charge(job) > 0
    _settled_for_its_charge(job, org, before)


# With the development engine this prompt, at seed 282 and temperature 2,
# makes 1070 tokens: over a second on the paced engine (a millisecond a token).
LONG_PROMPT = "Tokens are the unit of work, and the cluster"
LONG_PARAMS = {"max_tokens": 3000, "seed": 282, "temperature": 2.0}


def _long_streamed_job(paced_triton_server, grant) -> tuple[Job, triton.GenerationResult]:
    """A queued streamed job of LONG_PROMPT on the paced engine, which runs over a second
    when nothing stops it, of an organization with credits; and its whole generation."""
    model = served_model(
        "gym-run-long", grpc_urls=[paced_triton_server.grpc_url], access_tier="basic"
    )
    full = triton.pool_for([paced_triton_server.grpc_url], "ensemble").generate(
        triton.GenerationRequest(LONG_PROMPT, stream=True, **LONG_PARAMS)
    )
    assert full.output_tokens > 1000
    org = OrganizationFactory()
    grant(org, credits(10))
    job = _queued(org, model, **LONG_PARAMS)
    Job.objects.filter(pk=job.pk).update(stream=True)
    job.refresh_from_db()
    return job, full


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_job_running_past_its_limit_is_stopped_failed_and_billed_for_what_it_produced(
    paced_triton_server, grant, settings, message
):
    # given a streamed job that runs over a second when nothing stops it, and
    # a run limit of 0.8 s (the job's start and its first token take a small
    # part of it on a slow machine)
    settings.INFERENCE_JOB_DEADLINE_SECONDS = 0.8
    job, full = _long_streamed_job(paced_triton_server, grant)
    org = job.organization
    before = organization_balance(organization=org)

    # when it runs
    status = _run(job, _spec(job, age_s=60 if message == "late" else 0), prompt=LONG_PROMPT)
    events = list(relay_events(job.public_id, timeout_s=10))

    # then it was stopped at its limit, failed, and says why
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.FAILED
    assert job.error_code == "job_deadline_exceeded"
    assert "limit of 0.8 s" in job.error_message
    # with what the engine had produced: the start of its whole text, relayed
    # and counted by the engine
    assert 0 < job.output_tokens < full.output_tokens
    assert (job.input_tokens, job.input_tokens_source) == (
        full.input_tokens,
        InputTokensSource.ENGINE,
    )
    *deltas, final = events
    relayed = "".join(event["text"] for event in deltas)
    assert (final["type"], final["error_code"]) == ("error", "job_deadline_exceeded")
    assert final["text"] == relayed and full.text.startswith(relayed)
    assert final["output_tokens"] == job.output_tokens == count_tokens(relayed)
    # and it was billed for exactly that, once
    assert job.credits_charged == _expected_charge(job) > 0
    assert final["credits_charged"] == job.credits_charged
    _settled_for_its_charge(job, org, before)


@pytest.mark.parametrize(
    "sender", ["renews its reader marker", "of an earlier release"], ids=["reader", "earlier"]
)
def test_a_stream_nobody_reads_is_cancelled_by_its_worker_and_billed_for_what_it_produced(
    paced_triton_server, grant, settings, sender
):
    # given a streamed job that runs over a second when nothing stops it, whose
    # reader's marker lives 0.3 s, and which nobody reads: its web process died
    # as it was queued. Its message from a web process that renews the marker,
    # or from one of an earlier release, which never writes one.
    settings.INFERENCE_STREAM_READER_TTL_SECONDS = 0.3
    job, full = _long_streamed_job(paced_triton_server, grant)
    org = job.organization
    spec = _spec(job)
    assert spec["reader"] is True
    if sender == "of an earlier release":
        del spec["reader"]
    before = organization_balance(organization=org)

    # when it runs
    status = _run(job, spec, prompt=LONG_PROMPT)
    *deltas, final = relay_events(job.public_id, timeout_s=10)

    job = Job.objects.get(pk=job.pk)
    if sender == "of an earlier release":
        # then, from a web process that never renews a marker, it runs to its end
        assert status == job.status == JobStatus.SUCCEEDED
        assert job.output_tokens == full.output_tokens
    else:
        # then its worker cancelled it once the marker was due and missing, and it
        # was billed, once, for what the engine had produced: the start of its text
        assert status == job.status == JobStatus.CANCELED
        assert job.finish_reason == "cancelled"
        assert 0 < job.output_tokens < full.output_tokens
        relayed = "".join(event["text"] for event in deltas)
        assert final["text"] == relayed and full.text.startswith(relayed)
        assert final["output_tokens"] == job.output_tokens == count_tokens(relayed)
    assert job.credits_charged == _expected_charge(job) > 0
    _settled_for_its_charge(job, org, before)


def _run_behind_busy_engine(job: Job, engine, **pool_options) -> str:
    """Run the job (a late message) while every worker of its engine is taken: it waits,
    silent, in the engine's queue. The worker's pool for it (`pool_options` as the worker
    builds it) has used its server first: no readiness check on the job's time."""
    triton.pool_for([engine.grpc_url], "ensemble", **pool_options).generate(
        triton.GenerationRequest(PROMPT, 1)
    )
    busy, _workers = occupy_engine_workers(engine.grpc_url)
    try:
        return _run(job, _spec(job, age_s=60))
    finally:
        busy.stop()


def test_a_job_stopped_at_its_limit_before_its_first_token_is_billed_the_prompt_it_sent(
    paced_engine, grant, settings
):
    # given a model with a tokenizer whose engine is busy (a request sent now
    # waits, silent, in its queue, past its limit on any machine: the paced
    # engine), and a run limit of a second and a half: time enough, on a slow
    # machine, to start the job and send it
    engine = paced_engine
    settings.INFERENCE_JOB_DEADLINE_SECONDS = 1.5
    job = _queued_with_tokenizer("gym-run-busy", engine.grpc_url, grant)
    org = job.organization
    before = organization_balance(organization=org)

    # when it runs
    status = _run_behind_busy_engine(job, engine)

    # then it was stopped and failed with nothing generated, and billed the
    # prompt the engine took (as a cancelled job is), counted by the model's
    # tokenizer: the engine worked on the request until its limit
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.FAILED
    assert job.error_code == "job_deadline_exceeded"
    assert job.output_tokens == 0
    # and its engine time is the time it was in the engine's hands
    assert job.engine_ms > 0
    assert f"{job.input_tokens} prompt and 0 output tokens" in job.error_message
    _billed_the_prompt_by_tokenizer(job, org, before)


@pytest.mark.parametrize(
    "origin",
    [CancelOrigin.GATEWAY_TIMEOUT, CancelOrigin.CLIENT],
    ids=["gateway-timeout", "client"],
)
def test_a_job_cancelled_before_its_first_token_is_billed_by_who_cancelled_it(
    paced_engine, grant, origin
):
    # given a job on a model with a tokenizer whose engine is busy (a request
    # sent now waits, silent, in its queue: the paced engine), running, its
    # prompt taken by the engine
    engine = paced_engine
    job = _queued_with_tokenizer("gym-run-waited", engine.grpc_url, grant)
    org = job.organization
    before = organization_balance(organization=org)
    # The worker's pool has used its server first: no readiness check on the job's time.
    triton.pool_for([engine.grpc_url], "ensemble").generate(triton.GenerationRequest(PROMPT, 1))
    busy, workers = occupy_engine_workers(engine.grpc_url)
    status, errors = [], []
    run = threading.Thread(
        target=on_own_connection,
        args=(lambda: status.append(_run(job, _spec(job, age_s=60))), errors),
    )
    try:
        run.start()
        wait_for_engine_load(engine.metrics_url, 2 * workers + 1)

        # when it is cancelled: by the gateway, which stopped waiting for it
        # (its client answered 504 engine_timeout), or by its client
        relay_cancel(job.public_id, origin=origin)
        run.join(timeout=60)
    finally:
        busy.stop()

    assert not errors and not run.is_alive()
    job = Job.objects.get(pk=job.pk)
    *_deltas, final = relay_events(job.public_id, timeout_s=10)
    if origin == CancelOrigin.GATEWAY_TIMEOUT:
        # then its client got nothing, and nothing is charged: the job failed,
        # engine_timeout, its whole hold released once, the held credits back
        assert status == [job.status] == [JobStatus.FAILED]
        assert (job.error_code, job.finish_reason) == ("engine_timeout", "error")
        assert (job.input_tokens, job.output_tokens, job.credits_charged) == (0, 0, 0)
        assert job.input_tokens_source == InputTokensSource.NONE
        assert (final["type"], final["error_code"], final["credits_charged"]) == (
            "error",
            "engine_timeout",
            0,
        )
        _settled_once(job, status=HoldStatus.RELEASED, captured=0)
        after = organization_balance(organization=org)
        assert (after.available, after.held) == (before.available + before.held, 0)
    else:
        # then, as any cancel: cancelled, billed the prompt the engine took,
        # counted by the model's tokenizer
        assert status == [job.status] == [JobStatus.CANCELED]
        assert final["credits_charged"] == job.credits_charged
        _billed_the_prompt_by_tokenizer(job, org, before)


def test_a_stream_the_gateway_stops_waiting_for_after_its_tokens_is_billed_for_them(
    paced_triton_server, grant
):
    # given a streamed job that runs over a second when nothing stops it,
    # running, its first tokens relayed to its client
    job, full = _long_streamed_job(paced_triton_server, grant)
    org = job.organization
    before = organization_balance(organization=org)
    status, errors = [], []
    run = threading.Thread(
        target=on_own_connection,
        args=(lambda: status.append(_run(job, _spec(job), prompt=LONG_PROMPT)), errors),
    )
    run.start()
    wait_until(
        lambda: get_redis().xlen(f"jobstream:{job.public_id}") >= 3,
        timeout=30,
        what="the job's first tokens",
    )

    # when the gateway stops waiting for it (a pause between two events)
    relay_cancel(job.public_id, origin=CancelOrigin.GATEWAY_TIMEOUT)
    run.join(timeout=60)

    # then it is billed as any cancel is: the tokens its client was sent
    assert not errors and not run.is_alive()
    *deltas, final = relay_events(job.public_id, timeout_s=10)
    job = Job.objects.get(pk=job.pk)
    assert status == [job.status] == [JobStatus.CANCELED]
    relayed = "".join(event["text"] for event in deltas)
    assert full.text.startswith(relayed) and relayed
    assert final["output_tokens"] == job.output_tokens == count_tokens(relayed) > 0
    assert job.output_tokens < full.output_tokens
    assert final["credits_charged"] == job.credits_charged == _expected_charge(job) > 0
    _settled_for_its_charge(job, org, before)


def test_a_job_not_streamed_outlasting_the_engine_timeout_succeeds_and_is_billed(
    paced_engine, grant, settings
):
    # given an engine timeout of half a second, and a job not streamed whose
    # engine is busy (below): its one response comes when its generation ends,
    # after it waited in the engine's queue behind a busy stream (3 s on the
    # paced engine): that long silent, as a long generation is. Its run limit
    # (5 minutes) is far off.
    engine = paced_engine
    settings.INFERENCE_ENGINE_TIMEOUT_SECONDS = 0.5
    model = served_model("gym-run-quiet", grpc_urls=[engine.grpc_url], access_tier="basic")
    org = OrganizationFactory()
    grant(org, credits(10))
    job = _queued(org, model)
    assert not job.stream
    before = organization_balance(organization=org)

    # when it runs
    status = _run_behind_busy_engine(job, engine, timeout_s=0.5)

    # then it waited for its answer, silent past the engine timeout, and succeeded
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.SUCCEEDED, job.error_message
    assert job.engine_ms > 500
    # billed once for what the engine served and counted
    assert job.output_tokens == 4
    assert job.input_tokens > 0 and job.input_tokens_source == InputTokensSource.ENGINE
    assert job.credits_charged == _expected_charge(job) > 0
    _settled_for_its_charge(job, org, before)


def test_a_job_cancelled_before_its_fresh_message_arrived_is_abandoned_not_settled_again(
    queued_job, engine
):
    # given: the job was cancelled while queued (its hold released), then its
    # message arrives at once
    _ended_while_queued(queued_job)
    before = ledger_rows(), UsageRecord.objects.count()
    served = _served(engine)

    # when
    status = _run(queued_job, _spec(queued_job))

    # then: it stays cancelled, nothing more is written or billed
    job = Job.objects.get(pk=queued_job.pk)
    assert status == job.status == JobStatus.CANCELED
    assert job.started_at is None and job.credits_charged == 0
    assert (ledger_rows(), UsageRecord.objects.count()) == before
    # though the engine did get the request (sent before the start found the job ended)
    wait_until(lambda: _served(engine) > served, timeout=10, what="the engine to answer it")


def test_a_job_cancelled_before_its_late_message_arrived_is_never_sent(queued_job, engine):
    # given: the job was cancelled while queued, and its message waited long
    _ended_while_queued(queued_job)
    before = ledger_rows(), UsageRecord.objects.count()
    served = _served(engine)
    one_request = triton.pool_for([engine.grpc_url], "ensemble")

    # when
    status = _run(queued_job, _spec(queued_job, age_s=60))
    # and one more request follows it to the engine
    one_request.generate(triton.GenerationRequest(PROMPT, 2, seed=1))

    # then: it stays cancelled, nothing more is written or billed
    assert status == Job.objects.get(pk=queued_job.pk).status == JobStatus.CANCELED
    assert (ledger_rows(), UsageRecord.objects.count()) == before
    # and the engine answered the later request only (each request moves the
    # counter once per model: the ensemble and its step)
    per_request = 2
    assert _served_when_idle(engine) == served + per_request


def test_a_running_job_cancelled_before_its_task_came_back_is_not_sent_again(queued_job, engine):
    # given a job that was running when its worker died (its task goes back to
    # the end of the queue), and that its client cancelled meanwhile
    first = tasks.job_start(job_pk=queued_job.pk, public_id=queued_job.public_id)
    assert first is not None and not first.restarted
    relay_cancel(queued_job.public_id)
    # the cancel outlives the job's hold, however long the queue is
    hold_ttl = int(settings.METERING_HOLD_TTL.total_seconds())
    assert get_redis().ttl(f"jobcancel:{queued_job.public_id}") > hold_ttl
    served = _served(engine)

    # when its task runs again, late
    status = _run(queued_job, _spec(queued_job, age_s=60))

    # then it ends cancelled without reaching the engine, nothing billed
    job = Job.objects.get(pk=queued_job.pk)
    assert status == job.status == JobStatus.CANCELED
    assert (job.credits_charged, job.input_tokens, job.output_tokens) == (0, 0, 0)
    assert Hold.objects.get(key=queued_job.public_id).status == HoldStatus.RELEASED
    assert _served_when_idle(engine) == served


@pytest.mark.parametrize("was_running", [False, True], ids=["queued", "came-back"])
def test_a_late_message_whose_hold_expires_soon_is_not_run_and_the_job_expires_unbilled(
    queued_job, engine, was_running, caplog
):
    # given a job whose message arrives when its hold has less life left than
    # a run may take (a backlog, or a dead worker's task the broker handed
    # back late), queued or started before
    if was_running:
        assert tasks.job_start(job_pk=queued_job.pk, public_id=queued_job.public_id)
    soon = timezone.now() + JOB_START_MARGIN - timedelta(minutes=1)
    Hold.objects.filter(key=queued_job.public_id).update(
        expires_at=soon, created_at=soon - settings.METERING_HOLD_TTL
    )
    status_before = Job.objects.get(pk=queued_job.pk).status
    served, before = _served(engine), (ledger_rows(), UsageRecord.objects.count())

    # when its task runs
    status = _run(queued_job, _spec(queued_job, age_s=60))

    # then it is not started, nor sent to the engine: nothing is written, and
    # the worker says so
    assert status == Job.objects.get(pk=queued_job.pk).status == status_before
    assert f"job {queued_job.public_id} not started: its hold expires in" in caplog.text
    assert "WARNING" in [r.levelname for r in caplog.records if "not started" in r.getMessage()]
    assert (ledger_rows(), UsageRecord.objects.count()) == before
    assert _served_when_idle(engine) == served
    # and when the hold expires, the job ends expired with nothing charged
    assert holds_expire(now=soon + timedelta(seconds=1)) == 1
    job = Job.objects.get(pk=queued_job.pk)
    assert (job.status, job.credits_charged) == (JobStatus.EXPIRED, 0)
    assert Hold.objects.get(key=queued_job.public_id).status == HoldStatus.EXPIRED


def test_a_worker_whose_start_margin_no_hold_allows_says_what_to_fix(queued_job, settings, caplog):
    # given a job whose hold the web app placed for an hour (its settings),
    # and a worker told that jobs run 30 minutes (a start margin of an hour)
    # while the web app was not
    settings.INFERENCE_JOB_DEADLINE_SECONDS = 1800
    settings.METERING_HOLD_TTL = timedelta(hours=3)
    before = (ledger_rows(), UsageRecord.objects.count())

    # when its fresh message runs (sent to the engine as the job starts, and
    # abandoned there when it does not)
    status = _run(queued_job, _spec(queued_job))

    # then the job is not started, nothing is written, and the worker logs an
    # error that names the settings the processes disagree on
    assert status == Job.objects.get(pk=queued_job.pk).status == JobStatus.QUEUED
    assert (ledger_rows(), UsageRecord.objects.count()) == before
    [record] = [r for r in caplog.records if "not started" in r.getMessage()]
    assert record.levelname == "ERROR"
    assert "its hold was placed for 3600 s, and this worker starts a job only with 3600 s" in (
        record.getMessage()
    )
    assert "METERING_HOLD_TTL_SECONDS or INFERENCE_JOB_DEADLINE_SECONDS" in record.getMessage()


def test_a_settlement_the_database_fails_under_is_tried_again(queued_job, monkeypatch):
    # given a job the engine served, and a database connection that the
    # server ends (a restart, a failover) just before the job settles
    monkeypatch.setattr(tasks, "SETTLE_RETRY_PAUSES_S", (0.05, 0.05))
    job = tasks.job_start(job_pk=queued_job.pk, public_id=queued_job.public_id)
    job.model, job.model_price = queued_job.model, queued_job.model_price
    outcome = Outcome(
        text="Squat.", input_tokens=3, output_tokens=4, finish_reason="length", engine_ms=2
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        [pid] = cursor.fetchone()
    with _admin_connection() as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])

    # when it settles
    pipe = get_redis().pipeline(transaction=False)
    settled = tasks._settle(job=job, outcome=outcome, status=JobStatus.SUCCEEDED, pipe=pipe)
    pipe.execute()

    # then it settled once, on a new connection, billed for what was served
    assert settled.status == Job.objects.get(pk=job.pk).status == JobStatus.SUCCEEDED
    hold = Hold.objects.get(key=job.public_id)
    assert hold.status == HoldStatus.CAPTURED and hold.captured == settled.credits_charged > 0
    assert UsageRecord.objects.filter(job_id=job.public_id).count() == 1


def _admin_connection() -> psycopg.Connection:
    """A second connection to the test database, as Django's settings name it."""
    db = connection.settings_dict
    return psycopg.connect(
        dbname=db["NAME"],
        user=db["USER"],
        password=db["PASSWORD"] or None,
        host=db["HOST"] or "127.0.0.1",
        port=db["PORT"] or 5432,
        autocommit=True,
    )


# -- a worker that fails after the job started: the job settles failed, not left running ----

RESERVED_TOKENS = 500


def _with_reservations(job: Job) -> Job:
    """The job's token reservation and concurrency slot, taken as job_submit takes them (the
    job here is written directly, so that no Celery message is sent)."""
    scope = f"org:{job.organization_id}"
    reserved_at = time.time()
    rate_limit_consume(
        kind="tokens",
        limits=[Limit(scope=scope, limit=job.organization.tokens_per_minute)],
        cost=RESERVED_TOKENS,
        slot=Slot(scope=scope, limit=job.organization.concurrent_jobs, job_id=job.public_id),
        now=reserved_at,
    )
    params = job.params | {"reserved_tokens": RESERVED_TOKENS, "reserved_at": reserved_at}
    Job.objects.filter(pk=job.pk).update(params=params)
    job.refresh_from_db()
    return job


def _tokens_counted(job: Job) -> int:
    """What the job's organization's tokens-per-minute window (the one it reserved in) counts."""
    minute = int(job.params["reserved_at"] // 60)
    return int(get_redis().get(f"rl:tokens:org:{job.organization_id}:{minute}") or 0)


def _slots_taken(job: Job) -> int:
    return get_redis().zcard(f"conc:org:{job.organization_id}")


def _connection_dropped_before(table: str, dropped: list[bool]):
    """The worker's database connection ended by the server (a restart, a failover) just
    before its first statement that reads `table` runs: that statement raises
    OperationalError, as in a database blip."""
    return _connection_dropped(lambda sql: f'FROM "{table}"' in sql, dropped, times=1)


@contextlib.contextmanager
def _connection_dropped(at, seen: list[bool], *, times: int | None):
    """The worker's database connection ended by the server just before each statement
    `at(sql)` picks, its first `times` times (None: every time), so that the statement
    raises OperationalError. `seen` gets, for each statement picked, whether it was."""

    def drop(execute, sql, params, many, context):
        if not at(sql):
            return execute(sql, params, many, context)
        seen.append(times is None or len(seen) < times)
        if seen[-1]:
            pid = context["connection"].connection.info.backend_pid
            with _admin_connection() as admin:
                admin.execute("SELECT pg_terminate_backend(%s)", [pid])
        return execute(sql, params, many, context)

    with connection.execute_wrapper(drop):
        yield


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_job_whose_worker_fails_after_starting_it_settles_failed_unbilled(
    queued_job, monkeypatch, settings, message
):
    # given a job with its token reservation and concurrency slot, whose
    # worker's database connection drops as it reads the job's price, after
    # the job was marked running (a fresh message: while the engine works; a
    # late one: before it is sent)
    monkeypatch.setattr(tasks, "SETTLE_RETRY_PAUSES_S", (0.05, 0.05))
    settings.INFERENCE_TIMEOUT_SECONDS = 5
    job = _with_reservations(queued_job)
    org = job.organization
    before = organization_balance(organization=org)
    assert (_slots_taken(job), _tokens_counted(job)) == (1, RESERVED_TOKENS)
    dropped: list[bool] = []

    # when its task runs
    with _connection_dropped_before("metering_modelprice", dropped):
        status = _run(job, _spec(job, age_s=0 if message == "fresh" else 60))

    # then the job is not left running: it failed on our side, and says so
    assert dropped, "the price was never read from the database"
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.FAILED
    assert job.error_code == "worker_error" and "nothing was charged" in job.error_message
    assert job.started_at is not None and job.finished_at is not None
    # nothing billed: its whole hold released once, the organization's balance as before
    assert (job.credits_charged, job.input_tokens, job.output_tokens) == (0, 0, 0)
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)
    after = organization_balance(organization=org)
    assert (after.available, after.held) == (before.available + before.held, 0)
    # its concurrency slot freed and its whole token reservation given back
    assert (_slots_taken(job), _tokens_counted(job)) == (0, 0)
    # and the request waiting for it answers with that error at once, in OpenAI's
    # shape, a 5xx that frees its Idempotency-Key (nothing was charged), not a
    # 504 saying the job was cancelled
    _answered_at_once_worker_error(job)


def _answered_at_once_worker_error(job: Job) -> None:
    """The request waiting for the failed job answers at once: 502 `worker_error`, its
    message the job's, nothing charged (its Idempotency-Key freed)."""
    started = time.monotonic()
    with pytest.raises(ApplicationError) as failed:
        apis.ChatCompletionsApi().answer(job, {"stream": False})
    assert time.monotonic() - started < 2
    response = exception_handler(failed.value, {})
    assert response.status_code == 502 and not failed.value.took_effect
    assert response.data["error"]["code"] == "worker_error"
    assert response.data["error"]["message"] == job.error_message
    assert response["X-Gym-Credits-Charged"] == amount_display(0)


def test_a_job_whose_worker_fails_after_the_engine_answered_is_billed_what_it_delivered(
    queued_job, monkeypatch
):
    # given a job whose worker fails after the engine's answer came back,
    # before it is made into what the job is billed (stood in at the
    # function that does so: nothing real in it fails on demand)
    job = _with_reservations(queued_job)

    def fails(*_args, **_kwargs):
        raise RuntimeError("a bug after the answer")

    monkeypatch.setattr(tasks, "_result_outcome", fails)

    # when its task runs
    status = _run(job, _spec(job))

    # then it failed on our side, billed once for the tokens the engine delivered
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.FAILED and job.error_code == "worker_error"
    assert job.output_tokens == 4 and job.input_tokens > 0
    assert job.credits_charged == _expected_charge(job) > 0
    _settled_once(job, status=HoldStatus.CAPTURED, captured=job.credits_charged)
    # its slot freed, and the tokens it did not use given back
    assert (_slots_taken(job), _tokens_counted(job)) == (0, job.input_tokens + job.output_tokens)


# -- a worker that fails before the job started: tried again, else the job settles failed --


def _connection_dropped_at_the_start(starts: list[bool], *, times: int | None = None):
    """The connection dropped (_connection_dropped) before the job's start statement: the
    start raises OperationalError, nothing of it committed."""
    return _connection_dropped(
        lambda sql: sql.lstrip().startswith("UPDATE inference_job") and "started_at" in sql,
        starts,
        times=times,
    )


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_job_whose_start_the_database_failed_under_is_run_again(
    queued_job, engine, monkeypatch, message
):
    # given a job whose worker's database connection drops as it marks the
    # job running (a fresh message: while the engine works; a late one:
    # before it is sent)
    monkeypatch.setattr(tasks, "START_RETRY_PAUSES_S", (0.05, 0.05))
    job = _with_reservations(queued_job)
    starts: list[bool] = []

    # when its task runs
    with _connection_dropped_at_the_start(starts, times=1):
        status = _run(job, _spec(job, age_s=0 if message == "fresh" else 60))

    # then the run is tried again and the job served, not left queued: billed
    # once for what the engine delivered, its slot freed
    assert starts == [True, False], "the start did not fail once and run again"
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.SUCCEEDED and job.output_tokens == 4
    _settled_once(job, status=HoldStatus.CAPTURED, captured=_expected_charge(job))
    assert job.credits_charged == _expected_charge(job) > 0
    assert _slots_taken(job) == 0
    [final] = relay_events(job.public_id, timeout_s=5)
    assert final["type"] == "done" and final["output_tokens"] == 4


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_job_whose_start_keeps_failing_settles_failed_and_releases_its_whole_hold(
    queued_job, engine, monkeypatch, settings, message
):
    # given a job with its token reservation and concurrency slot, whose
    # worker's database connection drops each time it marks the job running
    monkeypatch.setattr(tasks, "START_RETRY_PAUSES_S", (0.05, 0.05))
    settings.INFERENCE_TIMEOUT_SECONDS = 5
    job = _with_reservations(queued_job)
    org = job.organization
    before = organization_balance(organization=org)
    served = _served_when_idle(engine)
    starts: list[bool] = []

    # when its task runs
    with _connection_dropped_at_the_start(starts):
        status = _run(job, _spec(job, age_s=0 if message == "fresh" else 60))

    # then, its tries spent (the first and two more), the job is not left
    # queued: it failed on our side, and says so
    assert starts == [True, True, True]
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.FAILED
    assert job.error_code == "worker_error" and "nothing was charged" in job.error_message
    assert job.finished_at is not None
    # nothing billed: its whole hold released once, the balance as before
    assert (job.credits_charged, job.input_tokens, job.output_tokens) == (0, 0, 0)
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)
    after = organization_balance(organization=org)
    assert (after.available, after.held) == (before.available + before.held, 0)
    # its concurrency slot freed and its whole token reservation given back
    assert (_slots_taken(job), _tokens_counted(job)) == (0, 0)
    # no engine output delivered for it (a fresh message's request, sent
    # before its start, was abandoned before any response)
    if message == "late":
        assert _served_when_idle(engine) == served
    # and the request waiting for it answers 502 worker_error at once
    _answered_at_once_worker_error(job)


def test_a_copy_of_the_message_while_a_failed_start_waits_to_try_again_is_dropped(
    queued_job, engine, monkeypatch
):
    # given a job whose first run's start failed (its database connection
    # dropped) and which waits to try again, holding the job's run lease
    monkeypatch.setattr(tasks, "START_RETRY_PAUSES_S", (3.0,))
    spec = _spec(queued_job, age_s=60)
    starts: list[bool] = []
    first_status, errors = [], []

    def first_run():
        with _connection_dropped_at_the_start(starts, times=1):
            first_status.append(_run(queued_job, spec))

    first = threading.Thread(target=on_own_connection, args=(first_run, errors))
    first.start()
    wait_until(lambda: starts, timeout=30, what="the first run's start to fail")

    # when a second copy of its message arrives meanwhile (a push sent twice)
    second = _run(queued_job, spec)

    # then the copy is dropped, and the first run, tried again, runs the job
    # once: served once, billed once
    assert second == tasks.DUPLICATE
    first.join(timeout=60)
    assert not errors and first_status == [JobStatus.SUCCEEDED]
    job = Job.objects.get(pk=queued_job.pk)
    assert job.status == JobStatus.SUCCEEDED and job.output_tokens == 4
    _settled_once(job, status=HoldStatus.CAPTURED, captured=_expected_charge(job))


def test_a_settlement_whose_commit_answer_was_lost_still_frees_the_jobs_reservations(
    queued_job, monkeypatch
):
    # given a job the engine served, with its token reservation and slot, on
    # the ledger's fast path (one statement settles it), and a database
    # connection that drops after that statement committed, before its answer
    # came back (stood in by raising once it ran)
    monkeypatch.setattr(tasks, "SETTLE_RETRY_PAUSES_S", (0.05, 0.05))
    accounts_for(queued_job.organization, AccountKind.CONSUMPTION)
    job = tasks.job_start(job_pk=_with_reservations(queued_job).pk, public_id=queued_job.public_id)
    job.model, job.model_price = queued_job.model, queued_job.model_price
    outcome = Outcome(
        text="Squat.", input_tokens=3, output_tokens=4, finish_reason="length", engine_ms=2
    )
    committed: list[str] = []

    def answer_lost(execute, sql, params, many, context):
        result = execute(sql, params, many, context)
        if not committed and "inference_job_settle(" in sql:
            committed.append(sql)
            raise OperationalError("server closed the connection unexpectedly")
        return result

    # when it settles, tried again on a new connection
    pipe = get_redis().pipeline(transaction=False)
    with connection.execute_wrapper(answer_lost):
        settled = tasks._settle(job=job, outcome=outcome, status=JobStatus.SUCCEEDED, pipe=pipe)
    pipe.execute()

    # then it settled once, billed for what was served
    assert committed, "the settlement did not run in one statement"
    assert settled.status == Job.objects.get(pk=job.pk).status == JobStatus.SUCCEEDED
    _settled_once(settled, status=HoldStatus.CAPTURED, captured=settled.credits_charged)
    assert settled.credits_charged > 0
    # and its slot is free, its unused tokens given back: the window counts the 7 used
    assert (_slots_taken(job), _tokens_counted(job)) == (0, 7)

    # and a settlement tried once more gives nothing back twice
    pipe = get_redis().pipeline(transaction=False)
    tasks._settle(job=job, outcome=outcome, status=JobStatus.SUCCEEDED, pipe=pipe)
    job_settle(job=job, outcome=outcome, status=JobStatus.SUCCEEDED, pipe=pipe, retried=True)
    pipe.execute()
    assert (_slots_taken(job), _tokens_counted(job)) == (0, 7)


# -- dedicated capacity: an organization's jobs go to its own pool first -------------------


@pytest.fixture
def shared_model(triton_server):
    """A model whose shared pool is the session's server."""
    return served_model("gym-shared", grpc_urls=[triton_server.grpc_url], access_tier="basic")


def _with_dedicated_pool(grant, model, urls: list[str]):
    org = OrganizationFactory()
    grant(org, credits(10))
    pool = ServerPool.objects.create(name=f"dedicated-{org.pk}", grpc_urls=urls)
    DedicatedCapacity.objects.create(organization=org, model=model, pool=pool)
    return org


def _run_as(job: Job, message: str) -> str:
    return _run(job, _spec(job, age_s=60 if message == "late" else 0))


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_an_organizations_job_goes_to_its_dedicated_pool(engine, shared_model, grant, message):
    # given an organization with a pool of its own (this test's server) for the model
    org = _with_dedicated_pool(grant, shared_model, [engine.grpc_url])
    job = _queued(org, shared_model)
    served = _served_when_idle(engine)

    # when its job runs
    status = _run_as(job, message)

    # then its own server served it (the ensemble and its step: 2 requests)
    assert status == JobStatus.SUCCEEDED
    assert _served_when_idle(engine) == served + 2


def test_another_organizations_job_stays_on_the_shared_pool(engine, shared_model, grant):
    # given one organization with a dedicated pool, and another without
    _with_dedicated_pool(grant, shared_model, [engine.grpc_url])
    other = OrganizationFactory()
    grant(other, credits(10))
    job = _queued(other, shared_model)
    served = _served_when_idle(engine)

    # when the other's job runs
    status = _run(job, _spec(job))

    # then the shared pool served it, not the dedicated one
    assert status == JobStatus.SUCCEEDED
    assert Job.objects.get(pk=job.pk).output_tokens == 4
    assert _served_when_idle(engine) == served


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_job_whose_dedicated_pool_takes_nothing_is_served_by_the_shared_pool(
    shared_model, dead_grpc_url, grant, message
):
    # given an organization whose dedicated pool has no live server
    org = _with_dedicated_pool(grant, shared_model, [dead_grpc_url])
    job = _queued(org, shared_model)

    # when its job runs
    status = _run_as(job, message)

    # then the shared pool served it, started and billed once
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.SUCCEEDED
    assert job.output_tokens == 4 and job.started_at is not None
    [record] = UsageRecord.objects.filter(job_id=job.public_id)
    assert record.credits == job.credits_charged > 0


def test_a_job_whose_dedicated_server_dies_after_taking_it_is_served_by_the_shared_pool(
    engine, triton_server, shared_model, grant, monkeypatch
):
    # given an organization whose dedicated server dies as soon as it has
    # taken the job's request (killed from the job's start, which runs once
    # the request is out), a long one: 544 tokens, answered only at its end
    org = _with_dedicated_pool(grant, shared_model, [engine.grpc_url])
    job = _queued(org, shared_model, max_tokens=3000, seed=27, temperature=1.5)
    starts: list[int] = []
    start = tasks._Start.__call__

    def kill_then_start(self) -> bool:
        starts.append(sum(server.inflight for server in _pool_of(engine)._servers))
        os.killpg(engine.process.pid, signal.SIGKILL)
        return start(self)

    monkeypatch.setattr(tasks._Start, "__call__", kill_then_start)
    shared_served = _served_when_idle(triton_server, _ensemble_served)

    # when its fresh message runs
    status = _run(job, _spec(job))

    # then the request was out at the dedicated server when the job started,
    # once; the shared pool's server answered it (its ensemble one request more,
    # which the dedicated server answering instead would not move); it was billed once
    assert starts == [1]
    assert _served_when_idle(triton_server, _ensemble_served) == shared_served + 1
    job = Job.objects.get(pk=job.pk)
    assert status == job.status == JobStatus.SUCCEEDED
    assert job.output_tokens == 544 and job.started_at is not None
    [record] = UsageRecord.objects.filter(job_id=job.public_id)
    assert record.output_tokens == 544 and record.credits == job.credits_charged > 0


def _pool_of(server) -> triton.ServerPool:
    return triton.pool_for([server.grpc_url], "ensemble")


# -- routing by load: a pool with metrics urls counts every client's requests --------------


def _ensemble_served(server) -> float:
    """Requests the server's `ensemble` answered (the gateway's; not another client's
    requests to `gym_engine` itself)."""
    return sum(
        sample.value
        for sample in triton.scrape_samples(server.metrics_url)
        if sample.name == "nv_inference_request_success"
        and sample.labels.get("model") == "ensemble"
    )


@pytest.mark.parametrize("message", ["fresh", "late"])
def test_a_job_goes_to_the_server_other_clients_leave_free(engine, triton_server, grant, message):
    # given a model on two servers with their metrics urls in the catalog, the
    # first (this test's) held busy by another client, and the worker's pool
    # for them (the one its jobs use) having read that
    urls = [engine.grpc_url, triton_server.grpc_url]
    metrics = [engine.metrics_url, triton_server.metrics_url]
    model = served_model("gym-load", grpc_urls=urls, metrics_urls=metrics, access_tier="basic")
    org = OrganizationFactory()
    grant(org, credits(10))
    pool = triton.pool_for(urls, "ensemble", metrics_urls=tuple(metrics))
    busy, workers = occupy_engine_workers(engine.grpc_url)
    try:
        wait_until(
            lambda: (pool._others(pool._servers[0], time.monotonic()) or 0) >= workers,
            timeout=30,
            what="the busy server's load to be read",
        )
        before = _ensemble_served(engine)

        # when jobs run
        statuses = [_run_as(_queued(org, model), message) for _ in range(4)]
    finally:
        busy.stop()

    # then: all served, none by the busy server
    assert statuses == [JobStatus.SUCCEEDED] * 4
    assert _ensemble_served(engine) == before
