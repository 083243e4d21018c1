"""API keys: `gym_<public id>_<secret><checksum>`.

- `gym_` and the fixed shape let secret scanners spot a leaked key; the
  6-character checksum (CRC32 of the rest, base62) lets them tell a real key
  from a look-alike without asking us.
- Only SHA-256 of the whole key is stored, with the public id for lookup:
  the database holds no secret. Keys carry 190 bits of randomness, so a fast
  hash is enough (no password stretching is needed for random secrets).
- The stored and computed hashes are compared in constant time.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import secrets
import string
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import transaction
from django.utils import timezone

from accounts.cache import SharedCache
from accounts.errors import ApplicationError
from accounts.models import ApiKey, Organization, Scope
from accounts.ratelimits import Limit
from accounts.services.audit import audit_record

ALPHABET = string.digits + string.ascii_letters  # base62
PUBLIC_ID_LENGTH = 12
SECRET_LENGTH = 32
CHECKSUM_LENGTH = 6
PREFIX = "gym_"
# How stale `last_used_at` may be: refreshing it on every request would be a
# write per request.
LAST_USED_GRANULARITY = timedelta(minutes=1)
# The column is a PostgreSQL integer; more than that is refused with a 400,
# not a database error.
MAX_REQUESTS_PER_MINUTE = 2_147_483_647

# Keys with their organizations, by public id: every API request reads one.
# Dropped in every process when a key or an organization changes (the save
# signals, AccountsConfig.ready; the services that write them with update()
# call KEYS.invalidate()), so a revocation, a suspension or a new limit holds
# from the very next request. Each request gets its own copies.
# Reloaded every 5 s at the latest even if a change could not be published
# (Redis unreachable at that moment): a revocation must not wait a minute.
KEYS = SharedCache("api-keys", max_age_s=5.0)


def _key_load(public_id: str) -> ApiKey | None:
    """The key with its organization, and the limits of its line (`line_limits`): the
    buckets of its limited ancestors, which every request with it counts in too
    (accounts.api_base). Built here, once per load, so the request path reads them with the
    cached key at no cost: no query, no walk up the line."""
    key = ApiKey.objects.select_related("organization").filter(public_id=public_id).first()
    if key is not None:
        # Nearest first: a request refused by several full buckets is told of the one
        # closest to its key.
        key.line_limits = tuple(
            Limit(
                scope=f"key:{ancestor['id']}",
                limit=ancestor["requests_per_minute"],
                name=f"API key's line ({PREFIX}{ancestor['public_id']} and the keys made from it)",
            )
            for ancestor in reversed(_ancestor_limits(key))
        )
    return key


def _key_lookup(public_id: str) -> ApiKey | None:
    cached = KEYS.get(public_id, lambda: _key_load(public_id))
    if cached is None:
        return None
    key = copy.copy(cached)
    key.organization = copy.copy(cached.organization)
    key._cached = cached  # where last_used_at is written back (apikey_authenticate)
    return key


def _ancestor_limits(key: ApiKey) -> list[dict]:
    """`key.ancestor_limits`: its ancestors with a requests_per_minute of their own, root
    first. Stored on every key made since migration 0013; on one made before (or by the
    release before, during its deploy) walked up from its parent instead, a query per
    generation: only on a cache miss or when it makes a key (which stores the result), and
    lines are a few keys deep. A key with no parent
    (made by a person or an operator, or before 0012) has none."""
    if key.ancestor_limits is not None:
        return key.ancestor_limits
    if key.parent_id is None:
        return []
    parent = ApiKey.objects.only(
        "pk", "public_id", "requests_per_minute", "parent_id", "ancestor_limits"
    ).get(pk=key.parent_id)
    return _line_below(parent)


def _line_below(parent: ApiKey) -> list[dict]:
    """The ancestor_limits of a key made with `parent`: the parent's, and the parent when
    it has a limit of its own. One without is bounded by the organization's limit, counted
    for every request already."""
    line = list(_ancestor_limits(parent))
    if parent.requests_per_minute is not None:
        line.append(
            {
                "id": parent.pk,
                "public_id": parent.public_id,
                "requests_per_minute": parent.requests_per_minute,
            }
        )
    return line


def _random(n: int) -> str:
    return "".join(secrets.choice(ALPHABET) for _ in range(n))


def _base62(value: int, width: int) -> str:
    out = []
    for _ in range(width):
        value, digit = divmod(value, 62)
        out.append(ALPHABET[digit])
    return "".join(reversed(out))


def _checksum(body: str) -> str:
    return _base62(zlib.crc32(body.encode()), CHECKSUM_LENGTH)


def hash_key(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


@dataclass(frozen=True)
class ParsedKey:
    public_id: str
    raw: str


def parse_key(raw: str) -> ParsedKey | None:
    """Split a presented key; None unless it has our shape and a valid checksum."""
    if not raw.startswith(PREFIX):
        return None
    rest = raw[len(PREFIX) :]
    public_id, sep, tail = rest.partition("_")
    if (
        not sep
        or len(public_id) != PUBLIC_ID_LENGTH
        or len(tail) != SECRET_LENGTH + CHECKSUM_LENGTH
        or any(c not in ALPHABET for c in public_id + tail)
    ):
        return None
    body, checksum = raw[:-CHECKSUM_LENGTH], raw[-CHECKSUM_LENGTH:]
    if not hmac.compare_digest(_checksum(body), checksum):
        return None
    return ParsedKey(public_id=public_id, raw=raw)


def _validate_scopes(scopes: list[str]) -> list[str]:
    if not isinstance(scopes, list | tuple) or not scopes:
        raise ApplicationError(
            code="invalid_scopes",
            message=f"Give at least one scope from: {', '.join(Scope.values)}.",
            param="scopes",
        )
    unknown = [s for s in scopes if s not in Scope.values]
    if unknown:
        raise ApplicationError(
            code="invalid_scopes",
            message=f"Unknown scopes {unknown}; use any of: {', '.join(Scope.values)}.",
            param="scopes",
        )
    return sorted(set(scopes))


def _valid_expiry(expires_at: datetime) -> datetime:
    """`expires_at` in UTC, or `invalid_expiry`: it must be in the future and readable back.

    The dashboard's form keeps the offset it was typed with; 9999-12-31T23:59:59-14:00
    is in year 10000 UTC, which PostgreSQL stores but Python cannot read back: every
    page and request that loads the key (listing, revoking, authenticating with it)
    would then fail. Converting here, before anything is written, refuses it instead.
    """
    try:
        expires_at = expires_at.astimezone(UTC)
    except (OverflowError, ValueError):
        raise ApplicationError(
            code="invalid_expiry",
            message="expires_at is too far in the future; give a date before the year 10000 (UTC).",
            param="expires_at",
        ) from None
    if expires_at <= timezone.now():
        raise ApplicationError(
            code="invalid_expiry", message="expires_at must be in the future.", param="expires_at"
        )
    return expires_at


def _require_within_parent(
    *,
    parent: ApiKey,
    scopes: list[str],
    expires_at: datetime | None,
    requests_per_minute: int | None,
) -> None:
    """Refuse (400 `key_exceeds_parent`, `param` naming the field) a key made with the key
    `parent` that could do more than it: a scope it lacks, a later expiry (or none while it
    has one), a higher requests-per-minute ceiling (or none while it has one).

    Otherwise a leaked key with a week to live, or a narrow admin key, mints a key that
    never expires, or one with every scope, and the limits put on it mean nothing. Its
    role cannot grow: the new key has the same creator (apikey_create), whose role every
    admin key acts with. A person in the dashboard or the API makes keys unbounded by
    this: they are not a key.
    """
    beyond = sorted(set(scopes) - set(parent.scopes))
    if beyond:
        raise ApplicationError(
            code="key_exceeds_parent",
            message="This API key may only make keys with scopes it has "
            f"({', '.join(parent.scopes)}); it lacks {', '.join(beyond)}.",
            param="scopes",
        )
    if parent.expires_at is not None and (expires_at is None or expires_at > parent.expires_at):
        raise ApplicationError(
            code="key_exceeds_parent",
            message="This API key expires at "
            f"{parent.expires_at.isoformat()}: a key it makes needs an expires_at no later.",
            param="expires_at",
        )
    if parent.requests_per_minute is not None and (
        requests_per_minute is None or requests_per_minute > parent.requests_per_minute
    ):
        raise ApplicationError(
            code="key_exceeds_parent",
            message=f"This API key is limited to {parent.requests_per_minute} requests per "
            "minute: a key it makes needs a requests_per_minute no higher.",
            param="requests_per_minute",
        )


@transaction.atomic
def apikey_create(
    *,
    organization: Organization,
    name: str,
    scopes: list[str],
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    actor=None,
    actor_key: ApiKey | None = None,
) -> tuple[ApiKey, str]:
    """Create a key. Returns the row and the full key, which is never shown again.

    Made with `actor_key` (a key's request): bounded by it (_require_within_parent), and
    recorded as made by it (`parent`, `limit_root`, `ancestor_limits`), so that revoking it
    revokes this key and this key's requests count against the limit of every key above it
    that has one."""
    if not name or not name.strip() or len(name) > 100:
        raise ApplicationError(
            code="invalid_name", message="A key needs a name of 1 to 100 characters.", param="name"
        )
    scopes = _validate_scopes(scopes)
    if expires_at is not None:
        expires_at = _valid_expiry(expires_at)
    if requests_per_minute is not None and (
        not isinstance(requests_per_minute, int)
        or not 1 <= requests_per_minute <= MAX_REQUESTS_PER_MINUTE
    ):
        raise ApplicationError(
            code="invalid_rate_limit",
            message=(
                f"requests_per_minute must be an integer from 1 to {MAX_REQUESTS_PER_MINUTE} "
                "(or null for the organization's limit)."
            ),
            param="requests_per_minute",
        )
    if actor_key is not None:
        _require_within_parent(
            parent=actor_key,
            scopes=scopes,
            expires_at=expires_at,
            requests_per_minute=requests_per_minute,
        )
        # Imported here: organizations imports this module (KEYS).
        from accounts.services.organizations import _organization_lock

        # Under the lock apikey_revoke takes first: a revocation of the parent either went
        # first (refused here) or finds this key among the parent's children and revokes it.
        _organization_lock(organization.pk)
        apikey_require_unrevoked(actor_key)
    public_id = _random(PUBLIC_ID_LENGTH)
    body = f"{PREFIX}{public_id}_{_random(SECRET_LENGTH)}"
    raw = body + _checksum(body)
    key = ApiKey.objects.create(
        organization=organization,
        name=name.strip(),
        public_id=public_id,
        secret_hash=hash_key(raw),
        scopes=scopes,
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        # A key made with a key is its creator's: it must not outlive the
        # standing of the person behind the key that made it.
        created_by=actor
        if getattr(actor, "pk", None)
        else (actor_key.created_by if actor_key is not None else None),
        parent=actor_key,
        limit_root_id=(actor_key.limit_root_id or actor_key.pk) if actor_key is not None else None,
        ancestor_limits=_line_below(actor_key) if actor_key is not None else [],
    )
    audit_record(
        organization=organization,
        action="api_key.created",
        target=key.prefix,
        actor_user=actor,
        actor_key=actor_key,
        data={"name": key.name, "scopes": scopes},
    )
    return key, raw


def apikey_require_unrevoked(key: ApiKey) -> None:
    """401 `api_key_revoked` when `key`'s row is revoked now, whatever the caller loaded.

    For a write made with a key authenticated before it waited for its organization's lock
    (_organization_lock), which apikey_revoke takes first: read under that lock, a
    revocation either went first and is seen here, or comes after the write and undoes it
    (an invitation sent, a key made with it).
    """
    if ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=False).exists():
        raise ApplicationError(
            code="api_key_revoked", message="This API key was revoked.", status=401
        )


def _descendants(key: ApiKey) -> list[int]:
    """The ids of every key made with `key`, or with one of those, down the line (revoked
    ones too: one revoked alone still leads to what it made). A generation per query;
    lines are a few keys deep, and a key is always made after its parent, so they end."""
    found: list[int] = []
    generation = [key.pk]
    while generation:
        generation = list(
            ApiKey.objects.filter(parent_id__in=generation).values_list("pk", flat=True)
        )
        found += generation
    return found


@transaction.atomic
def apikey_revoke(*, key: ApiKey, actor=None, actor_key: ApiKey | None = None) -> ApiKey:
    """Revoke at once: the next request with it fails, and with any key made with it, or
    with one of those (its descendants: a leaked key's children die with it); the open
    invitations any of them sent are revoked too (invitations_sent_with_key_revoke). One
    `api_key.revoked` audit row per key; a descendant's says `reason` `ancestor_revoked`
    and which key's revocation took it. Revoking twice is harmless, and closes what a key
    revoked before that existed had left open. Keys made before migration 0012 recorded no
    parent: they are not revoked with the key that made them."""
    # Imported here: organizations imports this module (KEYS).
    from accounts.services.organizations import (
        _organization_lock,
        invitations_sent_with_key_revoke,
    )

    # The organization's row first, as everything that changes its invitations takes
    # it: an accept of one of the key's invitations either went first (a member) or
    # waits and reads it revoked; an invitation_create with the key either went first
    # (revoked below) or waits and reads the key revoked. So does apikey_create with a
    # key: a key made with a descendant either went first (found below) or is refused.
    _organization_lock(key.organization_id)
    now = timezone.now()
    updated = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=now)
    descendants = _descendants(key)
    # Not locked FOR UPDATE: the organization's lock already orders every revoke and
    # create of its keys, and a row lock would make a job being written for one of these
    # keys (its foreign key is checked at commit) wait for this whole transaction while
    # holding the wallet's row. The UPDATE's own lock does not conflict with that check.
    taken = list(
        ApiKey.objects.filter(pk__in=descendants, revoked_at__isnull=True)
        .order_by("pk")
        .only("pk", "public_id")
    )
    ApiKey.objects.filter(pk__in=[taken_key.pk for taken_key in taken]).update(revoked_at=now)
    KEYS.invalidate()
    key.refresh_from_db()
    if updated:
        audit_record(
            organization=key.organization,
            action="api_key.revoked",
            target=key.prefix,
            actor_user=actor,
            actor_key=actor_key,
        )
    for taken_key in taken:
        audit_record(
            organization=key.organization,
            action="api_key.revoked",
            target=taken_key.prefix,
            actor_user=actor,
            actor_key=actor_key,
            data={"reason": "ancestor_revoked", "ancestor": key.prefix},
        )
    invitations_sent_with_key_revoke(
        key=key, descendants=descendants, actor=actor, actor_key=actor_key
    )
    return key


def apikey_authenticate(*, raw: str) -> ApiKey:
    """The live key for a presented secret, or `authentication_failed`."""
    parsed = parse_key(raw or "")
    key = _key_lookup(parsed.public_id) if parsed else None
    # Hash even when nothing matched, so timing does not reveal which part failed.
    presented = hash_key(raw or "")
    stored = key.secret_hash if key else hash_key("")
    if key is None or not hmac.compare_digest(presented, stored):
        raise ApplicationError(
            code="authentication_failed",
            message="Invalid API key. Check the Authorization: Bearer header.",
            status=401,
        )
    now = timezone.now()
    if key.revoked_at is not None:
        raise ApplicationError(
            code="api_key_revoked", message="This API key was revoked.", status=401
        )
    if key.expires_at is not None and key.expires_at <= now:
        raise ApplicationError(
            code="api_key_expired", message="This API key has expired.", status=401
        )
    if key.last_used_at is None or key.last_used_at < now - LAST_USED_GRANULARITY:
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        # Not a change anyone must see at once: the cached row learns it
        # (else every request would write it), other processes within
        # LAST_USED_GRANULARITY.
        key.last_used_at = key._cached.last_used_at = now
    return key
