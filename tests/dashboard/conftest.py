"""Dashboard pages through Django's test client, on the real database.

`member` signs a user in as a member of an organization in a given role; the
browser tests (tests/e2e) sign in through the login form instead. `assert_refused`
checks a refusal as a script reads it: the status and the page's `data-error-code`.
"""

from __future__ import annotations

import pytest

from accounts.models import Membership, Role
from accounts.redis import get_redis
from tests.factories import OrganizationFactory, UserFactory

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def _clean_rate_limits():
    """Each test starts with no rate-limit counters: pages count sign-ins per network address
    (every test client's is 127.0.0.1) and POSTs per organization, as the API counts."""
    get_redis().flushdb()


@pytest.fixture
def member(client):
    def _member(role: str = Role.OWNER, organization=None):
        organization = organization or OrganizationFactory()
        user = UserFactory()
        Membership.objects.create(user=user, organization=organization, role=role)
        client.force_login(user)
        return user, organization

    return _member


def assert_refused(response, status: int, code: str) -> None:
    """A page's refusal: its status, and its machine-readable code on the page."""
    assert response.status_code == status, response.content
    assert f'data-error-code="{code}"'.encode() in response.content
