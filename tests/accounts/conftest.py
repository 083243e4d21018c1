"""Fixtures for the identity API: keys, clients and a clean rate-limit store."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from rest_framework.test import APIClient

from accounts.models import ApiKey, Organization, Role, Scope
from accounts.redis import get_redis
from accounts.services import apikey_create, membership_add
from tests.factories import UserFactory


@pytest.fixture(autouse=True)
def _clean_rate_limits():
    """Each test starts with no rate-limit counters (settings.REDIS_URL, db 14 by default).

    Primary keys restart with each test database, so a window left over from
    an earlier run would otherwise count against this one's key of the same id.
    """
    get_redis().flushdb()
    yield


@pytest.fixture
def make_key() -> Callable[..., tuple[ApiKey, str]]:
    """An API key made by the real service: returns the row and the full key."""

    def _make(organization: Organization, scopes=(Scope.ADMIN,), name="test key", **kwargs):
        return apikey_create(organization=organization, name=name, scopes=list(scopes), **kwargs)

    return _make


def key_client(raw: str, **kwargs) -> APIClient:
    """A client that authenticates every request with `Authorization: Bearer <raw>`."""
    client = APIClient(**kwargs)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def admin_key(org, make_key) -> tuple[ApiKey, str]:
    return make_key(org, scopes=[Scope.ADMIN], name="admin")


@pytest.fixture
def admin_client(admin_key) -> APIClient:
    return key_client(admin_key[1])


@pytest.fixture
def member_of() -> Callable[..., object]:
    """A new user holding `role` in `organization`, added through the service."""

    def _member(organization: Organization, role: str = Role.MEMBER, **user_fields):
        user = UserFactory(**user_fields)
        membership_add(organization=organization, user=user, role=role)
        return user

    return _member
