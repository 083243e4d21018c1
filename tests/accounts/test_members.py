"""Members, roles, seats and invitations, through the dashboard's session and the API."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from urllib.parse import unquote

import pytest
from django.conf import settings
from django.core import mail
from django.test import Client
from django.utils import timezone

from accounts.models import (
    ApiKey,
    AuditEvent,
    Invitation,
    Membership,
    Organization,
    Role,
    Scope,
    User,
)
from accounts.services import (
    invitation_create,
    membership_add,
    organization_create,
    organization_entitlements_set,
    user_signup,
)
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


def signed_in(user, *, csrf: bool = False) -> Client:
    client = Client(enforce_csrf_checks=csrf)
    client.force_login(user)
    return client


def csrf_token(client: Client) -> str:
    """The token a dashboard page hands out: its form and cookie (the admin login page has one)."""
    client.get("/admin/login/")
    return client.cookies[settings.CSRF_COOKIE_NAME].value


def send(client: Client, method: str, path: str, body: dict | None = None, **extra):
    return getattr(client, method)(
        path, data=json.dumps(body or {}), content_type="application/json", **extra
    )


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert {"type", "code", "message", "param"} <= set(error)
    assert error["code"] == code
    return error


@pytest.fixture
def team(member_of):
    """An organization with 5 seats: an owner, an admin, a billing person and a member."""
    org = OrganizationFactory(seats=5)
    return {
        "org": org,
        Role.OWNER: member_of(org, Role.OWNER),
        Role.ADMIN: member_of(org, Role.ADMIN),
        Role.BILLING: member_of(org, Role.BILLING),
        Role.MEMBER: member_of(org, Role.MEMBER),
    }


def membership(org: Organization, user) -> Membership:
    return Membership.objects.get(organization=org, user=user)


def audit(org: Organization, action: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(organization=org, action=action).order_by("pk"))


# --- sessions and CSRF -------------------------------------------------------------------


def test_a_session_post_without_the_csrf_token_is_refused(team):
    # given
    org = team["org"]
    newcomer = UserFactory()
    client = signed_in(team[Role.OWNER], csrf=True)
    events_before = AuditEvent.objects.count()

    # when
    response = send(client, "post", f"/api/v1/orgs/{org.pk}/members", {"email": newcomer.email})

    # then
    error = assert_error(response, 403, "permission_denied")
    assert "CSRF" in error["message"]
    assert not Membership.objects.filter(user=newcomer).exists()
    assert AuditEvent.objects.count() == events_before


def test_a_session_post_with_the_csrf_token_goes_through(team):
    # given
    org = team["org"]
    newcomer = UserFactory()
    client = signed_in(team[Role.OWNER], csrf=True)
    token = csrf_token(client)

    # when
    response = send(
        client,
        "post",
        f"/api/v1/orgs/{org.pk}/members",
        {"email": newcomer.email},
        HTTP_X_CSRFTOKEN=token,
    )

    # then
    assert response.status_code == 201, response.content
    assert membership(org, newcomer).role == Role.MEMBER


def test_a_session_read_needs_no_csrf_token(team):
    # given
    client = signed_in(team[Role.MEMBER], csrf=True)

    # when
    response = client.get("/api/v1/me", HTTP_X_ORGANIZATION=team["org"].slug)

    # then
    assert response.status_code == 200
    assert response.json()["role"] == Role.MEMBER
    assert response.json()["user"]["email"] == team[Role.MEMBER].email


def test_an_x_organization_with_a_nul_character_is_no_such_organization(team):
    # given: PostgreSQL refuses to compare text holding NUL (it was a 500)
    client = signed_in(team[Role.OWNER])
    client.raise_request_exception = False

    # when
    response = client.get("/api/v1/me", HTTP_X_ORGANIZATION=f"{team['org'].slug}\x00")

    # then
    error = assert_error(response, 404, "not_found")
    assert error["param"] == "X-Organization"


def test_an_api_key_needs_no_csrf_token(team, make_key):
    # given
    org = team["org"]
    _key, raw = make_key(org, scopes=[Scope.ADMIN])
    client = Client(enforce_csrf_checks=True)
    newcomer = UserFactory()

    # when
    response = send(
        client,
        "post",
        f"/api/v1/orgs/{org.pk}/members",
        {"email": newcomer.email},
        HTTP_AUTHORIZATION=f"Bearer {raw}",
    )

    # then
    assert response.status_code == 201
    assert membership(org, newcomer).role == Role.MEMBER


def test_a_signed_out_visitor_is_refused(team):
    # when
    response = Client().get(f"/api/v1/orgs/{team['org'].pk}/members")

    # then
    assert_error(response, 401, "authentication_failed")


# --- roles --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "allowed"),
    [(Role.OWNER, True), (Role.ADMIN, True), (Role.BILLING, False), (Role.MEMBER, False)],
)
def test_only_owners_and_admins_add_members(team, role, allowed):
    # given
    org = team["org"]
    newcomer = UserFactory()

    # when
    response = send(
        signed_in(team[role]), "post", f"/api/v1/orgs/{org.pk}/members", {"email": newcomer.email}
    )

    # then
    if allowed:
        assert response.status_code == 201
        assert response.json()["email"] == newcomer.email
        assert membership(org, newcomer).role == Role.MEMBER
        [event] = audit(org, "member.added")[-1:]
        assert event.target == newcomer.email
        assert event.actor_user == team[role]
    else:
        assert_error(response, 403, "permission_denied")
        assert not Membership.objects.filter(user=newcomer).exists()


@pytest.mark.parametrize("role", [Role.BILLING, Role.MEMBER])
def test_members_may_list_members_but_not_change_them(team, role):
    # given
    org = team["org"]
    client = signed_in(team[role])
    target = membership(org, team[Role.MEMBER])

    # when
    listing = client.get(f"/api/v1/orgs/{org.pk}/members")
    promote = send(client, "patch", f"/api/v1/orgs/{org.pk}/members/{target.pk}", {"role": "owner"})
    remove = client.delete(f"/api/v1/orgs/{org.pk}/members/{target.pk}")

    # then
    assert listing.status_code == 200
    assert {row["email"] for row in listing.json()["results"]} == {
        team[r].email for r in (Role.OWNER, Role.ADMIN, Role.BILLING, Role.MEMBER)
    }
    assert_error(promote, 403, "permission_denied")
    assert_error(remove, 403, "permission_denied")
    target.refresh_from_db()
    assert target.role == Role.MEMBER
    assert audit(org, "member.role_changed") == [] and audit(org, "member.removed") == []


def test_an_admin_changes_a_role_and_it_is_audited(team):
    # given
    org = team["org"]
    target = membership(org, team[Role.MEMBER])

    # when
    response = send(
        signed_in(team[Role.ADMIN]),
        "patch",
        f"/api/v1/orgs/{org.pk}/members/{target.pk}",
        {"role": "billing"},
    )

    # then
    assert response.status_code == 200
    assert response.json()["role"] == Role.BILLING
    target.refresh_from_db()
    assert target.role == Role.BILLING
    [event] = audit(org, "member.role_changed")
    assert event.target == team[Role.MEMBER].email
    assert event.data == {"from": "member", "to": "billing"}
    assert event.actor_user == team[Role.ADMIN]


def test_an_owner_removes_a_member_and_it_is_audited(team):
    # given
    org = team["org"]
    target = membership(org, team[Role.MEMBER])

    # when
    response = signed_in(team[Role.OWNER]).delete(f"/api/v1/orgs/{org.pk}/members/{target.pk}")

    # then
    assert response.status_code == 204
    assert not Membership.objects.filter(pk=target.pk).exists()
    [event] = audit(org, "member.removed")
    assert event.target == team[Role.MEMBER].email
    assert event.actor_user == team[Role.OWNER]


def test_members_of_another_organization_cannot_be_reached(team, member_of):
    # given
    other = OrganizationFactory(seats=5)
    outsider = member_of(other, Role.MEMBER)
    client = signed_in(team[Role.OWNER])
    target = membership(other, outsider)

    # when
    via_own_org = client.delete(f"/api/v1/orgs/{team['org'].pk}/members/{target.pk}")
    via_their_org = client.delete(f"/api/v1/orgs/{other.pk}/members/{target.pk}")

    # then
    assert_error(via_own_org, 404, "not_found")
    assert_error(via_their_org, 404, "not_found")
    assert Membership.objects.filter(pk=target.pk).exists()


# --- seats ----------------------------------------------------------------------------------


def test_no_member_is_added_beyond_the_seats(member_of):
    # given: two seats, both taken
    org = OrganizationFactory(seats=2)
    owner = member_of(org, Role.OWNER)
    member_of(org, Role.MEMBER)
    newcomer = UserFactory()

    # when
    response = send(
        signed_in(owner), "post", f"/api/v1/orgs/{org.pk}/members", {"email": newcomer.email}
    )

    # then
    error = assert_error(response, 409, "no_seats_left")
    assert error["type"] == "conflict_error"
    assert Membership.objects.filter(organization=org).count() == 2
    assert [e.target for e in audit(org, "member.added")] == [
        m.user.email for m in Membership.objects.filter(organization=org).order_by("pk")
    ]


def test_an_unknown_email_is_told_to_use_an_invitation(team):
    # when
    response = send(
        signed_in(team[Role.OWNER]),
        "post",
        f"/api/v1/orgs/{team['org'].pk}/members",
        {"email": "nobody@example.test"},
    )

    # then
    error = assert_error(response, 404, "user_not_found")
    assert error["param"] == "email"


def test_an_unverified_account_answers_as_no_account_until_its_address_is_proven(
    team, commit_then_mail
):
    # given someone who signed up under an address they have not proven (anyone could)
    org = team["org"]
    with commit_then_mail():
        squatter = user_signup(email="cfo@victim.test", password="a long passphrase, 44")
    owner = signed_in(team[Role.OWNER])
    path = f"/api/v1/orgs/{org.pk}/members"

    # when a manager adds that address, and an address with no account
    unverified = send(owner, "post", path, {"email": "CFO@victim.test"})
    unknown = send(owner, "post", path, {"email": "nobody@victim.test"})

    # then both answer alike, revealing nothing, and nobody joined
    assert_error(unverified, 404, "user_not_found")
    assert unverified.json() == unknown.json()
    assert not Membership.objects.filter(organization=org, user=squatter).exists()

    # when the account proves the address (the emailed link, confirmed signed in as it),
    # the same request adds them
    token = unquote(re.search(r"/verify-email\?token=(\S+)", mail.outbox[-1].body)[1])
    proving = Client()
    proving.force_login(squatter)
    assert proving.post("/verify-email", {"token": token}).status_code == 302
    added = send(owner, "post", path, {"email": "cfo@victim.test"})
    assert added.status_code == 201
    assert membership(org, squatter).role == Role.MEMBER


def test_adding_someone_twice_is_a_conflict(team):
    # when
    response = send(
        signed_in(team[Role.OWNER]),
        "post",
        f"/api/v1/orgs/{team['org'].pk}/members",
        {"email": team[Role.MEMBER].email},
    )

    # then
    assert_error(response, 409, "already_member")


# --- the last owner ----------------------------------------------------------------------------


def test_the_last_owner_cannot_be_removed(team):
    # given
    org = team["org"]
    owner = membership(org, team[Role.OWNER])

    # when
    by_admin = signed_in(team[Role.ADMIN]).delete(f"/api/v1/orgs/{org.pk}/members/{owner.pk}")
    by_self = signed_in(team[Role.OWNER]).delete(f"/api/v1/orgs/{org.pk}/members/{owner.pk}")

    # then: an admin may not touch an owner at all; the owner may not leave it ownerless
    assert_error(by_admin, 403, "permission_denied")
    assert_error(by_self, 409, "last_owner")
    assert Membership.objects.filter(pk=owner.pk, role=Role.OWNER).exists()
    assert audit(org, "member.removed") == []


def test_an_admin_cannot_make_themselves_owner(team):
    # given
    org = team["org"]
    admin = membership(org, team[Role.ADMIN])

    # when
    response = send(
        signed_in(team[Role.ADMIN]),
        "patch",
        f"/api/v1/orgs/{org.pk}/members/{admin.pk}",
        {"role": "owner"},
    )

    # then
    assert_error(response, 403, "permission_denied")
    assert Membership.objects.get(pk=admin.pk).role == Role.ADMIN
    assert audit(org, "member.role_changed") == []


def _admin_key_of(user, org) -> str:
    """An `admin`-scoped API key, created by `user` signed in (as the dashboard does)."""
    response = send(signed_in(user), "post", "/api/v1/keys", {"name": "ops", "scopes": ["admin"]})
    assert response.status_code == 201, response.content
    return response.json()["key"]


def _set_role(api, org, member: Membership, role: str):
    """PATCH a member's role with an API key client."""
    return api.patch(f"/api/v1/orgs/{org.pk}/members/{member.pk}", {"role": role}, format="json")


def test_an_admins_api_key_cannot_do_what_the_admin_may_not(team):
    # given an admin's key with the admin scope (admins may create one)
    org = team["org"]
    admin, owner = membership(org, team[Role.ADMIN]), membership(org, team[Role.OWNER])
    api = key_client(_admin_key_of(team[Role.ADMIN], org))
    base = f"/api/v1/orgs/{org.pk}"

    # when the key makes the admin owner, demotes or removes the owner, or
    # invites a new owner
    attempts = [
        _set_role(api, org, admin, "owner"),
        _set_role(api, org, owner, "member"),
        api.delete(f"{base}/members/{owner.pk}"),
        api.post(
            f"{base}/invitations", {"email": "x@example.test", "role": "owner"}, format="json"
        ),
    ]

    # then each is refused as the admin signed in is, and nothing changed
    for response in attempts:
        assert_error(response, 403, "permission_denied")
    assert Membership.objects.get(pk=admin.pk).role == Role.ADMIN
    assert Membership.objects.get(pk=owner.pk).role == Role.OWNER
    assert not Invitation.objects.filter(organization=org).exists()
    # while the key manages what the admin may: a member's role
    member = membership(org, team[Role.MEMBER])
    changed = _set_role(api, org, member, "billing")
    assert changed.status_code == 200, changed.content


def test_an_owners_api_key_may_make_an_owner_until_its_creator_is_no_longer_one(team):
    # given an owner's admin key
    org = team["org"]
    admin = membership(org, team[Role.ADMIN])
    api = key_client(_admin_key_of(team[Role.OWNER], org))

    # when it makes the admin owner
    promoted = _set_role(api, org, admin, "owner")

    # then it may, as its creator may
    assert promoted.status_code == 200, promoted.content
    # and once its creator is an admin, it may no longer touch an owner
    Membership.objects.filter(organization=org, user=team[Role.OWNER]).update(role=Role.ADMIN)
    demoted = _set_role(api, org, admin, "admin")
    assert_error(demoted, 403, "permission_denied")
    assert Membership.objects.get(pk=admin.pk).role == Role.OWNER


def test_a_key_stops_managing_members_when_its_creator_stops_being_an_admin(team):
    # given an admin's key, and a key that key made
    org = team["org"]
    member = membership(org, team[Role.MEMBER])
    api = key_client(_admin_key_of(team[Role.ADMIN], org))
    made = api.post("/api/v1/keys", {"name": "minted", "scopes": ["admin"]}, format="json")
    assert made.status_code == 201, made.content
    minted = key_client(made.json()["key"])

    # when the admin is made a member, then neither key manages anyone (the
    # minted one is its maker's creator's)
    Membership.objects.filter(organization=org, user=team[Role.ADMIN]).update(role=Role.MEMBER)
    for key in (api, minted):
        refused = _set_role(key, org, member, "billing")
        assert_error(refused, 403, "permission_denied")
        # nor makes, lists or revokes keys: its admin scope was its creator's
        made_again = key.post("/api/v1/keys", {"name": "again", "scopes": ["admin"]}, format="json")
        assert_error(made_again, 403, "permission_denied")
        assert_error(key.get("/api/v1/keys"), 403, "permission_denied")
    assert Membership.objects.get(pk=member.pk).role == Role.MEMBER
    assert audit(org, "member.role_changed") == []
    assert not ApiKey.objects.filter(organization=org, name="again").exists()


def test_an_operators_key_manages_members_but_no_owner(team):
    # given a key made with manage.py apikey_create (no creator)
    from accounts.services import apikey_create

    org = team["org"]
    _key, raw = apikey_create(organization=org, name="ops", scopes=[Scope.ADMIN])
    api = key_client(raw)
    member, owner = membership(org, team[Role.MEMBER]), membership(org, team[Role.OWNER])

    # then it changes a member's role, and not an owner's
    changed = _set_role(api, org, member, "billing")
    assert changed.status_code == 200, changed.content
    refused = _set_role(api, org, owner, "admin")
    assert_error(refused, 403, "permission_denied")
    assert Membership.objects.get(pk=owner.pk).role == Role.OWNER


def test_the_last_owner_cannot_be_demoted(team):
    # given
    org = team["org"]
    owner = membership(org, team[Role.OWNER])

    # when
    response = send(
        signed_in(team[Role.OWNER]),
        "patch",
        f"/api/v1/orgs/{org.pk}/members/{owner.pk}",
        {"role": "admin"},
    )

    # then
    assert_error(response, 409, "last_owner")
    owner.refresh_from_db()
    assert owner.role == Role.OWNER
    assert audit(org, "member.role_changed") == []


def test_an_owner_steps_down_once_there_is_another_owner(team):
    # given
    org = team["org"]
    client = signed_in(team[Role.OWNER])
    admin = membership(org, team[Role.ADMIN])
    owner = membership(org, team[Role.OWNER])
    promoted = send(client, "patch", f"/api/v1/orgs/{org.pk}/members/{admin.pk}", {"role": "owner"})
    assert promoted.status_code == 200

    # when
    response = send(
        client, "patch", f"/api/v1/orgs/{org.pk}/members/{owner.pk}", {"role": "member"}
    )

    # then
    assert response.status_code == 200
    assert set(
        Membership.objects.filter(organization=org, role=Role.OWNER).values_list("user", flat=True)
    ) == {team[Role.ADMIN].pk}
    assert [e.data for e in audit(org, "member.role_changed")] == [
        {"from": "admin", "to": "owner"},
        {"from": "owner", "to": "member"},
    ]


# --- invitations ------------------------------------------------------------------------------


def invite(client: Client, org: Organization, email: str, role: str = "member"):
    return send(
        client, "post", f"/api/v1/orgs/{org.pk}/invitations", {"email": email, "role": role}
    )


def token_from(message) -> str:
    match = re.search(r"token=([A-Za-z0-9_\-]+)", message.body)
    assert match, message.body
    return match[1]


def test_an_invitation_is_created_and_emailed(team, commit_then_mail):
    # given
    org = team["org"]

    # when
    with commit_then_mail():
        response = invite(signed_in(team[Role.ADMIN]), org, "New.Person@Example.TEST", "billing")

    # then
    assert response.status_code == 201
    assert response.json()["email"] == "new.person@example.test"
    assert response.json()["role"] == "billing"
    invitation = Invitation.objects.get(organization=org)
    assert invitation.email == "new.person@example.test"
    assert invitation.invited_by == team[Role.ADMIN]
    [message] = mail.outbox
    assert message.to == ["new.person@example.test"]
    token = token_from(message)
    assert token not in invitation.token_hash  # only its hash is kept
    [event] = audit(org, "member.invited")
    assert event.target == "new.person@example.test"
    assert event.data == {"role": "billing"}
    assert event.actor_user == team[Role.ADMIN]
    listing = signed_in(team[Role.ADMIN]).get(f"/api/v1/orgs/{org.pk}/invitations")
    assert [row["email"] for row in listing.json()["results"]] == ["new.person@example.test"]


def test_a_member_cannot_invite(team, commit_then_mail):
    # when
    with commit_then_mail():
        response = invite(signed_in(team[Role.MEMBER]), team["org"], "x@example.test")

    # then
    assert_error(response, 403, "permission_denied")
    assert not Invitation.objects.exists()
    assert mail.outbox == []


def test_inviting_the_same_email_twice_is_a_conflict(team, commit_then_mail):
    # given
    client = signed_in(team[Role.OWNER])
    with commit_then_mail():
        invite(client, team["org"], "x@example.test")

    # when
    with commit_then_mail():
        response = invite(client, team["org"], "x@example.test")

    # then
    assert_error(response, 409, "invitation_exists")
    assert Invitation.objects.count() == 1
    assert len(mail.outbox) == 1


def test_an_expired_invitation_gives_way_to_a_new_one(team, commit_then_mail):
    # given an invitation that expired unused
    client = signed_in(team[Role.OWNER])
    with commit_then_mail():
        invite(client, team["org"], "x@example.test")
    Invitation.objects.update(expires_at=timezone.now() - timedelta(seconds=1))

    # when the address is invited again
    with commit_then_mail():
        response = invite(client, team["org"], "x@example.test")

    # then a new invitation is made and emailed, and the expired one is closed
    assert response.status_code == 201
    old, new = Invitation.objects.order_by("pk")
    assert old.revoked_at is not None and new.revoked_at is None
    assert new.expires_at > timezone.now()
    assert len(mail.outbox) == 2


@pytest.fixture
def invited(team, commit_then_mail):
    """An invitation to a person who signed up (and so owns a personal organization)."""
    person = user_signup(email="invitee@example.test", password=None)
    with commit_then_mail():
        response = invite(signed_in(team[Role.OWNER]), team["org"], person.email, "admin")
    assert response.status_code == 201
    return person, token_from(mail.outbox[-1])


def test_the_invited_person_accepts_and_becomes_a_member(team, invited):
    # given
    org = team["org"]
    person, token = invited

    # when
    response = send(signed_in(person), "post", "/api/v1/invitations/accept", {"token": token})

    # then
    assert response.status_code == 201
    assert response.json()["email"] == person.email
    assert membership(org, person).role == Role.ADMIN
    assert Invitation.objects.get(organization=org).accepted_at is not None
    [added] = [e for e in audit(org, "member.added") if e.target == person.email]
    assert added.data == {"role": "admin"}
    open_invitations = signed_in(team[Role.OWNER]).get(f"/api/v1/orgs/{org.pk}/invitations")
    assert open_invitations.json()["results"] == []


def test_accepting_an_invitation_proves_the_address_it_was_sent_to(team, invited):
    # given an unverified account (signed up) invited by its address
    person, token = invited
    assert person.email_verified is False

    # when it accepts: the token came to that mailbox
    response = send(signed_in(person), "post", "/api/v1/invitations/accept", {"token": token})

    # then the address is verified
    assert response.status_code == 201
    person.refresh_from_db()
    assert person.email_verified is True


def test_an_email_longer_than_the_column_is_refused_not_a_server_error(team):
    # given a valid address of 260 characters (an address may have 320; the
    # column, as Django's EmailField, 254)
    email = "a" * 64 + "@" + ("b" * 63 + ".") * 3 + "com"
    assert len(email) == 260
    owner = signed_in(team[Role.OWNER])

    # when it is invited, or added
    invited = send(owner, "post", f"/api/v1/orgs/{team['org'].pk}/invitations", {"email": email})
    added = send(owner, "post", f"/api/v1/orgs/{team['org'].pk}/members", {"email": email})

    # then both are refused, naming the field, and nothing is written
    for response in (invited, added):
        assert assert_error(response, 400, "invalid_request")["param"] == "email"
    assert not Invitation.objects.filter(organization=team["org"]).exists()


# Each is a valid address as typed (checked as sent, 254 characters at most) that
# canonical_email (NFKC) makes longer than the column: U+FDFA is 18 characters with spaces
# among them (no address then), U+FB03 the three letters "ffi" (an address, of 262).
NFKC_EXPANDS = {
    "no-address": "a@" + "\ufdfa" * 14 + ".test",
    "past-the-column": "a@" + ".".join(["\ufb03" * 21] * 4) + ".test",
}


@pytest.mark.parametrize("email", NFKC_EXPANDS.values(), ids=NFKC_EXPANDS.keys())
def test_an_address_that_normalizes_past_the_column_is_refused_not_a_server_error(
    team, make_key, commit_then_mail, email
):
    # given an admin key, and an address that NFKC stretches
    org = team["org"]
    _key, raw = make_key(org, scopes=[Scope.ADMIN])
    assert len(email) <= 254 < len(User.objects.canonical_email(email))

    # when it is invited, under an Idempotency-Key
    with commit_then_mail():
        response = send(
            key_client(raw),
            "post",
            f"/api/v1/orgs/{org.pk}/invitations",
            {"email": email},
            HTTP_IDEMPOTENCY_KEY="stretched",
        )

    # then it is refused naming the field, and nothing is written, kept or sent
    assert assert_error(response, 400, "invalid_email")["param"] == "email"
    assert not Invitation.objects.filter(organization=org).exists()
    assert audit(org, "member.invited") == []
    assert not org.idempotency_records.exists()
    assert mail.outbox == []


def test_a_member_is_added_by_any_form_of_their_verified_address(team, member_of):
    # given a verified account under ada@example.test
    org = team["org"]
    ada = UserFactory(email="ada@example.test")
    assert ada.email_verified

    # when a manager adds "ada@\uff45xample.test" (a fullwidth e), the address that signs
    # in, and that an invitation reaches, as ada@example.test
    response = send(
        signed_in(team[Role.OWNER]),
        "post",
        f"/api/v1/orgs/{org.pk}/members",
        {"email": "ada@\uff45xample.test"},
    )

    # then Ada is the member added
    assert response.status_code == 201, response.content
    assert response.json()["email"] == "ada@example.test"
    assert membership(org, ada).role == Role.MEMBER


def test_someone_else_cannot_accept_the_invitation(team, invited):
    # given
    org = team["org"]
    _person, token = invited
    intruder = user_signup(email="intruder@example.test", password=None)

    # when
    response = send(signed_in(intruder), "post", "/api/v1/invitations/accept", {"token": token})

    # then
    assert_error(response, 403, "invitation_email_mismatch")
    assert not Membership.objects.filter(organization=org, user=intruder).exists()
    assert Invitation.objects.get(organization=org).accepted_at is None


def test_an_invitation_is_accepted_once(team, invited):
    # given
    org = team["org"]
    person, token = invited
    client = signed_in(person)
    assert send(client, "post", "/api/v1/invitations/accept", {"token": token}).status_code == 201
    added_events = len(audit(org, "member.added"))

    # when
    response = send(client, "post", "/api/v1/invitations/accept", {"token": token})

    # then
    assert_error(response, 409, "invitation_used")
    assert Membership.objects.filter(organization=org, user=person).count() == 1
    assert len(audit(org, "member.added")) == added_events


def test_an_unknown_token_is_refused(team, invited):
    # given
    person, _token = invited

    # when
    response = send(
        signed_in(person), "post", "/api/v1/invitations/accept", {"token": "not-a-token"}
    )

    # then
    error = assert_error(response, 404, "invitation_invalid")
    assert error["param"] == "token"
    assert not Membership.objects.filter(organization=team["org"], user=person).exists()


@pytest.mark.parametrize(
    "body",
    [b'{"token": "\\ud800"}', b'["token"]', b'{"token": "x", "role": "owner"}'],
    ids=["lone surrogate", "array", "unknown field"],
)
def test_a_bad_body_from_someone_in_no_organization_is_a_400(team, body):
    # given someone in no organization yet (an invitation is how they join one): their
    # body was read for its token before it was validated, and a lone surrogate in it
    # failed to hash (a 500); the rest were "unknown invitation" (404), not bad input
    loner = User.objects.create_user("loner@example.test", "a long passphrase, 44")
    client = signed_in(loner)
    client.raise_request_exception = False

    # when
    response = client.post("/api/v1/invitations/accept", body, content_type="application/json")

    # then
    assert_error(response, 400, "invalid_request")
    assert not Membership.objects.filter(user=loner).exists()


def test_an_api_key_cannot_accept_an_invitation(team, invited, make_key):
    # given
    _person, token = invited
    _key, raw = make_key(team["org"], scopes=[Scope.ADMIN])

    # when
    response = key_client(raw).post("/api/v1/invitations/accept", {"token": token}, format="json")

    # then
    assert_error(response, 403, "permission_denied")
    assert Invitation.objects.get(organization=team["org"]).accepted_at is None


def test_accepting_when_the_seats_are_full_is_refused(member_of, commit_then_mail):
    # given: an invitation sent while a seat was free, which someone else then took
    org = OrganizationFactory(seats=2)
    owner = member_of(org, Role.OWNER)
    person = user_signup(email="late@example.test", password=None)
    with commit_then_mail():
        invite(signed_in(owner), org, person.email)
    membership_add(organization=org, user=UserFactory(), role=Role.MEMBER, actor=owner)

    # when
    response = send(
        signed_in(person),
        "post",
        "/api/v1/invitations/accept",
        {"token": token_from(mail.outbox[-1])},
    )

    # then
    assert_error(response, 409, "no_seats_left")
    assert not Membership.objects.filter(organization=org, user=person).exists()
    assert Invitation.objects.get(organization=org).accepted_at is None


# --- revoking invitations ------------------------------------------------------------------------


def accept(person, token: str):
    return send(signed_in(person), "post", "/api/v1/invitations/accept", {"token": token})


def revoke(client, org: Organization, invitation_id: int):
    return client.delete(f"/api/v1/orgs/{org.pk}/invitations/{invitation_id}")


def invited_as(commit_then_mail, client, org: Organization, email: str, role: str):
    """An invitation sent through the API by `client`, and the token its email carried."""
    with commit_then_mail():
        response = invite(client, org, email, role)
    assert response.status_code == 201, response.content
    return Invitation.objects.get(pk=response.json()["id"]), token_from(mail.outbox[-1])


@pytest.mark.parametrize("by", ["admin session", "owner's api key"])
def test_a_manager_revokes_an_invitation_and_its_link_admits_nobody(team, commit_then_mail, by):
    # given an open invitation to an address that has an account
    org = team["org"]
    person = user_signup(email="invitee@example.test", password=None)
    invitation, token = invited_as(
        commit_then_mail, signed_in(team[Role.OWNER]), org, person.email, "member"
    )
    client = (
        signed_in(team[Role.ADMIN])
        if by == "admin session"
        else key_client(_admin_key_of(team[Role.OWNER], org))
    )

    # when it is revoked
    response = revoke(client, org, invitation.pk)

    # then it answers with the invitation, closed; the audit log says who; the list no
    # longer shows it; its token admits nobody; and the address may be invited again
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["id"], body["email"], body["role"]) == (invitation.pk, person.email, "member")
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None and body["revoked_at"] is not None
    [event] = audit(org, "invitation.revoked")
    assert (event.target, event.data) == (person.email, {"role": "member"})
    if by == "admin session":
        assert event.actor_user == team[Role.ADMIN]
    else:
        assert event.actor_key is not None and event.actor_user is None
    listing = signed_in(team[Role.OWNER]).get(f"/api/v1/orgs/{org.pk}/invitations")
    assert listing.json()["results"] == []
    assert_error(accept(person, token), 404, "invitation_invalid")
    assert not Membership.objects.filter(organization=org, user=person).exists()
    with commit_then_mail():
        again = invite(signed_in(team[Role.OWNER]), org, person.email)
    assert again.status_code == 201, again.content


def test_another_organizations_invitation_is_not_found_and_stays_open(team, member_of):
    # given an invitation of another organization
    other = OrganizationFactory(seats=5)
    member_of(other, Role.OWNER)
    theirs, _token = invitation_create(organization=other, email="theirs@example.test")
    client = signed_in(team[Role.OWNER])

    # when the owner of this one names it, through their organization or the other's
    via_own_org = revoke(client, team["org"], theirs.pk)
    via_their_org = revoke(client, other, theirs.pk)

    # then both are 404, as an id that does not exist, and it is still open
    assert_error(via_own_org, 404, "not_found")
    assert_error(via_their_org, 404, "not_found")
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert audit(other, "invitation.revoked") == []


@pytest.mark.parametrize(
    ("revoker", "role"),
    [(Role.MEMBER, "member"), (Role.BILLING, "member"), (Role.ADMIN, "owner")],
    ids=["member", "billing", "admin-revokes-an-owner-invitation"],
)
def test_who_may_not_invite_to_the_role_may_not_revoke(team, commit_then_mail, revoker, role):
    # given an owner's open invitation
    org = team["org"]
    invitation, _token = invited_as(
        commit_then_mail, signed_in(team[Role.OWNER]), org, "x@example.test", role
    )

    # when someone who could not have sent it revokes it
    response = revoke(signed_in(team[revoker]), org, invitation.pk)

    # then it is refused and stays open
    assert_error(response, 403, "permission_denied")
    invitation.refresh_from_db()
    assert invitation.revoked_at is None
    assert audit(org, "invitation.revoked") == []


@pytest.mark.parametrize(
    ("state", "code"),
    [
        ("accepted", "invitation_used"),
        ("revoked", "invitation_revoked"),
        ("expired", "invitation_expired"),
    ],
)
def test_an_invitation_no_longer_open_is_a_conflict_and_stays_as_it_was(team, invited, state, code):
    # given an invitation accepted, revoked or expired
    org = team["org"]
    person, token = invited
    invitation = Invitation.objects.get(organization=org)
    owner = signed_in(team[Role.OWNER])
    if state == "accepted":
        assert accept(person, token).status_code == 201
    elif state == "revoked":
        assert revoke(owner, org, invitation.pk).status_code == 200
    else:
        Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now())
    before = Invitation.objects.values("accepted_at", "revoked_at").get(pk=invitation.pk)
    events = len(audit(org, "invitation.revoked"))

    # when it is revoked
    response = revoke(owner, org, invitation.pk)

    # then the answer says why not, with a code, and nothing changed
    assert_error(response, 409, code)
    assert Invitation.objects.values("accepted_at", "revoked_at").get(pk=invitation.pk) == before
    assert len(audit(org, "invitation.revoked")) == events
    if state == "accepted":
        assert membership(org, person).role == Role.ADMIN


# A removed or demoted sender: what they sent goes with their power to send it.


def test_a_removed_admin_cannot_come_back_through_an_invitation_they_sent(team, commit_then_mail):
    # given admin Mallory invites another address of hers as admin, and another admin
    # invites someone else
    org = team["org"]
    mallory = team[Role.ADMIN]
    hers, token = invited_as(
        commit_then_mail, signed_in(mallory), org, "mallory.alt@example.test", "admin"
    )
    colleague = UserFactory()
    membership_add(organization=org, user=colleague, role=Role.ADMIN)
    kept, _ = invited_as(commit_then_mail, signed_in(colleague), org, "kept@example.test", "member")

    # when an owner removes Mallory
    removed = signed_in(team[Role.OWNER]).delete(
        f"/api/v1/orgs/{org.pk}/members/{membership(org, mallory).pk}"
    )

    # then her invitation is revoked with her, audited with why; the colleague's stays
    assert removed.status_code == 204, removed.content
    hers.refresh_from_db()
    kept.refresh_from_db()
    assert hers.revoked_at is not None and kept.revoked_at is None
    [event] = audit(org, "invitation.revoked")
    assert event.target == "mallory.alt@example.test"
    assert event.data == {"role": "admin", "reason": "sender_removed"}
    assert event.actor_user == team[Role.OWNER]
    # and when she signs up with the other address and accepts, she is refused
    alt = user_signup(email="mallory.alt@example.test", password=None)
    assert_error(accept(alt, token), 404, "invitation_invalid")
    assert not Membership.objects.filter(organization=org, user=alt).exists()


def test_removing_an_admin_revokes_what_they_sent_with_their_api_key(team, commit_then_mail):
    # given an invitation sent with an admin's admin key
    org = team["org"]
    api = key_client(_admin_key_of(team[Role.ADMIN], org))
    invitation, token = invited_as(commit_then_mail, api, org, "by-key@example.test", "admin")
    assert invitation.invited_by is None and invitation.invited_by_key is not None

    # when the admin is removed
    membership_remove_response = signed_in(team[Role.OWNER]).delete(
        f"/api/v1/orgs/{org.pk}/members/{membership(org, team[Role.ADMIN]).pk}"
    )

    # then the invitation is revoked, and its token admits nobody
    assert membership_remove_response.status_code == 204
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None
    person = user_signup(email="by-key@example.test", password=None)
    assert_error(accept(person, token), 404, "invitation_invalid")


@pytest.mark.parametrize(
    ("new_role", "revoked"),
    [(Role.ADMIN, {"owner"}), (Role.MEMBER, {"owner", "admin", "member"})],
)
def test_a_demoted_owner_loses_the_invitations_to_roles_they_can_no_longer_give(
    team, commit_then_mail, new_role, revoked
):
    # given a second owner who invited an owner, an admin and a member
    org = team["org"]
    second = UserFactory()
    membership_add(organization=org, user=second, role=Role.OWNER)
    for role in ("owner", "admin", "member"):
        invited_as(commit_then_mail, signed_in(second), org, f"{role}@example.test", role)

    # when the first owner demotes them
    response = send(
        signed_in(team[Role.OWNER]),
        "patch",
        f"/api/v1/orgs/{org.pk}/members/{membership(org, second).pk}",
        {"role": new_role},
    )

    # then the invitations to roles their new role does not give are revoked, and only those
    assert response.status_code == 200, response.content
    closed = set(
        Invitation.objects.filter(organization=org, revoked_at__isnull=False).values_list(
            "role", flat=True
        )
    )
    assert closed == revoked
    assert {e.data["role"] for e in audit(org, "invitation.revoked")} == revoked
    assert {e.data["reason"] for e in audit(org, "invitation.revoked")} == {"sender_role_changed"}


# Invitations sent before removal revoked them (or by someone deactivated rather than
# removed): accepting one checks its sender again.


def test_an_owner_invitation_from_an_owner_since_demoted_is_refused_at_accept(
    team, commit_then_mail
):
    # given a second owner's invitations to be owner and to be member, and the second
    # owner then made admin without their invitations being touched (as before demotion
    # revoked them)
    org = team["org"]
    organization_entitlements_set(organization=org, reason="test: seats for both", seats=10)
    second = UserFactory()
    membership_add(organization=org, user=second, role=Role.OWNER)
    owner_invitee = user_signup(email="would-be-owner@example.test", password=None)
    member_invitee = user_signup(email="plain-member@example.test", password=None)
    _, owner_token = invited_as(
        commit_then_mail, signed_in(second), org, owner_invitee.email, "owner"
    )
    _, member_token = invited_as(
        commit_then_mail, signed_in(second), org, member_invitee.email, "member"
    )
    Membership.objects.filter(organization=org, user=second).update(role=Role.ADMIN)

    # when both are accepted
    as_owner = accept(owner_invitee, owner_token)
    as_member = accept(member_invitee, member_token)

    # then the owner invitation is refused, saying why, and the member one, which an
    # admin may still give, stands
    error = assert_error(as_owner, 403, "invitation_sender_not_allowed")
    assert "new invitation" in error["message"]
    assert not Membership.objects.filter(organization=org, user=owner_invitee).exists()
    assert Invitation.objects.get(email=owner_invitee.email).accepted_at is None
    assert as_member.status_code == 201, as_member.content
    assert membership(org, member_invitee).role == Role.MEMBER


@pytest.mark.parametrize("how", ["removed", "deactivated"])
def test_an_invitation_from_a_sender_who_left_is_refused_at_accept(team, commit_then_mail, how):
    # given an admin's invitation, and the admin gone without it being revoked (removed
    # before removal revoked invitations, or deactivated by staff)
    org = team["org"]
    admin = team[Role.ADMIN]
    person = user_signup(email="late@example.test", password=None)
    _, token = invited_as(commit_then_mail, signed_in(admin), org, person.email, "member")
    if how == "removed":
        Membership.objects.filter(organization=org, user=admin).delete()
    else:
        User.objects.filter(pk=admin.pk).update(is_active=False)

    # when it is accepted
    response = accept(person, token)

    # then it is refused
    assert_error(response, 403, "invitation_sender_not_allowed")
    assert not Membership.objects.filter(organization=org, user=person).exists()


def test_an_operators_key_invitation_is_accepted(team, make_key, commit_then_mail):
    # given an invitation sent with a key made by `manage.py apikey_create` (no creator)
    org = team["org"]
    _key, raw = make_key(org, scopes=[Scope.ADMIN])
    person = user_signup(email="ops-invited@example.test", password=None)
    _, token = invited_as(commit_then_mail, key_client(raw), org, person.email, "admin")

    # when it is accepted
    response = accept(person, token)

    # then the key's scope was its power, as when it invited: the person joins
    assert response.status_code == 201, response.content
    assert membership(org, person).role == Role.ADMIN


@pytest.mark.parametrize("creator", ["admin", "operator"])
def test_revoking_a_key_revokes_the_open_invitations_it_sent(
    team, make_key, commit_then_mail, creator
):
    # given an invitation sent with an admin key (an admin's, or an operator's without a
    # creator), and another sent by an admin signed in
    org = team["org"]
    made_by = team[Role.ADMIN] if creator == "admin" else None
    key, raw = make_key(org, scopes=[Scope.ADMIN], actor=made_by)
    person = user_signup(email=f"leaked-{creator}@example.test", password=None)
    sent, token = invited_as(commit_then_mail, key_client(raw), org, person.email, "admin")
    kept, _ = invited_as(
        commit_then_mail, signed_in(team[Role.ADMIN]), org, "kept@example.test", "member"
    )

    # when an owner revokes the key: it leaked, and was used to invite an outsider
    owner = signed_in(team[Role.OWNER])
    response = owner.delete(f"/api/v1/keys/{key.pk}")

    # then its invitation is revoked with it, audited with why; the list shows only the
    # other; the token admits nobody; and the address may be invited again
    assert response.status_code == 200, response.content
    sent.refresh_from_db()
    kept.refresh_from_db()
    assert sent.revoked_at is not None and kept.revoked_at is None
    [event] = audit(org, "invitation.revoked")
    assert (event.target, event.data) == (
        person.email,
        {"role": "admin", "reason": "sender_key_revoked"},
    )
    assert event.actor_user == team[Role.OWNER]
    listing = owner.get(f"/api/v1/orgs/{org.pk}/invitations")
    assert [row["email"] for row in listing.json()["results"]] == ["kept@example.test"]
    assert_error(accept(person, token), 404, "invitation_invalid")
    assert not Membership.objects.filter(organization=org, user=person).exists()
    with commit_then_mail():
        again = invite(owner, org, person.email, "admin")
    assert again.status_code == 201, again.content


def test_revoking_a_key_revokes_the_invitations_sent_with_keys_made_from_it(
    team, make_key, commit_then_mail
):
    # given an admin's key, a key made with it, and an invitation sent with that child
    org = team["org"]
    parent, parent_raw = make_key(org, scopes=[Scope.ADMIN], actor=team[Role.ADMIN])
    child = key_client(parent_raw).post(
        "/api/v1/keys", {"name": "child", "scopes": ["admin"]}, format="json"
    )
    assert child.status_code == 201, child.content
    person = user_signup(email="child-invited@example.test", password=None)
    sent, token = invited_as(
        commit_then_mail, key_client(child.json()["key"]), org, person.email, "member"
    )

    # when an owner revokes the parent
    response = signed_in(team[Role.OWNER]).delete(f"/api/v1/keys/{parent.pk}")

    # then the child's invitation dies with it, audited with why
    assert response.status_code == 200, response.content
    sent.refresh_from_db()
    assert sent.revoked_at is not None
    [event] = audit(org, "invitation.revoked")
    assert (event.target, event.data) == (
        person.email,
        {"role": "member", "reason": "sender_key_revoked"},
    )
    assert_error(accept(person, token), 404, "invitation_invalid")


def test_an_invitation_sent_with_a_key_revoked_before_it_closed_them_is_refused(
    team, make_key, commit_then_mail
):
    # given an invitation sent with an admin's key, then the key revoked without its
    # invitations being touched (as before revoking a key revoked them)
    org = team["org"]
    key, raw = make_key(org, scopes=[Scope.ADMIN], actor=team[Role.ADMIN])
    person = user_signup(email="leaked@example.test", password=None)
    sent, token = invited_as(commit_then_mail, key_client(raw), org, person.email, "admin")
    ApiKey.objects.filter(pk=key.pk).update(revoked_at=timezone.now())

    # when the invitation is accepted
    response = accept(person, token)

    # then it is refused: the revoked key vouches for nothing it did
    assert_error(response, 403, "invitation_sender_not_allowed")
    assert not Membership.objects.filter(organization=org, user=person).exists()
    # and revoking the key again closes it, so that it is no longer listed as open
    again = signed_in(team[Role.OWNER]).delete(f"/api/v1/keys/{key.pk}")
    assert again.status_code == 200, again.content
    sent.refresh_from_db()
    assert sent.revoked_at is not None
    listing = signed_in(team[Role.OWNER]).get(f"/api/v1/orgs/{org.pk}/invitations")
    assert listing.json()["results"] == []


def test_an_invitation_expired_after_its_key_was_revoked_is_listed_as_revoked_not_expired(
    team, make_key, commit_then_mail
):
    # given three invitations, all past their expiry and none revoked by its own row: one
    # sent with a key revoked while it was open, before revoking a key closed its
    # invitations (it expired before the migration that closed those left open ran), one
    # sent with a key revoked only after it had expired, and one an admin sent signed in
    org = team["org"]
    owner = signed_in(team[Role.OWNER])
    (leaked_key, leaked_raw), (late_key, late_raw) = (
        make_key(org, scopes=[Scope.ADMIN], actor=team[Role.ADMIN], name=name)
        for name in ("leaked", "late")
    )
    leaked, _ = invited_as(
        commit_then_mail, key_client(leaked_raw), org, "leaked@example.test", "member"
    )
    late, _ = invited_as(commit_then_mail, key_client(late_raw), org, "late@example.test", "member")
    mine, _ = invited_as(
        commit_then_mail, signed_in(team[Role.ADMIN]), org, "mine@example.test", "member"
    )
    expired_at = timezone.now() - timedelta(days=1)
    Invitation.objects.filter(pk__in=[leaked.pk, late.pk, mine.pk]).update(expires_at=expired_at)
    ApiKey.objects.filter(pk=leaked_key.pk).update(revoked_at=expired_at - timedelta(days=2))
    ApiKey.objects.filter(pk=late_key.pk).update(revoked_at=expired_at + timedelta(hours=1))

    # when the open invitations are listed, and the one revoked with its key withdrawn
    listing = owner.get(f"/api/v1/orgs/{org.pk}/invitations")
    withdrawn = owner.delete(f"/api/v1/orgs/{org.pk}/invitations/{leaked.pk}")

    # then the list leaves it out, as it leaves out every revoked invitation, and keeps the
    # two that did expire; withdrawing it says it is revoked, not expired
    assert listing.status_code == 200, listing.content
    assert {row["email"] for row in listing.json()["results"]} == {
        "late@example.test",
        "mine@example.test",
    }
    assert_error(withdrawn, 409, "invitation_revoked")
    for row in (leaked, late, mine):
        row.refresh_from_db()
    assert [row.status for row in (leaked, late, mine)] == ["revoked", "expired", "expired"]


# --- the audit log over the dashboard -------------------------------------------------------------


def test_owners_and_admins_read_the_audit_log_and_others_do_not(team):
    # given: some membership history
    org = team["org"]
    owner_client = signed_in(team[Role.OWNER])
    target = membership(org, team[Role.MEMBER])
    send(owner_client, "patch", f"/api/v1/orgs/{org.pk}/members/{target.pk}", {"role": "billing"})
    owner_client.delete(f"/api/v1/orgs/{org.pk}/members/{target.pk}")

    # when
    as_owner = owner_client.get("/api/v1/audit", HTTP_X_ORGANIZATION=org.slug)
    as_admin = signed_in(team[Role.ADMIN]).get("/api/v1/audit", HTTP_X_ORGANIZATION=org.slug)
    as_billing = signed_in(team[Role.BILLING]).get("/api/v1/audit", HTTP_X_ORGANIZATION=org.slug)

    # then
    assert as_owner.status_code == 200
    actions = [row["action"] for row in as_owner.json()["results"]]
    assert actions[:2] == ["member.removed", "member.role_changed"]
    assert actions.count("member.added") == 4
    assert as_owner.json()["results"][0]["actor"] == team[Role.OWNER].email
    assert as_admin.json() == as_owner.json()
    assert_error(as_billing, 403, "permission_denied")


def test_organization_create_is_audited_with_its_owner(member_of):
    # given
    owner = UserFactory()

    # when
    org = organization_create(slug="acme", owner=owner)

    # then
    [event] = audit(org, "organization.created")
    assert event.actor_user == owner
    assert membership(org, owner).role == Role.OWNER
