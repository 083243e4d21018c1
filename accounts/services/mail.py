"""Email the app sends people: invitations, verification links.

Sent once the caller's transaction commits (nothing is mailed about a row that
was rolled back), through the backend EMAIL_URL configures. A mail server that
refuses or is down does not turn the committed change into an error page: the
failure is logged for the operator, and the person can ask again (a verification
link) or be invited again once the invitation is revoked or expires.
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


def email_send_on_commit(*, to: str, subject: str, body: str) -> None:
    def send() -> None:
        try:
            send_mail(subject=subject, message=body, from_email=None, recipient_list=[to])
        except Exception:  # an SMTP error of any kind, or the network's
            logger.exception("could not send %r to %s", subject, to)

    transaction.on_commit(send)
