"""API keys and their organizations are cached per process (accounts.services.api_keys.KEYS),
and a change holds from the very next request.

Transactional tests: the cache stays out of transactions (accounts.cache), so
only committed rows, as in production, show it at work.
"""

from __future__ import annotations

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from accounts.errors import ApplicationError
from accounts.models import Scope, Standing
from accounts.services import apikey_create, apikey_revoke, organization_entitlements_set
from accounts.services.api_keys import (
    CHECKSUM_LENGTH,
    SECRET_LENGTH,
    _checksum,
    apikey_authenticate,
)
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def key():
    org = OrganizationFactory()
    key, raw = apikey_create(organization=org, name="cached", scopes=[Scope.INFERENCE])
    return key, raw


def test_a_known_key_is_checked_without_a_query(key):
    # given a key used once (which also stamps last_used_at)
    _key, raw = key
    apikey_authenticate(raw=raw)

    # when it is used again
    with CaptureQueriesContext(connection) as queries:
        again = apikey_authenticate(raw=raw)

    # then it was checked from the cache, and it is the same key
    assert len(queries) == 0
    assert again.pk == _key.pk and again.organization.pk == _key.organization_id


def test_a_revoked_key_fails_on_the_very_next_request(key):
    # given a key in use
    row, raw = key
    apikey_authenticate(raw=raw)

    # when it is revoked
    apikey_revoke(key=row)

    # then the next request with it fails
    with pytest.raises(ApplicationError) as refused:
        apikey_authenticate(raw=raw)
    assert refused.value.code == "api_key_revoked"


def test_a_suspension_is_seen_by_the_very_next_request(key):
    # given a key in use on an active organization
    row, raw = key
    assert apikey_authenticate(raw=raw).organization.standing == Standing.ACTIVE

    # when billing suspends the organization (an update(), not a save())
    organization_entitlements_set(
        organization=row.organization, reason="test", standing=Standing.SUSPENDED
    )

    # then the next request sees it
    assert apikey_authenticate(raw=raw).organization.standing == Standing.SUSPENDED


def test_what_one_request_changes_on_its_objects_stays_in_that_request(key):
    # given one request that changes the key and organization it was handed
    _row, raw = key
    first = apikey_authenticate(raw=raw)
    first.name = "changed"
    first.organization.name = "changed"

    # then the next request gets them as they are stored
    second = apikey_authenticate(raw=raw)
    assert second.name == "cached"
    assert second.organization.name != "changed"


def test_a_wrong_secret_for_a_cached_key_is_still_refused(key):
    # given a key in use
    _row, raw = key
    apikey_authenticate(raw=raw)

    # when the same public id is presented with another secret (and a valid checksum)
    secret_start = len(raw) - CHECKSUM_LENGTH - SECRET_LENGTH
    other = "a" * SECRET_LENGTH if raw[secret_start] != "a" else "b" * SECRET_LENGTH
    body = raw[:secret_start] + other
    forged = body + _checksum(body)

    # then it is refused
    with pytest.raises(ApplicationError) as refused:
        apikey_authenticate(raw=forged)
    assert refused.value.code == "authentication_failed"


def test_a_keys_limited_ancestors_are_read_with_it_in_one_query_then_none(key):
    # given a line: a key with no limit made K1 (7 a minute), which made K2 (5), which
    # made K3
    line = [key[0]]
    for name, limit in (("k1", 7), ("k2", 5), ("k3", 5)):
        made, raw = apikey_create(
            organization=line[0].organization,
            name=name,
            scopes=[Scope.INFERENCE],
            requests_per_minute=limit,
            actor_key=line[-1],
        )
        line.append(made)
    _first, k1, k2, _k3 = line  # and raw, K3's key

    # when K3 is used, then used again
    with CaptureQueriesContext(connection) as loading:
        apikey_authenticate(raw=raw)
    with CaptureQueriesContext(connection) as queries:
        again = apikey_authenticate(raw=raw)
        limits = [(limit.scope, limit.limit) for limit in again.line_limits]

    # then its first use read the key and its line in one query, the next in none; the
    # line is every limited key above it, nearest first
    assert len([q for q in loading if q["sql"].startswith("SELECT")]) == 1
    assert len(queries) == 0
    assert limits == [(f"key:{k2.pk}", 5), (f"key:{k1.pk}", 7)]


def test_revoking_a_key_fails_its_childs_very_next_request(key):
    # given a key made with a key, in use
    parent, _raw = key
    _child, raw = apikey_create(
        organization=parent.organization, name="child", scopes=[Scope.INFERENCE], actor_key=parent
    )
    apikey_authenticate(raw=raw)

    # when the parent is revoked
    apikey_revoke(key=parent)

    # then the child's next request fails, though its own row was written with update()
    with pytest.raises(ApplicationError) as refused:
        apikey_authenticate(raw=raw)
    assert refused.value.code == "api_key_revoked"
