"""Dashboard pages through Django's test client, on the real database.

`member` signs a user in as a member of an organization in a given role; the
browser tests (tests/e2e) sign in through the login form instead. `assert_refused`
checks a refusal as a script reads it: the status and the page's `data-error-code`.
`client` is a DashboardClient: its POSTs to pages carry `acting_for` and a `form_token`
as the page's forms do.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from django.contrib.auth import SESSION_KEY
from django.http import HttpRequest
from django.test import Client

from accounts.dashboard import ACTING_FOR, FORM_TOKEN, chosen_membership
from accounts.models import Membership, Role
from accounts.redis import get_redis
from accounts.selectors import user_memberships
from tests.factories import OrganizationFactory, UserFactory

PASSWORD = "correct horse battery staple"
SWITCHER = "/dashboard/organization"
# `acting_for` left to DashboardClient.post: the organization the session acts for now.
NOW = object()


class DashboardClient(Client):
    """Django's test client, whose POSTs to the dashboard's pages send `acting_for` as a
    form drawn just before sends it: the slug of the organization the session acts for
    now. `acting_for="slug"` sends that one instead (a form drawn before a switch), and
    `acting_for=None` none (a form from before forms carried it). Each POST is a form
    drawn anew, with a `form_token` of its own, unless `data` has one (the same form
    sent again) or `form_token=None` (a form from before forms carried one). The
    switcher's own form, and every other address, are posted as they are."""

    def post(
        self,
        path: str,
        data: Any = None,
        *args: Any,
        acting_for: Any = NOW,
        form_token: Any = NOW,
        **kwargs: Any,
    ):
        page = path.startswith("/dashboard/") and path.split("?")[0] != SWITCHER
        if page and "content_type" not in kwargs and (data is None or isinstance(data, dict)):
            data = dict(data or {})
            slug = self.acting_slug() if acting_for is NOW else acting_for
            if slug is not None:
                data.setdefault(ACTING_FOR, slug)
            token = secrets.token_urlsafe(16) if form_token is NOW else form_token
            if token is not None:
                data.setdefault(FORM_TOKEN, token)
        return super().post(path, data, *args, **kwargs)

    def acting_slug(self) -> str | None:
        """The organization a page drawn now acts for (MemberPage's choice), or None."""
        user_id = self.session.get(SESSION_KEY)
        if user_id is None:
            return None
        request = HttpRequest()
        request.session = self.session
        memberships = list(user_memberships(user=user_id).order_by("organization__name"))
        membership = chosen_membership(request, memberships)
        return membership.organization.slug if membership else None


@pytest.fixture
def client() -> DashboardClient:
    return DashboardClient()


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
