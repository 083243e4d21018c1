"""The API keys page: list, create (the secret shown once), revoke; owners and admins only."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter

from accounts.models import ApiKey, AuditEvent, Role, Scope
from accounts.services import apikey_create
from accounts.views.keys import ApiKeysPage
from tests.dashboard.conftest import assert_refused
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db

SECRET = re.compile(rb"<code data-secret>(gym_[0-9A-Za-z_]+)</code>")


def create(client, **fields):
    data = {"name": "ci", "scopes": [Scope.BILLING_READ]} | fields
    return client.post("/dashboard/keys", data)


def test_the_list_shows_the_organizations_keys_and_no_others(client, member):
    # given a live key, a revoked one, and another organization's
    user, org = member(Role.ADMIN)
    live, _ = apikey_create(
        organization=org,
        name="deploy bot",
        scopes=[Scope.INFERENCE, Scope.BILLING_READ],
        expires_at=timezone.now() + timedelta(days=3),
        actor=user,
    )
    gone, _ = apikey_create(organization=org, name="old laptop", scopes=[Scope.INFERENCE])
    ApiKey.objects.filter(pk=gone.pk).update(revoked_at=timezone.now())
    theirs, _ = apikey_create(organization=OrganizationFactory(), name="x", scopes=["inference"])

    # when
    response = client.get("/dashboard/keys")

    # then
    assert response.status_code == 200
    page = response.content.decode()
    row = re.search(rf'<tr data-key="{live.prefix}">(.*?)</tr>', page, re.S).group(1)
    assert "deploy bot" in row and "billing:read, inference" in row
    assert f"by {user.email}" in row and "active" in row and "Revoke" in row
    old = re.search(rf'<tr data-key="{gone.prefix}">(.*?)</tr>', page, re.S).group(1)
    assert "revoked" in old and "Revoke" not in old
    assert theirs.prefix not in page


def test_a_new_key_is_shown_once_and_works_against_the_api(client, member):
    # given
    user, org = member(Role.OWNER)

    # when an owner creates a key that reads billing
    created = create(client, name="ci", scopes=[Scope.BILLING_READ])

    # then the answer shows the key, once, beside an empty form, and may not be cached
    assert created.status_code == 201
    assert b'name="name" maxlength="100" required id="id_name">' in created.content
    assert "no-store" in created["Cache-Control"].split(", ")
    secret = SECRET.search(created.content).group(1).decode()
    key = ApiKey.objects.get(organization=org)
    assert (key.name, key.scopes, key.created_by) == ("ci", ["billing:read"], user)
    assert secret.startswith(key.prefix + "_")
    # and nothing keeps it: not the session, not a message, not the next page
    assert secret not in str(dict(client.session.items()))
    again = client.get("/dashboard/keys")
    assert secret.encode() not in again.content and b"data-secret" not in again.content
    assert key.prefix.encode() in again.content
    # and it authenticates against the API
    balance = Client().get("/api/v1/credits/balance", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert balance.status_code == 200 and balance.json()["available"] == 0


def test_a_key_may_expire(client, member):
    _, org = member(Role.ADMIN)

    created = create(client, expires_at="2999-01-02T03:04")

    assert created.status_code == 201
    key = ApiKey.objects.get(organization=org)
    assert key.expires_at.isoformat() == "2999-01-02T03:04:00+00:00"


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"scopes": ["root"]}, "invalid_scopes"),
        ({"scopes": []}, "invalid_scopes"),
        ({"name": "x" * 101}, "invalid_name"),
        ({"name": "   "}, "invalid_name"),
        ({"expires_at": "tomorrow"}, "invalid_expires_at"),
        ({"expires_at": "2001-01-01T00:00"}, "invalid_expiry"),
        # In year 10000 UTC: stored, no page or request could read the key back.
        ({"expires_at": "9999-12-31T23:59:59-14:00"}, "invalid_expiry"),
    ],
    ids=[
        "unknown-scope",
        "no-scope",
        "long-name",
        "blank-name",
        "bad-date",
        "past-expiry",
        "expiry-past-year-9999-utc",
    ],
)
def test_a_refused_key_is_400_with_its_code_and_creates_nothing(client, member, fields, code):
    # given
    _, org = member(Role.OWNER)

    # when
    response = create(client, **fields)

    # then
    assert_refused(response, 400, code)
    assert b"data-secret" not in response.content
    assert not ApiKey.objects.filter(organization=org).exists()
    # and the form keeps what was typed
    assert f'name="name" value="{fields.get("name", "ci")}"'.encode() in response.content


def test_revoking_asks_first_then_the_key_stops_working(client, member):
    # given
    user, org = member(Role.OWNER)
    key, secret = apikey_create(organization=org, name="ci", scopes=[Scope.BILLING_READ])

    # when the owner follows "Revoke…", then confirms
    asked = client.get(f"/dashboard/keys?revoke={key.pk}")
    confirmed = client.post(f"/dashboard/keys/{key.pk}/revoke")

    # then the key was not revoked by asking, and is by confirming
    assert f'action="/dashboard/keys/{key.pk}/revoke"'.encode() in asked.content
    assert confirmed.status_code == 302 and confirmed["Location"] == "/dashboard/keys"
    key.refresh_from_db()
    assert key.revoked_at is not None
    assert AuditEvent.objects.get(action="api_key.revoked").actor_user == user
    after = Client().get("/api/v1/credits/balance", HTTP_AUTHORIZATION=f"Bearer {secret}")
    assert after.status_code == 401
    assert b"Revoked ci" in client.get("/dashboard/keys").content


def test_asking_to_revoke_something_that_is_no_key_id_is_refused_beside_the_form(client, member):
    member(Role.OWNER)

    response = client.get("/dashboard/keys?revoke=abc")

    assert_refused(response, 400, "invalid_revoke")
    assert b"confirm-heading" not in response.content
    assert response.content.count(b'type="checkbox" name="scopes"') == len(Scope.values)


def test_revoking_another_organizations_key_is_not_found_and_changes_nothing(client, member):
    # given
    member(Role.OWNER)
    theirs, _ = apikey_create(organization=OrganizationFactory(), name="x", scopes=["inference"])

    # when
    response = client.post(f"/dashboard/keys/{theirs.pk}/revoke")

    # then
    assert_refused(response, 404, "not_found")
    theirs.refresh_from_db()
    assert theirs.revoked_at is None
    assert not AuditEvent.objects.filter(action="api_key.revoked").exists()


def test_revoking_is_post_only(client, member):
    _, org = member(Role.OWNER)
    key, _ = apikey_create(organization=org, name="ci", scopes=[Scope.INFERENCE])

    response = client.get(f"/dashboard/keys/{key.pk}/revoke")

    assert response.status_code == 405
    key.refresh_from_db()
    assert key.revoked_at is None


@pytest.mark.parametrize("role", [Role.BILLING, Role.MEMBER])
def test_other_roles_get_the_403_page_and_change_nothing(client, member, role):
    # given
    _, org = member(role)
    key, _ = apikey_create(organization=org, name="ci", scopes=[Scope.INFERENCE])

    # when
    listed = client.get("/dashboard/keys")
    created = create(client)
    revoked = client.post(f"/dashboard/keys/{key.pk}/revoke")

    # then
    for response in (listed, created, revoked):
        assert_refused(response, 403, "permission_denied")
    assert b"ci" not in listed.content.split(b"<main>")[1]
    assert ApiKey.objects.filter(organization=org).count() == 1
    key.refresh_from_db()
    assert key.revoked_at is None
    assert b"/dashboard/keys" not in client.get("/dashboard/").content


def test_a_post_without_the_csrf_token_is_refused(member):
    # given a browser-like client that enforces CSRF, signed in as an owner
    _, org = member(Role.OWNER)
    client = Client(enforce_csrf_checks=True)
    client.force_login(org.memberships.get().user)

    # when
    response = create(client)

    # then
    assert response.status_code == 403
    assert not ApiKey.objects.filter(organization=org).exists()


def test_the_list_reads_the_same_queries_however_many_keys(
    client, member, django_assert_max_num_queries
):
    user, org = member(Role.OWNER)
    for n in range(20):
        apikey_create(organization=org, name=f"k{n}", scopes=[Scope.INFERENCE], actor=user)

    with django_assert_max_num_queries(4):
        response = client.get("/dashboard/keys")

    assert response.content.count(b"<tr data-key=") == 20


def test_an_error_report_of_creating_a_key_hides_its_secret(client, member, monkeypatch):
    # given the page failing after the key was made (drawing it raises: only to have an
    # error to report; the key and its secret are the service's own)
    member(Role.OWNER)

    def fail(self, context, **kwargs):
        raise RuntimeError("the page could not be drawn")

    monkeypatch.setattr(ApiKeysPage, "render_to_response", fail)
    client.raise_request_exception = True

    # when the error is reported as Django reports one (the 500 email, the debug page)
    with pytest.raises(RuntimeError) as failure:
        create(client)
    frames = ExceptionReporter(None, failure.type, failure.value, failure.tb).get_traceback_frames()

    # then the frame that held the secret shows it masked
    [post] = [
        f
        for f in frames
        if f["function"] == "post" and f["filename"].endswith("accounts/views/keys.py")
    ]
    variables = dict(post["vars"])
    assert variables["secret"] == SafeExceptionReporterFilter.cleansed_substitute
    assert "gym_" not in repr(variables["secret"])
