"""The invitation email's link, /invitations/accept?token=: a page to join the organization.

Signed out, it says what the invitation is for and leads to signing in or up and back;
signed in, it shows the organization and role, and its POST accepts through
invitation_accept, as the API does, and switches the dashboard to the organization.
"""

from __future__ import annotations

import re
from datetime import timedelta
from urllib.parse import parse_qs, quote, unquote, urlsplit

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from accounts.dashboard import SESSION_ORGANIZATION
from accounts.models import Invitation, Membership, Role, User
from accounts.services import invitation_create, membership_add
from tests.dashboard.conftest import assert_refused
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

PASSWORD = "a long and unusual passphrase 3"


@pytest.fixture
def invitation():
    """An invitation to Acme (3 seats, its owner in one) for zoe@example.test, as admin."""
    org = OrganizationFactory(name="Acme Compute", seats=3)
    owner = UserFactory()
    membership_add(organization=org, user=owner, role=Role.OWNER)
    row, token = invitation_create(
        organization=org, email="zoe@example.test", role=Role.ADMIN, actor=owner
    )
    return row, token


PAGE = "/invitations/accept"


def page(token: str) -> str:
    """The link in the invitation email."""
    return f"{PAGE}?token={quote(token)}"


def test_the_link_keeps_its_token_out_of_every_address_after_its_own(client, invitation):
    # given the link in the email
    _row, token = invitation

    # when it is followed
    followed = client.get(page(token), follow=True)

    # then it is answered with a redirect to the page without the token (which the
    # session keeps), and nothing the page shows or links to carries the token
    assert followed.redirect_chain == [(PAGE, 302)]
    assert followed.status_code == 200 and b"Acme Compute" in followed.content
    assert token not in followed.content.decode()
    assert quote(token, safe="") not in followed.content.decode()


def test_signed_out_the_page_says_what_it_is_for_and_leads_to_signing_in_or_up_and_back(
    client, invitation
):
    _row, token = invitation

    response = client.get(page(token), follow=True)

    assert response.status_code == 200
    body = response.content.decode()
    assert "Acme Compute" in body and "admin" in body.lower() and "zoe@example.test" in body
    back = quote(PAGE, safe="")
    assert f'href="/login/?next={back}"' in body
    assert f'href="/signup/?next={back}"' in body
    assert "<form" not in body.split("<main>", 1)[1]  # nothing to accept before signing in
    assert "no-store" in response["Cache-Control"]  # it holds the token


def test_signed_out_a_post_leads_to_signing_in_and_accepts_nothing(client, invitation):
    row, token = invitation

    response = client.post("/invitations/accept", {"token": token})

    assert response.status_code == 302
    location = urlsplit(response["Location"])
    assert location.path == "/login/" and parse_qs(location.query) == {"next": [PAGE]}
    assert Invitation.objects.get(pk=row.pk).accepted_at is None


def test_signing_up_from_the_invitation_comes_back_to_it_and_accepting_joins(
    client, invitation, commit_then_mail
):
    # given a newcomer who follows the link, then its sign-up link
    row, token = invitation
    org = row.organization

    # when they sign up with the address invited, follow the link emailed (with their
    # password), and accept on the page
    client.get(page(token))
    with commit_then_mail():
        signed_up = client.post(
            "/signup/", {"email": "Zoe@Example.test", "password": PASSWORD, "next": PAGE}
        )
    [verification] = [m for m in mail.outbox if "verify" in m.subject.lower()]
    link = re.search(r"token=(\S+)", verification.body)[1]
    verified = client.post("/verify-email", {"token": unquote(link), "password": PASSWORD})
    shown = client.get(verified["Location"])
    accepted = client.post(PAGE)
    overview = client.get(accepted["Location"])

    # then the link brings them back to the invitation, they join as admin, and the
    # dashboard acts for Acme
    assert signed_up.status_code == 302
    assert signed_up["Location"] == f"/signup/done?next={quote(PAGE, safe='')}"
    assert verified.status_code == 302 and verified["Location"] == PAGE
    assert shown.status_code == 200
    assert b"Acme Compute" in shown.content
    assert b'action="/invitations/accept"' in shown.content
    assert accepted.status_code == 302 and accepted["Location"] == "/dashboard/"
    zoe = User.objects.get(email="zoe@example.test")
    assert Membership.objects.get(organization=org, user=zoe).role == Role.ADMIN
    assert Invitation.objects.get(pk=row.pk).accepted_at is not None
    assert client.session[SESSION_ORGANIZATION] == org.slug
    assert re.search(rf'<option value="{org.slug}" selected>', overview.content.decode())
    assert b"You joined Acme Compute as admin." in overview.content
    zoe.refresh_from_db()
    assert zoe.email_verified is True  # the invitation came to that mailbox
    assert "invitation_token" not in client.session  # used: no longer kept


def test_signing_in_from_the_invitation_comes_back_to_it(client, invitation):
    _row, token = invitation
    UserFactory(email="zoe@example.test", password=PASSWORD)
    client.get(page(token))

    response = client.post(
        "/login/", {"username": "zoe@example.test", "password": PASSWORD, "next": PAGE}
    )
    shown = client.get(response["Location"])

    assert response.status_code == 302 and response["Location"] == PAGE
    assert b"Join Acme Compute" in shown.content  # the session kept the token through it


def expire(row: Invitation) -> None:
    Invitation.objects.filter(pk=row.pk).update(expires_at=timezone.now() - timedelta(seconds=1))


def revoke(row: Invitation) -> None:
    Invitation.objects.filter(pk=row.pk).update(revoked_at=timezone.now())


def use(row: Invitation) -> None:
    Invitation.objects.filter(pk=row.pk).update(accepted_at=timezone.now())


def demote_sender(row: Invitation) -> None:
    """Its sender (an owner) made billing, as before demoting revoked what they sent."""
    Membership.objects.filter(organization=row.organization, user=row.invited_by).update(
        role=Role.BILLING
    )


@pytest.mark.parametrize(
    ("spoil", "who", "status", "code"),
    [
        (expire, "zoe@example.test", 404, "invitation_invalid"),
        (revoke, "zoe@example.test", 404, "invitation_invalid"),
        (use, "zoe@example.test", 409, "invitation_used"),
        (None, "intruder@example.test", 403, "invitation_email_mismatch"),
        (demote_sender, "zoe@example.test", 403, "invitation_sender_not_allowed"),
    ],
    ids=["expired", "revoked", "used", "another-address", "sender-demoted"],
)
def test_an_invitation_that_cannot_be_accepted_is_refused_on_the_page_and_its_post(
    client, invitation, spoil, who, status, code
):
    # given
    row, token = invitation
    if spoil:
        spoil(row)
    client.force_login(UserFactory(email=who))
    before = Membership.objects.count()

    # when
    shown = client.get(page(token), follow=True)
    posted = client.post("/invitations/accept", {"token": token})

    # then both are the page with the refusal, and nobody joined
    assert_refused(shown, status, code)
    assert_refused(posted, status, code)
    assert Membership.objects.count() == before


def test_an_unknown_token_is_not_found_signed_in_or_not(client, invitation):
    signed_out = Client().get(page("not-a-token"), follow=True)
    client.force_login(UserFactory(email="zoe@example.test"))
    signed_in = client.post("/invitations/accept", {"token": "not-a-token"})

    assert_refused(signed_out, 404, "invitation_invalid")
    assert_refused(signed_in, 404, "invitation_invalid")


def test_accepting_when_the_seats_are_full_is_refused_on_the_page(client, invitation):
    # given the invitation's seat taken by someone added meanwhile
    row, token = invitation
    membership_add(organization=row.organization, user=UserFactory())
    membership_add(organization=row.organization, user=UserFactory())
    client.force_login(UserFactory(email="zoe@example.test"))

    # when
    response = client.post("/invitations/accept", {"token": token})

    # then
    assert_refused(response, 409, "no_seats_left")
    assert Invitation.objects.get(pk=row.pk).accepted_at is None


def test_accepting_needs_the_csrf_token(invitation):
    row, token = invitation
    client = Client(enforce_csrf_checks=True)
    client.force_login(UserFactory(email="zoe@example.test"))

    response = client.post("/invitations/accept", {"token": token})

    assert response.status_code == 403
    assert Invitation.objects.get(pk=row.pk).accepted_at is None
