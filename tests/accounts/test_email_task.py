"""Email goes out from a Celery task (accounts.tasks.email_send_task), which tries again
while the mail server refuses for now, and gives up at once when it refuses for good.

The mail servers here are Django email backends of the test's own (EMAIL_BACKEND, the
one client of the mail server): no SMTP server can be told to answer 421 or 550 on cue
here. They record what they accept in django.core.mail.outbox, as the tests' locmem one.
"""

from __future__ import annotations

import smtplib

import pytest
from django.core import mail
from django.core.mail.backends.locmem import EmailBackend as LocmemBackend

from accounts.services.mail import email_send_on_commit
from accounts.tasks import EMAIL_MAX_RETRIES, email_retry_wait

pytestmark = pytest.mark.django_db

BODY = "Set a new password: https://gym.example.test/password-reset/MQ/secret-token/\n"


class ScriptedServer(LocmemBackend):
    """A mail server answering each attempt from `answers` (an SMTP code; 250 accepts),
    then accepting; `attempts` counts the attempts."""

    answers: list[int] = []
    attempts = 0

    def send_messages(self, messages):
        ScriptedServer.attempts += 1
        code = ScriptedServer.answers.pop(0) if ScriptedServer.answers else 250
        if code != 250:
            raise smtplib.SMTPDataError(code, b"scripted answer")
        return super().send_messages(messages)


@pytest.fixture
def server(settings):
    settings.EMAIL_BACKEND = f"{__name__}.ScriptedServer"
    ScriptedServer.answers, ScriptedServer.attempts = [], 0
    return ScriptedServer


def test_an_email_the_server_refuses_for_now_is_sent_on_a_later_attempt(server, commit_then_mail):
    # given a mail server that is busy (421) for two attempts
    server.answers = [421, 421]

    # when an email is sent
    with commit_then_mail():
        email_send_on_commit(to="ada@example.test", subject="Your link", body=BODY)

    # then it arrives once, on the third attempt
    [message] = mail.outbox
    assert (message.to, message.body, server.attempts) == (["ada@example.test"], BODY, 3)


def test_an_email_the_server_refuses_for_good_is_logged_and_not_tried_again(
    server, commit_then_mail, caplog
):
    # given a mail server that refuses the message (550: no such mailbox)
    server.answers = [550]

    with commit_then_mail():
        email_send_on_commit(to="nobody@example.test", subject="Your link", body=BODY)

    # then nothing is sent, the operator's log says what was not, and it was tried once
    assert mail.outbox == []
    assert "could not send 'Your link' to nobody@example.test after 1 attempts" in caplog.text
    assert server.attempts == 1


def test_a_mail_server_down_for_good_is_given_up_after_the_last_retry(
    server, commit_then_mail, caplog
):
    server.answers = [421] * (EMAIL_MAX_RETRIES + 5)

    with commit_then_mail():
        email_send_on_commit(to="ada@example.test", subject="Your link", body=BODY)

    assert mail.outbox == []
    assert server.attempts == EMAIL_MAX_RETRIES + 1
    assert f"after {EMAIL_MAX_RETRIES + 1} attempts" in caplog.text


def test_the_queued_message_shows_no_body_to_logs_and_monitors(
    django_capture_on_commit_callbacks, email_worker
):
    # when an email is queued
    with django_capture_on_commit_callbacks(execute=True):
        email_send_on_commit(to="ada@example.test", subject="Your link", body=BODY)

    # then the message carries the body for the worker, and shows only its address and
    # subject (Celery's kwargsrepr: what worker logs, events and monitors print)
    [(headers, kwargs)] = email_worker.take_messages()
    assert kwargs == {"to": "ada@example.test", "subject": "Your link", "body": BODY}
    assert "secret-token" not in headers["kwargsrepr"] + headers["argsrepr"]
    assert "ada@example.test" in headers["kwargsrepr"]


def test_the_waits_between_attempts_double_and_stay_inside_the_visibility_timeout(settings):
    # (A message a worker holds for later past the broker's visibility timeout is handed
    # to another worker as well: the email would go twice.)
    waits = [email_retry_wait(retries) for retries in range(EMAIL_MAX_RETRIES)]
    assert waits == [30, 60, 120, 240, 480, 600, 600, 600, 600, 600]

    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 300}
    assert max(email_retry_wait(retries) for retries in range(EMAIL_MAX_RETRIES)) == 150
