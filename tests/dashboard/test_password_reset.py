"""A forgotten password: a link emailed to the address, which sets a new one.

The link proves the mailbox, as the verification link does: the address is verified,
and an account someone else had signed up with the address becomes its owner's.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from django.core import mail
from django.test import Client

from accounts.models import Membership, User
from accounts.services import (
    apikey_create,
    organization_create,
    user_email_change,
    user_signup,
)
from tests.dashboard.conftest import assert_refused

pytestmark = pytest.mark.django_db

OLD, NEW = "a long and unusual passphrase 3", "another long passphrase, 77"


def ask(client: Client, email: str, capture, **extra):
    with capture():
        return client.post("/password-reset/", {"email": email}, **extra)


def link_in(message) -> str:
    found = re.search(r"https?://\S+/password-reset/\S+/\S+/", message.body)
    assert found, message.body
    return found[0]


def set_password(client: Client, link: str, password: str):
    """Follow the link (Django swaps its token for one in the session), then set it."""
    opened = client.get(urlsplit(link).path)
    assert opened.status_code == 302, opened.content
    form = opened["Location"]
    assert b"New password" in client.get(form).content
    return client.post(form, {"new_password1": password, "new_password2": password})


def test_a_forgotten_password_is_set_anew_through_the_emailed_link(
    client, commit_then_mail, settings
):
    # given an account, whose owner forgot its password
    User.objects.create_user("ada@example.test", OLD)

    # when they ask (in any case) and follow the link emailed to the address
    asked = ask(client, "ADA@example.test", commit_then_mail)
    [message] = mail.outbox
    done = set_password(client, link_in(message), NEW)

    # then the new password signs in and the old one does not
    assert asked.status_code == 302 and asked["Location"] == "/password-reset/sent/"
    assert message.to == ["ada@example.test"]
    assert link_in(message).startswith(f"{settings.SITE_URL}/password-reset/")
    assert done.status_code == 302 and done["Location"] == "/password-reset/done/"
    assert Client().login(username="ada@example.test", password=NEW)
    assert not Client().login(username="ada@example.test", password=OLD)


def test_an_address_with_no_account_is_answered_alike_and_sent_nothing(client, commit_then_mail):
    asked = ask(client, "nobody@example.test", commit_then_mail)

    assert asked.status_code == 302 and asked["Location"] == "/password-reset/sent/"
    assert mail.outbox == []


def test_the_link_names_the_site_not_the_host_the_request_came_with(
    client, commit_then_mail, settings
):
    # given a request whose Host header an attacker chose (and which the hosts allow)
    settings.ALLOWED_HOSTS = ["*"]
    User.objects.create_user("ada@example.test", OLD)

    ask(client, "ada@example.test", commit_then_mail, HTTP_HOST="evil.test")

    [message] = mail.outbox
    assert link_in(message).startswith(f"{settings.SITE_URL}/password-reset/")
    assert "evil.test" not in message.body


def test_an_owner_an_operator_made_without_a_password_sets_one(client, commit_then_mail):
    # given an owner made by `org_create --owner`, with no usable password
    owner = User.objects.create_user("boss@example.test", None)

    ask(client, "boss@example.test", commit_then_mail)
    set_password(client, link_in(mail.outbox[0]), NEW)

    owner.refresh_from_db()
    assert owner.check_password(NEW)


def reset_password(client: Client, email: str, capture) -> None:
    """Ask for a new password for `email`, and set NEW through the link emailed to it."""
    ask(client, email, capture)
    set_password(client, link_in(mail.outbox[-1]), NEW)


def squatted_account(capture) -> tuple[User, Client]:
    """An account a squatter signed up with someone else's address, and their browser,
    signed in to it."""
    browser = Client()
    with capture():
        account = user_signup(email="cfo@victim.test", password=OLD)
    browser.force_login(account)
    return account, browser


def key_made_by(user: User) -> dict[str, str]:
    """The headers that send an API key `user` made in their first organization."""
    organization = Membership.objects.filter(user=user).earliest("pk").organization
    _key, secret = apikey_create(
        organization=organization, name="theirs", scopes=["billing:read"], actor=user
    )
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


def balance_status(auth: dict[str, str]) -> int:
    return Client().get("/api/v1/credits/balance", **auth).status_code


def staff_move(user: User, email: str, capture) -> None:
    """Staff change `user`'s address in the admin, without ticking "New address checked"."""
    staff = User.objects.create_superuser("support@gym.test", "staff passphrase 1234")
    with capture():
        user_email_change(user=user, email=email, changed_by=staff)


def test_the_addresss_owner_reclaims_an_account_a_squatter_signed_up_with_it(
    client, commit_then_mail
):
    # given a squatter who signed up with someone else's address, is signed in, and made
    # an API key in the account's organization
    account, squatter_browser = squatted_account(commit_then_mail)
    auth = key_made_by(account)
    assert balance_status(auth) == 200
    assert squatter_browser.get("/dashboard/").status_code == 200

    # when the address's owner asks for a new password, and sets it through the link
    reset_password(client, "cfo@victim.test", commit_then_mail)

    # then the address is verified, the squatter's session is over, and their key too
    account.refresh_from_db()
    assert account.email_verified is True
    assert squatter_browser.get("/dashboard/").status_code == 302
    assert balance_status(auth) == 401


def test_a_reset_after_staff_changed_the_address_keeps_the_owners_keys(client, commit_then_mail):
    # given Alice, whose address was proven, with an API key in her organization; staff
    # moved her to a new address without checking it, and she forgot her password
    alice = User.objects.create_user("alice@old.test", OLD)
    organization_create(slug="alice-co", owner=alice)
    auth = key_made_by(alice)
    staff_move(alice, "alice@new.test", commit_then_mail)

    # when she asks for a new password at the new address, and sets it through the link
    reset_password(client, "alice@new.test", commit_then_mail)

    # then the new address is verified, and her key still works: the account was hers
    alice.refresh_from_db()
    assert alice.email_verified is True
    assert balance_status(auth) == 200


def test_a_squatters_account_staff_moved_is_still_reclaimed_by_a_reset(client, commit_then_mail):
    # given a squatter's account, never verified, whose address staff then changed
    # (unchecked), and a key the squatter made
    account, _ = squatted_account(commit_then_mail)
    auth = key_made_by(account)
    staff_move(account, "cfo@victim-corp.test", commit_then_mail)

    # when the new address's owner sets a new password through the emailed link
    reset_password(client, "cfo@victim-corp.test", commit_then_mail)

    # then no address of the account was ever proven before: the squatter's key is revoked
    account.refresh_from_db()
    assert account.email_verified is True
    assert balance_status(auth) == 401


def test_a_used_link_does_not_work_again(client, commit_then_mail):
    User.objects.create_user("ada@example.test", OLD)
    ask(client, "ada@example.test", commit_then_mail)
    link = link_in(mail.outbox[0])
    set_password(client, link, NEW)

    again = Client().get(urlsplit(link).path, follow=True)

    assert b'data-error-code="reset_link_invalid"' in again.content
    assert Client().login(username="ada@example.test", password=NEW)


def test_asking_is_limited_per_network_address(client, settings, commit_then_mail, fresh_window):
    # (both asks inside one window: fresh_window keeps clear of a minute's end, and so
    # of the end of the limit's ten minutes)
    settings.RATELIMIT_SIGNUP_PER_IP = 1
    User.objects.create_user("ada@example.test", OLD)

    first = ask(client, "ada@example.test", commit_then_mail)
    second = ask(client, "ada@example.test", commit_then_mail)

    assert first.status_code == 302
    assert_refused(second, 429, "rate_limited")
    assert second["Retry-After"]
    assert len(mail.outbox) == 1


# Transactional, as in production (no ATOMIC_REQUESTS): the request's own commit runs
# its on_commit callbacks before it answers.
@pytest.mark.django_db(transaction=True)
def test_the_request_only_queues_the_email_and_a_worker_sends_it(client, email_worker, settings):
    # given an address with an account, and one without
    User.objects.create_user("ada@example.test", OLD)

    # when each asks for a reset link
    known = client.post("/password-reset/", {"email": "ada@example.test"})
    unknown = client.post("/password-reset/", {"email": "nobody@example.test"})

    # then the answers are the same, and neither request sent anything (so neither
    # waited on a mail server, whose time would tell who has an account)
    assert (known.status_code, known["Location"]) == (unknown.status_code, unknown["Location"])
    assert mail.outbox == []

    # and the one email queued, for the known address, is what the worker sends
    queued = email_worker.work()
    [message] = mail.outbox
    assert [each["to"] for each in queued] == message.to == ["ada@example.test"]
    assert link_in(message).startswith(f"{settings.SITE_URL}/password-reset/")
