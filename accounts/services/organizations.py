"""Organizations, memberships and invitations."""

from __future__ import annotations

import secrets
from collections.abc import Collection
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone
from django.utils.text import Truncator, slugify

from accounts.errors import ApplicationError
from accounts.models import (
    ApiKey,
    Invitation,
    Membership,
    Organization,
    Role,
    User,
    roles_grantable_by,
)
from accounts.selectors import invitation_by_token, invitation_to_accept, invitation_token_hash
from accounts.services.api_keys import KEYS, apikey_require_unrevoked
from accounts.services.audit import audit_record
from accounts.services.email_verification import (
    EMAIL_VERIFICATION_TTL,
    email_verification_link,
    user_email_mark_verified,
    user_email_verification_send,
)
from accounts.services.mail import email_send_on_commit, site_link

INVITATION_TTL = timedelta(days=7)


def organization_create(
    *, slug: str, name: str = "", owner: User | None = None, personal: bool = False, actor=None
) -> Organization:
    """Create an organization, with `owner` as its first owner. Ledger accounts open on first use."""
    if not slug or slugify(slug) != slug:
        raise ApplicationError(
            code="invalid_slug",
            message="A slug uses lowercase letters, digits and hyphens only.",
            param="slug",
        )
    try:
        with transaction.atomic():
            org = Organization.objects.create(slug=slug, name=name or slug, personal=personal)
            if owner is not None:
                Membership.objects.create(user=owner, organization=org, role=Role.OWNER)
            audit_record(
                organization=org,
                action="organization.created",
                target=slug,
                actor_user=actor or owner,
            )
            return org
    except IntegrityError:
        raise ApplicationError(
            code="organization_exists",
            message=f"An organization with the slug {slug!r} already exists; choose another slug.",
            status=409,
            param="slug",
        ) from None


@transaction.atomic
def user_signup(*, email: str, password: str | None) -> User | None:
    """A new user and their personal organization, which they own; or, when the address
    already has an account, None, and that account's owner is told by email.

    Anyone may sign up under any address, so the new account starts unverified, and is
    emailed the link that proves the address (user_email_verify); it cannot sign in
    before (accounts.forms). A taken address changes nothing about its account and
    makes none: its owner is emailed that someone tried, with the ways in (sign-in, a
    new password). Either way one email goes out and the password is hashed, so that
    the caller can answer both alike, in about the same time: the answer to sign-up
    must not say which addresses have accounts (SignupView).
    """
    email = User.objects.storable_email(email)
    try:
        with transaction.atomic():
            # The password is hashed before the insert is tried, on both branches.
            user = User.objects.create_user(email, password, email_verified=False)
    except IntegrityError:
        existing = User.objects.filter(email__iexact=email).first()
        if existing is not None:
            _signup_attempt_notify(user=existing)
        return None
    # Cut, the local part may end in a hyphen ("first-name-..." at its 40th character):
    # joined to the suffix by another, the slug had "--", which organization_create
    # refuses (slugify collapses it), and the address could never sign up.
    base = slugify(email.split("@")[0])[:40].strip("-_") or "user"
    # Named by the address, cut to what a name holds (an ellipsis at its end) where the
    # address is longer: the name is a label (the organization switcher, the Stripe
    # customer), the address itself is the user's, and a name column as long as an
    # address would let every other organization's name grow past what pages show.
    name = Truncator(email).chars(Organization._meta.get_field("name").max_length)
    organization_create(slug=f"{base}-{secrets.token_hex(3)}", name=name, owner=user, personal=True)
    user_email_verification_send(user=user)
    return user


def _signup_attempt_notify(*, user: User) -> None:
    """Tell the owner of `user`'s address that someone tried to sign up with it: how to
    sign in, how to set a new password, and, while the address is unverified, the link
    that verifies it (the account cannot sign in without it)."""
    lines = [
        f"Someone, perhaps you, tried to create a GymBilling account with {user.email}. "
        "The address already has one: no account was made, and nothing about yours "
        "changed.",
        f"To sign in: {site_link('login')}",
        f"Forgotten your password? Set a new one: {site_link('password_reset')}",
    ]
    if not user.email_verified:
        link = email_verification_link(user=user)
        lines.append(
            f"Your address is not verified yet; this link verifies it and signs you in "
            f"(it asks for your password, and works for {EMAIL_VERIFICATION_TTL.days} "
            f"days): {link}"
        )
    lines.append("If it was not you, you need do nothing.")
    email_send_on_commit(
        to=user.email,
        subject="Someone tried to sign up to GymBilling with your address",
        body="\n".join(lines) + "\n",
    )


def _refused(message: str) -> ApplicationError:
    return ApplicationError(code="permission_denied", message=message, status=403)


def _require_manager(organization: Organization, actor) -> None:
    """Owners and admins manage members; staff (finance, support) may too.

    An API key (no `actor`) is checked by the view: its `admin` scope, which
    works only while the key's creator is an owner or admin
    (accounts.api_base._require_key_creator_manages).
    """
    if actor is None or getattr(actor, "is_staff", False):
        return
    role = (
        Membership.objects.filter(organization=organization, user=actor)
        .values_list("role", flat=True)
        .first()
    )
    if role not in (Role.OWNER, Role.ADMIN):
        raise _refused("Only the organization's owners and admins can manage members.")


def _require_owner_for(organization: Organization, actor, *roles: str, actor_key=None) -> None:
    """Only an owner may grant the owner role or change an owner: an admin
    cannot promote themselves and then remove the owners.

    An API key does so only while the person who created it is an owner of
    the organization: an admin's key with the admin scope must not do what
    the admin may not, and a key without a creator (an operator's) or whose
    creator left (or was deactivated) may not either. A staff member's key is
    no staff member. No actor and no key: the system acting.
    """
    if Role.OWNER not in roles or (actor is None and actor_key is None):
        return
    if getattr(actor, "is_staff", False):
        return
    person = actor.pk if actor is not None else actor_key.created_by_id
    if not Membership.objects.filter(
        organization=organization, user_id=person, user__is_active=True, role=Role.OWNER
    ).exists():
        raise _refused(
            "Only an owner can make someone an owner or change an owner's role (with an API "
            "key: only while the person who created it is an owner)."
        )


def _require_role(role: str) -> None:
    if role not in Role.values:
        raise ApplicationError(
            code="invalid_role",
            message=f"Unknown role {role!r}; use one of {', '.join(Role.values)}.",
            param="role",
        )


def _seats_left(organization: Organization) -> bool:
    return Membership.objects.filter(organization=organization).count() < organization.seats


@transaction.atomic
def membership_add(
    *,
    organization: Organization,
    user: User,
    role: str = Role.MEMBER,
    actor=None,
    actor_key=None,
) -> Membership:
    _require_role(role)
    _require_manager(organization, actor)
    _require_owner_for(organization, actor, role, actor_key=actor_key)
    # Lock the organization so two concurrent adds cannot both take the last seat.
    organization = Organization.objects.select_for_update().get(pk=organization.pk)
    if Membership.objects.filter(organization=organization, user=user).exists():
        raise ApplicationError(
            code="already_member", message="That user is already a member.", status=409
        )
    if not _seats_left(organization):
        raise ApplicationError(
            code="no_seats_left",
            message=f"All {organization.seats} seats are taken; add seats to your plan first.",
            status=409,
        )
    membership = Membership.objects.create(user=user, organization=organization, role=role)
    audit_record(
        organization=organization,
        action="member.added",
        target=user.email,
        actor_user=actor,
        actor_key=actor_key,
        data={"role": role},
    )
    return membership


def _organization_lock(organization_id: int) -> None:
    """Lock the organization's row FOR NO KEY UPDATE: what changes its members or its
    invitations takes it first, before any row of theirs.

    The accept of an invitation locks it (FOR UPDATE) before the invitation's row; a
    change that locked the invitation first and the organization only at COMMIT (its
    audit row's deferred foreign key takes a key-share lock there) deadlocked against it.
    """
    Organization.objects.select_for_update(no_key=True).get(pk=organization_id)


def _membership_locked(membership: Membership) -> Membership:
    """`membership` as it is now, read with its organization's row locked: what may change
    it (its role, whether it is the last owner) is checked against this, not against the
    row the caller loaded.

    Every change to an organization's owners takes this lock first (FOR NO KEY UPDATE, as
    organization_entitlements_set does: it serializes them, and membership_add's FOR
    UPDATE, yet lets rows that reference the organization be inserted meanwhile). Locking
    the owners' rows instead did nothing: Django drops FOR UPDATE from a count(), so two
    owners who removed or demoted each other at once both saw the other still an owner,
    and the organization was left with none. And a role read before the lock was stale:
    an admin's removal of a member who an owner promoted meanwhile removed an owner.
    """
    _organization_lock(membership.organization_id)
    current = (
        Membership.objects.select_related("user", "organization").filter(pk=membership.pk).first()
    )
    if current is None:
        raise ApplicationError(
            code="not_found", message="No such member in this organization.", status=404
        )
    return current


@transaction.atomic
def membership_set_role(
    *, membership: Membership, role: str, actor=None, actor_key=None
) -> Membership:
    _require_role(role)
    membership = _membership_locked(membership)
    _require_manager(membership.organization, actor)
    _require_owner_for(membership.organization, actor, role, membership.role, actor_key=actor_key)
    if membership.role == Role.OWNER and role != Role.OWNER:
        _require_another_owner(membership)
    old = membership.role
    Membership.objects.filter(pk=membership.pk).update(role=role)
    membership.role = role
    audit_record(
        organization=membership.organization,
        action="member.role_changed",
        target=membership.user.email,
        actor_user=actor,
        actor_key=actor_key,
        data={"from": old, "to": role},
    )
    invitations_sent_revoke(membership=membership, actor=actor, actor_key=actor_key)
    return membership


def _require_another_owner(membership: Membership) -> None:
    """Only under _membership_locked's lock: it is what keeps the count true until commit."""
    owners = Membership.objects.filter(organization_id=membership.organization_id, role=Role.OWNER)
    if not owners.exclude(pk=membership.pk).exists():
        raise ApplicationError(
            code="last_owner",
            message="An organization needs an owner: make someone else owner first.",
            status=409,
        )


@transaction.atomic
def membership_remove(*, membership: Membership, actor=None, actor_key=None) -> None:
    membership = _membership_locked(membership)
    _require_manager(membership.organization, actor)
    _require_owner_for(membership.organization, actor, membership.role, actor_key=actor_key)
    if membership.role == Role.OWNER:
        _require_another_owner(membership)
    audit_record(
        organization=membership.organization,
        action="member.removed",
        target=membership.user.email,
        actor_user=actor,
        actor_key=actor_key,
    )
    membership.delete()
    invitations_sent_revoke(membership=membership, removed=True, actor=actor, actor_key=actor_key)


@transaction.atomic
def invitation_create(
    *,
    organization: Organization,
    email: str,
    role: str = Role.MEMBER,
    actor=None,
    actor_key=None,
) -> tuple[Invitation, str]:
    """Invite someone by email. Returns the invitation and its token (sent, never stored)."""
    _require_role(role)
    _require_manager(organization, actor)
    _require_owner_for(organization, actor, role, actor_key=actor_key)
    email = User.objects.storable_email(email)
    if Membership.objects.filter(organization=organization, user__email=email).exists():
        raise ApplicationError(
            code="already_member", message=f"{email} is already a member.", status=409
        )
    token = secrets.token_urlsafe(32)
    now = timezone.now()
    try:
        with transaction.atomic():
            # Before the expired invitation's row, as an accept of it takes them.
            _organization_lock(organization.pk)
            # Under the lock apikey_revoke takes too: a key revoked while this request,
            # authenticated before, waited for it must not send an invitation that no
            # accept could use and that its revocation no longer closes.
            if actor_key is not None:
                apikey_require_unrevoked(actor_key)
            # An expired invitation admits nobody, but the uniqueness of open ones still
            # counted it, so the address could never be invited again: it is closed
            # (revoked) for the new one to take its place.
            Invitation.objects.filter(
                organization=organization,
                email=email,
                accepted_at__isnull=True,
                revoked_at__isnull=True,
                expires_at__lte=now,
            ).update(revoked_at=now)
            invitation = Invitation.objects.create(
                organization=organization,
                email=email,
                role=role,
                token_hash=invitation_token_hash(token),
                invited_by=actor if getattr(actor, "pk", None) else None,
                invited_by_key=actor_key,
                expires_at=now + INVITATION_TTL,
            )
    except IntegrityError:
        raise ApplicationError(
            code="invitation_exists",
            message=f"{email} already has an open invitation.",
            status=409,
            param="email",
        ) from None
    audit_record(
        organization=organization,
        action="member.invited",
        target=email,
        actor_user=actor,
        actor_key=actor_key,
        data={"role": role},
    )
    email_send_on_commit(
        to=email,
        subject=f"You are invited to {organization.name} on GymBilling",
        body=(
            f"Accept the invitation: {site_link('invitation-page', token=token)}\n"
            f'Or POST {{"token": "{token}"}} to {site_link("invitation-accept")} '
            "while signed in. It expires in 7 days."
        ),
    )
    return invitation, token


@transaction.atomic
def invitation_accept(*, token: str, user: User) -> Membership:
    """Join the organization `token` invites to, in its role, as `user` (the address
    invited). invitation_to_accept says what refuses it, its sender's standing included:
    an invitation stands only while whoever sent it may still give its role."""
    # The organization is locked first, then the invitation (membership_add locks the
    # organization again, already held): the order a removal or change of role takes
    # them in when it locks the organization and then revokes what its member sent
    # (invitations_sent_revoke). The other order could deadlock against it; in this
    # one the second waits, and reads what the first did: a sender removed or demoted
    # meanwhile, or the invitation revoked, refuses the accept.
    found = invitation_by_token(token=token or "")
    if found is not None:
        Organization.objects.select_for_update().filter(pk=found.organization_id).first()
    invitation = invitation_to_accept(token=token, user=user, for_update=True)
    # The invitation is the permission: no manager check, but the audit log
    # names the person who accepted.
    membership = membership_add(
        organization=invitation.organization, user=user, role=invitation.role, actor=None
    )
    audit_record(
        organization=invitation.organization,
        action="invitation.accepted",
        target=user.email,
        actor_user=user,
        data={"role": invitation.role},
    )
    Invitation.objects.filter(pk=invitation.pk).update(accepted_at=timezone.now())
    # The token was sent to the address: whoever used it reads mail there.
    user_email_mark_verified(user=user, email=invitation.email)
    return membership


def _require_open(invitation: Invitation) -> None:
    """An invitation still to withdraw: not accepted, revoked or expired (409 saying which;
    revoked with the key that sent it too, as Invitation.status reads it)."""
    status = invitation.status
    if status == "accepted":
        raise ApplicationError(
            code="invitation_used",
            message=f"The invitation to {invitation.email} was already accepted: remove the "
            "member instead.",
            status=409,
        )
    if status == "revoked":
        raise ApplicationError(
            code="invitation_revoked",
            message=f"The invitation to {invitation.email} was already revoked.",
            status=409,
        )
    if status == "expired":
        raise ApplicationError(
            code="invitation_expired",
            message=f"The invitation to {invitation.email} has expired and admits nobody; "
            "inviting the address again replaces it.",
            status=409,
        )


@transaction.atomic
def invitation_revoke(*, invitation: Invitation, actor=None, actor_key=None) -> Invitation:
    """Withdraw an open invitation: its link admits nobody from now on, and the address may
    be invited again. Whoever may invite to its role may revoke it (an invitation to be
    owner: only an owner, or an API key while its creator is one). An invitation accepted,
    revoked already or expired is a 409 saying which: there is nothing left to withdraw.
    """
    organization = invitation.organization
    _require_manager(organization, actor)
    _require_owner_for(organization, actor, invitation.role, actor_key=actor_key)
    _organization_lock(organization.pk)  # before the invitation's: as an accept takes them
    # Under its lock: an accept that got there first has made a member (409 above).
    invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
    _require_open(invitation)
    now = timezone.now()
    Invitation.objects.filter(pk=invitation.pk).update(revoked_at=now)
    invitation.revoked_at = now
    audit_record(
        organization=organization,
        action="invitation.revoked",
        target=invitation.email,
        actor_user=actor,
        actor_key=actor_key,
        data={"role": invitation.role},
    )
    return invitation


def invitations_sent_revoke(
    *, membership: Membership, removed: bool = False, actor=None, actor_key=None
) -> int:
    """Revoke the open invitations that `membership`'s person sent to its organization
    (signed in, or with an API key they created) and could no longer send: all of them
    once `removed`; after a change of role, those to a role it does not give
    (roles_grantable_by). Each is audited as revoked, with why. Returns how many.

    Without it, an admin who invited another address of theirs was admin again, through
    that invitation, after an owner removed them. Called by membership_remove and
    membership_set_role, in their transaction, after the change: both happen, or
    neither. (invitation_to_accept checks the sender again when one is accepted.)
    """
    person = membership.user_id
    keys = ApiKey.objects.filter(organization_id=membership.organization_id, created_by_id=person)
    sent = Invitation.objects.filter(
        Q(invited_by_id=person) | Q(invited_by_key__in=keys.values("pk")),
        organization_id=membership.organization_id,
    )
    if not removed:
        sent = sent.exclude(role__in=roles_grantable_by(membership.role))
    return _invitations_revoke(
        organization=membership.organization,
        sent=sent,
        reason="sender_removed" if removed else "sender_role_changed",
        actor=actor,
        actor_key=actor_key,
    )


def invitations_sent_with_key_revoke(
    *, key: ApiKey, descendants: Collection[int] = (), actor=None, actor_key=None
) -> int:
    """Revoke the open invitations sent with `key`, or with the keys `descendants` (ids of
    those made from it), which apikey_revoke has just revoked, in its transaction; audited
    as revoked, reason `sender_key_revoked`. Returns how many.

    A revoked key vouches for nothing it did (invitation_sender_may_grant): left open,
    its invitations were listed as pending though no accept could succeed, and held the
    address, which could not be invited again.
    """
    return _invitations_revoke(
        organization=key.organization,
        sent=Invitation.objects.filter(
            organization_id=key.organization_id, invited_by_key__in=[key.pk, *descendants]
        ),
        reason="sender_key_revoked",
        actor=actor,
        actor_key=actor_key,
    )


def _invitations_revoke(
    *, organization: Organization, sent, reason: str, actor=None, actor_key=None
) -> int:
    """Revoke those of the invitations `sent` that are still open, each audited with
    `reason`; returns how many. Only under the organization's lock (_organization_lock),
    taken before the invitations' rows as an accept takes them."""
    now = timezone.now()
    open_ = sent.filter(
        accepted_at__isnull=True,
        revoked_at__isnull=True,
        expires_at__gt=now,  # an expired one admits nobody already
    )
    revoked = list(open_.select_for_update().order_by("pk").values_list("pk", "email", "role"))
    if not revoked:
        return 0
    Invitation.objects.filter(pk__in=[pk for pk, _email, _role in revoked]).update(revoked_at=now)
    for _pk, email, role in revoked:
        audit_record(
            organization=organization,
            action="invitation.revoked",
            target=email,
            actor_user=actor,
            actor_key=actor_key,
            data={"role": role, "reason": reason},
        )
    return len(revoked)


# The fields billing owns (DESIGN.md: entitlements live on the organization,
# billing writes them, inference and the API only read them).
ENTITLEMENT_FIELDS = (
    "standing",
    "seats",
    "model_tiers",
    "max_priority",
    "requests_per_minute",
    "tokens_per_minute",
    "concurrent_jobs",
)


@transaction.atomic
def organization_entitlements_set(*, organization: Organization, reason: str, **values) -> bool:
    """Write what the organization may do now; returns whether anything changed.

    Locks the organization row so two billing events cannot interleave their
    writes, and records the change in the audit log with the reason.
    """
    unknown = set(values) - set(ENTITLEMENT_FIELDS)
    if unknown:
        raise ValueError(f"not entitlement fields: {sorted(unknown)}")
    # FOR NO KEY UPDATE: it serializes entitlement writers, yet lets rows that
    # reference the organization be inserted meanwhile (a foreign key takes a
    # key-share lock, at COMMIT for Django's deferred ones). With FOR UPDATE a
    # subscription's sync, which holds this row through its rollover, and the
    # expiry sweep of the same organization's accounts deadlocked.
    locked = Organization.objects.select_for_update(no_key=True).get(pk=organization.pk)
    changed = {name: value for name, value in values.items() if getattr(locked, name) != value}
    if not changed:
        return False
    before = {name: getattr(locked, name) for name in changed}
    Organization.objects.filter(pk=locked.pk).update(**changed)
    KEYS.invalidate()  # the API reads the organization with its key
    for name, value in changed.items():
        setattr(organization, name, value)
    audit_record(
        organization=locked,
        action="organization.entitlements_changed",
        target=reason[:200],
        data={"before": before, "after": changed},
    )
    return True
