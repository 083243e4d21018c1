"""Races on an organization's owners, on real PostgreSQL connections: two owners who
remove or demote each other (or themselves) at once, a removal that was decided on a
role changed meanwhile, and a password reset that revokes an account's keys as it joins
an organization.

As in tests/gymbilling/market/test_market_race.py, a hook on a call the service makes
anyway (its audit record, written after its checks and before its commit) only decides
when each connection runs; the test then waits for a state PostgreSQL reports (a lock
waited for, a thread done), never for a length of time.
"""

from __future__ import annotations

import threading

import pytest
from django.contrib.auth.tokens import default_token_generator
from django.test import Client
from django.utils.encoding import force_bytes
from django.utils.http import urlsafe_base64_encode

from accounts import apis
from accounts.models import ApiKey, Invitation, Membership, Role, Scope
from accounts.services import api_keys as api_key_services
from accounts.services import apikey_create, membership_add, membership_set_role
from accounts.services import organizations as organization_services
from tests.accounts.conftest import key_client
from tests.dashboard.conftest import DashboardClient
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import on_own_connection, pause_after, run_against_paused

pytestmark = pytest.mark.django_db(transaction=True)

NEW = "a new long passphrase, 4711"


@pytest.fixture
def two_owners():
    """An organization of 5 seats whose only owners are Alice and Bob, and a member Dave."""
    org = OrganizationFactory(seats=5)
    alice, bob, dave = UserFactory(), UserFactory(), UserFactory()
    membership_add(organization=org, user=alice, role=Role.OWNER)
    membership_add(organization=org, user=bob, role=Role.OWNER)
    membership_add(organization=org, user=dave, role=Role.MEMBER)
    return org, alice, bob, dave


def membership(org, user) -> Membership:
    return Membership.objects.get(organization=org, user=user)


def owners(org) -> set[str]:
    return set(
        Membership.objects.filter(organization=org, role=Role.OWNER).values_list(
            "user__email", flat=True
        )
    )


def signed_in(user, client_class=Client) -> Client:
    client = client_class()
    client.force_login(user)
    return client


def race(monkeypatch, first, second, *, services=organization_services) -> None:
    """`first()` on the thread "first", paused once past its checks (its first audit record,
    by `services`, written, its transaction open); then `second()` on its own connection,
    until it is done or waits for a lock; then `first` goes on. Each calls the real page
    or API."""
    errors: list = []
    paused, resume = pause_after(monkeypatch, services, "audit_record", thread="first")
    first_thread = threading.Thread(name="first", target=on_own_connection, args=(first, errors))
    first_thread.start()
    assert paused.wait(timeout=60)
    second_thread = threading.Thread(target=on_own_connection, args=(second, errors))
    run_against_paused(
        second_thread,
        paused=first_thread,
        resume=resume,
        what="the second change to finish or wait for the organization",
    )
    assert errors == []


def test_two_owners_removing_each_other_at_once_leave_one_owner(two_owners, monkeypatch):
    # given: Alice and Bob, the only owners, each on the API
    org, alice, bob, _ = two_owners
    alice_client, bob_client = signed_in(alice), signed_in(bob)
    alice_row, bob_row = membership(org, alice), membership(org, bob)
    answers: dict[str, object] = {}

    def alice_removes_bob() -> None:
        answers["alice"] = alice_client.delete(f"/api/v1/orgs/{org.pk}/members/{bob_row.pk}")

    def bob_removes_alice() -> None:
        answers["bob"] = bob_client.delete(f"/api/v1/orgs/{org.pk}/members/{alice_row.pk}")

    # when: each removes the other at the same moment
    race(monkeypatch, alice_removes_bob, bob_removes_alice)

    # then: Alice's removal went through; Bob's was decided after it, when he was no
    # longer a member, and refused: the organization keeps its owner
    assert owners(org) == {alice.email}
    assert answers["alice"].status_code == 204, answers["alice"].content
    assert answers["bob"].status_code == 403, answers["bob"].content
    assert answers["bob"].json()["error"]["code"] == "permission_denied"


def test_two_owners_stepping_down_at_once_leave_one_owner(two_owners, monkeypatch):
    # given: Alice and Bob, the only owners, each on the dashboard's members page
    org, alice, bob, _ = two_owners
    alice_client = signed_in(alice, DashboardClient)
    bob_client = signed_in(bob, DashboardClient)
    alice_row, bob_row = membership(org, alice), membership(org, bob)
    answers: dict[str, object] = {}

    def step_down(name: str, client: Client, row: Membership):
        def post() -> None:
            answers[name] = client.post(f"/dashboard/members/{row.pk}/role", {"role": "admin"})

        return post

    # when: each makes themselves an admin at the same moment, counting on the other
    race(
        monkeypatch,
        step_down("alice", alice_client, alice_row),
        step_down("bob", bob_client, bob_row),
    )

    # then: Alice stepped down; Bob, by then the last owner, is told so and stays one
    assert owners(org) == {bob.email}
    assert answers["alice"].status_code == 302, answers["alice"].content
    assert answers["bob"].status_code == 409, answers["bob"].content
    assert b'data-error-code="last_owner"' in answers["bob"].content
    assert membership(org, alice).role == Role.ADMIN


def test_an_admin_does_not_remove_a_member_promoted_to_owner_meanwhile(two_owners, monkeypatch):
    # given: an admin's removal of Dave, a member, paused once the API has loaded his
    # membership, before the service runs
    org, alice, _, dave = two_owners
    admin = UserFactory()
    membership_add(organization=org, user=admin, role=Role.ADMIN)
    admin_client = signed_in(admin)
    dave_row = membership(org, dave)
    answers: dict[str, object] = {}
    errors: list = []
    paused, resume = pause_after(monkeypatch, apis, "get_object_or_404", thread="removal")

    def remove_dave() -> None:
        answers["admin"] = admin_client.delete(f"/api/v1/orgs/{org.pk}/members/{dave_row.pk}")

    removal = threading.Thread(name="removal", target=on_own_connection, args=(remove_dave, errors))
    removal.start()
    assert paused.wait(timeout=60)

    # when: Alice makes Dave an owner meanwhile, and the removal goes on
    membership_set_role(membership=dave_row, role=Role.OWNER, actor=alice)
    resume.set()
    removal.join(timeout=120)

    # then: an admin may not remove an owner, and Dave, an owner now, stays
    assert not removal.is_alive() and errors == []
    assert membership(org, dave).role == Role.OWNER
    assert answers["admin"].status_code == 403, answers["admin"].content
    assert answers["admin"].json()["error"]["code"] == "permission_denied"


def test_an_invitation_revoked_as_it_is_accepted_is_one_or_the_other_never_a_500(
    two_owners, monkeypatch
):
    # given: Alice, an owner, invited Carol; Carol has signed up with that address
    org, alice, _, _ = two_owners
    carol = UserFactory()
    invitation, token = organization_services.invitation_create(
        organization=org, email=carol.email, role=Role.MEMBER, actor=alice
    )
    alice_client, carol_client = signed_in(alice), signed_in(carol)
    answers: dict[str, object] = {}

    def alice_revokes() -> None:
        answers["revoke"] = alice_client.delete(
            f"/api/v1/orgs/{org.pk}/invitations/{invitation.pk}"
        )

    def carol_accepts() -> None:
        answers["accept"] = carol_client.post(
            "/api/v1/invitations/accept", {"token": token}, content_type="application/json"
        )

    # when: Alice revokes it while Carol accepts it
    race(monkeypatch, alice_revokes, carol_accepts)

    # then: the revocation went through and the accept, decided after it, was refused
    # with its reason (it waited for the organization, not a deadlock aborted either);
    # Carol is no member
    assert answers["revoke"].status_code == 200, answers["revoke"].content
    assert answers["accept"].status_code == 404, answers["accept"].content
    assert answers["accept"].json()["error"]["code"] == "invitation_invalid"
    assert not Membership.objects.filter(organization=org, user=carol).exists()


def test_a_key_revoked_as_it_invites_leaves_no_open_invitation(two_owners, monkeypatch):
    # given: Alice, an owner, made an admin key, which a partner app invites with
    org, alice, _, _ = two_owners
    key, raw = apikey_create(organization=org, name="app", scopes=[Scope.ADMIN], actor=alice)
    alice_client, app = signed_in(alice), key_client(raw)
    answers: dict[str, object] = {}

    def alice_revokes() -> None:
        answers["revoke"] = alice_client.delete(f"/api/v1/keys/{key.pk}")

    def app_invites() -> None:
        answers["invite"] = app.post(
            f"/api/v1/orgs/{org.pk}/invitations",
            {"email": "carol@example.test", "role": "member"},
            format="json",
        )

    # when: Alice revokes the key while the app, authenticated before the revocation
    # committed, invites Carol with it
    race(monkeypatch, alice_revokes, app_invites, services=api_key_services)

    # then: the revocation went through, and the invitation, decided after it, was
    # refused: no invitation is left open that no accept could use
    assert answers["revoke"].status_code == 200, answers["revoke"].content
    assert answers["invite"].status_code == 401, answers["invite"].content
    assert answers["invite"].json()["error"]["code"] == "api_key_revoked"
    assert not Invitation.objects.filter(organization=org, revoked_at__isnull=True).exists()


def test_a_key_revoked_as_a_key_it_made_mints_one_leaves_no_live_key(two_owners, monkeypatch):
    # given: Alice made an admin key K1, with which a partner app made K2
    org, alice, _, _ = two_owners
    k1, raw1 = apikey_create(organization=org, name="k1", scopes=[Scope.ADMIN], actor=alice)
    made = key_client(raw1).post("/api/v1/keys", {"name": "k2", "scopes": ["admin"]}, format="json")
    assert made.status_code == 201, made.content
    alice_client, app = signed_in(alice), key_client(made.json()["key"])
    answers: dict[str, object] = {}

    def alice_revokes() -> None:
        answers["revoke"] = alice_client.delete(f"/api/v1/keys/{k1.pk}")

    def app_mints() -> None:
        answers["mint"] = app.post(
            "/api/v1/keys", {"name": "k3", "scopes": ["admin"]}, format="json"
        )

    # when: Alice revokes K1 while the app, authenticated with K2 before the revocation
    # committed, makes K3 with it
    race(monkeypatch, alice_revokes, app_mints, services=api_key_services)

    # then: K1 and K2 are revoked, and K3 was refused: no key of the line outlives it
    assert answers["revoke"].status_code == 200, answers["revoke"].content
    assert answers["mint"].status_code == 401, answers["mint"].content
    assert answers["mint"].json()["error"]["code"] == "api_key_revoked"
    assert not ApiKey.objects.filter(organization=org, revoked_at__isnull=True).exists()


def reset_form(user) -> tuple[Client, str]:
    """A browser that has followed the password-reset link emailed to `user` (Django swaps
    its token for one in the session), and the form that sets the new password."""
    browser = Client()
    uid = urlsafe_base64_encode(force_bytes(user.pk))
    token = default_token_generator.make_token(user)
    opened = browser.get(f"/password-reset/{uid}/{token}/")
    assert opened.status_code == 302, opened.content
    return browser, opened["Location"]


@pytest.mark.parametrize("joins", ["added", "accepts"])
def test_a_password_reset_as_the_account_joins_an_organization_is_no_deadlock(
    two_owners, monkeypatch, joins
):
    # given: an account a squatter signed up with Carol's address (never verified), which
    # was a member of Alice's organization, made a key there, and was removed (its key
    # stays: a removal revokes invitations, not keys); Alice invited it back
    org, alice, _, _ = two_owners
    carol = UserFactory(email_verified=False, email_previously_verified=False)
    membership = membership_add(organization=org, user=carol, role=Role.ADMIN, actor=alice)
    key, _raw = apikey_create(
        organization=org, name="theirs", scopes=[Scope.BILLING_READ], actor=carol
    )
    organization_services.membership_remove(membership=membership, actor=alice)
    _invitation, token = organization_services.invitation_create(
        organization=org, email=carol.email, role=Role.MEMBER, actor=alice
    )
    carol_client = signed_in(carol)  # before the link: signing in makes an older link stale
    browser, form = reset_form(carol)
    answers: dict[str, object] = {}

    def carol_joins() -> None:
        # With the organization's row locked, a Membership referencing the account is
        # inserted (its foreign key takes a key-share lock on the account's row at
        # COMMIT); an accept also updates that row (its address proven)
        if joins == "added":
            membership_add(organization=org, user=carol, role=Role.MEMBER, actor=alice)
        else:
            answers["accept"] = carol_client.post(
                "/api/v1/invitations/accept", {"token": token}, content_type="application/json"
            )

    def owner_resets() -> None:
        answers["reset"] = browser.post(form, {"new_password1": NEW, "new_password2": NEW})

    # when: the address's owner sets a new password through the link (which revokes the
    # squatter's keys, each under its organization's lock) as the account joins
    race(monkeypatch, carol_joins, owner_resets)

    # then: both went through, neither aborted as a deadlock: the account is a member,
    # its address verified and its new password set. Added back by Alice, the account was
    # still a squatter's when the reset read it: their key is revoked. Accepting, it used
    # the invitation sent to the address, which proved the address first: the reset
    # found the account its owner's, and its key stays
    assert answers["reset"].status_code == 302, answers["reset"].content
    if joins == "accepts":
        assert answers["accept"].status_code == 201, answers["accept"].content
    carol.refresh_from_db()
    key.refresh_from_db()
    assert Membership.objects.filter(organization=org, user=carol).exists()
    assert carol.email_verified and carol.check_password(NEW)
    assert (key.revoked_at is not None) == (joins == "added")
