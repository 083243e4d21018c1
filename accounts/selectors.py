"""Reads of identity and tenancy."""

from __future__ import annotations

import hashlib

from django.db.models import QuerySet
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import (
    INVITATION_REVOKED_WITH_ITS_KEY,
    ApiKey,
    AuditEvent,
    Invitation,
    Membership,
    Organization,
    Role,
    User,
    roles_grantable_by,
)


def organization_api_keys(*, organization: Organization) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(organization=organization).select_related("created_by")


def organization_members(*, organization: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(organization=organization).select_related("user")


def organization_invitations(*, organization: Organization) -> QuerySet[Invitation]:
    """Every invitation of the organization, open or not (accepted, revoked, expired)."""
    return Invitation.objects.filter(organization=organization).select_related(
        "invited_by", "invited_by_key"
    )


def organization_open_invitations(*, organization: Organization) -> QuerySet[Invitation]:
    """Those neither accepted nor revoked (expired ones included: the dashboard marks them),
    one revoked with the key that sent it too (INVITATION_REVOKED_WITH_ITS_KEY)."""
    return (
        organization_invitations(organization=organization)
        .filter(accepted_at__isnull=True, revoked_at__isnull=True)
        .exclude(INVITATION_REVOKED_WITH_ITS_KEY)
    )


def organization_audit_events(*, organization: Organization) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(organization=organization).select_related(
        "actor_user", "actor_key"
    )


def user_by_email(*, email: str) -> User:
    """The person with an account under `email` (any case or Unicode compatibility form),
    or `user_not_found`.

    Only an address its owner proved (`email_verified`): anyone may sign up under any
    address, and a manager adding "cfo@their-company" must not add whoever did. An
    unverified account answers exactly as no account does, so that this reveals nothing;
    an invitation reaches it (its token proves the mailbox).
    """
    # As it is stored (canonical_email): "ada@\uff45xample.test" (a fullwidth e) is the
    # address that signs in, and that an invitation reaches, as ada@example.test.
    email = User.objects.canonical_email(email)
    user = User.objects.filter(email=email, email_verified=True).first()
    if user is None:
        raise ApplicationError(
            code="user_not_found",
            message="No user has that email; send an invitation instead.",
            status=404,
            param="email",
        )
    return user


def user_memberships(*, user) -> QuerySet[Membership]:
    return Membership.objects.filter(user=user).select_related("organization")


def user_membership_by_slug(*, user, slug: str) -> Membership | None:
    """The user's membership of the organization `slug` names (a header or a form field,
    as sent), or None. A slug holding NUL names none (slugs are letters, digits and
    hyphens), and is not sent to PostgreSQL, which refuses to compare such text."""
    if "\x00" in slug:
        return None
    return user_memberships(user=user).filter(organization__slug=slug).first()


def invitation_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invitation_by_token(*, token: str) -> Invitation | None:
    return (
        Invitation.objects.select_related("organization")
        .filter(token_hash=invitation_token_hash(token))
        .first()
    )


def invitation_to_accept(*, token: str, user=None, for_update: bool = False) -> Invitation:
    """The open invitation `token` names, which `user` (when given) may accept now; else
    why not: unknown, revoked or expired (404 `invitation_invalid`), accepted already (409
    `invitation_used`), sent to another address (403 `invitation_email_mismatch`), sent by
    someone who may no longer grant its role there (403 `invitation_sender_not_allowed`).

    The rules invitation_accept applies, under its lock (`for_update`), and the page shows
    before anyone presses accept. Seats are counted by membership_add, as it adds.
    """
    invitations = Invitation.objects.select_related("organization")
    if for_update:
        invitations = invitations.select_for_update()
    invitation = invitations.filter(token_hash=invitation_token_hash(token or "")).first()
    if invitation is None or invitation.revoked_at or invitation.expires_at <= timezone.now():
        raise ApplicationError(
            code="invitation_invalid",
            message="This invitation is unknown, revoked or expired; ask for a new one.",
            status=404,
            param="token",
        )
    if invitation.accepted_at:
        raise ApplicationError(
            code="invitation_used", message="This invitation was already accepted.", status=409
        )
    if user is not None and invitation.email != user.email:
        raise ApplicationError(
            code="invitation_email_mismatch",
            message="This invitation was sent to another email address.",
            status=403,
        )
    if not invitation_sender_may_grant(invitation):
        raise ApplicationError(
            code="invitation_sender_not_allowed",
            message="Whoever sent this invitation can no longer give its role in this "
            "organization (they were removed, or their role changed); ask one of its owners "
            "or admins for a new invitation.",
            status=403,
        )
    return invitation


def invitation_sender_may_grant(invitation: Invitation) -> bool:
    """Whether the person behind `invitation` may still give its role: an active member
    whose role grants it (roles_grantable_by), or an active staff member (they manage any
    organization). Sent with an API key, its creator is that person; a key without a
    creator (an operator's, `manage.py apikey_create`) acts on its scope alone, and may
    give any role but owner, as when it invited; a key revoked since may give none. Nobody
    named (sent by the system, or by a person since deleted): the invitation alone
    decides, as before senders were checked.

    Removing or demoting a member revokes what they sent that they could no longer send
    (invitations_sent_revoke), and revoking a key what it sent
    (invitations_sent_with_key_revoke); this holds for the rest: invitations sent before
    those existed, and senders deactivated rather than removed.
    """
    person = invitation.invited_by_id
    if person is None and invitation.invited_by_key_id is not None:
        if invitation.invited_by_key.revoked_at is not None:
            # A key revoked (leaked, or withdrawn) vouches for nothing it did: its
            # invitations would otherwise outlive it, as its creator's standing does.
            return False
        person = invitation.invited_by_key.created_by_id
        if person is None:
            return invitation.role in roles_grantable_by(Role.ADMIN)
    if person is None:
        return True
    sender = User.objects.filter(pk=person).values("is_active", "is_staff").first()
    if sender is None or not sender["is_active"]:
        return False
    if sender["is_staff"]:
        return True
    role = (
        Membership.objects.filter(organization_id=invitation.organization_id, user_id=person)
        .values_list("role", flat=True)
        .first()
    )
    return invitation.role in roles_grantable_by(role)
