"""API keys: `gym_<public id>_<secret><checksum>`, hashed at rest, scoped, revocable, audited."""

from __future__ import annotations

import hashlib
import re
import string
import zlib
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone

import pytest
from django.test import Client
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import ApiKey, AuditEvent, Role, Scope
from accounts.services import apikey_create, apikey_revoke
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

KEY_SHAPE = re.compile(
    r"gym_(?P<public_id>[0-9A-Za-z]{12})_(?P<secret>[0-9A-Za-z]{32})[0-9A-Za-z]{6}"
)
BASE62 = string.digits + string.ascii_letters


def checksum(body: str) -> str:
    """The documented checksum, computed independently: CRC32 of the rest, 6 base62 digits."""
    value = zlib.crc32(body.encode())
    digits = []
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def other_char(c: str) -> str:
    return "a" if c != "a" else "b"


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    body = response.json()
    assert set(body) == {"error"}
    assert {"type", "code", "message", "param"} <= set(body["error"])
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    return body["error"]


# --- the key and what the database keeps -----------------------------------------


def test_created_key_has_the_documented_shape_and_checksum(org, make_key):
    # when
    key, raw = make_key(org, scopes=[Scope.INFERENCE])

    # then
    match = KEY_SHAPE.fullmatch(raw)
    assert match, raw
    assert match["public_id"] == key.public_id
    assert key.prefix == raw[:16] == f"gym_{key.public_id}"
    assert raw[-6:] == checksum(raw[:-6])


def test_database_holds_no_secret_only_a_hash_and_the_prefix(org, make_key):
    # when
    key, raw = make_key(org, scopes=[Scope.INFERENCE, Scope.BILLING_READ], name="prod")

    # then: no column of the key's row contains the key or its secret part
    secret = KEY_SHAPE.fullmatch(raw)["secret"]
    fields = [f.attname for f in ApiKey._meta.concrete_fields]
    row = ApiKey.objects.filter(pk=key.pk).values(*fields).get()
    for column, value in row.items():
        assert raw not in str(value), column
        assert secret not in str(value), column
    assert row["secret_hash"] == hashlib.sha256(raw.encode()).hexdigest()
    # nor does the audit log of its creation
    for event in AuditEvent.objects.filter(organization=org):
        assert secret not in f"{event.target} {event.data}"


def test_created_key_authenticates(org, make_key):
    # given
    key, raw = make_key(org, scopes=[Scope.INFERENCE])

    # when
    response = key_client(raw).get("/api/v1/me")

    # then
    assert response.status_code == 200
    body = response.json()
    assert body["organization"]["slug"] == org.slug
    assert body["api_key"] == {"id": key.pk, "prefix": key.prefix, "scopes": [Scope.INFERENCE]}
    assert body["user"] is None
    key.refresh_from_db()
    assert key.last_used_at is not None


@pytest.mark.parametrize(
    "position",
    [4, 10, 17, 40, 48, 53],  # public id, public id, secret, secret, checksum, last character
    ids=["public-id-start", "public-id", "secret-start", "secret", "checksum", "last"],
)
def test_a_key_with_one_character_changed_is_refused(org, make_key, position):
    # given
    key, raw = make_key(org)
    tampered = raw[:position] + other_char(raw[position]) + raw[position + 1 :]
    assert len(tampered) == len(raw) and tampered != raw

    # when
    response = key_client(tampered).get("/api/v1/me")

    # then
    error = assert_error(response, 401, "authentication_failed")
    assert error["type"] == "authentication_error"
    key.refresh_from_db()
    assert key.last_used_at is None


def test_a_key_with_a_valid_checksum_but_the_wrong_secret_is_refused(org, make_key):
    # given: the real public id, another secret, and a checksum that matches it
    key, _raw = make_key(org)
    body = f"gym_{key.public_id}_{'A' * 32}"
    forged = body + checksum(body)

    # when
    response = key_client(forged).get("/api/v1/me")

    # then
    assert_error(response, 401, "authentication_failed")
    key.refresh_from_db()
    assert key.last_used_at is None


@pytest.mark.parametrize(
    "header",
    ["Bearer", "Bearer ", "Token {raw}", "Basic {raw}", "Bearer gym_short", "Bearer {raw}x"],
)
def test_a_malformed_authorization_header_is_refused(org, make_key, header):
    # given
    _key, raw = make_key(org)
    client = Client()

    # when
    response = client.get("/api/v1/me", HTTP_AUTHORIZATION=header.format(raw=raw))

    # then
    assert_error(response, 401, "authentication_failed")


# --- revocation and expiry ---------------------------------------------------------


def test_revocation_takes_effect_on_the_very_next_request(org, admin_client, make_key):
    # given: a key in use
    victim, raw = make_key(org, scopes=[Scope.INFERENCE], name="leaked")
    victim_client = key_client(raw)
    assert victim_client.get("/api/v1/me").status_code == 200

    # when
    response = admin_client.delete(f"/api/v1/keys/{victim.pk}")

    # then
    assert response.status_code == 200
    assert response.json()["revoked_at"] is not None
    victim.refresh_from_db()
    assert victim.revoked_at is not None
    error = assert_error(victim_client.get("/api/v1/me"), 401, "api_key_revoked")
    assert error["type"] == "authentication_error"


def test_a_key_can_revoke_itself_and_is_refused_at_once(admin_key, admin_client):
    # given
    key, _raw = admin_key

    # when
    response = admin_client.delete(f"/api/v1/keys/{key.pk}")

    # then
    assert response.status_code == 200
    assert_error(admin_client.get("/api/v1/keys"), 401, "api_key_revoked")


def test_revoking_twice_records_one_revocation(org, admin_client, make_key):
    # given
    victim, _raw = make_key(org, scopes=[Scope.INFERENCE])
    admin_client.delete(f"/api/v1/keys/{victim.pk}")
    first_revoked_at = ApiKey.objects.get(pk=victim.pk).revoked_at

    # when
    response = admin_client.delete(f"/api/v1/keys/{victim.pk}")

    # then
    assert response.status_code == 200
    assert ApiKey.objects.get(pk=victim.pk).revoked_at == first_revoked_at
    assert AuditEvent.objects.filter(action="api_key.revoked", target=victim.prefix).count() == 1


def test_another_organizations_key_cannot_be_revoked(admin_client, make_key):
    # given
    stranger, raw = make_key(OrganizationFactory(), scopes=[Scope.INFERENCE])

    # when
    response = admin_client.delete(f"/api/v1/keys/{stranger.pk}")

    # then
    assert_error(response, 404, "not_found")
    stranger.refresh_from_db()
    assert stranger.revoked_at is None
    assert key_client(raw).get("/api/v1/me").status_code == 200


def test_an_expired_key_is_refused(org, make_key):
    # given: a key that worked until its expiry
    key, raw = make_key(org, expires_at=timezone.now() + timedelta(hours=1))
    client = key_client(raw)
    assert client.get("/api/v1/me").status_code == 200
    # Time passes: the expiry is now behind us (no service moves an expiry).
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))

    # when
    response = client.get("/api/v1/me")

    # then
    error = assert_error(response, 401, "api_key_expired")
    assert error["type"] == "authentication_error"


def test_a_key_cannot_be_created_already_expired(org, admin_client):
    # given
    before = ApiKey.objects.count()

    # when
    response = admin_client.post(
        "/api/v1/keys",
        {"name": "late", "scopes": ["inference"], "expires_at": "2000-01-01T00:00:00Z"},
        format="json",
    )

    # then
    error = assert_error(response, 400, "invalid_expiry")
    assert error["param"] == "expires_at"
    assert ApiKey.objects.count() == before


def test_an_expiry_past_year_9999_in_utc_is_refused_and_writes_nothing(org):
    # given an expiry whose offset puts it in year 10000 UTC: PostgreSQL would store
    # it, and every later read of the key (list, revoke, authenticate) would fail
    expires_at = datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt_timezone(timedelta(hours=-14)))

    # when
    with pytest.raises(ApplicationError) as refused:
        apikey_create(organization=org, name="far", scopes=["inference"], expires_at=expires_at)

    # then
    assert (refused.value.code, refused.value.status) == ("invalid_expiry", 400)
    assert refused.value.param == "expires_at"
    assert not ApiKey.objects.filter(organization=org).exists()
    assert not AuditEvent.objects.filter(organization=org).exists()


def test_an_expiry_with_an_offset_is_stored_in_utc(org):
    # given the latest instant of year 9999 as typed east of UTC
    expires_at = datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt_timezone(timedelta(hours=14)))

    # when
    key, _ = apikey_create(
        organization=org, name="far", scopes=["inference"], expires_at=expires_at
    )

    # then it reads back, as the same instant in UTC
    key.refresh_from_db()
    assert key.expires_at.isoformat() == "9999-12-31T09:59:59+00:00"


def test_a_key_created_with_an_expiry_reports_it(org, admin_client):
    # given
    expires_at = (timezone.now() + timedelta(days=7)).replace(microsecond=0)

    # when
    response = admin_client.post(
        "/api/v1/keys",
        {"name": "week", "scopes": ["admin"], "expires_at": expires_at.isoformat()},
        format="json",
    )

    # then
    assert response.status_code == 201
    key = ApiKey.objects.get(pk=response.json()["id"])
    assert key.expires_at == expires_at
    assert response.json()["expires_at"] is not None


# --- scopes ------------------------------------------------------------------------


def test_a_billing_read_key_cannot_create_keys(org, make_key):
    # given
    _key, raw = make_key(org, scopes=[Scope.BILLING_READ])
    before = ApiKey.objects.count()

    # when
    response = key_client(raw).post(
        "/api/v1/keys", {"name": "escalate", "scopes": ["admin"]}, format="json"
    )

    # then
    error = assert_error(response, 403, "permission_denied")
    assert error["type"] == "permission_error"
    assert ApiKey.objects.count() == before
    assert not AuditEvent.objects.filter(action="api_key.created", data__name="escalate").exists()


def test_an_admin_key_creates_a_key_with_the_scopes_asked_for(org, make_key):
    # given: a key with the admin scope and those it gives
    _parent, raw = make_key(org, scopes=[Scope.ADMIN, Scope.BILLING_READ, Scope.INFERENCE])

    # when
    response = key_client(raw).post(
        "/api/v1/keys",
        {"name": "reporting", "scopes": ["billing:read", "inference"]},
        format="json",
    )

    # then
    assert response.status_code == 201
    created = ApiKey.objects.get(pk=response.json()["id"])
    assert created.organization == org
    assert created.name == "reporting"
    assert created.scopes == ["billing:read", "inference"]
    assert response.json()["scopes"] == ["billing:read", "inference"]


@pytest.mark.parametrize(
    ("scopes", "path", "allowed"),
    [
        ([Scope.BILLING_READ], "/api/v1/credits/balance", True),
        ([Scope.INFERENCE], "/api/v1/credits/balance", False),
        ([Scope.BILLING_READ], "/api/v1/credits/ledger", True),
        ([Scope.BILLING_READ], "/api/v1/credits/lots", True),
        ([Scope.INFERENCE], "/api/v1/credits/lots", False),
        ([Scope.MARKETPLACE], "/api/v1/usage", False),
        ([Scope.BILLING_READ], "/api/v1/keys", False),
        ([Scope.ADMIN], "/api/v1/keys", True),
        ([Scope.BILLING_READ], "/api/v1/audit", False),
        ([Scope.ADMIN], "/api/v1/audit", True),
        ([Scope.INFERENCE], "/api/v1/me", True),
    ],
)
def test_each_endpoint_needs_its_scope(org, make_key, scopes, path, allowed):
    # given
    _key, raw = make_key(org, scopes=scopes)

    # when
    response = key_client(raw).get(path)

    # then
    if allowed:
        assert response.status_code == 200, response.content
    else:
        assert_error(response, 403, "permission_denied")


def test_unknown_scopes_are_refused(org, admin_client):
    # given
    before = ApiKey.objects.count()

    # when
    response = admin_client.post("/api/v1/keys", {"name": "x", "scopes": ["root"]}, format="json")

    # then
    error = assert_error(response, 400, "invalid_request")
    assert error["param"].startswith("scopes")
    assert ApiKey.objects.count() == before


# --- shown once ----------------------------------------------------------------------


def test_the_created_key_is_shown_once_and_never_listed(org, admin_client):
    # given
    created = admin_client.post("/api/v1/keys", {"name": "ci", "scopes": ["admin"]}, format="json")
    assert created.status_code == 201
    raw = created.json()["key"]
    secret = KEY_SHAPE.fullmatch(raw)["secret"]

    # when
    listing = admin_client.get("/api/v1/keys")
    detail_after_revoke = admin_client.delete(f"/api/v1/keys/{created.json()['id']}")

    # then: the creation response carried the working key...
    assert created.json()["prefix"] == raw[:16]
    assert ApiKey.objects.get(pk=created.json()["id"]).secret_hash == (
        hashlib.sha256(raw.encode()).hexdigest()
    )
    # ...and nothing afterwards shows it again
    assert listing.status_code == 200
    rows = listing.json()["results"]
    assert {row["prefix"] for row in rows} == {
        k.prefix for k in ApiKey.objects.filter(organization=org)
    }
    assert all("key" not in row for row in rows)
    assert secret.encode() not in listing.content
    assert secret.encode() not in detail_after_revoke.content


def test_an_owner_signed_in_creates_keys_and_a_member_cannot(org, member_of):
    # given
    org.seats = 5
    org.save(update_fields=["seats"])
    owner = member_of(org, Role.OWNER)
    member = member_of(org, Role.MEMBER)
    owner_client, member_client = Client(), Client()
    owner_client.force_login(owner)
    member_client.force_login(member)
    body = {"name": "dashboard", "scopes": ["inference"]}

    # when
    by_owner = owner_client.post("/api/v1/keys", body, content_type="application/json")
    by_member = member_client.post("/api/v1/keys", body, content_type="application/json")

    # then
    assert by_owner.status_code == 201
    assert ApiKey.objects.get(pk=by_owner.json()["id"]).created_by == owner
    assert_error(by_member, 403, "permission_denied")
    assert ApiKey.objects.filter(organization=org).count() == 1


# --- a key makes keys within its own reach ------------------------------------------------


def _in(days: int) -> datetime:
    return (timezone.now() + timedelta(days=days)).replace(microsecond=0)


@pytest.mark.parametrize(
    ("parent", "asked", "param"),
    [
        ({"scopes": [Scope.ADMIN]}, {"scopes": ["admin", "inference"]}, "scopes"),
        (
            {"scopes": [Scope.ADMIN], "expires_at": _in(1)},
            {"scopes": ["admin"], "expires_at": _in(2).isoformat()},
            "expires_at",
        ),
        ({"scopes": [Scope.ADMIN], "expires_at": _in(1)}, {"scopes": ["admin"]}, "expires_at"),
        (
            {"scopes": [Scope.ADMIN], "requests_per_minute": 10},
            {"scopes": ["admin"], "requests_per_minute": 11},
            "requests_per_minute",
        ),
        (
            {"scopes": [Scope.ADMIN], "requests_per_minute": 10},
            {"scopes": ["admin"], "requests_per_minute": None},
            "requests_per_minute",
        ),
    ],
    ids=["broader-scopes", "later-expiry", "no-expiry", "higher-limit", "no-limit"],
)
def test_a_key_cannot_make_a_key_that_exceeds_it(org, make_key, parent, asked, param):
    # given: a key with the admin scope, and bounds of its own
    _key, raw = make_key(org, name="parent", **parent)
    before = ApiKey.objects.count()

    # when: it asks for a key beyond them
    response = key_client(raw).post("/api/v1/keys", {"name": "child", **asked}, format="json")

    # then: refused, naming the field, and nothing made or audited
    error = assert_error(response, 400, "key_exceeds_parent")
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert ApiKey.objects.count() == before
    assert not AuditEvent.objects.filter(action="api_key.created", data__name="child").exists()


def test_a_key_makes_a_key_up_to_its_own_bounds(org, make_key):
    # given
    expires_at = _in(2)
    _key, raw = make_key(
        org,
        scopes=[Scope.ADMIN, Scope.INFERENCE],
        expires_at=expires_at,
        requests_per_minute=10,
    )

    # when: a narrower key, and one exactly as far as it goes
    narrower = key_client(raw).post(
        "/api/v1/keys",
        {
            "name": "narrower",
            "scopes": ["inference"],
            "expires_at": _in(1).isoformat(),
            "requests_per_minute": 3,
        },
        format="json",
    )
    equal = key_client(raw).post(
        "/api/v1/keys",
        {
            "name": "equal",
            "scopes": ["admin", "inference"],
            "expires_at": expires_at.isoformat(),
            "requests_per_minute": 10,
        },
        format="json",
    )

    # then
    assert (narrower.status_code, equal.status_code) == (201, 201), equal.content
    made = ApiKey.objects.get(pk=equal.json()["id"])
    assert (made.scopes, made.expires_at, made.requests_per_minute) == (
        ["admin", "inference"],
        expires_at,
        10,
    )
    assert ApiKey.objects.get(pk=narrower.json()["id"]).scopes == ["inference"]


def test_a_person_makes_keys_beyond_the_key_they_could_have_used(org, member_of, make_key):
    # given: an owner signed in, who also has a narrow, short-lived admin key
    owner = member_of(org, Role.OWNER)
    make_key(org, scopes=[Scope.ADMIN], expires_at=_in(1), requests_per_minute=1, actor=owner)
    client = Client()
    client.force_login(owner)

    # when: signed in, they make a key with every scope, no expiry and no limit of its own
    response = client.post(
        "/api/v1/keys",
        {"name": "full", "scopes": list(Scope.values)},
        content_type="application/json",
    )

    # then: a person is not bounded by a key
    assert response.status_code == 201, response.content
    made = ApiKey.objects.get(pk=response.json()["id"])
    assert (made.expires_at, made.requests_per_minute) == (None, None)
    assert sorted(made.scopes) == sorted(Scope.values)


# --- a key's line: the keys made with it, and with those -------------------------------


def _mint(raw: str, name: str, **fields) -> dict:
    """A key made with the key `raw` over the API; its body (the full key under "key")."""
    response = key_client(raw).post(
        "/api/v1/keys", {"name": name, "scopes": ["admin"], **fields}, format="json"
    )
    assert response.status_code == 201, response.content
    return response.json()


@pytest.fixture
def line(org, make_key, member_of):
    """K1 (made by an owner), K2 made with K1, K3 made with K2; the owner, signed in."""
    owner = member_of(org, Role.OWNER)
    k1, raw1 = make_key(org, scopes=[Scope.ADMIN], name="k1", actor=owner)
    k2 = _mint(raw1, "k2")
    k3 = _mint(k2["key"], "k3")
    client = Client()
    client.force_login(owner)
    client.user = owner
    return {"k1": (k1.pk, raw1), "k2": (k2["id"], k2["key"]), "k3": (k3["id"], k3["key"])}, client


def test_a_key_made_with_a_key_records_its_parent_and_the_first_of_its_line(line):
    # given
    keys, owner = line
    (k1, _), (k2, _), (k3, _) = keys["k1"], keys["k2"], keys["k3"]

    # when
    listed = {row["id"]: row for row in owner.get("/api/v1/keys").json()["results"]}

    # then: the API shows each key's parent; the root of the line is K1 for both
    assert (listed[k1]["parent"], listed[k2]["parent"], listed[k3]["parent"]) == (None, k1, k2)
    rows = {k.pk: k for k in ApiKey.objects.filter(pk__in=[k1, k2, k3])}
    assert (rows[k1].parent_id, rows[k2].parent_id, rows[k3].parent_id) == (None, k1, k2)
    assert (rows[k1].limit_root_id, rows[k2].limit_root_id, rows[k3].limit_root_id) == (
        None,
        k1,
        k1,
    )


def test_revoking_a_key_revokes_every_key_made_from_it(org, line):
    # given: K1 made K2, which made K3; all work
    keys, owner = line
    (k1, raw1), (k2, raw2), (k3, raw3) = keys["k1"], keys["k2"], keys["k3"]
    assert all(key_client(raw).get("/api/v1/me").status_code == 200 for raw in (raw2, raw3))

    # when: the owner revokes K1
    response = owner.delete(f"/api/v1/keys/{k1}")

    # then: K2 and K3 are refused from the next request on, as K1 is
    assert response.status_code == 200
    for raw in (raw1, raw2, raw3):
        error = assert_error(key_client(raw).get("/api/v1/me"), 401, "api_key_revoked")
        assert error["type"] == "authentication_error"
    assert not ApiKey.objects.filter(pk__in=[k1, k2, k3], revoked_at__isnull=True).exists()
    # one audit row per key, by the owner; the descendants' say which revocation took them
    prefixes = {pk: key.prefix for pk, key in ApiKey.objects.in_bulk([k1, k2, k3]).items()}
    k1_prefix = prefixes[k1]
    events = {
        e.target: e for e in AuditEvent.objects.filter(organization=org, action="api_key.revoked")
    }
    assert set(events) == set(prefixes.values())
    assert events[k1_prefix].data == {}
    for pk in (k2, k3):
        assert events[prefixes[pk]].data == {"reason": "ancestor_revoked", "ancestor": k1_prefix}
    assert {(e.actor_user_id, e.actor_key_id) for e in events.values()} == {(owner.user.pk, None)}


def test_revoking_a_key_made_with_a_key_leaves_its_parent_working(line):
    # given
    keys, _owner = line
    (_k1, raw1), (k2, raw2), (k3, raw3) = keys["k1"], keys["k2"], keys["k3"]

    # when: K2 alone is revoked (with K1 itself, as its maker may)
    response = key_client(raw1).delete(f"/api/v1/keys/{k2}")

    # then: K1 works; K2 and what K2 made do not
    assert response.status_code == 200
    assert key_client(raw1).get("/api/v1/me").status_code == 200
    assert_error(key_client(raw2).get("/api/v1/me"), 401, "api_key_revoked")
    assert_error(key_client(raw3).get("/api/v1/me"), 401, "api_key_revoked")
    assert ApiKey.objects.get(pk=k3).revoked_at is not None


def test_a_key_revoked_while_its_request_waited_makes_no_key(org, make_key):
    # given: a key authenticated, then revoked before its request reaches the service
    parent, _raw = make_key(org, scopes=[Scope.ADMIN], name="parent")
    stale = ApiKey.objects.get(pk=parent.pk)
    apikey_revoke(key=parent)
    before = ApiKey.objects.count()

    # when: its request to make a key goes on
    with pytest.raises(ApplicationError) as refused:
        apikey_create(organization=org, name="late", scopes=[Scope.ADMIN], actor_key=stale)

    # then: refused as the revoked key it is; no key escapes the revocation
    assert (refused.value.code, refused.value.status) == ("api_key_revoked", 401)
    assert ApiKey.objects.count() == before


def test_a_key_made_by_a_person_has_no_parent(org, member_of, make_key):
    # given: an owner signed in, who has a key too
    owner = member_of(org, Role.OWNER)
    own_key, _raw = make_key(org, scopes=[Scope.ADMIN], actor=owner)
    client = Client()
    client.force_login(owner)

    # when: they make a key signed in, then revoke their other key
    made = client.post(
        "/api/v1/keys",
        {"name": "signed in", "scopes": ["inference"]},
        content_type="application/json",
    ).json()
    client.delete(f"/api/v1/keys/{own_key.pk}")

    # then: the new key belongs to no line, and was not revoked with the other key
    assert made["parent"] is None
    row = ApiKey.objects.get(pk=made["id"])
    assert (row.parent_id, row.limit_root_id, row.revoked_at) == (None, None, None)


# --- audit -----------------------------------------------------------------------------


def test_creating_and_revoking_keys_is_audited_with_the_acting_key(org, admin_key, admin_client):
    # given
    admin, _raw = admin_key

    # when
    created = admin_client.post(
        "/api/v1/keys", {"name": "worker", "scopes": ["admin"]}, format="json"
    ).json()
    admin_client.delete(f"/api/v1/keys/{created['id']}")

    # then
    events = AuditEvent.objects.filter(organization=org, target=created["prefix"]).order_by("pk")
    assert [e.action for e in events] == ["api_key.created", "api_key.revoked"]
    assert all(e.actor_key_id == admin.pk and e.actor_user_id is None for e in events)
    assert events[0].data == {"name": "worker", "scopes": ["admin"]}


def test_the_audit_log_lists_the_organizations_events_only(org, admin_key, admin_client, make_key):
    # given: events here and in another organization
    admin, _raw = admin_key
    created = admin_client.post(
        "/api/v1/keys", {"name": "worker", "scopes": ["admin"]}, format="json"
    ).json()
    admin_client.delete(f"/api/v1/keys/{created['id']}")
    make_key(OrganizationFactory(), name="elsewhere")

    # when
    response = admin_client.get("/api/v1/audit")

    # then
    assert response.status_code == 200
    rows = response.json()["results"]
    assert [(r["action"], r["target"]) for r in rows] == [
        ("api_key.revoked", created["prefix"]),
        ("api_key.created", created["prefix"]),
        ("api_key.created", admin.prefix),  # the fixture's own key, made by the service
    ]
    assert rows[0]["actor"] == admin.prefix
    assert set(rows[0]) == {"id", "action", "target", "actor", "data", "created_at"}
    assert {e.pk for e in AuditEvent.objects.filter(organization=org)} == {r["id"] for r in rows}
