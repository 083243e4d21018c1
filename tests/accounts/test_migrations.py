"""Data the accounts migrations must carry over, tried on the real schema."""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.test import Client
from django.utils import timezone

from accounts.models import ApiKey, AuditEvent, Invitation, Role, Scope, User
from accounts.services import (
    invitation_accept,
    invitation_create,
    invitation_revoke,
    user_signup,
)
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = ("accounts", "0006_priority_known_email_any_case")
VERIFIED = ("accounts", "0007_user_email_verified")
CALLER = ("accounts", "0008_idempotency_record_caller")
PREVIOUSLY_VERIFIED = ("accounts", "0009_user_email_previously_verified")
KEY_SENDER = ("accounts", "0010_invitation_invited_by_key")
SENDER_KEY_REVOKED = ("accounts", "0011_invitation_sent_with_revoked_key_revoke")
LATEST = None  # every app's latest migration


@pytest.fixture
def migrate():
    """Migrates the test database to a node; after the test, back to the latest."""

    def _migrate(target: tuple[str, str] | None):
        executor = MigrationExecutor(connection)
        targets = executor.loader.graph.leaf_nodes() if target is LATEST else [target]
        executor.migrate(targets)
        return executor.loader.project_state(targets).apps

    yield _migrate
    executor = MigrationExecutor(connection)
    executor.migrate(executor.loader.graph.leaf_nodes())


def test_every_user_made_before_email_verification_is_verified(migrate):
    # given a user made before email verification existed
    old = migrate(BEFORE)
    old.get_model("accounts", "User").objects.create(email="early@example.test")

    # when the migration runs
    new = migrate(VERIFIED)

    # then they are verified: only an account signed up from now on starts unverified
    user = new.get_model("accounts", "User").objects.get(email="early@example.test")
    assert user.email_verified is True


def test_no_account_unverified_at_the_upgrade_escapes_being_reclaimed(migrate):
    # given, before the column existed: unverified accounts, one of which has signed in
    # (a squatter's, from before unverified accounts were refused sign-in, or an owner's
    # whose address staff changed: nothing tells which), and a verified one
    old = migrate(CALLER)
    users = old.get_model("accounts", "User").objects
    now = timezone.now()
    users.create(email="signed-in@example.test", email_verified=False, last_login=now)
    users.create(email="never@example.test", email_verified=False)
    users.create(email="proven@example.test", email_verified=True, last_login=now)

    # when the migration runs
    new = migrate(PREVIOUSLY_VERIFIED)

    # then none counts as having proven an address before: a reset still reclaims the
    # unverified ones from whoever may have squatted them
    previously = dict(
        new.get_model("accounts", "User").objects.values_list("email", "email_previously_verified")
    )
    assert previously == {
        "signed-in@example.test": False,
        "never@example.test": False,
        "proven@example.test": False,
    }


def test_a_user_inserted_without_the_verified_column_is_verified(db):
    # given a process not yet upgraded, which inserts users without email_verified
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO accounts_user (password, is_superuser, first_name, last_name, "
            "is_staff, is_active, date_joined, email) "
            "VALUES ('!', false, '', '', false, true, now(), 'old.code@example.test')"
        )

    # then the database gives it what the model's default would
    assert User.objects.get(email="old.code@example.test").email_verified is True


def test_invitations_of_keys_revoked_before_revoking_closed_them_are_revoked(
    migrate, member_of, make_key, monkeypatch
):
    # given, made by the real services on today's schema, then taken back to before 0011
    # (0012 drops only its own columns; 0011 backwards changes nothing): a team whose
    # admin's key sent invitations, some since accepted, withdrawn or expired, then was
    # revoked as keys were before their revocation closed their invitations (its row
    # alone); one sent with a live key, one by the admin signed in; and another team
    # whose operator's key (no creator) was revoked the same way
    org = OrganizationFactory(seats=10)
    owner, admin = member_of(org, Role.OWNER), member_of(org, Role.ADMIN)
    leaked, _ = make_key(org, scopes=[Scope.ADMIN], actor=admin)
    live, _ = make_key(org, scopes=[Scope.ADMIN], actor=admin)

    def sent(organization, email, role=Role.MEMBER, *, key=None, actor=None):
        return invitation_create(
            organization=organization, email=email, role=role, actor=actor, actor_key=key
        )

    leaked_admin, leaked_admin_token = sent(
        org, "leaked-admin@example.test", Role.ADMIN, key=leaked
    )
    leaked_member, _ = sent(org, "leaked-member@example.test", key=leaked)
    joined, joined_token = sent(org, "joined@example.test", key=leaked)
    invitation_accept(token=joined_token, user=user_signup(email=joined.email, password=None))
    withdrawn, _ = sent(org, "withdrawn@example.test", key=leaked)
    invitation_revoke(invitation=withdrawn, actor=owner)
    expired, _ = sent(org, "expired@example.test", key=leaked)
    Invitation.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(days=1))
    kept, _ = sent(org, "kept@example.test", key=live)
    by_person, _ = sent(org, "by-person@example.test", actor=admin)
    ApiKey.objects.filter(pk=leaked.pk).update(revoked_at=timezone.now())
    other = OrganizationFactory(seats=10)
    operators, _ = make_key(other, scopes=[Scope.ADMIN])
    theirs, _ = sent(other, "operators@example.test", key=operators)
    ApiKey.objects.filter(pk=operators.pk).update(revoked_at=timezone.now())
    invitee = user_signup(email=leaked_admin.email, password=None)
    owners = Client()
    owners.force_login(owner)
    # their rows still open, though no accept can use them (the list already leaves them
    # out: INVITATION_REVOKED_WITH_ITS_KEY reads the key)
    before = owners.get(f"/api/v1/orgs/{org.pk}/invitations").json()["results"]
    assert leaked_admin.email not in {row["email"] for row in before}
    assert Invitation.objects.get(pk=leaked_admin.pk).revoked_at is None
    revoked_before = dict(Invitation.objects.values_list("email", "revoked_at"))
    events_before = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first()
    migrate(KEY_SENDER)

    # when 0011 runs, one invitation a batch (so that the teams' are in batches of their own)
    monkeypatch.setattr(
        importlib.import_module("accounts.migrations.0011_invitation_sent_with_revoked_key_revoke"),
        "BATCH",
        1,
    )
    started = timezone.now()
    migrate(SENDER_KEY_REVOKED)
    ended = timezone.now()
    migrate(LATEST)  # for the services and the API below, which read today's columns

    # then the open invitations of the revoked keys are revoked now (not when the keys
    # were), each audited as revoking the key would have, by nobody; the rest are as they
    # were: accepted, withdrawn by hand, expired, or their sender's standing intact
    revoked = dict(Invitation.objects.values_list("email", "revoked_at"))
    closed = {leaked_admin.email, leaked_member.email, theirs.email}
    [closed_at] = {revoked[email] for email in closed}
    assert closed_at is not None and started <= closed_at <= ended
    assert {email: at for email, at in revoked.items() if email not in closed} == {
        email: at for email, at in revoked_before.items() if email not in closed
    }
    assert revoked[withdrawn.email] is not None
    assert revoked[joined.email] is revoked[expired.email] is revoked[kept.email] is None
    assert revoked[by_person.email] is None
    events = AuditEvent.objects.filter(pk__gt=events_before).order_by("pk")
    assert [
        (e.organization_id, e.action, e.target, e.data, e.actor_user_id, e.actor_key_id)
        for e in events
    ] == [
        (org.pk, "invitation.revoked", leaked_admin.email, {"role": "admin", "reason": "sender_key_revoked"}, None, None),
        (org.pk, "invitation.revoked", leaked_member.email, {"role": "member", "reason": "sender_key_revoked"}, None, None),
        (other.pk, "invitation.revoked", theirs.email, {"role": "member", "reason": "sender_key_revoked"}, None, None),
    ]  # fmt: skip
    # and the API lists them no more, their links admit nobody, and the addresses may be
    # invited again
    after = owners.get(f"/api/v1/orgs/{org.pk}/invitations").json()["results"]
    assert {row["email"] for row in after} == {expired.email, kept.email, by_person.email}
    invitee_client = Client()
    invitee_client.force_login(invitee)
    refused = invitee_client.post(
        "/api/v1/invitations/accept",
        {"token": leaked_admin_token},
        content_type="application/json",
    )
    assert refused.status_code == 404, refused.content
    assert refused.json()["error"]["code"] == "invitation_invalid"
    again = owners.post(
        f"/api/v1/orgs/{org.pk}/invitations",
        {"email": leaked_admin.email, "role": "admin"},
        content_type="application/json",
    )
    assert again.status_code == 201, again.content

    # when it runs again (backwards is a no-op)
    migrate(KEY_SENDER)
    events_before = AuditEvent.objects.order_by("-pk").values_list("pk", flat=True).first()
    revoked_before = dict(Invitation.objects.values_list("pk", "revoked_at"))
    migrate(SENDER_KEY_REVOKED)

    # then nothing changes: the new invitation is a live sender's, the rest are closed
    assert dict(Invitation.objects.values_list("pk", "revoked_at")) == revoked_before
    assert not AuditEvent.objects.filter(pk__gt=events_before).exists()
