"""Job callbacks: a signed webhook to the job's `callback_url` when it ends, at least once.

The shape is Stripe's and GitHub's:

- An outbox row (JobCallback) is written by `job_callback_record`, inside the
  transaction that moves the job to its final state (job_settle), with the
  event's id and exact body. After commit a Celery task delivers it; a lost
  message or a dead worker is made good by the beat sweep
  (`job_callbacks_sweep`), which queues every pending callback that is due.
- `job_callback_deliver` claims the row (attempts + 1, and a lease as its
  next due time, so a second task for it finds nothing to do), POSTs outside
  any transaction, and records the answer: a 2xx delivers it; anything else
  (3xx, 4xx, 5xx, timeout, refused address) is retried after
  RETRY_SCHEDULE's delay for that attempt, and after the last attempt the
  callback fails. Receivers see each event at least once, and tell repeats
  by `Gym-Event-Id`.
- Every attempt is signed afresh with the organization's webhook secret
  (`Gym-Signature: t=...,v1=...`, accounts.services.webhook_secrets) and says
  its number (`Gym-Delivery-Attempt`).
"""

from __future__ import annotations

import json
import secrets
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from accounts.services.webhook_secrets import webhook_signature_header, webhook_signing_secrets
from inference.callback_client import callback_post
from inference.models import CallbackStatus, Job, JobCallback

EVENT_TYPES = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "canceled": "job.canceled",
    "expired": "job.expired",
}
# The sweep queues at most this many due callbacks per run; the next run takes the rest.
SWEEP_BATCH = 1000


def retry_schedule() -> list[timedelta]:
    """The wait after each failed attempt; one attempt more than delays in all."""
    return [timedelta(seconds=s) for s in settings.INFERENCE_CALLBACK_RETRY_SCHEDULE_SECONDS]


def max_attempts() -> int:
    return len(settings.INFERENCE_CALLBACK_RETRY_SCHEDULE_SECONDS) + 1


def _lease() -> timedelta:
    # Longer than any attempt can take (callback_post cuts an attempt at its timeout,
    # however its receiver trickles): until then no other task may take the row.
    return timedelta(seconds=settings.INFERENCE_CALLBACK_TIMEOUT_SECONDS + 30)


def job_callback_record(*, job: Job, status: str) -> JobCallback | None:
    """Write the job's callback, if it asked for one, and deliver it after commit.

    Call inside the transaction that moves the job to `status` (a final
    state), after its row was updated: the body is the job as GET
    /api/v1/jobs/{id} shows it from then on. The job row lock held there
    makes this run once per job; the unique job column makes sure of it.
    """
    if not job.callback_url:
        return None
    # The API's own representation, so the webhook and GET never disagree. Imported
    # here: inference.apis imports the services.
    from inference.apis import JobOutput

    now = timezone.now()
    event_id = f"evt_{secrets.token_urlsafe(18)}"
    event_type = EVENT_TYPES[status]
    current = Job.objects.select_related("model").get(pk=job.pk)
    body = json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": int(now.timestamp()),
            "data": {"job": JobOutput(current).data},
        },
        separators=(",", ":"),
    )
    callback = JobCallback.objects.create(
        job_id=job.pk,
        organization_id=job.organization_id,
        event_id=event_id,
        event_type=event_type,
        url=job.callback_url,
        body=body,
        next_attempt_at=now,
    )
    from inference.tasks import job_callback_deliver_task

    # robust: with the broker down the job has still ended, and the sweep
    # delivers from the outbox row later; the caller must not see an error.
    transaction.on_commit(lambda: job_callback_deliver_task.delay(callback.pk, 0), robust=True)
    return callback


def job_callback_deliver(
    *, callback_id: int, now: datetime | None = None, attempts: int | None = None
) -> JobCallback | None:
    """Make the callback's next attempt if it is pending and due at `now`; None if not.

    With `attempts` (a queued delivery: the count when it was queued), the
    attempt is made if no other was made since, due or not: the sweep moves
    a row it queues out of the due ones for a lease (job_callbacks_sweep), and
    a duplicate message finds the count moved on.

    Never inside a transaction: the POST may take INFERENCE_CALLBACK_TIMEOUT_SECONDS,
    and no row may stay locked, nor a transaction open, that long.
    """
    if connection.in_atomic_block:
        raise RuntimeError("job_callback_deliver makes an HTTP call: never inside a transaction")
    now = now or timezone.now()
    with transaction.atomic():
        callback = (
            JobCallback.objects.select_for_update(skip_locked=True, of=("self",))
            .select_related("organization")
            .filter(pk=callback_id, status=CallbackStatus.PENDING)
            .filter(Q(attempts=attempts) if attempts is not None else Q(next_attempt_at__lte=now))
            .first()
        )
        if callback is None:
            return None  # delivered, failed, not yet due, or another task has it
        attempt = callback.attempts + 1
        JobCallback.objects.filter(pk=callback.pk).update(
            attempts=attempt, last_attempt_at=now, next_attempt_at=now + _lease()
        )

    body = callback.body.encode()
    timeout = float(settings.INFERENCE_CALLBACK_TIMEOUT_SECONDS)
    headers = {
        "Gym-Event-Id": callback.event_id,
        "Gym-Delivery-Attempt": str(attempt),
    }
    try:
        signing_secrets = webhook_signing_secrets(organization=callback.organization, now=now)
    except Exception as exc:  # an unreadable secret: retried like a receiver that failed
        answer_status, answer_error = None, f"cannot sign: {exc}"[:500]
    else:
        # The signature's time is the wall clock's: receivers compare it with theirs.
        headers["Gym-Signature"] = webhook_signature_header(
            signing_secrets=signing_secrets, timestamp=int(time.time()), body=body
        )
        answer = callback_post(url=callback.url, body=body, headers=headers, timeout=timeout)
        if answer.ok:
            JobCallback.objects.filter(
                pk=callback.pk, status=CallbackStatus.PENDING, attempts=attempt
            ).update(
                status=CallbackStatus.DELIVERED,
                delivered_at=now,
                next_attempt_at=None,
                last_status_code=answer.status_code,
                last_error="",
            )
            callback.refresh_from_db()
            return callback
        answer_status, answer_error = (
            answer.status_code,
            answer.error or f"HTTP {answer.status_code}",
        )

    if attempt >= max_attempts():
        changes = {"status": CallbackStatus.FAILED, "next_attempt_at": None}
    else:
        changes = {"next_attempt_at": now + retry_schedule()[attempt - 1]}
    # Only if the row is still ours: a task that outlived its lease records nothing.
    JobCallback.objects.filter(
        pk=callback.pk, status=CallbackStatus.PENDING, attempts=attempt
    ).update(last_status_code=answer_status, last_error=answer_error[:500], **changes)
    callback.refresh_from_db()
    return callback


def job_callbacks_due(*, now: datetime | None = None, limit: int = SWEEP_BATCH) -> list[int]:
    """Ids of pending callbacks due at `now`, oldest due first."""
    now = now or timezone.now()
    return list(
        JobCallback.objects.filter(status=CallbackStatus.PENDING, next_attempt_at__lte=now)
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:limit]
    )


# Takes the due rows out of the due ones for a lease, in one statement, and says
# which they were and how many attempts each had: the sweep queues each once,
# not again every run while its message waits in the queue.
_SWEEP_CLAIM = """
UPDATE inference_jobcallback SET next_attempt_at = %(until)s
 WHERE id IN (
    SELECT id FROM inference_jobcallback
     WHERE status = %(pending)s AND next_attempt_at <= %(now)s
     ORDER BY next_attempt_at
     LIMIT %(limit)s
       FOR UPDATE SKIP LOCKED)
RETURNING id, attempts
"""


def job_callbacks_sweep(*, now: datetime | None = None) -> int:
    """Queue a delivery for every due callback (beat runs it every few seconds).

    A queued row is due again only after a lease: if its message is lost, the
    sweep queues it again then.
    """
    from inference.tasks import job_callback_deliver_task

    now = now or timezone.now()
    params = {
        "until": now + _lease(),
        "pending": CallbackStatus.PENDING,
        "now": now,
        "limit": SWEEP_BATCH,
    }
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(_SWEEP_CLAIM, params)
        claimed = cursor.fetchall()
    for callback_id, attempts in claimed:
        job_callback_deliver_task.delay(callback_id, attempts)
    return len(claimed)
