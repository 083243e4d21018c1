"""Dashboard pages through Django's test client, on the real database.

`member` signs a user in as a member of an organization in a given role; the
browser tests (tests/e2e) sign in through the login form instead.
"""

from __future__ import annotations

import pytest

from accounts.models import Membership, Role
from tests.factories import OrganizationFactory, UserFactory

PASSWORD = "correct horse battery staple"


@pytest.fixture
def member(client):
    def _member(role: str = Role.OWNER, organization=None):
        organization = organization or OrganizationFactory()
        user = UserFactory()
        Membership.objects.create(user=user, organization=organization, role=role)
        client.force_login(user)
        return user, organization

    return _member
