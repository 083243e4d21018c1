"""Idempotency-Key for every POST: the first response is replayed byte for byte.

Per organization and key, for IDEMPOTENCY_TTL (24 h). A retry while the first
request runs gets 409; the same key with another request gets 422. The
record is inserted, and committed, before the work starts: its unique
constraint is what makes two concurrent requests with one key run once.
A server error, or a request refused before the endpoint ran (bad JSON, content
type or fields), stores nothing: the key is freed for the corrected retry. A
server error after the request took effect (an inference job that was, or may
have been, charged: ApplicationError.took_effect) is stored like any answer:
a retry with the key must not run, and charge, a second job.

Stored bodies are encrypted (Fernet, with a key derived from SECRET_KEY):
some responses carry secrets shown once, such as a new API key, and the
database must not hold them in the clear.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.fernet import InvalidToken
from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import IdempotencyRecord, Organization
from accounts.sealing import sealer

MAX_KEY_LENGTH = 255


def _seal(body: bytes) -> bytes:
    return sealer("idempotency").encrypt(body)


def _open(sealed: bytes) -> bytes:
    return sealer("idempotency").decrypt(sealed)


# Headers a response carries of its own, sent again with its replay: what the
# request was charged (X-Gym-*), a model's Sunset, a Retry-After. Not the
# x-ratelimit-* headers: those describe the request that was answered.
_REPLAYED_HEADERS = ("retry-after", "sunset", "location")
_REPLAYED_PREFIX = "x-gym-"


def replayed_headers(response) -> dict[str, str]:
    """The headers of `response` (an HttpResponse) that its replay must carry too."""
    return {
        name: value
        for name, value in response.items()
        if name.lower() in _REPLAYED_HEADERS or name.lower().startswith(_REPLAYED_PREFIX)
    }


@dataclass(frozen=True)
class StoredResponse:
    status_code: int
    content_type: str
    body: bytes
    headers: dict[str, str]


def request_hash(*, caller: str | None, method: str, path: str, body: bytes) -> str:
    """The request's fingerprint; `caller=None` is the form records had before the
    caller was part of it (accepted only for records with no `caller`)."""
    digest = hashlib.sha256()
    if caller is not None:
        digest.update(caller.encode() + b"\0")
    for part in (method.encode(), b"\0", path.encode(), b"\0", body):
        digest.update(part)
    return digest.hexdigest()


def _same_request(record: IdempotencyRecord, *, caller: str, digest: str, **request) -> bool:
    """Whether `record` was claimed by this request from this caller.

    A record that names its caller is only ever this caller's. One that does
    not was written by an earlier release, during its 24 hours after a deploy:
    - before the caller was hashed, its hash has no caller in it. Nothing on
      the row says who sent it, so the organization's retry of the same request
      replays it, as that release promised; refusing it instead (422) made
      clients retry with a fresh key and buy twice.
    - after the caller was hashed, but before this column, its hash has the
      caller in it, so only that caller matches, as now.
    New records keep the caller in the hash as well as in the column: a
    process of the previous release, still running during a rolling deploy,
    matches them by hash alone and must keep replaying them to their caller.
    """
    if record.caller:
        return record.caller == caller and record.request_hash == digest
    return record.request_hash in (digest, request_hash(caller=None, **request))


def idempotency_begin(
    *, organization: Organization, caller: str, key: str, method: str, path: str, body: bytes
) -> IdempotencyRecord | StoredResponse:
    """Claim the key for this request, or return the stored response to replay.

    `caller` (an API key's or a person's id) is part of the request: a key stays
    unique in its organization, but another caller sending the same key and body
    is refused as a different request (422), never handed the first caller's
    answer, which may hold a secret shown once (a new API key, made for its
    creator, with the creator's role).
    """
    if not key or len(key) > MAX_KEY_LENGTH or not key.isprintable():
        raise ApplicationError(
            code="invalid_idempotency_key",
            message=f"Idempotency-Key must be 1 to {MAX_KEY_LENGTH} printable characters.",
            param="Idempotency-Key",
        )
    digest = request_hash(caller=caller, method=method, path=path, body=body)
    now = timezone.now()
    for _attempt in range(2):
        try:
            with transaction.atomic():
                return IdempotencyRecord.objects.create(
                    organization=organization,
                    key=key,
                    method=method,
                    path=path[:500],
                    request_hash=digest,
                    caller=caller,
                    expires_at=now + settings.IDEMPOTENCY_TTL,
                )
        except IntegrityError:
            pass
        existing = IdempotencyRecord.objects.filter(organization=organization, key=key).first()
        if existing is None:
            continue  # purged between the insert and the read: try once more
        if existing.expires_at <= now:
            # Past its 24 hours: the key is free again.
            IdempotencyRecord.objects.filter(pk=existing.pk, expires_at__lte=now).delete()
            continue
        if not _same_request(
            existing, caller=caller, digest=digest, method=method, path=path, body=body
        ):
            raise ApplicationError(
                code="idempotency_key_reused",
                message=(
                    "This Idempotency-Key was already used with a different request. "
                    "Use a new key for a new request."
                ),
                status=422,
                param="Idempotency-Key",
            )
        if existing.status_code is None:
            stale = existing.created_at <= now - settings.IDEMPOTENCY_LOCK_TIMEOUT
            if stale and IdempotencyRecord.objects.filter(
                pk=existing.pk, status_code__isnull=True, created_at=existing.created_at
            ).update(created_at=now):
                return existing  # the first request died: this retry takes over
            raise ApplicationError(
                code="idempotency_in_progress",
                message="A request with this Idempotency-Key is still running; retry shortly.",
                status=409,
                param="Idempotency-Key",
                extra={"retry_after": 1},
            )
        try:
            body = _open(bytes(existing.body or b""))
        except InvalidToken:
            # Sealed under another SECRET_KEY: we cannot replay it, and must
            # not run the request a second time either.
            raise ApplicationError(
                code="idempotency_key_reused",
                message="This Idempotency-Key was used before and its result is unavailable; use a new key.",
                status=422,
                param="Idempotency-Key",
            ) from None
        return StoredResponse(
            status_code=existing.status_code,
            content_type=existing.content_type,
            body=body,
            headers=existing.headers or {},
        )
    raise ApplicationError(
        code="idempotency_in_progress",
        message="A request with this Idempotency-Key is being processed; retry shortly.",
        status=409,
        extra={"retry_after": 1},
    )


def idempotency_complete(
    *,
    record: IdempotencyRecord,
    status_code: int,
    content_type: str,
    body: bytes,
    headers: dict[str, str] | None = None,
    took_effect: bool = False,
) -> None:
    """Store the response; a server error of a request without effect instead frees the key
    so a retry can run."""
    if status_code >= 500 and not took_effect:
        idempotency_release(record=record)
        return
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        status_code=status_code,
        content_type=content_type,
        body=_seal(body),
        headers=headers or {},
    )


def idempotency_release(*, record: IdempotencyRecord) -> None:
    """Free the key without storing a result: the request had no effect and may be retried."""
    IdempotencyRecord.objects.filter(pk=record.pk).delete()


def idempotency_purge() -> int:
    """Delete expired records (a periodic task)."""
    deleted, _ = IdempotencyRecord.objects.filter(expires_at__lte=timezone.now()).delete()
    return deleted
