"""The playground page, and the session requests its script sends to the inference API.

The page sends /v1/chat/completions as the signed-in member (session cookie,
CSRF token, X-Organization). These tests use refusals that come before any
engine is asked; the answers themselves, streamed and billed, are in
tests/e2e/test_playground.py.
"""

from __future__ import annotations

import json
import re

import pytest
from django.conf import settings
from django.test import Client

from accounts.models import Membership, Role
from inference.models import Job, ModelStatus
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import credits, ledger_rows, served_model

pytestmark = pytest.mark.django_db

PAGE = "/dashboard/playground"
CHAT = "/v1/chat/completions"


def offered_models(content: bytes) -> list[str]:
    """The model names the page's model picker offers, in order."""
    picker = re.search(rb'<select id="pg-model".*?</select>', content, re.S)
    assert picker is not None
    return [name.decode() for name in re.findall(rb'<option value="([^"]*)"', picker[0])]


def on_the_page(organization) -> tuple[Client, str]:
    """A member's browser on the playground: Django's client with CSRF checks on, as a real
    browser meets them, and the CSRF token the page gave it."""
    user = UserFactory()
    Membership.objects.create(user=user, organization=organization, role=Role.MEMBER)
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    client.get(PAGE)  # the page sets the CSRF cookie, as in a browser
    return client, client.cookies[settings.CSRF_COOKIE_NAME].value


def chat(client: Client, organization, *, model: str = "gym-basic", **headers):
    """The request the page's script sends (its `headers`: the CSRF token or not)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Plan my week."}],
        "max_tokens": 16,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    return client.post(
        CHAT,
        json.dumps(body),
        content_type="application/json",
        HTTP_X_ORGANIZATION=organization.slug,
        **headers,
    )


def test_a_visitor_is_sent_to_sign_in_and_back():
    response = Client().get(PAGE)

    assert response.status_code == 302
    assert response["Location"] == f"/login/?next={PAGE}"


def test_the_page_offers_exactly_the_models_the_organization_may_use(client, member, grant):
    # given models in the organization's tier, outside it, and retired
    served_model("gym-basic", access_tier="basic")
    served_model("gym-basic-old", access_tier="basic", status=ModelStatus.RETIRED)
    served_model("gym-pro", access_tier="pro")
    served_model("gym-also-basic", access_tier="basic")
    _user, org = member(Role.MEMBER)
    grant(org, credits(5))

    # when the member opens the playground
    page = client.get(PAGE)

    # then it offers the basic ones, which are what GET /v1/models lists for them
    assert page.status_code == 200
    assert offered_models(page.content) == ["gym-also-basic", "gym-basic"]
    listed = client.get("/v1/models", HTTP_X_ORGANIZATION=org.slug)
    assert sorted(m["id"] for m in listed.json()["data"]) == offered_models(page.content)
    assert b'data-error-code="' not in page.content
    assert f'data-organization="{org.slug}"'.encode() in page.content
    assert b'data-figure="available" data-micro="5000000">5<' in page.content


def test_the_page_acts_for_the_organization_chosen_with_the_switcher(client, member, grant):
    # given a member of two organizations, whose second may use the pro tier
    served_model("gym-basic", access_tier="basic")
    served_model("gym-pro", access_tier="pro")
    user, _first = member(Role.MEMBER)
    second = OrganizationFactory(model_tiers=["pro"])
    Membership.objects.create(user=user, organization=second, role=Role.MEMBER)
    grant(second, credits(1))

    # when they switch to the second
    client.post("/dashboard/organization", {"organization": second.slug})
    page = client.get(PAGE)

    # then the page offers its models, and its requests name it
    assert offered_models(page.content) == ["gym-pro"]
    assert f'data-organization="{second.slug}"'.encode() in page.content


@pytest.mark.parametrize("role", Role.values)
def test_every_role_may_use_it(client, member, grant, role):
    served_model("gym-basic", access_tier="basic")
    _user, org = member(role)
    grant(org, credits(1))

    page = client.get(PAGE)

    assert page.status_code == 200
    assert b'aria-current="page">Playground<' in page.content
    assert b"<fieldset>" in page.content


def test_without_models_the_page_says_so_and_sends_nothing(client, member, grant):
    # given credits but no model in the organization's tiers
    served_model("gym-pro", access_tier="pro")
    _user, org = member(Role.OWNER)
    grant(org, credits(5))

    page = client.get(PAGE)

    assert page.status_code == 200
    assert b'data-error-code="no_models"' in page.content
    assert b"<fieldset disabled>" in page.content
    assert offered_models(page.content) == []


def test_without_credits_the_page_says_so_and_sends_nothing(client, member):
    served_model("gym-basic", access_tier="basic")
    member(Role.MEMBER)

    page = client.get(PAGE)

    assert page.status_code == 200
    assert b'data-error-code="insufficient_credits"' in page.content
    assert b"<fieldset disabled>" in page.content


def test_a_session_request_without_the_csrf_token_is_refused_and_takes_nothing(grant):
    # given a member with credits, signed in, and a model they may use
    served_model("gym-basic", access_tier="basic")
    org = OrganizationFactory()
    grant(org, credits(5))
    client, _token = on_the_page(org)
    rows, balance = ledger_rows(), organization_balance(organization=org)

    # when a request rides on their session without the page's CSRF token
    # (what another site could make their browser send)
    response = chat(client, org)

    # then it is refused, in the API's error shape, before anything was held
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "permission_denied"
    assert "CSRF" in error["message"]
    assert not Job.objects.exists()
    assert ledger_rows() == rows
    assert organization_balance(organization=org) == balance


def test_a_session_request_with_the_csrf_token_reaches_inference_as_the_member(grant):
    # given a member whose organization has one micro-credit: less than any
    # request's worst case
    served_model("gym-basic", access_tier="basic")
    org = OrganizationFactory()
    grant(org, 1)
    client, token = on_the_page(org)
    rows = ledger_rows()

    # when the page's script sends a request with the token
    response = chat(client, org, HTTP_X_CSRFTOKEN=token)

    # then the request got past authentication to the hold, which refused it
    assert response.status_code == 402
    assert response.json()["error"]["code"] == "insufficient_credits"
    assert not Job.objects.exists()
    assert ledger_rows() == rows


def test_a_session_request_for_a_model_outside_the_plan_is_refused_with_its_code(grant):
    served_model("gym-pro", access_tier="pro")
    org = OrganizationFactory()
    grant(org, credits(5))
    client, token = on_the_page(org)
    rows = ledger_rows()

    response = chat(client, org, model="gym-pro", HTTP_X_CSRFTOKEN=token)

    assert response.status_code == 403
    assert response.json()["error"]["code"] == "model_not_in_plan"
    assert ledger_rows() == rows


def test_a_session_request_for_an_organization_not_theirs_is_refused(grant):
    served_model("gym-basic", access_tier="basic")
    mine, theirs = OrganizationFactory(), OrganizationFactory()
    grant(theirs, credits(5))
    client, token = on_the_page(mine)
    rows = ledger_rows()

    response = chat(client, theirs, HTTP_X_CSRFTOKEN=token)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    assert ledger_rows() == rows
