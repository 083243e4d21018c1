"""A running job whose run is gone and whose message is not coming back is ended by a sweep.

Its worker died and its message was not handed back (a run whose settlement
kept failing, a message the broker lost): nothing else ended it before its
hold expired, an hour on, `expired`, its credits held and its concurrency
slot taken meanwhile, its stream left without an end. The sweep
(jobs_orphaned_sweep, beat, every minute) ends such a job `failed`,
`worker_lost`, as a redelivered message ends a streamed job whose dead run
relayed part of it (tasks._relayed_before), once it has run longer than
INFERENCE_ORPHAN_GRACE_SECONDS with no run holding its lease: billed for the
text its client was streamed, counted by the model's tokenizer (its prompt
only where the job's row kept it: the sweep has no task message), nothing
without a tokenizer or without relayed text.

The task body runs in this process, on a tritonserver of its own, as in
test_job_run.py; the job's statements commit as in the worker.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import redis
from django.utils import timezone

from accounts.redis import get_redis
from inference import relay, tasks, triton
from inference.engine.tokenizer import count_tokens
from inference.models import InputTokensSource, Job, JobStatus
from inference.relay import relay_events, relay_publish
from inference.tasks import jobs_orphaned_sweep
from metering.models import Hold, HoldStatus
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory
from tests.helpers import credits, on_own_connection, pause_after, served_model
from tests.inference.test_job_run import (
    PROMPT,
    TOKENIZER,
    _queued,
    _run,
    _served_when_idle,
    _slots_taken,
    _spec,
    _tokens_counted,
    _with_reservations,
)
from tests.reliability.test_inference_faults import _expected_charge, _settled_once

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def engine(private_triton_server):
    yield private_triton_server
    triton.close_pools()  # its streams must go before the server can stop


@pytest.fixture
def queued_job(engine, grant) -> Job:
    model = served_model("gym-orphans", grpc_urls=[engine.grpc_url], access_tier="basic")
    org = OrganizationFactory()
    grant(org, credits(10))
    return _queued(org, model)


def _running_since(job: Job, *, seconds_ago: float, stream: bool = False) -> Job:
    """The job started by a run, `seconds_ago`, whose worker is gone (no lease held)."""
    Job.objects.filter(pk=job.pk).update(stream=stream)
    assert tasks.job_start(job_pk=job.pk, public_id=job.public_id)
    Job.objects.filter(pk=job.pk).update(started_at=timezone.now() - timedelta(seconds=seconds_ago))
    job.refresh_from_db()
    return job


def test_a_running_job_whose_run_is_gone_ends_worker_lost_with_what_it_relayed(
    queued_job, settings
):
    # given a streamed job running past the grace, whose dead run had relayed
    # part of its answer, with its token reservation and concurrency slot
    grace = settings.INFERENCE_ORPHAN_GRACE_SECONDS
    job = _running_since(_with_reservations(queued_job), seconds_ago=grace + 60, stream=True)
    org = job.organization
    for text in ("Squat", " deep."):
        relay_publish(job.public_id, {"type": "delta", "text": text})
    # and beside it a job running as long whose run is alive (it holds its
    # lease), and one whose run has not lasted the grace
    alive = _running_since(_queued(org, job.model), seconds_ago=grace + 60)
    get_redis().set(f"jobrun:{alive.pk}", "live-run", px=5000)
    young = _running_since(_queued(org, job.model), seconds_ago=grace - 60)
    before = organization_balance(organization=org)

    # when the sweep runs
    ended = jobs_orphaned_sweep()

    # then the orphan ended failed, worker_lost, nothing charged (its model
    # has no tokenizer to count the relayed text with): its whole hold
    # released once, the balance as before
    assert ended == 1
    job = Job.objects.get(pk=job.pk)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "worker_lost")
    assert "part of the answer" in job.error_message and "nothing was charged" in (
        job.error_message
    )
    assert (job.credits_charged, job.output_tokens) == (0, 0)
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)
    after = organization_balance(organization=org)
    assert (after.available, after.held) == (
        before.available + job.hold_amount,
        before.held - job.hold_amount,
    )
    # its slot freed, its whole token reservation given back
    assert (_slots_taken(job), _tokens_counted(job)) == (0, 0)
    # its client's stream ends after the text it was sent, with the error
    *deltas, final = relay_events(job.public_id, timeout_s=5)
    assert "".join(event["text"] for event in deltas) == final["text"] == "Squat deep."
    assert final["type"] == "error" and final["error_code"] == "worker_lost"
    assert final["credits_charged"] == 0
    # and the live run's job and the young one run on, their holds pending
    for other in (alive, young):
        assert Job.objects.get(pk=other.pk).status == JobStatus.RUNNING
        assert Hold.objects.get(key=other.public_id).status == HoldStatus.PENDING

    # and a second sweep ends nothing more
    assert jobs_orphaned_sweep() == 0
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)


@pytest.mark.parametrize("kept", [True, False], ids=["prompt-kept", "prompt-not-kept"])
def test_an_orphaned_stream_is_billed_for_the_text_it_relayed(grant, settings, kept):
    # given a streamed job on a model with a tokenizer, running past the grace,
    # whose dead run had relayed part of its answer; its prompt kept on its row
    # (the organization stores prompts) or not (the sweep has no task message)
    model = served_model("gym-orphans-tok", access_tier="basic", tokenizer_file=TOKENIZER)
    org = OrganizationFactory(store_prompts=kept)
    grant(org, credits(10))
    job = _queued(org, model, max_tokens=64)
    Job.objects.filter(pk=job.pk).update(prompt=PROMPT if kept else "")
    grace = settings.INFERENCE_ORPHAN_GRACE_SECONDS
    job = _running_since(_with_reservations(job), seconds_ago=grace + 60, stream=True)
    relayed = "Squat deep, then drive up."
    for text in ("Squat deep,", " then drive up."):
        relay_publish(job.public_id, {"type": "delta", "text": text})
    before = organization_balance(organization=org)

    # when the sweep runs
    assert jobs_orphaned_sweep() == 1

    # then the job ended failed, worker_lost, billed for the text its client
    # got, counted by the model's tokenizer, and for the prompt where kept
    job = Job.objects.get(pk=job.pk)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "worker_lost")
    assert job.output_tokens == count_tokens(relayed) > 0
    if kept:
        assert (job.input_tokens, job.input_tokens_source) == (
            count_tokens(PROMPT),
            InputTokensSource.TOKENIZER,
        )
    else:
        assert (job.input_tokens, job.input_tokens_source) == (0, InputTokensSource.UNMETERED)
        assert "prompt was not kept" in job.error_message
    charge = _expected_charge(job)
    assert job.credits_charged == charge > 0
    # its hold captured for that charge once, the rest back in the balance
    _settled_once(job, status=HoldStatus.CAPTURED, captured=charge)
    after = organization_balance(organization=org)
    assert (after.available, after.held) == (
        before.available + job.hold_amount - charge,
        before.held - job.hold_amount,
    )
    # and its client's stream ends after that text, with the charge
    *_deltas, final = relay_events(job.public_id, timeout_s=5)
    assert (final["type"], final["error_code"]) == ("error", "worker_lost")
    assert (final["text"], final["credits_charged"]) == (relayed, charge)
    # and a second sweep bills nothing more
    assert jobs_orphaned_sweep() == 0
    _settled_once(job, status=HoldStatus.CAPTURED, captured=charge)


def test_a_message_that_comes_back_as_the_sweep_ends_its_job_runs_nothing(
    queued_job, engine, settings, monkeypatch
):
    # given a job running past the grace whose run is gone, and the sweep
    # ending it, held just before it settles (it holds the job's run lease)
    job = _running_since(queued_job, seconds_ago=settings.INFERENCE_ORPHAN_GRACE_SECONDS + 60)
    served = _served_when_idle(engine)
    lost, settle = pause_after(monkeypatch, tasks, "_relayed_before", thread="sweep")
    swept, errors = [], []
    sweep = threading.Thread(
        target=on_own_connection,
        args=(lambda: swept.append(jobs_orphaned_sweep()), errors),
        name="sweep",
    )
    sweep.start()
    assert lost.wait(timeout=30), "the sweep did not reach the job"

    # when its message comes back meanwhile (a late redelivery)
    during = _run(job, _spec(job, age_s=60))
    settle.set()
    sweep.join(timeout=60)
    # and once more after the sweep
    after = _run(job, _spec(job, age_s=60))

    # then neither ran it: the job settled once, by the sweep, nothing sent
    # to the engine, nothing charged
    assert not errors and swept == [1]
    assert during == tasks.DUPLICATE and after == JobStatus.FAILED
    job = Job.objects.get(pk=job.pk)
    assert (job.status, job.error_code, job.credits_charged) == (
        JobStatus.FAILED,
        "worker_lost",
        0,
    )
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)
    assert _served_when_idle(engine) == served


def test_the_sweep_ends_nothing_while_redis_fails(queued_job, settings, monkeypatch):
    # given a job running past the grace, and Redis failing as the sweep asks
    # for its run lease (stood in at the lease's one call: a real outage would
    # stop every other test's relay and broker)
    job = _running_since(queued_job, seconds_ago=settings.INFERENCE_ORPHAN_GRACE_SECONDS + 60)

    def redis_down(*_args, **_kwargs):
        raise redis.ConnectionError("redis is down")

    monkeypatch.setattr(relay, "_run_lease_take", redis_down)

    # when the sweep runs
    ended = jobs_orphaned_sweep()

    # then it ends nothing: it cannot tell whether the job's run is alive
    assert ended == 0
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.PENDING
