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
from datetime import datetime, timedelta

import pytest
import redis
from django.utils import timezone

from accounts.redis import get_redis
from inference import relay, tasks, triton
from inference.engine.tokenizer import count_tokens, load_tokenizer
from inference.models import InputTokensSource, Job, JobStatus
from inference.relay import relay_events, relay_publish
from inference.tasks import jobs_orphaned_sweep
from metering.models import Hold, HoldStatus
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory
from tests.helpers import (
    credits,
    on_own_connection,
    pause_after,
    redis_aged,
    served_model,
    wait_until,
)
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
    since = timezone.now() - timedelta(seconds=seconds_ago)
    Job.objects.filter(pk=job.pk).update(started_at=since, run_started_at=since)
    job.refresh_from_db()
    return job


def _swept_twice(*, now: datetime | None = None) -> int:
    """Two sweeps a beat's interval apart, from `now` (the first only notes the leases it
    finds missing, and ends nothing); how many jobs the second ended."""
    now = now or timezone.now()
    assert jobs_orphaned_sweep(now=now) == 0
    return jobs_orphaned_sweep(now=now + timedelta(seconds=tasks.ORPHAN_SWEEP_EVERY_S))


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

    # when the sweep runs, twice (a minute apart)
    ended = _swept_twice()

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
    for text in _token_deltas(relayed):
        relay_publish(job.public_id, {"type": "delta", "text": text})
    before = organization_balance(organization=org)

    # when the sweep runs, twice (a minute apart)
    assert _swept_twice() == 1

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


def _token_deltas(text: str) -> list[str]:
    """`text` as the engine streams it: a delta per token (the model's tokenizer's)."""
    encoded = load_tokenizer().encode(text, add_special_tokens=False)
    return [text[start:end] for start, end in encoded.offsets]


@pytest.mark.parametrize(
    ("deltas", "billed"),
    [
        (_token_deltas("Squat deep, then drive up."), count_tokens("Squat deep, then drive up.")),
        # A partial character the engine decoded as U+FFFD, one a token: the
        # tokenizer re-encodes each to 3 tokens, more than the engine made.
        (["\ufffd"] * 3, 3),
    ],
    ids=["a-token-each", "replacement-characters"],
)
def test_a_dead_workers_stream_outlives_the_grace_and_is_billed_by_its_deltas(
    grant, settings, deltas, billed
):
    # given a streamed job on a model with a tokenizer, whose run started
    # past the grace ago and relayed its deltas a minute into it, then died
    model = served_model("gym-orphans-kept", access_tier="basic", tokenizer_file=TOKENIZER)
    org = OrganizationFactory()
    grant(org, credits(10))
    job = _queued(org, model, max_tokens=64)
    grace = settings.INFERENCE_ORPHAN_GRACE_SECONDS
    job = _running_since(_with_reservations(job), seconds_ago=grace + 60, stream=True)
    for text in deltas:
        relay_publish(job.public_id, {"type": "delta", "text": text})
    # its stream kept past the grace while the job runs
    stream = f"jobstream:{job.public_id}"
    assert get_redis().ttl(stream) > grace + tasks.ORPHAN_SIGHTING_TTL_S
    before = organization_balance(organization=org)

    # when the sweep runs, twice (a minute apart), the grace since those
    # deltas gone by (nothing written to the stream since)
    redis_aged(grace + tasks.ORPHAN_SWEEP_EVERY_S, stream)
    assert _swept_twice() == 1

    # then the job ended worker_lost, billed for the text its client was
    # streamed: counted by the model's tokenizer, never more than a token a
    # delta (the engine's own count, lost with its worker, was at least that)
    relayed = "".join(deltas)
    job = Job.objects.get(pk=job.pk)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "worker_lost")
    assert job.output_tokens == billed == min(count_tokens(relayed), len(deltas))
    charge = _expected_charge(job)
    assert job.credits_charged == charge > 0
    _settled_once(job, status=HoldStatus.CAPTURED, captured=charge)
    after = organization_balance(organization=org)
    assert after.available == before.available + job.hold_amount - charge
    # and its client's stream ends after that text; ended, it lives only as
    # long as a finished job's
    *_deltas, final = relay_events(job.public_id, timeout_s=5)
    assert (final["type"], final["text"], final["credits_charged"]) == ("error", relayed, charge)
    assert 0 < get_redis().ttl(stream) <= relay.STREAM_TTL_SECONDS


def test_a_message_that_comes_back_as_the_sweep_ends_its_job_runs_nothing(
    queued_job, engine, settings, monkeypatch
):
    # given a job running past the grace whose run is gone, and the sweep
    # ending it, held just before it settles (it holds the job's run lease)
    job = _running_since(queued_job, seconds_ago=settings.INFERENCE_ORPHAN_GRACE_SECONDS + 60)
    now = timezone.now()
    assert jobs_orphaned_sweep(now=now) == 0  # its lease found missing a first time
    served = _served_when_idle(engine)
    lost, settle = pause_after(monkeypatch, tasks, "_relayed_before", thread="sweep")
    swept, errors = [], []
    sweep = threading.Thread(
        target=on_own_connection,
        args=(
            lambda: swept.append(jobs_orphaned_sweep(now=now + timedelta(minutes=1))),
            errors,
        ),
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

    # when the sweep runs, twice (a minute apart)
    now = timezone.now()
    ended = jobs_orphaned_sweep(now=now) + jobs_orphaned_sweep(now=now + timedelta(minutes=1))

    # then it ends nothing: it cannot tell whether the job's run is alive
    assert ended == 0
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.PENDING


def test_a_job_run_again_after_its_worker_died_is_given_its_new_runs_grace(queued_job, settings):
    # given a job first started well past the grace ago, whose whole worker
    # died: its message came back after the visibility timeout and ran it
    # again just now (job_start's restart), and Redis then lost that live
    # run's lease (an outage, stood in for by deleting its key)
    grace = settings.INFERENCE_ORPHAN_GRACE_SECONDS
    job = _running_since(queued_job, seconds_ago=grace + 600)
    first_start = job.started_at
    get_redis().set(f"jobrun:{job.pk}", "live-run", px=60_000)
    restarted = tasks.job_start(job_pk=job.pk, public_id=job.public_id)
    assert restarted is not None and restarted.restarted
    get_redis().delete(f"jobrun:{job.pk}")

    # when the sweep runs, twice (a minute apart)
    ended = _swept_twice()

    # then it ends nothing: the job's current run is younger than the grace;
    # the job runs on, its hold pending, its first start kept for reports
    assert ended == 0
    job = Job.objects.get(pk=job.pk)
    assert (job.status, job.started_at) == (JobStatus.RUNNING, first_start)
    assert job.run_started_at > first_start
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.PENDING

    # and once that run too is past the grace with no lease, it is an orphan
    assert _swept_twice(now=job.run_started_at + timedelta(seconds=grace + 1)) == 1
    assert Job.objects.get(pk=job.pk).error_code == "worker_lost"


def _lease_back(key: str) -> bytes | None:
    """The lease under `key` once a few renewals had time to take it back (RUN_LEASE_S)."""
    try:
        return wait_until(lambda: get_redis().get(key), timeout=relay.RUN_LEASE_S)
    except AssertionError:
        return None


def test_a_live_runs_lease_lost_in_a_redis_outage_comes_back(queued_job):
    # given a live run holding its job's lease, renewed by its process, and
    # beside it in the same process another job's run (a witness: its lease
    # is renewed in the same round trip)
    key = f"jobrun:{queued_job.pk}"
    witness_pk = queued_job.pk + 1_000_000
    witness = f"jobrun:{witness_pk}"
    with relay.relay_run_lease(queued_job.pk) as leased, relay.relay_run_lease(witness_pk):
        assert leased
        token = get_redis().get(key)

        # when Redis loses it (an outage longer than its life, stood in for by
        # deleting its key)
        get_redis().delete(key)

        # then the run's process takes it back, under the run's own token
        assert _lease_back(key) == token

        # and one that another run took meanwhile is left to that run: once a
        # renewal took the witness's lease back, the other run's is untouched
        get_redis().set(key, "next-run", px=60_000)
        get_redis().delete(witness)
        assert _lease_back(witness) is not None
        assert get_redis().get(key) == b"next-run"
    get_redis().delete(key)


def test_a_run_started_while_redis_failed_takes_its_lease_once_redis_is_back(
    queued_job, monkeypatch
):
    # given a run that started unleased: Redis failed as it took its lease
    # (stood in at the lease's one call: a real outage would stop every other
    # test's relay and broker)
    key = f"jobrun:{queued_job.pk}"
    real_take = relay._run_lease_take

    def redis_down(*_args, **_kwargs):
        raise redis.ConnectionError("redis is down")

    monkeypatch.setattr(relay, "_run_lease_take", redis_down)
    with relay.relay_run_lease(queued_job.pk) as leased:
        assert leased
        monkeypatch.setattr(relay, "_run_lease_take", real_take)

        # when Redis answers again, then the run holds its lease: a second
        # message for the job is a duplicate, not a dead worker's
        assert _lease_back(key) is not None
        with relay.relay_run_lease(queued_job.pk) as second:
            assert second is False
    # and the run let it go as it ended
    assert not get_redis().exists(key)


def test_a_job_is_ended_only_once_its_lease_was_missing_at_two_sweeps_in_a_row(
    queued_job, settings
):
    # given a job running past the grace with no lease
    job = _running_since(queued_job, seconds_ago=settings.INFERENCE_ORPHAN_GRACE_SECONDS + 60)
    key, now = f"jobrun:{job.pk}", timezone.now()

    def swept(after_s: float) -> JobStatus:
        assert jobs_orphaned_sweep(now=now + timedelta(seconds=after_s)) == 0
        return Job.objects.get(pk=job.pk).status

    # when a sweep finds its lease missing, then it does not end the job (a
    # live run whose lease an outage took takes it back within seconds)
    assert swept(0) == JobStatus.RUNNING
    # nor does a sweep seconds after (a late beat task, then one on time)
    assert swept(5) == JobStatus.RUNNING
    # and a sweep that finds the lease held (its run took it back) forgets
    # the first sighting: the next sweep to find it missing is a first again
    get_redis().set(key, "live-run", px=60_000)
    assert swept(60) == JobStatus.RUNNING
    get_redis().delete(key)
    assert swept(120) == JobStatus.RUNNING

    # and the next sweep a minute on, its lease missing still, ends it
    assert jobs_orphaned_sweep(now=now + timedelta(seconds=180)) == 1
    job = Job.objects.get(pk=job.pk)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "worker_lost")
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)


def test_jobs_the_sweep_leaves_do_not_hide_an_orphan_behind_them(queued_job, settings, monkeypatch):
    # given more live runs past the grace than a sweep reads at once (two
    # here), each holding its lease, ahead of an orphan (a higher key)
    monkeypatch.setattr(tasks, "ORPHANS_PER_SWEEP", 2)
    grace = settings.INFERENCE_ORPHAN_GRACE_SECONDS
    org, model = queued_job.organization, queued_job.model
    queued = [queued_job, _queued(org, model), _queued(org, model), _queued(org, model)]
    *alive, orphan = [_running_since(job, seconds_ago=grace + 60) for job in queued]
    for job in alive:
        get_redis().set(f"jobrun:{job.pk}", "live-run", px=60_000)

    # when the sweep runs, twice (a minute apart)
    ended = _swept_twice()

    # then the orphan ended, and the live runs' jobs run on
    assert ended == 1
    assert Job.objects.get(pk=orphan.pk).error_code == "worker_lost"
    assert [Job.objects.get(pk=job.pk).status for job in alive] == [JobStatus.RUNNING] * 3


def test_an_orphan_whose_hold_expires_soon_is_ended_inside_its_grace(queued_job):
    # given a streamed job whose run started only minutes ago (a restart late
    # in its hold's life: its message back after the visibility timeout),
    # still inside its grace, whose run died too after relaying part of its
    # answer; its hold expires in two minutes
    job = _running_since(queued_job, seconds_ago=300, stream=True)
    relay_publish(job.public_id, {"type": "delta", "text": "Squat"})
    expires = timezone.now() + timedelta(minutes=2)
    Hold.objects.filter(key=job.public_id).update(expires_at=expires)

    # when the sweep runs, twice (a minute apart), before the hold expires
    ended = _swept_twice()

    # then the job ended worker_lost, its hold settled by it (not left to
    # expire, unbilled, with no end on its stream), and its stream ends
    assert ended == 1
    job = Job.objects.get(pk=job.pk)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "worker_lost")
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)
    *deltas, final = relay_events(job.public_id, timeout_s=5)
    assert [event["text"] for event in deltas] == ["Squat"]
    assert (final["type"], final["error_code"]) == ("error", "worker_lost")


def test_orphans_left_behind_the_cap_are_ended_at_their_turn(queued_job, settings, monkeypatch):
    # given more orphans past the grace than a sweep ends (two a sweep here,
    # as a mass failure leaves hundreds behind the 200)
    monkeypatch.setattr(tasks, "ORPHANS_PER_SWEEP", 2)
    grace = settings.INFERENCE_ORPHAN_GRACE_SECONDS
    org, model = queued_job.organization, queued_job.model
    queued = [queued_job] + [_queued(org, model) for _ in range(5)]
    orphans = [_running_since(job, seconds_ago=grace + 60) for job in queued]
    sightings = [f"jobrunmissing:{job.pk}" for job in orphans]
    now = timezone.now()

    # when the sweep runs every minute (Redis's clock moved on by as much
    # between two, for the sightings' lives)
    ended = []
    for minute in range(4):
        if minute:
            redis_aged(tasks.ORPHAN_SWEEP_EVERY_S, *sightings)
        ended.append(jobs_orphaned_sweep(now=now + timedelta(minutes=minute)))

    # then each sweep after the first sightings ended as many as it may, and
    # the last two were not sighted afresh at their turn (their sightings had
    # lapsed behind the cap): all six ended by the fourth sweep
    assert ended == [0, 2, 2, 2]
    assert {Job.objects.get(pk=job.pk).error_code for job in orphans} == {"worker_lost"}


def test_each_sighting_is_stamped_when_its_lease_is_checked(queued_job, settings):
    # given two jobs past the grace with no lease
    grace = settings.INFERENCE_ORPHAN_GRACE_SECONDS
    first = _running_since(queued_job, seconds_ago=grace + 60)
    second = _running_since(_queued(first.organization, first.model), seconds_ago=grace + 60)
    now = timezone.now()

    # when a sweep finds their leases missing a first time
    assert jobs_orphaned_sweep(now=now) == 0

    # then each sighting is stamped when its lease was checked, the second's
    # after the first's, not both with the sweep's start
    stamps = [float(get_redis().get(f"jobrunmissing:{job.pk}")) for job in (first, second)]
    assert now.timestamp() <= stamps[0] < stamps[1]
