"""Email verification: a self-service account proves its address by the emailed link.

An account made by signing up is unverified until then, and nobody can add it to an
organization by its address (tests/accounts/test_members.py); every other way a user
is made (an operator's) is verified.
"""

from __future__ import annotations

import re
import socket
import time
from io import StringIO
from urllib.parse import parse_qs, urlsplit

import pytest
from django.core import mail, signing
from django.core.management import call_command
from django.test import Client

from accounts.models import User
from accounts.services.email_verification import EMAIL_VERIFICATION_SALT, EMAIL_VERIFICATION_TTL
from tests.dashboard.conftest import assert_refused

pytestmark = pytest.mark.django_db

PASSWORD = "a long and unusual passphrase 3"


def link_in(message) -> str:
    """The path and query of the verification link in an email."""
    found = re.search(r"https?://\S+/verify-email\?token=\S+", message.body)
    assert found, message.body
    parts = urlsplit(found[0])
    return f"{parts.path}?{parts.query}"


@pytest.fixture
def signed_up(client, commit_then_mail):
    """Someone who signed up through the form (signed in as nobody yet): the user, their
    link."""
    with commit_then_mail():
        response = client.post("/signup/", {"email": "Ada@Example.test", "password": PASSWORD})
    assert response.status_code == 302, response.content
    [message] = mail.outbox
    return User.objects.get(email="ada@example.test"), link_in(message)


def test_signing_up_makes_an_unverified_account_and_emails_it_a_link(signed_up):
    user, link = signed_up

    assert user.email_verified is False
    [message] = mail.outbox
    assert message.to == ["ada@example.test"]
    assert "verify" in message.subject.lower()
    assert link.startswith("/verify-email?token=")


def token_of(link: str) -> str:
    return parse_qs(urlsplit(link).query)["token"][0]


def test_signed_out_the_link_asks_for_the_password_then_verifies_and_signs_in(client, signed_up):
    # given the account that signed up, following its link signed out
    user, link = signed_up

    # when the link's page is opened, it asks for the account's password
    asked = client.get(link)
    assert asked.status_code == 200
    assert b"Verify <strong>ada@example.test</strong> and sign in" in asked.content
    assert b'name="password"' in asked.content

    # and when the password is given
    verified = client.post("/verify-email", {"token": token_of(link), "password": PASSWORD})

    # then the address is verified, and they are signed in, on the overview
    assert verified.status_code == 302 and verified["Location"] == "/dashboard/"
    user.refresh_from_db()
    assert user.email_verified is True
    assert client.session["_auth_user_id"] == str(user.pk)
    overview = client.get("/dashboard/")
    assert overview.status_code == 200
    assert b"ada@example.test is verified" in overview.content


def test_a_link_with_a_wrong_password_verifies_nothing_and_signs_in_nobody(
    client, signed_up, settings, fresh_window
):
    # given the link, in the hands of the address's owner who did not choose the password
    # (a squatter signed up with it), and a limit of 2 sign-ins a minute per address (the
    # guesses inside one minute's window: fresh_window)
    user, link = signed_up
    settings.RATELIMIT_SIGNIN_PER_EMAIL = 2

    # when they guess, twice, then a third time
    guesses = [
        client.post("/verify-email", {"token": token_of(link), "password": "a guess"})
        for _ in range(3)
    ]

    # then each guess is refused (the password form drawn again, with the way to set a new
    # password), the third before the password is checked, and nothing changed
    assert_refused(guesses[0], 400, "invalid_login")
    assert b'name="password"' in guesses[0].content
    assert b'href="/password-reset/"' in guesses[0].content
    assert_refused(guesses[2], 429, "rate_limited")
    user.refresh_from_db()
    assert user.email_verified is False
    assert "_auth_user_id" not in client.session


def test_the_link_asks_then_verifies_for_the_account_signed_in_and_again_harmlessly(
    client, signed_up
):
    # given the account that signed up, signed in (a session from before sign-in needed
    # the link), following its link
    user, link = signed_up
    client.force_login(user)

    # when the link's page is opened, the account is not verified yet: it asks
    asked = client.get(link)
    user.refresh_from_db()
    assert asked.status_code == 200 and user.email_verified is False
    assert b"Verify <strong>ada@example.test</strong>" in asked.content
    assert b'name="password"' not in asked.content

    # and when they confirm (twice: a second confirmation is harmless)
    first = client.post("/verify-email", {"token": token_of(link)})
    second = client.post("/verify-email", {"token": token_of(link)})

    # then the address is verified, and the page says so if opened again
    assert first.status_code == second.status_code == 302
    user.refresh_from_db()
    assert user.email_verified is True
    assert b'data-verified="ada@example.test"' in client.get(link).content


def test_a_mail_scanner_opening_the_link_verifies_nothing(signed_up):
    # given a link, opened by software that fetches every link in incoming mail
    user, link = signed_up

    # when it is fetched, signed out
    fetched = Client().get(link)

    # then it is asked for the password, and nothing is verified
    assert fetched.status_code == 200 and b'name="password"' in fetched.content
    user.refresh_from_db()
    assert user.email_verified is False


def test_a_link_verifies_only_for_the_account_it_names(signed_up):
    # given a squatter who signed up with someone else's address (their link went to the
    # address's real owner), and that owner, signed in to an account of their own
    user, link = signed_up
    owner = Client()
    owner.force_login(User.objects.create_user("real.owner@example.test", PASSWORD))

    # when the owner follows the link and confirms it
    opened = owner.get(link)
    confirmed = owner.post("/verify-email", {"token": token_of(link)})

    # then neither verifies the squatter's account
    assert_refused(opened, 403, "verification_wrong_account")
    assert_refused(confirmed, 403, "verification_wrong_account")
    user.refresh_from_db()
    assert user.email_verified is False


class IssuedLongAgo(signing.TimestampSigner):
    """Signs as the service does, but dated longer ago than a link lasts."""

    def timestamp(self) -> str:
        return signing.b62_encode(int(time.time() - EMAIL_VERIFICATION_TTL.total_seconds() - 60))


def forged(user: User, how: str) -> str:
    claim = {"user": user.pk, "email": user.email}
    if how == "expired":
        return IssuedLongAgo(salt=EMAIL_VERIFICATION_SALT).sign_object(claim)
    if how == "another-key":
        return signing.TimestampSigner(key="not ours", salt=EMAIL_VERIFICATION_SALT).sign_object(
            claim
        )
    if how == "another-salt":  # a value the app signs for another purpose
        return signing.TimestampSigner(salt="another.purpose").sign_object(claim)
    return "" if how == "empty" else "not-a-token"


@pytest.mark.parametrize(
    ("how", "code"),
    [
        ("expired", "verification_expired"),
        ("another-key", "verification_invalid"),
        ("another-salt", "verification_invalid"),
        ("garbage", "verification_invalid"),
        ("empty", "verification_invalid"),
    ],
)
def test_a_bad_or_expired_link_is_a_400_and_verifies_nothing(client, signed_up, how, code):
    # given
    user, _link = signed_up

    # when it is opened, and confirmed
    opened = client.get("/verify-email", {"token": forged(user, how)})
    confirmed = client.post("/verify-email", {"token": forged(user, how)})

    # then
    assert_refused(opened, 400, code)
    assert_refused(confirmed, 400, code)
    user.refresh_from_db()
    assert user.email_verified is False


def test_a_link_for_an_address_the_account_no_longer_has_verifies_nothing(client, signed_up):
    # given the account's address changed after the link was sent (staff, in the admin)
    user, link = signed_up
    User.objects.filter(pk=user.pk).update(email="ada.new@example.test")

    # when
    response = client.post("/verify-email", {"token": token_of(link)})

    # then
    assert_refused(response, 400, "verification_invalid")
    user.refresh_from_db()
    assert user.email_verified is False


def test_the_overview_asks_an_unverified_account_to_verify_and_resends_the_link(
    client, signed_up, commit_then_mail
):
    # given an unverified account signed in (a session from before sign-in needed the link)
    user, _link = signed_up
    client.force_login(user)

    # when the overview is drawn, and its button asks for the link again
    overview = client.get("/dashboard/")
    with commit_then_mail():
        resent = client.post("/verify-email/send")

    # then the banner offers it, and a second email carries a link that works
    assert b'data-banner="verify-email"' in overview.content
    assert b'action="/verify-email/send"' in overview.content
    assert resent.status_code == 302 and resent["Location"] == "/dashboard/"
    assert len(mail.outbox) == 2 and mail.outbox[1].to == ["ada@example.test"]
    assert (
        client.post("/verify-email", {"token": token_of(link_in(mail.outbox[1]))}).status_code
        == 302
    )
    user.refresh_from_db()
    assert user.email_verified is True
    assert b'data-banner="verify-email"' not in client.get("/dashboard/").content


def test_a_verified_account_sees_no_banner_and_is_sent_nothing(client, member, commit_then_mail):
    member()

    overview = client.get("/dashboard/")
    with commit_then_mail():
        resent = client.post("/verify-email/send")

    assert b'data-banner="verify-email"' not in overview.content
    assert resent.status_code == 302
    assert mail.outbox == []


def test_asking_for_the_link_needs_a_signed_in_user():
    response = Client().post("/verify-email/send")

    assert response.status_code == 302 and response["Location"].startswith("/login/")
    assert mail.outbox == []


def test_users_an_operator_makes_are_verified(admin_user):
    # given users made every way but signing up
    staff = Client()
    staff.force_login(admin_user)
    password = "a long and unusual passphrase 8"
    made = staff.post(
        "/admin/accounts/user/add/",
        {"email": "by.admin@example.test", "password1": password, "password2": password},
    )
    assert made.status_code == 302, made.content
    call_command("org_create", "ops-gym", owner="by.command@example.test", stdout=StringIO())
    User.objects.create_user("by.manager@example.test", password)
    User.objects.create_superuser("by.super@example.test", password)

    # then every one of them is verified
    assert dict(User.objects.values_list("email", "email_verified")) == {
        admin_user.email: True,
        "by.admin@example.test": True,
        "by.command@example.test": True,
        "by.manager@example.test": True,
        "by.super@example.test": True,
    }


def test_a_mail_server_that_is_down_does_not_undo_or_break_the_sign_up(
    client, settings, commit_then_mail, caplog
):
    # given outgoing mail through an SMTP server where nothing listens
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", port, 2

    # when someone signs up
    with commit_then_mail():
        response = client.post("/signup/", {"email": "bo@example.test", "password": PASSWORD})

    # then they are signed up (signing up again with the address mails the link anew,
    # test_shell), and the operator's log says which email was not sent
    assert response.status_code == 302 and response["Location"] == "/signup/done"
    assert not User.objects.get(email="bo@example.test").email_verified
    assert "could not send 'Verify your email address for GymBilling' to bo@example.test" in (
        caplog.text
    )
