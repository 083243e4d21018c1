"""Webhook signing secrets: one `whsec_...` per organization, and Stripe's signature scheme.

Every webhook we send an organization carries

    Gym-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">

keyed with the organization's secret (the whole `whsec_...` string, as
Stripe does). Right after a rotation that kept the previous secret alive, the
header carries one `v1=` per live secret, newest first; a receiver accepts
the event when any of them matches its secret.

The secret must be read back to sign, so it cannot be hashed like an API
key: it is sealed with Fernet under a key derived from SECRET_KEY. Secrets
sealed under a key in SECRET_KEY_FALLBACKS still open, so SECRET_KEY can be
rotated the way Django documents; the next rotation of the webhook secret
reseals it under the new key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.fernet import InvalidToken, MultiFernet
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import ApiKey, Organization, WebhookSecret
from accounts.sealing import sealer
from accounts.services.audit import audit_record

PREFIX = "whsec_"
# The longest a rotated-out secret may keep signing (Stripe allows 24 hours too).
MAX_PREVIOUS_VALIDITY = timedelta(hours=24)


def _fernet() -> MultiFernet:
    return sealer("webhook-secret")


def _seal(secret: str) -> bytes:
    return _fernet().encrypt(secret.encode())


def _open(sealed) -> str:
    try:
        return _fernet().decrypt(bytes(sealed)).decode()
    except InvalidToken:
        raise ApplicationError(
            code="webhook_secret_unreadable",
            message=(
                "The webhook signing secret was sealed under a SECRET_KEY this server no "
                "longer has; rotate it (POST /api/v1/webhooks/secret/rotate)."
            ),
            status=500,
        ) from None


def _new_secret() -> str:
    return PREFIX + secrets.token_urlsafe(32)  # 256 bits


@dataclass(frozen=True)
class RevealedSecret:
    secret: str
    created_at: datetime
    rotated_at: datetime | None
    previous_expires_at: datetime | None


def _reveal(row: WebhookSecret, *, now: datetime) -> RevealedSecret:
    live_previous = (
        row.previous_expires_at
        if row.previous_expires_at and row.previous_expires_at > now
        else None
    )
    return RevealedSecret(
        secret=_open(row.secret_sealed),
        created_at=row.created_at,
        rotated_at=row.rotated_at,
        previous_expires_at=live_previous,
    )


def _ensure(
    *, organization: Organization, actor=None, actor_key: ApiKey | None = None
) -> WebhookSecret:
    """The organization's secret row, created (once, whoever races) on first use."""
    row = WebhookSecret.objects.filter(organization=organization).first()
    if row is not None:
        return row
    try:
        with transaction.atomic():
            row = WebhookSecret.objects.create(
                organization=organization, secret_sealed=_seal(_new_secret())
            )
            audit_record(
                organization=organization,
                action="webhook_secret.created",
                target=organization.slug,
                actor_user=actor,
                actor_key=actor_key,
            )
            return row
    except IntegrityError:
        # Another request or worker created it first: that one is the secret.
        return WebhookSecret.objects.get(organization=organization)


def webhook_secret_reveal(
    *, organization: Organization, actor=None, actor_key: ApiKey | None = None
) -> RevealedSecret:
    """The current secret in the clear, generating it on first use."""
    row = _ensure(organization=organization, actor=actor, actor_key=actor_key)
    return _reveal(row, now=timezone.now())


def webhook_secret_rotate(
    *,
    organization: Organization,
    previous_valid_for: timedelta = timedelta(0),
    actor=None,
    actor_key: ApiKey | None = None,
) -> RevealedSecret:
    """Replace the secret. The old one stops signing at once, or after `previous_valid_for`."""
    if not timedelta(0) <= previous_valid_for <= MAX_PREVIOUS_VALIDITY:
        raise ApplicationError(
            code="invalid_request",
            message=f"previous_valid_for_seconds must be 0 to {int(MAX_PREVIOUS_VALIDITY.total_seconds())}.",
            param="previous_valid_for_seconds",
        )
    _ensure(organization=organization, actor=actor, actor_key=actor_key)
    now = timezone.now()
    with transaction.atomic():
        row = WebhookSecret.objects.select_for_update().get(organization=organization)
        keep = previous_valid_for > timedelta(0)
        row.previous_sealed = _seal(_open(row.secret_sealed)) if keep else None
        row.previous_expires_at = now + previous_valid_for if keep else None
        row.secret_sealed = _seal(_new_secret())
        row.rotated_at = now
        row.save(
            update_fields=["previous_sealed", "previous_expires_at", "secret_sealed", "rotated_at"]
        )
        audit_record(
            organization=organization,
            action="webhook_secret.rotated",
            target=organization.slug,
            actor_user=actor,
            actor_key=actor_key,
            data={"previous_valid_for_seconds": int(previous_valid_for.total_seconds())},
        )
    return _reveal(row, now=now)


def webhook_signing_secrets(
    *, organization: Organization, now: datetime | None = None
) -> list[str]:
    """The secrets that sign a webhook sent now: the current one, then a still-live previous one."""
    now = now or timezone.now()
    row = _ensure(organization=organization)
    live = [_open(row.secret_sealed)]
    if row.previous_sealed and row.previous_expires_at and row.previous_expires_at > now:
        live.append(_open(row.previous_sealed))
    return live


def webhook_signature(*, secret: str, timestamp: int, body: bytes) -> str:
    """Hex HMAC-SHA256 of `<timestamp>.<body>` under `secret`."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def webhook_signature_header(*, signing_secrets: list[str], timestamp: int, body: bytes) -> str:
    """The `Gym-Signature` value: `t=<timestamp>,v1=<sig>[,v1=<sig of the previous secret>]`."""
    parts = [f"t={timestamp}"]
    parts += [
        f"v1={webhook_signature(secret=s, timestamp=timestamp, body=body)}" for s in signing_secrets
    ]
    return ",".join(parts)
