"""Reads of identity and tenancy."""

from __future__ import annotations

import hashlib

from django.db.models import QuerySet

from accounts.errors import ApplicationError
from accounts.models import ApiKey, AuditEvent, Invitation, Membership, Organization, User


def organization_api_keys(*, organization: Organization) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(organization=organization).select_related("created_by")


def organization_members(*, organization: Organization) -> QuerySet[Membership]:
    return Membership.objects.filter(organization=organization).select_related("user")


def organization_open_invitations(*, organization: Organization) -> QuerySet[Invitation]:
    return Invitation.objects.filter(
        organization=organization, accepted_at__isnull=True, revoked_at__isnull=True
    ).select_related("invited_by")


def organization_audit_events(*, organization: Organization) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(organization=organization).select_related(
        "actor_user", "actor_key"
    )


def user_by_email(*, email: str) -> User:
    """The person with an account under `email` (any case), or `user_not_found`.

    Only an address its owner proved (`email_verified`): anyone may sign up under any
    address, and a manager adding "cfo@their-company" must not add whoever did. An
    unverified account answers exactly as no account does, so that this reveals nothing;
    an invitation reaches it (its token proves the mailbox).
    """
    user = User.objects.filter(email=email.lower(), email_verified=True).first()
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


def invitation_token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invitation_by_token(*, token: str) -> Invitation | None:
    return (
        Invitation.objects.select_related("organization")
        .filter(token_hash=invitation_token_hash(token))
        .first()
    )
