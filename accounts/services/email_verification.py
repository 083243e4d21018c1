"""Proving an email address: the link emailed to an account made by signing up, or
whose address staff changed (user_email_change).

The link carries a token signed with the secret key (django.core.signing) over the
account's id and address, and dated: no table holds it. It works for as long as
EMAIL_VERIFICATION_TTL, and only while the account still has that address; following
it twice verifies twice, harmlessly.
"""

from __future__ import annotations

from datetime import UTC, timedelta

from django.core import signing
from django.db import transaction
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import ApiKey, User
from accounts.services.api_keys import apikey_revoke
from accounts.services.mail import email_send_on_commit, site_link

EMAIL_VERIFICATION_TTL = timedelta(days=3)
# Binds a token to this purpose: nothing else the app signs reads as one.
EMAIL_VERIFICATION_SALT = "accounts.email-verification"


def email_verification_token(*, user: User) -> str:
    return signing.TimestampSigner(salt=EMAIL_VERIFICATION_SALT).sign_object(
        {"user": user.pk, "email": user.email}
    )


def email_verification_link(*, user: User) -> str:
    """The link that proves `user`'s current address (the verification page's URL, signed)."""
    token = email_verification_token(user=user)
    return site_link("verify-email", token=token)


def user_email_verification_send(*, user: User) -> None:
    """Email `user` a link that proves their address, once the caller's transaction commits."""
    link = email_verification_link(user=user)
    days = EMAIL_VERIFICATION_TTL.days
    email_send_on_commit(
        to=user.email,
        subject="Verify your email address for GymBilling",
        body=(
            f"Follow this link to verify {user.email}: {link}\n"
            f"It asks for the account's password, verifies the address and signs you in; "
            f"it works for {days} days. Until then, the account cannot sign in, and nobody "
            "can add it to an organization by its address (an invitation still reaches "
            "you).\n"
            "If you did not sign up, ignore this email."
        ),
    )


def _refused(code: str, message: str) -> ApplicationError:
    return ApplicationError(code=code, message=message, status=400, param="token")


def email_verification_account(*, token: str, user: User | None) -> User:
    """The account the link's `token` proves an address of, or the refusal that says why
    not; changes nothing (the page's GET shows it, to ask).

    `user`: the account signed in, which must be the one the link names; None: nobody is
    signed in, and the page asks for the named account's password instead.
    """
    signer = signing.TimestampSigner(salt=EMAIL_VERIFICATION_SALT)
    try:
        claim = signer.unsign_object(token, max_age=EMAIL_VERIFICATION_TTL)
    except signing.SignatureExpired:
        raise _refused(
            "verification_expired",
            "This link has expired. Signed in, ask for a new one on the overview; signed "
            "out, sign up again with the address: the email it sends carries a new one.",
        ) from None
    except signing.BadSignature:
        raise _refused(
            "verification_invalid", "This link is not one we sent; use the one in the email."
        ) from None
    # Signed in as the account the link names, no one else: proving an address takes its
    # mailbox (the link) and the account's password. A link alone verified when a mail
    # scanner, or the address's real owner, opened it, and a squatter who had signed up
    # with someone else's address was then trusted with it.
    if user is not None and claim.get("user") != user.pk:
        raise ApplicationError(
            code="verification_wrong_account",
            message="This link is for another account. Sign out, and sign in as the account "
            "that asked for it; if you did not sign up with this address, ignore the email.",
            status=403,
            param="token",
        )
    if user is None:
        user = User.objects.filter(pk=claim.get("user"), is_active=True).first()
    if user is None or claim.get("email") != user.email:
        raise _refused(
            "verification_invalid",
            "This link is for an address the account no longer has; ask for a new one.",
        )
    return user


def user_email_verify(*, token: str, user: User) -> User:
    """Mark the address the link was sent to verified, for the signed-in `user` it names."""
    user = email_verification_account(token=token, user=user)
    user_email_mark_verified(user=user, email=user.email)
    return user


def user_email_mark_verified(*, user: User, email: str) -> None:
    """`email` is proven to be `user`'s (a link or an invitation sent to it was used):
    verified, unless the account has another address by now."""
    if User.objects.filter(pk=user.pk, email=email).update(email_verified=True):
        user.email_verified = True


@transaction.atomic
def user_email_change(*, user: User, email: str, changed_by: User, verified: bool = False) -> None:
    """Give `user` the address `email`: unverified, and emailed the link that proves it,
    unless the caller has checked it (`verified`: staff who vouch for it). The old
    address is told (_email_changed_notify).

    An address is what managers add a person by, and where their password is reset: a
    verified one that was changed stayed verified, so a typing mistake or a wrong
    request to staff handed the account to whoever reads mail at the new address, and
    let managers add the account by an address nobody had proven. The link works for
    the new address only (email_verification_account compares it); one sent to the old
    address stops working, as a password reset link sent there does (Django's token
    covers the address).
    """
    email = User.objects.storable_email(email)
    old_email = user.email
    row = User.objects.select_for_update().get(pk=user.pk)
    # Once proven, the account is its owner's: a password reset through the new address
    # must not take it as reclaimed from a squatter (user_password_reset_done).
    previously = row.email_verified or row.email_previously_verified
    User.objects.filter(pk=user.pk).update(
        email=email, email_verified=verified, email_previously_verified=previously
    )
    user.email_previously_verified = previously
    user.email, user.email_verified = email, verified
    if not verified:
        user_email_verification_send(user=user)
    if old_email != email:
        _email_changed_notify(old_email=old_email, changed_by=changed_by)


def _email_changed_notify(*, old_email: str, changed_by: User) -> None:
    """Tell the account's old address that staff moved the account to another one: who
    and when, so that its owner can object if they did not ask for it (a request to
    staff in their name is how an account is taken). Without it, the only mail went to
    the new address, and the owner learned of it when signing in failed.

    No link that acts (the old address proves nothing any more), and not the new
    address: a workplace address may now be read by someone the person left.
    """
    who = changed_by.get_full_name() or changed_by.email
    when = timezone.now().astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    email_send_on_commit(
        to=old_email,
        subject="The email address of your GymBilling account was changed",
        body=(
            f"The GymBilling account ({site_link('home')}) that used {old_email} was moved "
            f"to another email address by {who}, of GymBilling's staff, on {when}.\n"
            f"{old_email} no longer signs in to it, and the account's email now goes to "
            "the new address.\n"
            "If you did not ask for this, tell GymBilling's staff at once, from this "
            "address.\n"
        ),
    )


def user_password_reset_done(*, user: User) -> None:
    """A new password is being set through the link emailed to the account's address: the
    mailbox is proven, so the address is verified. Called in the transaction that saves
    the password, before it saves it (PasswordResetSetView): it takes the locks first.

    If no address of the account had ever been, whoever held it before may not have been
    the address's owner (anyone can sign up under any address): the sessions they had
    end with the password change (Django's session hash), and the API keys they made
    are revoked here, so that nothing of theirs outlasts the owner reclaiming the
    account. An account whose address staff changed (user_email_change) after it had
    been proven is not reclaimed: it was its owner's, who now resets the password; their
    keys, which run their integrations in every organization, stay.
    """
    # Imported here: organizations imports this module.
    from accounts.services.organizations import _organization_lock

    with transaction.atomic():
        keys = ApiKey.objects.filter(created_by=user, revoked_at__isnull=True)
        # The organizations of the keys a reclaim revokes are locked before the account's
        # row, in a fixed order, as an invitation's accept takes them (the organization,
        # then the account's row, which it updates as verified): the other order
        # deadlocked against it. Whether the account is reclaimed is only known under its
        # row's lock, so they are locked either way (staff may unverify an address
        # meanwhile); apikey_revoke below takes each again, held already. (A key the
        # account makes in another organization while this runs is still revoked, its
        # organization locked after the row.)
        for organization_id in sorted(set(keys.values_list("organization_id", flat=True))):
            _organization_lock(organization_id)
        # FOR NO KEY UPDATE: nothing here deletes the account or changes its key, and FOR
        # UPDATE would make every transaction that inserts a row referencing it (a
        # membership, an audit row: its foreign key takes a key-share lock, at COMMIT)
        # wait for this one, holding whatever it had locked.
        row = User.objects.select_for_update(no_key=True).get(pk=user.pk)
        reclaimed = not row.email_verified and not row.email_previously_verified
        user_email_mark_verified(user=user, email=row.email)
        if reclaimed:
            for key in keys.order_by("organization_id", "pk"):
                apikey_revoke(key=key, actor=user)
