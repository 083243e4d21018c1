"""System checks of the inference settings (`python manage.py check`; migrate and runserver
run them too): a run limit that would fail every job, or that is capped without saying so,
a broker that would hand a job back while it runs, or too late for it to start, an
answer that may outlast its Idempotency-Key's lock, and an orphaned jobs' grace that would
end a dead worker's jobs before their message comes back (its grace, or a sweep so slow that
its hold-expiry margin comes first), or never before their hold expires."""

from __future__ import annotations

import math

from django.conf import settings
from django.core.checks import Error, Tags, register
from django.core.checks import Warning as CheckWarning


@register(Tags.compatibility)
def job_run_limit_check(app_configs, **kwargs) -> list:
    from inference.services.jobs import job_run_limit

    wanted = settings.INFERENCE_JOB_DEADLINE_SECONDS
    if wanted <= 0:
        return [
            Error(
                f"INFERENCE_JOB_DEADLINE_SECONDS is {wanted:g}: every job would be stopped as "
                "it starts.",
                hint="Set it to the seconds a job may run (default 300); there is no 'off'.",
                id="inference.E001",
            )
        ]
    allowed = job_run_limit()
    if wanted > allowed:
        hold_ttl = int(settings.METERING_HOLD_TTL.total_seconds())
        return [
            CheckWarning(
                f"INFERENCE_JOB_DEADLINE_SECONDS is {wanted:g}, but jobs run at most "
                f"{allowed:g} s: a quarter of METERING_HOLD_TTL_SECONDS ({hold_ttl}), so that "
                "a job settles before its hold expires.",
                hint=f"Raise METERING_HOLD_TTL_SECONDS to at least {math.ceil(4 * wanted)} (four "
                "runs), or leave it unset: it then follows the run limit (six runs, at least an "
                "hour).",
                id="inference.W001",
            )
        ]
    return []


@register(Tags.compatibility)
def stream_reader_ttl_check(app_configs, **kwargs) -> list:
    """A streamed job's reader marker (inference.relay) must outlive the reads that renew it:
    else every stream's worker cancels its job as it finds the marker gone."""
    ttl = settings.INFERENCE_STREAM_READER_TTL_SECONDS
    if ttl >= 1:
        return []
    return [
        Error(
            f"INFERENCE_STREAM_READER_TTL_SECONDS is {ttl:g}: streams whose client still reads "
            "them would be cancelled (a web process under load renews the marker less often).",
            hint="Set it to a few seconds (default 5): how long a stream nobody reads any more "
            "may run on, and be billed, before its worker cancels it.",
            id="inference.E002",
        )
    ]


# Brokers served by kombu's Redis transport, whose visibility timeout hands back
# the messages of a worker that vanished.
REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")


@register(Tags.compatibility)
def broker_visibility_check(app_configs, **kwargs) -> list:
    """On a Redis broker a message whose worker vanished comes back after the visibility
    timeout: it must not come back while its job may still run and settle (the start
    margin), and must come back early enough for the job to start."""
    from inference.services.jobs import JOB_START_MARGIN, job_start_margin

    if settings.CELERY_BROKER_URL.split("://", 1)[0].lower() not in REDIS_SCHEMES:
        return []  # RabbitMQ hands a message back when its consumer's connection ends
    timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", 3600)
    margin = math.ceil(job_start_margin().total_seconds())
    hold_ttl = int(settings.METERING_HOLD_TTL.total_seconds())
    unset = "or leave CELERY_VISIBILITY_TIMEOUT_SECONDS and METERING_HOLD_TTL_SECONDS unset: "
    unset += "they then follow INFERENCE_JOB_DEADLINE_SECONDS."
    if timeout <= margin:
        return [
            CheckWarning(
                f"CELERY_VISIBILITY_TIMEOUT_SECONDS is {timeout}, but a job may run and settle "
                f"for {margin} s: the broker would hand a running job's message to another "
                "worker, which runs it again (it is billed once, the engine serves it twice).",
                hint=f"Raise it above {margin} s (three runs is the default), {unset}",
                id="inference.W002",
            )
        ]
    if timeout + margin >= hold_ttl:
        # The margin is capped at half the hold's life: with a longer life it
        # may grow to two runs, which the value named must leave room for.
        wanted = settings.INFERENCE_JOB_DEADLINE_SECONDS
        full_margin = max(JOB_START_MARGIN.total_seconds(), 2 * wanted)
        needed = max(timeout + math.ceil(full_margin) + 1, math.ceil(4 * wanted))
        return [
            CheckWarning(
                f"CELERY_VISIBILITY_TIMEOUT_SECONDS ({timeout}) and the start margin "
                f"({margin} s) add up to METERING_HOLD_TTL_SECONDS ({hold_ttl}) or more: the "
                "job of a worker that died comes back too late to start, and ends expired.",
                hint=f"Raise METERING_HOLD_TTL_SECONDS to at least {needed}, {unset}",
                id="inference.W003",
            )
        ]
    return []


@register(Tags.compatibility)
def orphan_grace_check(app_configs, **kwargs) -> list:
    """The orphaned jobs' sweep (inference.tasks.jobs_orphaned_sweep) ends a running job whose
    run lease is gone once its current run is INFERENCE_ORPHAN_GRACE_SECONDS old. A grace
    shorter than a Redis broker's visibility timeout ends a dead worker's job before its
    message comes back to run it again (failed, worker_lost, instead of served); one as
    long as a hold's life never ends a job before its hold's expiry does (expired,
    nothing billed, its stream left without its end). Warnings, not errors: no live run
    is ended either way (its lease keeps the sweep off), and nothing is billed twice."""
    from inference.tasks import ORPHAN_HOLD_MARGIN_SWEEPS

    grace = settings.INFERENCE_ORPHAN_GRACE_SECONDS
    hold_ttl = int(settings.METERING_HOLD_TTL.total_seconds())
    unset = "or leave it unset: it then follows CELERY_VISIBILITY_TIMEOUT_SECONDS."
    found = []
    if settings.CELERY_BROKER_URL.split("://", 1)[0].lower() in REDIS_SCHEMES:
        timeout = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", 3600)
        # A job whose hold expires within a few sweeps is ended as if past its grace
        # (tasks.ORPHAN_HOLD_MARGIN_S): a sweep so slow that this margin starts before
        # the broker hands a dead worker's message back ends that job first.
        sweep = settings.INFERENCE_ORPHAN_SWEEP_SECONDS
        margin = ORPHAN_HOLD_MARGIN_SWEEPS * sweep
        if hold_ttl - margin < timeout:
            found.append(
                CheckWarning(
                    f"INFERENCE_ORPHAN_SWEEP_SECONDS is {sweep}: the orphaned jobs' sweep "
                    f"ends a job whose hold expires within {ORPHAN_HOLD_MARGIN_SWEEPS} sweeps "
                    f"({margin} s), which with METERING_HOLD_TTL_SECONDS ({hold_ttl}) is "
                    f"before CELERY_VISIBILITY_TIMEOUT_SECONDS ({timeout}) hands a dead "
                    "worker's message back to run it again (failed, worker_lost, instead of "
                    "served).",
                    hint=(
                        "Lower it to at most "
                        f"{max(0, (hold_ttl - timeout) // ORPHAN_HOLD_MARGIN_SWEEPS)} (default "
                        "60), or raise METERING_HOLD_TTL_SECONDS."
                    ),
                    id="inference.W007",
                )
            )
        if grace < timeout:
            found.append(
                CheckWarning(
                    f"INFERENCE_ORPHAN_GRACE_SECONDS is {grace}, under "
                    f"CELERY_VISIBILITY_TIMEOUT_SECONDS ({timeout}): the orphaned jobs' sweep "
                    "ends the jobs of a worker that died (failed, worker_lost) before the "
                    "broker hands their messages back to run them again.",
                    hint=f"Raise it to at least {timeout} (the default adds one run), {unset}",
                    id="inference.W005",
                )
            )
    if grace >= hold_ttl:
        found.append(
            CheckWarning(
                f"INFERENCE_ORPHAN_GRACE_SECONDS ({grace}) is METERING_HOLD_TTL_SECONDS "
                f"({hold_ttl}) or more: a job whose worker vanished ends expired with its "
                "hold, unbilled, before the orphaned jobs' sweep would end it.",
                hint=f"Lower it below {hold_ttl}, or raise METERING_HOLD_TTL_SECONDS, {unset}",
                id="inference.W006",
            )
        )
    return found


@register(Tags.compatibility)
def idempotency_lock_check(app_configs, **kwargs) -> list:
    """A request that is not streamed holds its Idempotency-Key while it waits for its job's
    answer (INFERENCE_TIMEOUT_SECONDS, then the read after its cancel); a key held longer
    than IDEMPOTENCY_LOCK_TIMEOUT is taken to be a dead request's, and a retry with it runs:
    a second job, charged, beside the first, which is still answered."""
    from inference.apis import FINAL_AFTER_CANCEL_WAIT_S

    lock = settings.IDEMPOTENCY_LOCK_TIMEOUT.total_seconds()
    # A minute's room for the rest of the request (the hold's lock, the database).
    longest = settings.INFERENCE_TIMEOUT_SECONDS + FINAL_AFTER_CANCEL_WAIT_S + 60
    if longest <= lock:
        return []
    return [
        CheckWarning(
            f"A request may wait about {longest:g} s for its answer "
            f"(INFERENCE_TIMEOUT_SECONDS {settings.INFERENCE_TIMEOUT_SECONDS} and a minute), "
            f"but IDEMPOTENCY_LOCK_TIMEOUT_SECONDS is {lock:g}: a retry with its "
            "Idempotency-Key then runs, and charges, a second job beside the first.",
            hint=f"Raise IDEMPOTENCY_LOCK_TIMEOUT_SECONDS to at least {math.ceil(longest)}, or "
            "lower INFERENCE_TIMEOUT_SECONDS.",
            id="inference.W004",
        )
    ]
