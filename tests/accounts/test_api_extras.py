"""Per-key limits set through the API, bad cursors, and joining with no organization yet."""

import pytest
from rest_framework.test import APIClient

from accounts.models import ApiKey, Membership, Role, Scope
from accounts.services import invitation_create
from tests.accounts.conftest import key_client
from tests.factories import UserFactory

pytestmark = pytest.mark.django_db


def test_a_key_created_with_its_own_limit_is_held_to_it(org, make_key, fresh_window):
    # given a key created through the API with a ceiling of 2 requests a minute, by a key
    # that has the scope it is given (a key makes keys within its own scopes)
    admin_client = key_client(make_key(org, scopes=[Scope.ADMIN, Scope.BILLING_READ])[1])
    created = admin_client.post(
        "/api/v1/keys",
        {"name": "slow", "scopes": [Scope.BILLING_READ], "requests_per_minute": 2},
        format="json",
    )
    assert created.status_code == 201, created.content
    assert created.json()["requests_per_minute"] == 2
    client = key_client(created.json()["key"])
    org_limit = org.requests_per_minute

    # when it makes three requests
    responses = [client.get("/api/v1/credits/balance") for _ in range(3)]

    # then the third is refused by the key's own ceiling
    assert [r.status_code for r in responses] == [200, 200, 429]
    error = responses[2].json()["error"]
    assert (error["code"], error["limit"]) == ("rate_limited", 2)
    assert "API key" in error["message"]
    assert ApiKey.objects.get(pk=created.json()["id"]).requests_per_minute == 2
    # while the organization's limit is untouched: its ceiling as it was, and its window
    # holding only what was served (the key's creation and the two), not the refusal
    org.refresh_from_db()
    assert org.requests_per_minute == org_limit
    other = admin_client.get("/api/v1/keys")
    assert other.status_code == 200
    assert (other["x-ratelimit-limit-requests"], other["x-ratelimit-remaining-requests"]) == (
        str(org_limit),
        str(org_limit - 4),  # the creation, the two, and this one
    )


def test_a_zero_key_limit_is_refused_and_creates_nothing(org, admin_client):
    # given
    before = ApiKey.objects.count()

    # when
    response = admin_client.post(
        "/api/v1/keys",
        {"name": "bad", "scopes": [Scope.BILLING_READ], "requests_per_minute": 0},
        format="json",
    )

    # then
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "requests_per_minute"
    assert ApiKey.objects.count() == before


def test_a_cursor_we_never_issued_is_bad_input(org, admin_client):
    # when
    response = admin_client.get("/api/v1/keys", {"cursor": "not-a-cursor"})

    # then
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_cursor"
    assert response.json()["error"]["param"] == "cursor"


def test_someone_with_no_organization_yet_can_accept_an_invitation(org):
    # given an invitation to a person whose account belongs to no organization
    org.seats = 5
    org.save(update_fields=["seats"])
    owner = UserFactory()
    Membership.objects.create(user=owner, organization=org, role=Role.OWNER)
    newcomer = UserFactory(email="newcomer@example.test")
    _invitation, token = invitation_create(
        organization=org, email=newcomer.email, role=Role.MEMBER, actor=owner
    )
    client = APIClient()
    client.force_login(newcomer)

    # when
    response = client.post("/api/v1/invitations/accept", {"token": token}, format="json")

    # then
    assert response.status_code == 201, response.content
    assert Membership.objects.get(user=newcomer).organization == org


def test_an_unknown_token_from_someone_with_no_organization_is_404(org):
    # given
    loner = UserFactory()
    client = APIClient()
    client.force_login(loner)

    # when
    response = client.post("/api/v1/invitations/accept", {"token": "nope"}, format="json")

    # then
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "invitation_invalid"
    assert not Membership.objects.filter(user=loner).exists()
