"""Celery tasks of accounts: the API's periodic housekeeping (CELERY_BEAT_SCHEDULE), and
sending email (accounts.services.mail)."""

from __future__ import annotations

import logging
import smtplib

from celery import shared_task
from django.conf import settings

from accounts.idempotency import idempotency_purge
from accounts.services.mail import email_send

logger = logging.getLogger(__name__)

# The queue email goes through (CELERY_TASK_ROUTES): a mail server that is slow or down
# holds up only email, never billing or inference tasks. Some worker must consume it
# (README, "Running the parts yourself"), or email waits there unsent.
EMAIL_QUEUE = "email"
# A mail server that is down or refuses for now (a 4xx answer, a dropped connection) is
# tried again after 30 s, then each wait doubles, up to 10 minutes: about an hour in
# all. No wait may reach the Redis broker's visibility timeout
# (CELERY_VISIBILITY_TIMEOUT_SECONDS): a message a worker holds for later past it is
# handed to another worker as well, and the email sent twice (email_retry_wait).
EMAIL_RETRY_FIRST_SECONDS = 30
EMAIL_RETRY_LONGEST_SECONDS = 600
EMAIL_MAX_RETRIES = 10


def email_shown(*, to: str, subject: str) -> str:
    """What Celery shows of an email's message (worker logs, events, monitors) in place
    of its arguments: not the body, whose links hold reset and verification tokens."""
    return repr({"to": to, "subject": subject})


def email_retry_wait(retries: int) -> int:
    """Seconds before the attempt after `retries` retries: doubling from the first wait,
    at most the longest, and at most half the broker's visibility timeout."""
    visibility = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get("visibility_timeout", 3600)
    return min(EMAIL_RETRY_FIRST_SECONDS * 2**retries, EMAIL_RETRY_LONGEST_SECONDS, visibility // 2)


@shared_task
def idempotency_purge_task() -> int:
    return idempotency_purge()


def _refused_for_good(exc: OSError) -> bool:
    """A 5xx answer (a mailbox that does not exist, a sender refused, failed
    authentication): the same message would be refused again."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code >= 500
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(code >= 500 for code, _ in exc.recipients.values())
    return False


# Delivery is at least once (late acknowledgement): a worker lost after the server took
# the message and before the acknowledgement sends it again. For these emails (a link,
# a notice) a second copy is the lesser harm than none.
@shared_task(bind=True, ignore_result=True, max_retries=EMAIL_MAX_RETRIES)
def email_send_task(self, *, to: str, subject: str, body: str) -> None:
    try:
        email_send(to=to, subject=subject, body=body)
    except OSError as exc:  # smtplib's errors, and the network's
        attempts = self.request.retries + 1
        if _refused_for_good(exc) or self.request.retries >= self.max_retries:
            logger.error(
                "could not send %r to %s after %d attempts: %r", subject, to, attempts, exc
            )
            return
        wait = email_retry_wait(self.request.retries)
        logger.warning(
            "could not send %r to %s (attempt %d), again in %d s: %r",
            subject,
            to,
            attempts,
            wait,
            exc,
        )
        raise self.retry(
            exc=exc, countdown=wait, kwargsrepr=email_shown(to=to, subject=subject)
        ) from None
