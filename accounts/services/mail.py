"""Email the app sends people: invitations, verification links, password resets, the
notice to an address someone tried to sign up with.

A request only queues the email, once its transaction commits (nothing is mailed
about a row that was rolled back): a Celery worker sends it (accounts.tasks.
email_send_task, on the `email` queue) through the backend EMAIL_URL configures. So no
request waits on a mail server, and none takes longer because the address it was
given has an account (the pages that take an address answer alike either way: a
response time that told them apart would tell who has an account). The task carries
the rendered message: it reads nothing back, so what it sends is what the request
committed to. A mail server that refuses or is down does not turn the committed
change into an error page: the worker tries again a while (accounts.tasks), then logs
the failure for the operator, and the person can ask again (a verification link, a
reset) or be invited again once the invitation is revoked or expires.
"""

from __future__ import annotations

import logging
from urllib.parse import urlencode

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.urls import reverse

logger = logging.getLogger(__name__)


def site_link(url_name: str, **query: str) -> str:
    """The absolute link to a page for an email: SITE_URL (never the Host header a
    request came with), the page's path, and `query`."""
    link = f"{settings.SITE_URL.rstrip('/')}{reverse(url_name)}"
    return f"{link}?{urlencode(query)}" if query else link


def email_send(*, to: str, subject: str, body: str) -> None:
    """Send one email now, or raise the mail server's error (an OSError: smtplib's
    errors are). The email task's work: nothing a request runs calls it."""
    send_mail(subject=subject, message=body, from_email=None, recipient_list=[to])


def email_send_on_commit(*, to: str, subject: str, body: str) -> None:
    """Queue the email for the worker once the caller's transaction commits."""

    def enqueue() -> None:
        # Imported here: the task module imports this one.
        from accounts.tasks import email_send_task, email_shown

        try:
            email_send_task.apply_async(
                kwargs={"to": to, "subject": subject, "body": body},
                kwargsrepr=email_shown(to=to, subject=subject),
            )
        except Exception:  # the broker unreachable: the change stands, as above
            logger.exception("could not queue %r to %s", subject, to)

    transaction.on_commit(enqueue)
