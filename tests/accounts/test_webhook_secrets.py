"""The webhook signing secret: created on first read, sealed at rest, rotated with an overlap."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from django.test import Client

from accounts.models import AuditEvent, Role, Scope, WebhookSecret
from accounts.services import webhook_signing_secrets
from accounts.services.webhook_secrets import webhook_signature_header
from tests.accounts.conftest import key_client

pytestmark = pytest.mark.django_db

URL = "/api/v1/webhooks/secret"


def test_the_secret_is_made_on_first_read_and_then_stays_the_same(org, admin_client):
    # when
    first = admin_client.get(URL)
    second = admin_client.get(URL)

    # then
    assert first.status_code == 200, first.content
    secret = first.json()["secret"]
    assert secret.startswith("whsec_") and len(secret) >= 40
    assert second.json()["secret"] == secret
    assert first["Cache-Control"] == "no-store"
    assert AuditEvent.objects.filter(organization=org, action="webhook_secret.created").count() == 1


def test_the_database_holds_the_secret_sealed_not_in_the_clear(org, admin_client):
    # when
    secret = admin_client.get(URL).json()["secret"]

    # then
    row = WebhookSecret.objects.get(organization=org)
    assert secret.encode() not in bytes(row.secret_sealed)
    assert webhook_signing_secrets(organization=org) == [secret]


def test_rotation_replaces_the_secret_at_once_by_default(org, admin_client):
    # given
    old = admin_client.get(URL).json()["secret"]

    # when
    rotated = admin_client.post(f"{URL}/rotate", {}, format="json")

    # then
    assert rotated.status_code == 200, rotated.content
    new = rotated.json()["secret"]
    assert new != old and new.startswith("whsec_")
    assert rotated.json()["previous_expires_at"] is None
    assert admin_client.get(URL).json()["secret"] == new
    assert webhook_signing_secrets(organization=org) == [new]
    assert AuditEvent.objects.filter(organization=org, action="webhook_secret.rotated").exists()


def test_a_rotation_with_overlap_signs_with_both_secrets_until_it_ends(org, admin_client):
    # given
    old = admin_client.get(URL).json()["secret"]

    # when
    rotated = admin_client.post(
        f"{URL}/rotate", {"previous_valid_for_seconds": 3600}, format="json"
    ).json()

    # then both secrets sign, the new one first, and either verifies on its own
    assert rotated["previous_expires_at"] is not None
    live = webhook_signing_secrets(organization=org)
    assert live == [rotated["secret"], old]
    body = b'{"id":"evt_1"}'
    header = webhook_signature_header(signing_secrets=live, timestamp=1_700_000_000, body=body)
    signatures = [v for k, v in (p.split("=", 1) for p in header.split(",")) if k == "v1"]
    for secret in (rotated["secret"], old):
        expected = hmac.new(secret.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()
        assert expected in signatures


@pytest.mark.parametrize("seconds", [-1, 86_401, "soon"])
def test_a_bad_overlap_is_refused(admin_client, seconds):
    # when
    response = admin_client.post(
        f"{URL}/rotate", {"previous_valid_for_seconds": seconds}, format="json"
    )

    # then
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "previous_valid_for_seconds"


def test_only_managers_and_admin_keys_may_read_or_rotate(org, make_key, member_of):
    # given
    org.seats = 5
    org.save(update_fields=["seats"])
    _key, inference_only = make_key(org, scopes=[Scope.INFERENCE])
    member = member_of(org, Role.MEMBER)
    billing = member_of(org, Role.BILLING)
    admin = member_of(org, Role.ADMIN)

    def session(user) -> Client:
        client = Client()
        client.force_login(user)
        return client

    # when / then
    assert key_client(inference_only).get(URL).status_code == 403
    assert key_client(inference_only).post(f"{URL}/rotate").status_code == 403
    assert session(member).get(URL).status_code == 403
    assert session(billing).post(f"{URL}/rotate").status_code == 403
    assert session(admin).get(URL).status_code == 200
    assert not WebhookSecret.objects.exclude(organization=org).exists()
