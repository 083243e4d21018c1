"""The Celery side of a job: call Triton, relay tokens, settle exactly once.

Queues: inference.priority, inference.standard, inference.batch, which a
worker on several takes in that order, its -Q order (settings:
queue_order_strategy). A worker
that dies mid-job hands the task back (acks late, reject on worker lost);
the redelivered task runs the generation again and the job settles once,
because its hold is keyed by the job id and the settlement checks the job's
status under its row lock. A run holds a lease its process renews
(relay_run_lease): a message handed back runs once its dead worker's lease
lapses (within 5 s), while a second copy of a message whose run is alive
(a push sent twice, a retried publish) is dropped, the job left to that run. Not a streamed job whose dead run had relayed
some of its text: its client is reading that stream, so it ends failed,
`worker_lost`, billed for the text relayed, counted by the model's tokenizer
(_relayed_before). A run that fails once its job has
started (the database or Redis failing under it, or a bug) ends the job
failed, `worker_error`, billed for what the engine delivered (_job_run): a
task that raised is not run again, and the job would stay running until its
hold expired. One that fails before its job's start committed (the database
or Redis failing) is tried again in the task (START_RETRY_PAUSES_S), and the
job ends failed the same way when it cannot be. A running job whose run is
gone and whose message is not coming back is ended by a sweep
(jobs_orphaned_sweep), failed, `worker_lost`, billed as above for the text
a stream had relayed (its prompt only where the job's row kept it).

A job is mostly waiting (on Triton, PostgreSQL, Redis), so an inference worker
may run many at once in threads (`--pool threads --concurrency 16`, as
docs/BENCHMARKS.md measures) rather than one per process. Nothing here is
shared between jobs but thread-safe clients (the Triton pool, the Redis pool;
Django gives each thread its own database connection), and each settlement is
its own transaction under the job's and the hold's row locks, so neighbours
cannot double-settle (tests/reliability/test_inference_faults.py runs its crowd
on such a worker). The price of threads: "reject on worker lost" needs the
prefork pool. A prefork child that dies hands its task back at once; a threads
worker that dies hands its tasks back when the broker's visibility timeout
expires (CELERY_VISIBILITY_TIMEOUT_SECONDS, by default 30 minutes or three
runs, well inside a hold's life: a job whose hold expires within the start
margin is not started), and
they settle once then, as above.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TypeVar

from celery import shared_task
from celery.signals import worker_process_shutdown
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import Exists, OuterRef, Q
from django.utils import timezone
from redis.exceptions import RedisError

from accounts.cache import cache_scope
from accounts.redis import get_redis
from inference import triton
from inference.models import NON_TERMINAL, InputTokensSource, Job, JobStatus, job_run_start
from inference.relay import (
    CancelEvent,
    CancelOrigin,
    Relayed,
    relay_cancel_requested,
    relay_cancel_watch,
    relay_progress_set,
    relay_publish,
    relay_relayed_text,
    relay_run_lease,
    relay_run_lease_missing_note,
    relay_run_lease_missing_since,
    relay_run_lease_release,
    relay_run_lease_seen,
)
from inference.selectors import catalog_model_by_id, job_final_event, pools_for_job
from inference.services import concurrency_slots_sweep, job_settle, job_start
from inference.services.callbacks import job_callback_deliver, job_callbacks_sweep
from inference.services.jobs import (
    ENGINE_SPEC_HEADER,
    EngineJob,
    Outcome,
    job_from_engine_spec,
    job_run_limit,
    job_start_refusal,
    output_tokens_count,
    prompt_tokens_count,
)
from metering.models import Hold, HoldStatus
from metering.selectors import model_price_by_id

logger = logging.getLogger(__name__)

T = TypeVar("T")


# A job delivered this soon after it was sent (a worker was idle) goes to the
# engine before it is marked running, on the server pool the API resolved for
# it: marking it (an UPDATE) and reading its model and price (the catalog
# caches' Redis read) then run while the engine works instead of before it
# (docs/BENCHMARKS.md, fifth pass). A job that ended meanwhile (cancelled
# while queued) has its request abandoned, but through an ensemble the engine
# runs an abandoned request to its end (triton.py), unbilled: hence a short
# window, which a job a client cancels within it pays for with that engine
# time. An older message (a backlog, a redelivery after a while) is marked
# running first, on the pool the catalog names now, so that a job cancelled
# while it waited is never sent. The age is read from the API's clock with the
# worker's; clocks that disagree only move jobs from one order to the other,
# and both settle alike.
ENGINE_FIRST_WITHIN_S = 0.25


# ignore_result: the answer travels through the relay (and the Job row), never
# through Celery's result backend; storing it would cost the worker a write and
# the API process a result subscription per job, for a result nobody reads.
#
# What the engine call needs (job_engine_spec) comes in a message header,
# which a worker makes an attribute of the task's request; a message without
# it (from an API of a release before it) starts the job first.
@shared_task(bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def job_run(self, job_pk: int, prompt: str) -> str:
    spec = self.request.get(ENGINE_SPEC_HEADER)
    # Before anything is sent or started: a second message for a job whose
    # first run is alive leaves the job to it (relay_run_lease).
    with relay_run_lease(job_pk) as leased:
        if not leased:
            logger.warning(
                "job %s: a second message for it came while its run is alive; dropped",
                spec["id"] if spec is not None else f"pk={job_pk}",
            )
            return DUPLICATE
        # One Redis read of the catalog and price caches' tokens for the whole job.
        with cache_scope():
            return _job_run(job_pk, prompt, spec)


# What job_run returns for a message it dropped as a duplicate (its result is
# ignored; it shows in the worker's log).
DUPLICATE = "duplicate"


class _Start:
    """The job's row, marked running: at once, or while the engine works (`after_send`)."""

    def __init__(self, job_pk: int, public_id: str | None):
        self.job_pk, self.public_id = job_pk, public_id
        self.job: Job | None = None
        # The job's row once its start committed, before anything else is read
        # for it: a run that fails from then on settles it (_job_run).
        self.started: Job | None = None
        self.ended = False  # the job had ended before it could be started
        # A streamed job whose dead worker had relayed some of its text: the
        # job, and what it relayed. It is not run again (_relayed_before).
        self.relayed: tuple[Job, Relayed] | None = None

    def __call__(self) -> bool:
        job = job_start(job_pk=self.job_pk, public_id=self.public_id)
        if job is None:  # cancelled while queued, or settled by a redelivery
            self.ended = True
            return False
        self.started = job
        # Everything the settlement reads but the job's row: its catalog model
        # and price, from this process's caches. The organization is never
        # loaded: its id is all they need.
        job.model = catalog_model_by_id(job.model_id)
        job.model_price = model_price_by_id(job.model_price_id)
        if job.restarted and job.stream:
            # Only a task that came back after its worker died reads the relay
            # here (one Redis read): a job's first run pays nothing for it.
            relayed = _relayed_text(job)
            if relayed is not None:
                self.relayed = (job, relayed)
                return False
        self.job = job
        return True

    def status(self) -> str:
        """The job's status, once it could not be started (what the task returns)."""
        jobs = Job.objects.filter(pk=self.job_pk)
        if self.public_id is not None:
            jobs = jobs.filter(public_id=self.public_id)
        status, public_id = jobs.values_list("status", "public_id").first() or ("", "")
        if status in (JobStatus.QUEUED, JobStatus.RUNNING):
            # Not ended, yet not started: job_start refused it for its hold
            # (settled, or expiring within the start margin). It ends with
            # the hold's expiry; a message this late deserves a look, and a
            # hold too short for any job to start, a fix.
            level, why = job_start_refusal(public_id=public_id)
            logger.log(
                level, "job %s not started: %s; it ends expired with its hold", public_id, why
            )
        return status


# The pauses between tries of a job whose run failed before its start
# committed (the database or Redis failing as the job is loaded and marked
# running): about 5 s in all, within the job's run limit. Nothing was
# delivered then (a request sent engine first is ended when its start
# raises), so the run is simply tried again, in this task: a task that raised
# is acknowledged and never run again (acks_late hands back only a dead
# worker's), and Celery's own retry would publish a new message through the
# broker (Redis, which may be what is failing) and drop this one when that
# publish fails. The run keeps its lease meanwhile, so no other message runs
# the job; and job_start's guard still refuses one that ended meanwhile (a
# cancel). After the last try, or on any other error, the job ends failed
# (_unstarted_failed) rather than queued until its hold expires.
START_RETRY_PAUSES_S = (0.2, 1.0, 4.0)
_TRANSIENT = (OperationalError, InterfaceError, RedisError)


def _job_run(job_pk: int, prompt: str, spec: dict | None) -> str:
    # The message's job by its primary key and, when the message says it, its
    # public id (job_start: a key may name another job after a crash).
    public_id = spec["id"] if spec is not None else None
    # Counted from when this worker took the job, whatever tries it takes.
    limit_s = job_run_limit()
    deadline = time.monotonic() + limit_s
    engine_first = spec is not None and 0 <= time.time() - spec["sent_at"] < ENGINE_FIRST_WITHIN_S
    pauses = iter(START_RETRY_PAUSES_S)
    while True:
        start = _Start(job_pk, public_id)
        delivered: list[triton.GenerationResult | triton.TritonError] = []
        try:
            ended = _job_end(
                start,
                prompt,
                spec,
                delivered,
                engine_first=engine_first,
                deadline=deadline,
                limit_s=limit_s,
            )
        except Exception as exc:
            if start.started is None:
                pause = next(pauses, None) if isinstance(exc, _TRANSIENT) else None
                if pause is not None and time.monotonic() + pause < deadline:
                    logger.warning(
                        "job %s: its run failed before it started (%r); trying again in %g s",
                        public_id or f"pk={job_pk}",
                        exc,
                        pause,
                    )
                    if not isinstance(exc, RedisError):
                        connection.close()  # a broken connection: the next try opens a new one
                    time.sleep(pause)
                    # Started first from now on: a job cancelled meanwhile is never sent.
                    engine_first = False
                    continue
                logger.exception(
                    "job %s: its run failed before it started; it ends failed",
                    public_id or f"pk={job_pk}",
                )
                return _unstarted_failed(job_pk, public_id, delivered)
            # Started, it must not be left running: nothing else would end it
            # before its hold's expiry (a task that raised is not run again:
            # acks_late hands back only a dead worker's), its hold and concurrency
            # slot taken all that time, a cancel unable to end it, and the request
            # waiting for it answered, at its timeout, that it was cancelled.
            job = start.started
            logger.exception("job %s: its run failed after it started; it ends failed", job)
            ended = job, _worker_failure(delivered[0] if delivered else None), JobStatus.FAILED
        break
    if ended is None:
        return start.status()
    return _finish(*ended)


def _unstarted_failed(job_pk: int, public_id: str | None, delivered: list) -> str:
    """End failed (`worker_error`) a job whose run failed before its start committed, and
    could not be tried again: its whole hold released, its reservations freed, its final
    event sent (a waiting request answers 502 at once). Nothing was delivered: a request
    sent engine first is ended when its start raises, before any response is read.

    Queued, or running if its start committed and only its answer was lost; a
    job that ended meanwhile (a cancel) is left as it ended. The database
    failing still, the task raises and the job ends with its hold's expiry,
    as before."""
    jobs = Job.objects.filter(pk=job_pk)
    if public_id is not None:
        jobs = jobs.filter(public_id=public_id)
    job = _db_retrying(lambda _retried: jobs.first(), what=f"job pk={job_pk}: its load")
    if job is None:
        return ""
    if job.status not in NON_TERMINAL:
        return job.status
    outcome = _worker_failure(delivered[0] if delivered else None, started=False)
    return _finish(job, outcome, JobStatus.FAILED)


def _job_end(
    start: _Start,
    prompt: str,
    spec: dict | None,
    delivered: list,
    *,
    engine_first: bool,
    deadline: float,
    limit_s: float,
) -> tuple[Job, Outcome, str] | None:
    """Run the job: how it ended (the job, what to bill, its status), or None if it could
    not be started. What the engine answered goes in `delivered` as soon as it has.
    `engine_first`: sent to the engine before it is started (ENGINE_FIRST_WITHIN_S);
    `deadline` (time.monotonic()): its run limit, `limit_s` long."""
    if engine_first:
        job = job_from_engine_spec(start.job_pk, spec)
        model, urls = spec["triton_model"], spec["pools"]
        metrics = spec.get("metrics") or [()] * len(urls)
    elif start():
        job = start.job
        model = job.model.triton_model
        pools = pools_for_job(job=job)
        urls = [pool.grpc_urls for pool in pools]
        metrics = [pool.metrics_urls for pool in pools]
    elif start.relayed is not None:
        return _relayed_before(*start.relayed, prompt=prompt)
    else:
        return None
    engines = [
        triton.pool_for(
            tuple(grpc),
            model,
            metrics_urls=metrics_urls,
            timeout_s=settings.INFERENCE_ENGINE_TIMEOUT_SECONDS,
        )
        for grpc, metrics_urls in zip(urls, metrics, strict=True)
    ]
    first_token: list[datetime] = []

    relay_lost: list[RedisError] = []
    progress = _Progress(job.public_id) if job.kind == "async" else None

    def on_delta(text: str) -> None:
        # An asynchronous job is streamed from the engine too (_engine_request):
        # its first token is stamped, and its progress told to whoever polls it.
        if not first_token:
            first_token.append(timezone.now())
        if progress is not None:
            progress.add(text, first_token[0])
        if job.stream and not relay_lost:
            try:
                relay_publish(job.public_id, {"type": "delta", "text": text})
            except RedisError as exc:
                # Nobody can read the rest: the engine is stopped and the job
                # settles for what it produced. Raised here, it would leave the
                # job unsettled (and its tokens unbilled) until its hold expired.
                logger.warning("job %s: its tokens cannot be relayed (%r); stopping it", job, exc)
                relay_lost.append(exc)
                cancel.set()

    # Set by POST /api/v1/jobs/{id}/cancel, or by the API process when a
    # streaming client goes away or a waiting one times out; for a streamed
    # job, also when its API process stopped reading it (died), if that
    # process renews its reader marker (job_engine_spec's `reader`).
    reader = job.stream and spec is not None and spec.get("reader", False)
    with relay_cancel_watch(job.public_id, reader=reader) as cancel:
        if getattr(job, "restarted", False):
            # A job cancelled while running whose task came back (its worker
            # died): the watcher would see it only after the prompt was sent.
            origin = relay_cancel_requested(job.public_id)
            if origin is not None:
                cancel.set_by(origin)
        result = _generate(
            engines,
            _engine_request(job, prompt),
            on_delta=on_delta,
            cancel=cancel,
            start=start if engine_first else None,
            deadline=deadline,
        )
    delivered.append(result)
    if engine_first:
        # Started while the engine worked; or never sent (no server took it,
        # or the job had ended: its request was abandoned): start it now.
        if start.job is None and not start.ended and start.relayed is None:
            start()
        if start.relayed is not None:  # its request was abandoned before any response
            return _relayed_before(*start.relayed, prompt=prompt)
        if start.job is None:
            return None
        job = start.job
    if isinstance(result, triton.TritonError):
        outcome, status = _failure_outcome(result), JobStatus.FAILED
        if isinstance(result, triton.DeadlineExceeded):
            outcome = _past_deadline(job, prompt, result, outcome, limit_s)
    elif _timed_out_untold(result, cancel):
        outcome, status = _gateway_timeout(result), JobStatus.FAILED
    else:
        outcome = _result_outcome(job, prompt, result)
        cancelled = result.finish_reason == "cancelled"
        status = JobStatus.CANCELED if cancelled else JobStatus.SUCCEEDED
    if first_token:
        outcome = replace(outcome, first_token_at=first_token[0])
    return job, outcome, status


def _finish(job: Job, outcome: Outcome, status: str) -> str:
    """Settle the job and relay its final event; the job's status."""
    return _settled(job, outcome, status).status


def _settled(job: Job, outcome: Outcome, status: str, *, tell_if_ended: bool = True) -> Job:
    """Settle the job and relay its final event; the job as it ended (`settled_here`).
    Without `tell_if_ended`, a job another settlement ended is not told again."""
    # The reservations' release and the final event go to Redis together;
    # the release is sent even if building the final event fails.
    pipe = get_redis().pipeline(transaction=False)
    try:
        job = _settle(job=job, outcome=outcome, status=status, pipe=pipe)
        if tell_if_ended or job.settled_here:
            relay_publish(job.public_id, _final_event(job, outcome), pipe=pipe)
        # Settled and answered: the run's lease goes in the same round trip.
        relay_run_lease_release(pipe)
    finally:
        _send(pipe)
    return job


# What a job not streamed, or whose stream holds no delta, relayed; and what one whose
# relay cannot be read is taken to have: not known, so billed as nothing.
_NOTHING = Relayed("", 0)


def _relayed_text(job: Job) -> Relayed | None:
    """What the relay holds of a restarted streamed job's text (None: nothing yet)."""
    try:
        return relay_relayed_text(job.public_id)
    except RedisError as exc:
        # Not knowing what its client was sent, the job must not stream into
        # it again: it ends as if some was (and Redis failing, its run could
        # not have relayed anything anyway).
        logger.warning("job %s: its relay cannot be read (%r); not running it again", job, exc)
        return _NOTHING


def _relayed_before(
    job: Job, relayed: Relayed, *, prompt: str | None = None
) -> tuple[Job, Outcome, str]:
    """End a job whose worker died after relaying `relayed` (its text streamed so far, ""
    if none or not known, and the delta events that carried it): not run again. For a
    streamed job whose task came back, and for any job the orphaned jobs' sweep ends
    (jobs_orphaned_sweep).

    A second run would generate from the start into the stream its client is
    still reading, which would get the text twice (the part, then all of
    it). It ends failed (`worker_lost`), its final event an error the API
    ends the client's stream with, after the text already relayed, as any
    stream failing after its first tokens ends (apis.sse_end): its choice
    ended "length", the code in its last chunk's gym.error, then OpenAI's
    error event.

    Billed for what its client got, as a cancelled stream is: the engine's
    counts rode on its responses, which died with the worker, and the relay
    carries text, not counts (counts on every token of every stream would
    cost every job for a rare crash). So the relayed text's tokens and the
    prompt are counted by the model's tokenizer, as a prompt the engine never
    counted is (_with_untold_prompt, `tokenizer` as the source); at most
    max_tokens of output, and at most one a delta event relayed (each carried
    at least one of the engine's tokens): a tokenizer's count of decoded text
    may exceed the engine's (a U+FFFD for a partial character re-encodes to
    several tokens); and never more than the hold (job_settle). Once: job_settle
    claims an open job only, so a redelivered message and a sweep that both
    get here settle it once.

    `prompt`: the job's text, which only its task message carries (or its row,
    where the organization stores prompts: Organization.store_prompts); a
    caller without it (the sweep, which has no message) bills the relayed
    output alone, and the job says its prompt was unmetered.
    Without a tokenizer in the catalog nothing can be counted: nothing billed
    (`unmetered`), as for an untold prompt; its final event then says 0 output
    tokens, so its client's stream ends as one failing before any token does
    (apis.sse_end), after the text relayed.

    This takes precedence over a cancel the job's key holds (tasks._job_end reads
    the relay first): the gateway's timeout (CancelOrigin.GATEWAY_TIMEOUT), set
    when a stream's reader stopped hearing from the dead worker, would otherwise
    end it `engine_timeout`, unbilled, saying the model never answered, though
    its client was streamed part of the answer.
    """
    prompt = prompt or job.prompt or None
    text = relayed.text
    outcome = Outcome(text=text, finish_reason="error", error_code="worker_lost")
    # Nothing relayed ("": a job not streamed, a stream that had sent nothing
    # yet, or a relay that could not be read) is not known to have reached its
    # client: a failure before any token, billed nothing.
    counted = output_tokens_count(model=job.model, text=text) if text else None
    if counted is not None:
        output_tokens = min(counted, relayed.deltas, job.params["max_tokens"])
        outcome = replace(outcome, output_tokens=output_tokens)
        if prompt is not None:
            outcome = _with_untold_prompt(job, prompt, outcome)
            charged = (
                f"it was charged for the {outcome.output_tokens} output and "
                f"{outcome.input_tokens} prompt tokens streamed, counted by the model's tokenizer"
            )
        else:
            outcome = replace(outcome, input_tokens_source=InputTokensSource.UNMETERED)
            charged = (
                f"it was charged for the {outcome.output_tokens} output tokens streamed, counted "
                "by the model's tokenizer (its prompt was not kept, so not counted)"
            )
    else:
        if text:  # served, but the catalog has no tokenizer to count it with
            outcome = replace(outcome, input_tokens_source=InputTokensSource.UNMETERED)
        charged = "nothing was charged"
    what = "stopped after streaming part of the answer, which cannot be streamed again"
    outcome = replace(
        outcome,
        error_message=(
            f"The worker running this job {what if text else 'was lost'}; {charged}. "
            "Send the request again."
        ),
    )
    logger.warning("job %s: its worker died (relayed %d characters); ending it", job, len(text))
    return job, outcome, JobStatus.FAILED


def jobs_orphaned_sweep(*, now: datetime | None = None) -> int:
    """End the running jobs whose run is gone and whose message is not coming back: failed,
    `worker_lost`, billed for the text a stream had relayed, nothing else (_relayed_before);
    returns how many it ended.

    Such a job's worker died and its message was not handed back (it had
    failed for good: a settlement the database kept failing under; or the
    broker lost it), so nothing else ends it before its hold expires (an
    hour), its credits held and its concurrency slot taken meanwhile, and a
    waiting stream left without its end. A job is an orphan once its current
    run has lasted longer than INFERENCE_ORPHAN_GRACE_SECONDS (a dead worker's
    message is back and run by then, settings/base.py) and no run held its
    lease (relay_run_lease: every run takes it before it starts the job and
    keeps it until it has settled) at two sweeps in a row; or, its lease
    missing as well, once its hold expires within ORPHAN_HOLD_MARGIN_S
    (_orphans_due): a run restarted late in its hold's life is still in its
    grace then, and the hold's expiry would end it unbilled.

    From the current run's start (run_started_at, job_start), not the first:
    a job run again after its whole worker died (its message back after the
    visibility timeout) is past its first start's grace for all its new run,
    which only its lease then protected. And at two sweeps: a live run whose
    lease lapsed (Redis failed, or lost its keys) takes it back within
    RUN_LEASE_RENEW_S of Redis answering again (_RENEW), so one sighting of
    it missing is not enough to end a job (ORPHAN_CONFIRM_S).

    The sweep takes the job's lease itself before it ends it, without
    waiting (a held lease: a run is alive, or died less than RUN_LEASE_S ago,
    for the next sweep), and keeps it until it has settled: a message that
    comes back meanwhile waits for it, then finds the job ended (job_start)
    and runs nothing; a sweep beside it gets no lease and leaves the job.
    Settlement is once in any case (job_settle's claim). Redis failing, the
    sweep ends nothing: it cannot tell a live run from a dead one.

    Jobs are read in pages by primary key, each page after the last one read
    (a keyset): the jobs a sweep leaves (live runs, first sightings, jobs whose
    settlement raised) never keep it from those after them. Past its cap
    (ORPHANS_PER_SWEEP ended), it reads the rest only to note their sightings
    and keep them alive (one round trip a page), so each is ended at its turn.
    """
    now = now or timezone.now()
    # Each sighting is stamped when its lease is checked, not when the sweep
    # began: one that took long over its pages would else note the jobs it
    # came to last as found missing earlier than they were.
    began = time.monotonic()

    def at() -> float:
        return now.timestamp() + (time.monotonic() - began)

    running = _orphans_due(now)
    ended, after = 0, 0
    while True:
        page = list(
            running.filter(pk__gt=after)
            .order_by("pk")
            .values_list("pk", flat=True)[:ORPHANS_PER_SWEEP]
        )
        try:
            for i, pk in enumerate(page):
                if ended >= ORPHANS_PER_SWEEP:
                    # The cap is reached: the rest are only looked at, their
                    # sightings noted and kept alive, so that an orphan a mass
                    # failure left behind the cap is confirmed at its turn,
                    # not sighted a first time then because its sighting lapsed.
                    relay_run_lease_missing_note(page[i:], now=at(), ttl_s=ORPHAN_SIGHTING_TTL_S)
                    break
                try:
                    if _orphan_sweep_one(pk, now=at(), running=running):
                        ended += 1
                except RedisError:
                    raise
                except Exception:  # the next job, and the next sweep, go on
                    logger.exception("job pk=%s: could not end it as orphaned", pk)
        except RedisError as exc:
            logger.warning("orphaned jobs not swept: Redis is failing (%r)", exc)
            return ended
        if len(page) < ORPHANS_PER_SWEEP:
            break
        after = page[-1]
    return ended


def _orphans_due(now: datetime):
    """The running jobs the sweep looks at: past the grace, or whose hold expires soon.

    A run that started late in its hold's life (a restart after its whole
    worker died: its message back after the visibility timeout) is still in
    its grace when its hold expires; orphaned, the hold's expiry would end it
    `expired`, unbilled for what it relayed. So a job whose hold expires
    within ORPHAN_HOLD_MARGIN_S is past its grace too (its lease still
    missing at two sightings): ended `worker_lost`, billed, before then.
    """
    cutoff = now - timedelta(seconds=settings.INFERENCE_ORPHAN_GRACE_SECONDS)
    expiring = Hold.objects.filter(
        key=OuterRef("public_id"),
        status=HoldStatus.PENDING,
        expires_at__lt=now + timedelta(seconds=ORPHAN_HOLD_MARGIN_S),
    )
    return (
        Job.objects.alias(run_start=job_run_start())
        .filter(status=JobStatus.RUNNING)
        .filter(Q(run_start__lt=cutoff) | Q(Exists(expiring)))
    )


# At most this many ended a sweep (a minute): after a mass failure the rest go
# the next minutes, each sweep's work bounded. Also the page the sweep reads
# running jobs by.
ORPHANS_PER_SWEEP = 200
# The beat's interval between two sweeps (the inference-orphaned-jobs-sweep entry's).
ORPHAN_SWEEP_EVERY_S = settings.INFERENCE_ORPHAN_SWEEP_SECONDS
# A job's lease found missing is confirmed missing by a sweep at least this
# long after the first sighting (a beat's task run late and the next on time
# may come seconds apart), far more than a live run takes to take its lease
# back once Redis answers (RUN_LEASE_RENEW_S). A sighting is forgotten when
# the lease is found held, and lapses a little over two sweeps after it was
# made: a sweep missed in between (beat down) still confirms it.
ORPHAN_CONFIRM_S = ORPHAN_SWEEP_EVERY_S / 2
ORPHAN_SIGHTING_TTL_S = 2.5 * ORPHAN_SWEEP_EVERY_S
# A job whose hold expires within this long is due as if past its grace: two
# sweeps to confirm its lease missing, one more for a late or missed beat, and
# it is ended before the hold's expiry (metering's holds_expire, every minute)
# would end it `expired`, unbilled.
ORPHAN_HOLD_MARGIN_SWEEPS = 5
ORPHAN_HOLD_MARGIN_S = ORPHAN_HOLD_MARGIN_SWEEPS * ORPHAN_SWEEP_EVERY_S


def _orphan_sweep_one(pk: int, *, now: float, running) -> bool:
    """Look at one running job due (_orphans_due), its lease checked at `now` (a Unix
    time); whether this call ended it as orphaned."""
    with relay_run_lease(pk, wait=False, unleased=False) as leased:
        if not leased:  # a run holds it (or another sweep does)
            relay_run_lease_seen(pk)
            return False
        since = relay_run_lease_missing_since(pk, now=now, ttl_s=ORPHAN_SIGHTING_TTL_S)
        if now - since < ORPHAN_CONFIRM_S:
            return False  # the first sighting: let go of the lease, for a live run to take
        return _orphan_end(pk, running=running)


def _orphan_end(pk: int, *, running) -> bool:
    """End the orphaned job, its run lease held; whether this call ended it."""
    # Checked again under its lease, with its row: a job whose row is locked is
    # being settled right now (SKIP LOCKED), and is left to that settlement.
    with transaction.atomic():
        job = running.select_for_update(skip_locked=True, of=("self",)).filter(pk=pk).first()
    if job is None:
        return False
    # What its client was streamed, read as a restarted streamed job reads it
    # (a job not streamed relays nothing before its end).
    relayed = (_relayed_text(job) or _NOTHING) if job.stream else _NOTHING
    # No prompt here (only the task message carries it): billed by the row's,
    # where the organization keeps prompts, else the relayed output alone.
    job = _settled(*_relayed_before(job, relayed), tell_if_ended=False)
    return job.settled_here


# How often a running asynchronous job tells its progress (and at its first
# token): one Redis write a second at most, from the engine's thread.
PROGRESS_EVERY_S = 1.0


class _Progress:
    """What a running asynchronous job has generated so far, for GET /api/v1/jobs/{id}.

    Characters, not tokens: the deltas the engine streams are exact text, and
    the tokens billed are the engine's own count, known when the job ends. A
    Redis failure here is logged once and ignored: progress is advisory, and
    the job must not stop or go unbilled for it.
    """

    def __init__(self, public_id: str):
        self.public_id = public_id
        self.output_chars = 0
        self.told_at: float | None = None
        self.broken = False

    def add(self, text: str, first_token_at: datetime) -> None:
        self.output_chars += len(text)
        now = time.monotonic()
        if self.broken or (self.told_at is not None and now - self.told_at < PROGRESS_EVERY_S):
            return
        self.told_at = now
        try:
            relay_progress_set(
                self.public_id,
                {
                    "output_chars": self.output_chars,
                    "first_token_at": first_token_at.isoformat(),
                    "updated_at": timezone.now().isoformat(),
                },
            )
        except RedisError as exc:
            self.broken = True
            logger.warning("job %s: its progress cannot be told (%r)", self.public_id, exc)


# The pauses between tries of a settlement the database failed under (a
# restart, a failover, a dropped connection, a deadlock): about 15 s in all.
# A task that raised is not run again (acks_late hands back only the tasks
# of a worker that died), so without them the tokens served would go
# unbilled and the hold stay locked until it expired. After the last try
# the job is left to that expiry: it ends expired, nothing charged.
SETTLE_RETRY_PAUSES_S = (0.2, 1.0, 4.0, 10.0)


def _settle(*, job: Job, outcome: Outcome, status: str, pipe) -> Job:
    """job_settle, tried again while the database fails; it settles a job once however often
    it is called (a try whose commit went through and whose answer was lost is claimed, and
    the job's reservations released all the same: job_settle's `retried`).

    The job's catalog model and price are read here if its run could not read
    them (it failed as it read them, after the job started: _job_run)."""

    def settle(retried: bool) -> Job:
        if not Job.model.is_cached(job):
            job.model = catalog_model_by_id(job.model_id)
        if not Job.model_price.is_cached(job):
            job.model_price = model_price_by_id(job.model_price_id)
        return job_settle(job=job, outcome=outcome, status=status, pipe=pipe, retried=retried)

    return _db_retrying(settle, what=f"job {job}: its settlement")


def _db_retrying(call: Callable[[bool], T], *, what: str) -> T:
    """`call(retried)`, tried again on a new connection while the database fails under it
    (SETTLE_RETRY_PAUSES_S); `retried`: an earlier try raised. The last failure is raised."""
    pauses = iter(SETTLE_RETRY_PAUSES_S)
    retried = False
    while True:
        try:
            return call(retried)
        except (OperationalError, InterfaceError):
            retried = True
            pause = next(pauses, None)
            if pause is None:
                raise
            logger.warning("%s failed; trying again in %g s", what, pause, exc_info=True)
            connection.close()  # a broken connection: the next try opens a new one
            time.sleep(pause)


def _generate(
    engines: list[triton.ServerPool],
    request: triton.GenerationRequest,
    *,
    on_delta,
    cancel,
    start,
    deadline: float,
) -> triton.GenerationResult | triton.TritonError:
    """The request on the first pool that takes it (a dedicated pool, then the shared one):
    the next is tried only when no server of a pool took it, so nothing was delivered.
    `start` (engine-first) runs once, on the first send, whichever pool took it."""
    result: triton.GenerationResult | triton.TritonError
    for attempt, engine in enumerate(engines, 1):
        try:
            return engine.generate(
                request,
                on_delta=on_delta,
                cancel=cancel,
                after_send=start if start is not None and start.job is None else None,
                deadline=deadline,
            )
        except triton.EngineUnavailable as exc:
            result = exc
            if attempt < len(engines):
                logger.warning("%s; trying the next pool", exc)
        except triton.TritonError as exc:
            return exc
    return result


def _send(pipe) -> None:
    try:
        pipe.execute()
    except Exception:
        # The job is settled; what is lost is a concurrency slot until its
        # lease ends, a token refund, or the answer (the client times out).
        logger.exception("could not send a job's reservations release and final event")


def _engine_request(job: Job | EngineJob, prompt: str) -> triton.GenerationRequest:
    params = job.params
    return triton.GenerationRequest(
        prompt=prompt,
        max_tokens=params["max_tokens"],
        temperature=params.get("temperature"),
        top_p=params.get("top_p"),
        seed=params.get("seed"),
        # A job queued by a web process of a release before the penalties has none.
        presence_penalty=params.get("presence_penalty"),
        frequency_penalty=params.get("frequency_penalty"),
        stop=list(params.get("stop") or []),
        # An asynchronous job is streamed from the engine too, though nobody
        # reads its tokens: a cancellation then ends it between two tokens and
        # bills what was generated so far, where a single response would leave
        # nothing to bill. Not for the OpenAI endpoints' non-streamed answers:
        # on the CPU engine a response per token cost about 0.5 ms a token
        # (16 tokens: 2.5 -> 10 ms, README "Inference"), which they would pay
        # on every request for a cancellation they rarely use.
        stream=job.stream or job.kind == "async",
    )


def _timed_out_untold(result: triton.GenerationResult, cancel: CancelEvent) -> bool:
    """Whether the job was stopped by the gateway's own timeout before any token came.

    Its client was answered 504 `engine_timeout` with nothing (the gateway
    stopped waiting: INFERENCE_TIMEOUT_SECONDS), so nothing is billed, not
    even a prompt the engine took (as a failure before any response bills
    nothing): a wait in the engine's queue is ours. A client's cancel
    (CancelOrigin.CLIENT, and every cancel of a web process of a release
    before origins) bills as before; tokens delivered before the timeout (a
    stream) are billed as any cancel's.
    """
    return (
        result.finish_reason == "cancelled"
        and cancel.origin == CancelOrigin.GATEWAY_TIMEOUT
        and not result.output_tokens
        and not result.text
    )


def _gateway_timeout(result: triton.GenerationResult) -> Outcome:
    """The outcome of a job the gateway stopped waiting for before its first token: failed,
    `engine_timeout`, nothing charged; its engine time still counted as serving cost."""
    return Outcome(
        engine_ms=result.engine_ms,
        finish_reason="error",
        error_code="engine_timeout",
        error_message=(
            "The model did not answer before the gateway stopped waiting "
            "(INFERENCE_TIMEOUT_SECONDS); the job was stopped and nothing was charged."
        ),
        input_tokens_source=InputTokensSource.NONE,
    )


def _result_outcome(job: Job, prompt: str, result: triton.GenerationResult) -> Outcome:
    outcome = Outcome(
        text=result.text,
        input_tokens=result.input_tokens,
        cached_input_tokens=result.cached_input_tokens,
        output_tokens=result.output_tokens,
        engine_ms=result.engine_ms,
        finish_reason=result.finish_reason,
        input_tokens_source=InputTokensSource.ENGINE
        if result.input_tokens
        else InputTokensSource.NONE,
    )
    if result.sent and not result.input_tokens:
        outcome = _with_untold_prompt(job, prompt, outcome)
    return outcome


def _with_untold_prompt(job: Job, prompt: str, outcome: Outcome) -> Outcome:
    """The engine took the prompt but never counted it: bill it by the model's tokenizer.

    That is a request cancelled after it was sent and before its first
    response: the engine's counts ride on its responses and none came, yet it
    took the prompt (and through an ensemble goes on to generate). Where the
    catalog has no tokenizer the prompt is not billed, and the job says so
    ("unmetered"). Without this, cancelling before the first token would make
    any prompt free.
    """
    counted = prompt_tokens_count(model=job.model, prompt=prompt)
    if counted is None:
        logger.warning("job %s: prompt taken by the engine but not billed: no tokenizer", job)
        return replace(outcome, input_tokens_source=InputTokensSource.UNMETERED)
    return replace(outcome, input_tokens=counted, input_tokens_source=InputTokensSource.TOKENIZER)


def _past_deadline(
    job: Job, prompt: str, exc: triton.DeadlineExceeded, outcome: Outcome, limit_s: float
) -> Outcome:
    """A job ended at its run limit (job_run_limit) is billed as a cancelled one: what the
    engine delivered, and a prompt it took but never counted (by the model's tokenizer).

    Not as a failure of ours, which bills nothing before the first response:
    the run was as long as the request made it, and the engine worked on it
    all that time (its engine time is the whole run, delivered or not).
    """
    outcome = replace(outcome, engine_ms=max(outcome.engine_ms, exc.engine_ms))
    if exc.sent and not outcome.input_tokens:
        outcome = _with_untold_prompt(job, prompt, outcome)
    return replace(
        outcome,
        error_message=(
            f"The job ran longer than its limit of {limit_s:g} s and was stopped; it is "
            f"billed for what the engine took and delivered until then: "
            f"{outcome.input_tokens} prompt and {outcome.output_tokens} output tokens."
        ),
    )


def _failure_outcome(exc: triton.TritonError) -> Outcome:
    """What a failed request is billed: what the engine delivered before failing, if anything.

    A failure before any response bills nothing, not even a prompt the engine
    may have taken: the client gets only an error, and the failure is ours
    (unreachable, silent, crashed or refusing engine).
    """
    return _failed(exc.partial, code=exc.code, message=str(exc))


def _worker_failure(
    result: triton.GenerationResult | triton.TritonError | None, *, started: bool = True
) -> Outcome:
    """What a job whose run failed is billed (`worker_error`): what the engine delivered
    (`result`, None if it answered nothing), as a failed request is. `started`: the run
    failed after the job's start committed (else before: _unstarted_failed).

    The run failed on our side (the database or Redis under the worker, or a
    bug) before it could tell what the engine delivered its own way: its
    engine's own counts, never a prompt counted by the tokenizer, which is
    where such a run may have failed.
    """
    delivered = result.partial if isinstance(result, triton.TritonError) else result
    if delivered is None or not (delivered.input_tokens or delivered.output_tokens):
        charged = "nothing was charged"
    else:
        charged = (
            f"it was charged for what the engine delivered: {delivered.input_tokens} prompt "
            f"and {delivered.output_tokens} output tokens"
        )
    return _failed(
        delivered,
        code="worker_error",
        message=(
            f"The job failed on our side {'after it started' if started else 'as it started'}; "
            f"{charged}. Send the request again."
        ),
    )


def _failed(delivered: triton.GenerationResult | None, *, code: str, message: str) -> Outcome:
    """A failed job's outcome, billed for what the engine `delivered` (None: nothing)."""
    return Outcome(
        text=delivered.text if delivered else "",
        input_tokens=delivered.input_tokens if delivered else 0,
        cached_input_tokens=delivered.cached_input_tokens if delivered else 0,
        output_tokens=delivered.output_tokens if delivered else 0,
        engine_ms=delivered.engine_ms if delivered else 0,
        finish_reason="error",
        error_code=code,
        error_message=message,
        input_tokens_source=InputTokensSource.ENGINE
        if delivered and delivered.input_tokens
        else InputTokensSource.NONE,
    )


def _final_event(job: Job, outcome: Outcome) -> dict:
    """The relay's last event for this job: what the waiting API process answers with."""
    return job_final_event(job, text=outcome.text, finish_reason=outcome.finish_reason)


@worker_process_shutdown.connect
def _close_triton_streams(**_kwargs) -> None:
    # An open gRPC stream keeps a Triton server from shutting down; let go of
    # ours when the worker process exits.
    triton.close_pools()


# --- job callbacks (inference.services.callbacks) ----------------------------------
# Deliveries go through a queue of their own (CELERY_TASK_ROUTES), which a worker
# must consume (README, "Running the parts yourself"): an attempt waits on the
# customer's receiver for up to INFERENCE_CALLBACK_TIMEOUT_SECONDS, and receivers
# that are slow on purpose must hold up only other callbacks, not every tenant's
# inference jobs, Stripe events and hold expiry on the default queue. The sweep
# stays on the default queue: it only queues deliveries.
CALLBACK_QUEUE = "callbacks"


# Safe to run twice: a delivery claims its row at the attempt count it was
# queued with, so a duplicate finds it moved on. Retries live in the row
# (next_attempt_at), not in Celery.
@shared_task(ignore_result=True)
def job_callback_deliver_task(callback_id: int, attempts: int | None = None) -> None:
    job_callback_deliver(callback_id=callback_id, attempts=attempts)


@shared_task(ignore_result=True)
def job_callbacks_sweep_task() -> int:
    return job_callbacks_sweep()


# --- concurrency slots (inference.services.jobs.concurrency_slots_sweep) ------------
@shared_task(ignore_result=True)
def concurrency_slots_sweep_task() -> int:
    return concurrency_slots_sweep()


# --- orphaned jobs (jobs_orphaned_sweep) ---------------------------------------------
@shared_task(ignore_result=True)
def jobs_orphaned_sweep_task() -> int:
    return jobs_orphaned_sweep()
