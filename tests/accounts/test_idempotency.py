"""Idempotency-Key on POST: the first response is stored per organization and replayed."""

from __future__ import annotations

import hashlib
import json
import threading

import pytest
import requests
from django.test import Client

from accounts.idempotency import idempotency_begin
from accounts.models import ApiKey, AuditEvent, IdempotencyRecord, Role, Scope
from accounts.services import apikey_create
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory

KEYS = "/api/v1/keys"


def key_body(name: str = "ci") -> bytes:
    # The acting keys have the admin scope alone, and a key makes keys within its own.
    return json.dumps({"name": name, "scopes": ["admin"]}).encode()


def post(client, body: bytes, idempotency_key: str):
    return client.post(
        KEYS, data=body, content_type="application/json", HTTP_IDEMPOTENCY_KEY=idempotency_key
    )


def created_keys(org) -> int:
    return ApiKey.objects.filter(organization=org, name__startswith="ci").count()


@pytest.mark.django_db
def test_a_retry_replays_the_first_response_byte_for_byte(org, admin_client):
    # given
    body = key_body()
    first = post(admin_client, body, "retry-1")
    assert first.status_code == 201

    # when
    replay = post(admin_client, body, "retry-1")

    # then
    assert replay.status_code == first.status_code
    assert replay.content == first.content
    assert replay["Content-Type"] == first["Content-Type"]
    assert replay["Idempotent-Replayed"] == "true"
    assert not first.has_header("Idempotent-Replayed")
    assert created_keys(org) == 1
    assert AuditEvent.objects.filter(action="api_key.created", data__name="ci").count() == 1
    record = IdempotencyRecord.objects.get(organization=org, key="retry-1")
    assert record.status_code == 201
    # The stored response holds the new key's secret, so it is sealed at rest.
    raw_key = first.json()["key"]
    assert raw_key.encode() not in bytes(record.body)
    assert bytes(record.body) != first.content


@pytest.mark.django_db
def test_the_same_key_with_another_body_is_refused(org, admin_client):
    # given
    post(admin_client, key_body("ci-first"), "reused")

    # when
    response = post(admin_client, key_body("ci-second"), "reused")

    # then
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "idempotency_key_reused"
    assert error["param"] == "Idempotency-Key"
    assert list(ApiKey.objects.filter(name__startswith="ci").values_list("name", flat=True)) == [
        "ci-first"
    ]


@pytest.mark.django_db
def test_a_retry_while_the_first_request_runs_gets_409(org, admin_key, admin_client):
    # given: the first request has claimed the key and not finished
    body = key_body()
    running = idempotency_begin(
        organization=org,
        caller=f"key:{admin_key[0].pk}",
        key="slow",
        method="POST",
        path=KEYS,
        body=body,
    )
    assert isinstance(running, IdempotencyRecord) and running.status_code is None

    # when
    response = post(admin_client, body, "slow")

    # then
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["code"] == "idempotency_in_progress"
    assert error["type"] == "conflict_error"
    assert response["Retry-After"] == "1"
    assert created_keys(org) == 0
    assert IdempotencyRecord.objects.get(pk=running.pk).status_code is None


@pytest.mark.django_db
def test_keys_are_per_organization(make_key):
    # given: two organizations whose clients happen to use the same key
    org_a, org_b = OrganizationFactory(), OrganizationFactory()
    client_a = key_client(make_key(org_a)[1])
    client_b = key_client(make_key(org_b)[1])
    body = key_body()

    # when
    response_a = post(client_a, body, "shared-key")
    response_b = post(client_b, body, "shared-key")

    # then: two effects, neither a replay of the other
    assert (response_a.status_code, response_b.status_code) == (201, 201)
    assert not response_b.has_header("Idempotent-Replayed")
    assert response_a.json()["key"] != response_b.json()["key"]
    assert created_keys(org_a) == 1
    assert created_keys(org_b) == 1
    assert IdempotencyRecord.objects.filter(key="shared-key").count() == 2


@pytest.mark.django_db
def test_another_caller_with_the_same_key_and_body_gets_no_replay(org, member_of):
    # given: an owner made an admin key through the API, under an Idempotency-Key
    org.seats = 2
    org.save(update_fields=["seats"])
    owner, admin = member_of(org, Role.OWNER), member_of(org, Role.ADMIN)
    body = json.dumps({"name": "ci", "scopes": ["admin"]}).encode()
    owners = Client()
    owners.force_login(owner)
    first = post(owners, body, "make-admin-key")
    assert first.status_code == 201
    owners_key = ApiKey.objects.get(pk=first.json()["id"])
    assert owners_key.created_by == owner

    # when: an admin sends the same key and body (what one deploy script sends, say)
    admins = Client()
    admins.force_login(admin)
    response = post(admins, body, "make-admin-key")

    # then: not the owner's answer, which holds the owner's new key in full: with it the
    # admin would act with the owner's role (an admin key acts for its creator) and could
    # make themselves an owner
    assert response.status_code == 422, response.content
    assert response.json()["error"]["code"] == "idempotency_key_reused"
    assert first.json()["key"].encode() not in response.content
    assert created_keys(org) == 1
    # and an API key is another caller too
    _admin_key, raw = apikey_create(organization=org, name="admin's", scopes=[Scope.ADMIN])
    assert post(key_client(raw), body, "make-admin-key").status_code == 422
    # while the owner's own retry is still replayed
    replay = post(owners, body, "make-admin-key")
    assert replay.content == first.content and replay["Idempotent-Replayed"] == "true"
    assert IdempotencyRecord.objects.get(key="make-admin-key").caller == f"user:{owner.pk}"


def as_written_before_the_caller_column(
    record_key: str, body: bytes, *, hashed_caller: str | None
) -> None:
    """Rewrite a stored record as an earlier release wrote it: no `caller` column, and a
    hash of method, path and body, with the caller in front of them (the release that
    hashed the caller) or without (the releases before it)."""
    record = IdempotencyRecord.objects.get(key=record_key)
    parts = [record.method.encode(), record.path.encode(), body]
    if hashed_caller is not None:
        parts.insert(0, hashed_caller.encode())
    IdempotencyRecord.objects.filter(pk=record.pk).update(
        caller="", request_hash=hashlib.sha256(b"\0".join(parts)).hexdigest()
    )


@pytest.mark.django_db
def test_a_record_from_before_the_caller_was_hashed_still_replays_in_its_organization(
    org, member_of
):
    # given: an answer stored by the release before callers were hashed (its 24 hours
    # run past the deploy)
    org.seats = 2
    org.save(update_fields=["seats"])
    owner, admin = member_of(org, Role.OWNER), member_of(org, Role.ADMIN)
    owners, admins = Client(), Client()
    owners.force_login(owner)
    admins.force_login(admin)
    body = key_body()
    first = post(owners, body, "old")
    assert first.status_code == 201
    as_written_before_the_caller_column("old", body, hashed_caller=None)

    # when: the client retries it
    replay = post(owners, body, "old")

    # then: the first answer again, not a 422 that a client answers with a fresh key
    # (and a second purchase); nothing on the row says who sent it, so the
    # organization's retry is replayed, as that release promised
    assert replay.status_code == 201, replay.content
    assert replay.content == first.content and replay["Idempotent-Replayed"] == "true"
    assert post(admins, body, "old").content == first.content
    assert created_keys(org) == 1
    # but another request under its key is still refused
    refused = post(owners, key_body("ci-other"), "old")
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "idempotency_key_reused"
    assert created_keys(org) == 1


@pytest.mark.django_db
def test_a_record_hashed_with_its_caller_before_the_column_replays_to_that_caller_only(
    org, admin_key, admin_client, make_key
):
    # given: an answer stored by the release that hashed the caller but had no column
    body = key_body()
    first = post(admin_client, body, "hashed")
    assert first.status_code == 201
    as_written_before_the_caller_column("hashed", body, hashed_caller=f"key:{admin_key[0].pk}")

    # when
    replay = post(admin_client, body, "hashed")
    other = post(key_client(make_key(org, name="other")[1]), body, "hashed")

    # then
    assert replay.content == first.content and replay["Idempotent-Replayed"] == "true"
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    assert first.json()["key"].encode() not in other.content
    assert created_keys(org) == 1


@pytest.mark.django_db
def test_a_request_refused_for_its_body_frees_the_key_for_the_corrected_retry(org, admin_client):
    # given: a first attempt with a typo in a field name
    bad = json.dumps({"nmae": "ci", "scopes": ["admin"]}).encode()
    refused = post(admin_client, bad, "fix-and-retry")
    assert refused.status_code == 400

    # when
    response = post(admin_client, key_body(), "fix-and-retry")

    # then
    assert response.status_code == 201
    assert not response.has_header("Idempotent-Replayed")
    assert created_keys(org) == 1


@pytest.mark.django_db
def test_a_refusal_by_the_service_is_stored_and_replayed(org, admin_client):
    # given: a request the endpoint ran and refused (an expiry in the past)
    body = json.dumps(
        {"name": "ci", "scopes": ["admin"], "expires_at": "2001-01-01T00:00:00Z"}
    ).encode()
    first = post(admin_client, body, "past")
    assert first.status_code == 400

    # when
    replay = post(admin_client, body, "past")

    # then
    assert replay.status_code == 400
    assert replay.content == first.content
    assert replay["Idempotent-Replayed"] == "true"
    assert created_keys(org) == 0


@pytest.mark.django_db
def test_posts_without_a_key_are_not_deduplicated(org, admin_client):
    # when
    for _ in range(2):
        admin_client.post(KEYS, data=key_body(), content_type="application/json")

    # then
    assert created_keys(org) == 2
    assert not IdempotencyRecord.objects.exists()


@pytest.mark.parametrize("idempotency_key", ["", "x" * 256, "tab\there"])
@pytest.mark.django_db
def test_an_invalid_idempotency_key_is_refused(org, admin_client, idempotency_key):
    # when
    response = post(admin_client, key_body(), idempotency_key)

    # then
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_idempotency_key"
    assert created_keys(org) == 0
    assert not IdempotencyRecord.objects.exists()


ROUNDS = 5


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_two_concurrent_posts_with_one_key_have_one_effect(live_server):
    # given: a real server (threaded), and an organization committed where it can see it
    org = OrganizationFactory()
    _admin, raw = apikey_create(organization=org, name="admin", scopes=[Scope.ADMIN])
    url = f"{live_server.url}{KEYS}"
    body = key_body()

    def race(idempotency_key: str) -> list[requests.Response]:
        barrier = threading.Barrier(2)
        responses: list[requests.Response | None] = [None, None]

        def send(i: int) -> None:
            barrier.wait()
            responses[i] = requests.post(
                url,
                data=body,
                headers={
                    "Authorization": f"Bearer {raw}",
                    "Content-Type": "application/json",
                    "Idempotency-Key": idempotency_key,
                },
                timeout=30,
            )

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return responses

    for n in range(ROUNDS):
        before = created_keys(org)

        # when
        first, second = sorted(
            race(f"race-{n}"),
            key=lambda r: (r.status_code != 201, "Idempotent-Replayed" in r.headers),
        )

        # then: exactly one effect; the other request is a replay or was told to wait
        assert created_keys(org) == before + 1
        assert first.status_code == 201
        assert "Idempotent-Replayed" not in first.headers
        if second.status_code == 201:
            assert second.headers["Idempotent-Replayed"] == "true"
            assert second.content == first.content
        else:
            assert second.status_code == 409, second.content
            assert second.json()["error"]["code"] == "idempotency_in_progress"
            assert second.headers["Retry-After"] == "1"

    assert created_keys(org) == ROUNDS
    assert AuditEvent.objects.filter(organization=org, action="api_key.created").count() == (
        ROUNDS + 1
    )
