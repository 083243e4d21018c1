"""The members page: members and open invitations; invite, add, change a role, remove."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.core import mail
from django.test import Client
from django.utils import timezone

from accounts.models import ApiKey, Invitation, Membership, Role, Scope
from accounts.services import apikey_create, invitation_create, membership_add, user_signup
from accounts.views.members import MembersPage
from tests.dashboard.conftest import assert_refused
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def team(member):
    """An owner signed in, with an admin and a member, in an organization of 5 seats."""
    owner, org = member(Role.OWNER, organization=OrganizationFactory(seats=5))
    admin, plain = UserFactory(), UserFactory()
    membership_add(organization=org, user=admin, role=Role.ADMIN)
    membership_add(organization=org, user=plain, role=Role.MEMBER)
    return org, owner, admin, plain


def membership(org, user) -> Membership:
    return Membership.objects.get(organization=org, user=user)


def roles(org) -> dict[str, str]:
    return dict(Membership.objects.filter(organization=org).values_list("user__email", "role"))


def test_the_page_lists_members_and_open_invitations_of_this_organization_only(client, team):
    # given an open invitation, an accepted-or-revoked one, and another organization's people
    org, owner, admin, plain = team
    invitation_create(organization=org, email="new@example.test", role=Role.BILLING, actor=owner)
    old, _ = invitation_create(organization=org, email="old@example.test", actor=owner)
    Invitation.objects.filter(pk=old.pk).update(revoked_at=old.created_at)
    other = OrganizationFactory(seats=5)
    stranger = UserFactory()
    membership_add(organization=other, user=stranger)
    invitation_create(organization=other, email="theirs@example.test")

    # when
    response = client.get("/dashboard/members")

    # then
    assert response.status_code == 200
    page = response.content.decode()
    assert re.findall(r'data-member="([^"]+)"', page) == [owner.email, admin.email, plain.email]
    assert re.findall(r'data-invitation="([^"]+)"', page) == ["new@example.test"]
    invited = re.search(r'data-invitation="new@example.test">(.*?)</tr>', page, re.S).group(1)
    assert "Billing" in invited and owner.email in invited
    assert "3 of 5 seats taken" in page
    assert stranger.email not in page and "theirs@" not in page


def invitation_rows(response) -> dict[str, str]:
    """The invitations a page lists, in its order, each with the text of its row."""
    found = re.findall(r'<tr data-invitation="([^"]+)">(.*?)</tr>', response.content.decode(), re.S)
    return dict(found)


def test_the_page_lists_the_newest_open_invitations_and_marks_the_expired(
    client, team, monkeypatch
):
    # given three open invitations, the oldest expired
    org, owner, *_ = team
    for name in ("old", "mid", "new"):
        invitation_create(organization=org, email=f"{name}@example.test", actor=owner)
    Invitation.objects.filter(email="old@example.test").update(expires_at=timezone.now())

    # when the page lists one, then three
    monkeypatch.setattr(MembersPage, "shown_invitations", 1)
    one = client.get("/dashboard/members")
    monkeypatch.setattr(MembersPage, "shown_invitations", 3)
    three = client.get("/dashboard/members")

    # then the newest come first, the older are left to the API, and the expired say so
    assert list(invitation_rows(one)) == ["new@example.test"]
    assert b"the invitations API lists them all" in one.content
    rows = invitation_rows(three)
    assert list(rows) == ["new@example.test", "mid@example.test", "old@example.test"]
    assert "(expired)" in rows["old@example.test"]
    assert "(expired)" not in rows["mid@example.test"]
    assert b"the invitations API lists them all" not in three.content


def test_an_expired_invitation_whose_key_was_revoked_while_it_was_open_is_not_listed(client, team):
    # given two expired invitations sent with admin keys: one key revoked while its
    # invitation was open (before revoking a key closed them, so its own row says nothing),
    # the other only after its invitation had expired
    org, _owner, admin, _plain = team
    keys = {}
    for name in ("leaked", "late"):
        keys[name], _raw = apikey_create(
            organization=org, name=name, scopes=[Scope.ADMIN], actor=admin
        )
        invitation_create(organization=org, email=f"{name}@example.test", actor_key=keys[name])
    expired_at = timezone.now() - timedelta(days=1)
    Invitation.objects.filter(organization=org).update(expires_at=expired_at)
    ApiKey.objects.filter(pk=keys["leaked"].pk).update(revoked_at=expired_at - timedelta(days=1))
    ApiKey.objects.filter(pk=keys["late"].pk).update(revoked_at=expired_at + timedelta(hours=1))

    # when
    response = client.get("/dashboard/members")

    # then the one revoked with its key is gone, as revoked ones are; the other is expired
    rows = invitation_rows(response)
    assert list(rows) == ["late@example.test"]
    assert "(expired)" in rows["late@example.test"]


def test_inviting_by_email_creates_an_invitation_and_sends_it(client, team, commit_then_mail):
    org, owner, *_ = team

    with commit_then_mail():
        response = client.post("/dashboard/members", {"email": "Zoe@Example.test", "role": "admin"})

    assert response.status_code == 302 and response["Location"] == "/dashboard/members"
    invitation = Invitation.objects.get(organization=org)
    assert (invitation.email, invitation.role, invitation.invited_by) == (
        "zoe@example.test",
        Role.ADMIN,
        owner,
    )
    assert [m.to for m in mail.outbox] == [["zoe@example.test"]]
    assert b"Invited zoe@example.test as admin" in client.get("/dashboard/members").content


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        ({"email": "not-an-email", "role": "member"}, 400, "invalid_email"),
        ({"email": "a@example.test", "role": "king"}, 400, "invalid_role"),
        ({"email": "dup@example.test", "role": "member"}, 409, "invitation_exists"),
        ({"email": "{plain}", "role": "member"}, 409, "already_member"),
        # NFKC makes each U+FDFA 18 characters, spaces among them: no address, past the column
        ({"email": "a@" + "\ufdfa" * 14 + ".test", "role": "member"}, 400, "invalid_email"),
    ],
    ids=["bad-email", "unknown-role", "already-invited", "already-a-member", "nfkc-expands"],
)
def test_a_refused_invitation_is_drawn_with_its_code_and_sends_nothing(
    client, team, data, status, code, commit_then_mail
):
    # given one open invitation already
    org, owner, _admin, plain = team
    invitation_create(organization=org, email="dup@example.test", actor=owner)

    # when
    with commit_then_mail():
        response = client.post(
            "/dashboard/members", {**data, "email": data["email"].format(plain=plain.email)}
        )

    # then the form keeps what was typed, and nothing was written or sent
    assert_refused(response, status, code)
    assert f'value="{data["email"].format(plain=plain.email)}"'.encode() in response.content
    assert Invitation.objects.filter(organization=org).count() == 1
    assert mail.outbox == []


def test_only_an_owner_invites_an_owner(client, member):
    # given an admin signed in
    _, org = member(Role.ADMIN, organization=OrganizationFactory(seats=5))

    # when
    response = client.post("/dashboard/members", {"email": "boss@example.test", "role": "owner"})

    # then
    assert_refused(response, 403, "permission_denied")
    assert not Invitation.objects.filter(organization=org).exists()


def test_someone_with_an_account_is_added_while_a_seat_is_free(client, member):
    # given two seats, one taken by the owner
    _, org = member(Role.OWNER, organization=OrganizationFactory(seats=2))
    first, second = UserFactory(), UserFactory()

    # when the owner adds two people
    added = client.post("/dashboard/members", {"email": first.email, "role": "billing", "add": "1"})
    refused = client.post(
        "/dashboard/members", {"email": second.email, "role": "member", "add": "1"}
    )

    # then the first takes the last seat, and the second is refused
    assert added.status_code == 302
    assert membership(org, first).role == Role.BILLING
    assert_refused(refused, 409, "no_seats_left")
    assert b"All 2 seats are taken" in refused.content
    assert Membership.objects.filter(organization=org).count() == 2


def test_adding_an_unknown_email_points_to_an_invitation(client, team):
    org, *_ = team

    response = client.post(
        "/dashboard/members", {"email": "x@nowhere.test", "role": "member", "add": "1"}
    )

    assert_refused(response, 404, "user_not_found")
    assert Membership.objects.filter(organization=org).count() == 3


def test_adding_an_unverified_account_answers_as_adding_an_unknown_email(client, team):
    # given someone who signed up under an address without proving it
    org, *_ = team
    squatter = user_signup(email="cfo@example.test", password=None)

    # when a manager adds that address at once
    response = client.post(
        "/dashboard/members", {"email": "cfo@example.test", "role": "member", "add": "1"}
    )

    # then the page says what it says of an address with no account, and nobody joined
    assert_refused(response, 404, "user_not_found")
    assert b"No user has that email; send an invitation instead." in response.content
    assert not Membership.objects.filter(organization=org, user=squatter).exists()


def test_changing_a_role(client, team):
    org, _owner, _admin, plain = team

    response = client.post(
        f"/dashboard/members/{membership(org, plain).pk}/role", {"role": "admin"}
    )

    assert response.status_code == 302 and response["Location"] == "/dashboard/members"
    assert membership(org, plain).role == Role.ADMIN
    assert f"{plain.email} is now admin".encode() in client.get("/dashboard/members").content


def test_the_last_owner_stays_an_owner(client, team):
    # given the owner is the only one
    org, owner, *_ = team
    before = roles(org)

    # when they try to step down, and to leave
    demoted = client.post(f"/dashboard/members/{membership(org, owner).pk}/role", {"role": "admin"})
    removed = client.post(f"/dashboard/members/{membership(org, owner).pk}/remove")

    # then
    assert_refused(demoted, 409, "last_owner")
    assert_refused(removed, 409, "last_owner")
    assert roles(org) == before


def test_an_admin_cannot_make_an_owner_nor_change_one(client, member):
    # given an admin signed in, an owner and a member
    _, org = member(Role.ADMIN, organization=OrganizationFactory(seats=5))
    owner, plain = UserFactory(), UserFactory()
    membership_add(organization=org, user=owner, role=Role.OWNER)
    membership_add(organization=org, user=plain, role=Role.MEMBER)
    before = roles(org)

    # when
    promoted = client.post(
        f"/dashboard/members/{membership(org, plain).pk}/role", {"role": "owner"}
    )
    removed = client.post(f"/dashboard/members/{membership(org, owner).pk}/remove")

    # then
    assert_refused(promoted, 403, "permission_denied")
    assert_refused(removed, 403, "permission_denied")
    assert roles(org) == before


def test_an_unknown_role_is_refused(client, team):
    org, _owner, _admin, plain = team

    response = client.post(f"/dashboard/members/{membership(org, plain).pk}/role", {"role": "god"})

    assert_refused(response, 400, "invalid_role")
    assert membership(org, plain).role == Role.MEMBER


def test_removing_asks_first_then_the_member_is_gone(client, team):
    org, _owner, _admin, plain = team
    target = membership(org, plain)

    asked = client.get(f"/dashboard/members?remove={target.pk}")
    removed = client.post(f"/dashboard/members/{target.pk}/remove")

    assert f'action="/dashboard/members/{target.pk}/remove"'.encode() in asked.content
    assert removed.status_code == 302
    assert not Membership.objects.filter(pk=target.pk).exists()
    assert f"Removed {plain.email}".encode() in client.get("/dashboard/members").content


def test_another_organizations_member_is_not_found_and_stays(client, team):
    # given a member of another organization
    other = OrganizationFactory(seats=5)
    stranger = UserFactory()
    theirs = membership_add(organization=other, user=stranger, role=Role.MEMBER)

    # when
    promoted = client.post(f"/dashboard/members/{theirs.pk}/role", {"role": "admin"})
    removed = client.post(f"/dashboard/members/{theirs.pk}/remove")

    # then
    assert_refused(promoted, 404, "not_found")
    assert_refused(removed, 404, "not_found")
    theirs.refresh_from_db()
    assert theirs.role == Role.MEMBER


def test_revoking_an_invitation_from_its_row(client, team, commit_then_mail):
    # given an open invitation, and an expired one
    org, owner, *_ = team
    with commit_then_mail():
        client.post("/dashboard/members", {"email": "zoe@example.test", "role": "admin"})
    token = re.search(r"token=([A-Za-z0-9_\-]+)", mail.outbox[-1].body)[1]
    invitation = Invitation.objects.get(email="zoe@example.test")
    expired, _ = invitation_create(organization=org, email="old@example.test", actor=owner)
    Invitation.objects.filter(pk=expired.pk).update(expires_at=timezone.now())

    # when the owner presses the open one's Revoke
    shown = client.get("/dashboard/members")
    response = client.post(f"/dashboard/invitations/{invitation.pk}/revoke")

    # then the open one had the button (the expired one, which admits nobody, none); it
    # is revoked, said so, and gone from the list; and its link admits nobody
    rows = invitation_rows(shown)
    assert f'action="/dashboard/invitations/{invitation.pk}/revoke"' in rows["zoe@example.test"]
    assert "Revoke" not in rows["old@example.test"]
    assert response.status_code == 302 and response["Location"] == "/dashboard/members"
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None
    after = client.get("/dashboard/members")
    assert b"Revoked the invitation to zoe@example.test" in after.content
    assert list(invitation_rows(after)) == ["old@example.test"]
    newcomer = UserFactory(email="zoe@example.test")
    client.force_login(newcomer)
    accepted = client.post("/invitations/accept", {"token": token})
    assert_refused(accepted, 404, "invitation_invalid")
    assert not Membership.objects.filter(organization=org, user=newcomer).exists()


def test_revoking_is_refused_for_another_organizations_invitation_and_an_admin_for_an_owner(
    client, member
):
    # given an admin signed in, an owner's invitation to be owner, and another
    # organization's invitation
    _admin, org = member(Role.ADMIN, organization=OrganizationFactory(seats=5))
    owner = UserFactory()
    membership_add(organization=org, user=owner, role=Role.OWNER)
    to_owner, _ = invitation_create(
        organization=org, email="boss@example.test", role=Role.OWNER, actor=owner
    )
    theirs, _ = invitation_create(organization=OrganizationFactory(), email="t@example.test")

    # when the admin revokes each
    not_theirs = client.post(f"/dashboard/invitations/{theirs.pk}/revoke")
    not_allowed = client.post(f"/dashboard/invitations/{to_owner.pk}/revoke")

    # then neither is revoked
    assert_refused(not_theirs, 404, "not_found")
    assert_refused(not_allowed, 403, "permission_denied")
    assert not Invitation.objects.filter(revoked_at__isnull=False).exists()


@pytest.mark.parametrize("role", [Role.BILLING, Role.MEMBER])
def test_other_roles_get_the_403_page_and_change_nothing(client, member, role):
    # given
    _, org = member(role, organization=OrganizationFactory(seats=5))
    owner = UserFactory()
    membership_add(organization=org, user=owner, role=Role.OWNER)
    target = membership(org, owner)
    before = roles(org)

    # when
    responses = [
        client.get("/dashboard/members"),
        client.post("/dashboard/members", {"email": "a@example.test", "role": "member"}),
        client.post("/dashboard/members", {"email": owner.email, "role": "member", "add": "1"}),
        client.post(f"/dashboard/members/{target.pk}/role", {"role": "member"}),
        client.post(f"/dashboard/members/{target.pk}/remove"),
    ]

    # then
    for response in responses:
        assert_refused(response, 403, "permission_denied")
    assert roles(org) == before
    assert not Invitation.objects.exists()


def test_changes_are_post_only_and_need_the_csrf_token(team):
    org, owner, _admin, plain = team
    target = membership(org, plain)
    client = Client(enforce_csrf_checks=True)
    client.force_login(owner)

    fetched = client.get(f"/dashboard/members/{target.pk}/remove")
    forged = client.post(f"/dashboard/members/{target.pk}/remove")
    invited = client.post("/dashboard/members", {"email": "a@example.test", "role": "member"})

    assert fetched.status_code == 405
    assert forged.status_code == 403 and invited.status_code == 403
    assert Membership.objects.filter(pk=target.pk).exists()
    assert not Invitation.objects.exists()


def test_the_page_reads_the_same_queries_however_many_members(
    client, member, django_assert_max_num_queries
):
    owner, org = member(Role.OWNER, organization=OrganizationFactory(seats=50))
    for n in range(20):
        membership_add(organization=org, user=UserFactory())
        invitation_create(organization=org, email=f"i{n}@example.test", actor=owner)

    with django_assert_max_num_queries(5):
        response = client.get("/dashboard/members")

    assert response.content.count(b"data-member=") == 21
    assert response.content.count(b"data-invitation=") == 20
