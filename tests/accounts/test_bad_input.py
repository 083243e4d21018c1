"""Bad requests: each gets a 4xx in the one error shape, and nothing is written.

Every POST below carries an Idempotency-Key, as a careful client's would: a
request refused before the endpoint ran must not leave a stored result
behind either.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from django.conf import settings
from django.test import Client

from accounts.models import (
    ApiKey,
    AuditEvent,
    IdempotencyRecord,
    Invitation,
    Membership,
    Role,
    Scope,
)
from accounts.services import apikey_create, invitation_create, membership_add
from gymbilling.services import billing_customer_ensure
from gymbilling.services.invoices import invoice_sync
from metering.models import JournalTransaction
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import credits

pytestmark = pytest.mark.django_db

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
}


def row_counts() -> dict[str, int]:
    return {
        model.__name__: model.objects.count()
        for model in (
            ApiKey,
            AuditEvent,
            IdempotencyRecord,
            JournalTransaction,
            Membership,
            Invitation,
        )
    }


def assert_error_shape(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/json")
    body = json.loads(response.content)
    assert set(body) == {"error"}
    error = body["error"]
    assert {"type", "code", "message", "param"} <= set(error)
    assert error["type"] == ERROR_TYPES[status]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


@dataclass(frozen=True)
class Bad:
    path: str
    body: bytes
    status: int
    code: str
    param: str | None = None
    content_type: str = "application/json"
    method: str = "post"


def j(value) -> bytes:
    return json.dumps(value).encode()


# The acting key has the admin scope alone, and a key makes keys within its own.
VALID = {"name": "ok", "scopes": ["admin"]}

BAD_KEY_REQUESTS = {
    "malformed-json": Bad("/api/v1/keys", b'{"name": "x", "scopes": ["admin"', 400, "invalid_json"),
    "trailing-garbage": Bad("/api/v1/keys", j(VALID) + b"}", 400, "invalid_json"),
    "nan": Bad("/api/v1/keys", b'{"name": NaN, "scopes": ["admin"]}', 400, "invalid_json"),
    "duplicate-key": Bad(
        "/api/v1/keys", b'{"name": "x", "scopes": ["inference"], "name": "y"}', 400, "invalid_json"
    ),
    "deeply-nested": Bad("/api/v1/keys", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    "non-utf8": Bad(
        "/api/v1/keys", b'{"name": "\xff\xfe\xc3", "scopes": ["admin"]}', 400, "invalid_json"
    ),
    "latin1-encoded": Bad(
        "/api/v1/keys",
        '{"name": "caf\xe9", "scopes": ["admin"]}'.encode("latin-1"),
        400,
        "invalid_json",
    ),
    "empty-body": Bad("/api/v1/keys", b"", 400, "invalid_request", "name"),
    "array": Bad("/api/v1/keys", j([VALID]), 400, "invalid_request"),
    "string": Bad("/api/v1/keys", j("ok"), 400, "invalid_request"),
    "null": Bad("/api/v1/keys", b"null", 400, "invalid_request"),
    "name-list": Bad("/api/v1/keys", j({**VALID, "name": ["a"]}), 400, "invalid_request", "name"),
    "name-object": Bad(
        "/api/v1/keys", j({**VALID, "name": {"a": 1}}), 400, "invalid_request", "name"
    ),
    "name-null": Bad("/api/v1/keys", j({**VALID, "name": None}), 400, "invalid_request", "name"),
    "name-blank": Bad("/api/v1/keys", j({**VALID, "name": "   "}), 400, "invalid_request", "name"),
    "name-too-long": Bad(
        "/api/v1/keys", j({**VALID, "name": "n" * 101}), 400, "invalid_request", "name"
    ),
    "name-nul-char": Bad(
        "/api/v1/keys", j({**VALID, "name": "a\x00b"}), 400, "invalid_request", "name"
    ),
    "scopes-string": Bad(
        "/api/v1/keys", j({**VALID, "scopes": "admin"}), 400, "invalid_request", "scopes"
    ),
    "scopes-empty": Bad(
        "/api/v1/keys", j({**VALID, "scopes": []}), 400, "invalid_request", "scopes"
    ),
    "scopes-ints": Bad(
        "/api/v1/keys", j({**VALID, "scopes": [1]}), 400, "invalid_request", "scopes"
    ),
    "scopes-unknown": Bad(
        "/api/v1/keys", j({**VALID, "scopes": ["root"]}), 400, "invalid_request", "scopes"
    ),
    "expiry-number": Bad(
        "/api/v1/keys",
        j({**VALID, "expires_at": 1_900_000_000}),
        400,
        "invalid_request",
        "expires_at",
    ),
    "expiry-garbage": Bad(
        "/api/v1/keys", j({**VALID, "expires_at": "tomorrow"}), 400, "invalid_request", "expires_at"
    ),
    "unknown-field": Bad(
        "/api/v1/keys", j({**VALID, "admin": True}), 400, "invalid_request", "admin"
    ),
    # Found by schemathesis: past the integer column it was a 500.
    "rate-limit-out-of-range": Bad(
        "/api/v1/keys",
        j({**VALID, "requests_per_minute": 2_069_872_645_737}),
        400,
        "invalid_request",
        "requests_per_minute",
    ),
    # A lone surrogate (sent escaped, as JSON allows) in a key the serializer does not
    # know: echoed in the error, the renderer could not encode it (a 500).
    "unknown-field-surrogate": Bad(
        "/api/v1/keys", j({**VALID, "\ud800": 1}), 400, "invalid_request", "\\ud800"
    ),
    "invitation-role-surrogate": Bad(
        "/api/v1/orgs/{org}/invitations",
        j({"email": "a@example.test", "role": "\ud800"}),
        400,
        "invalid_request",
        "role",
    ),
    "typo-field": Bad(
        "/api/v1/keys", j({"nmae": "ok", "scopes": ["admin"]}), 400, "invalid_request"
    ),
    "text-plain": Bad(
        "/api/v1/keys", j(VALID), 415, "unsupported_media_type", content_type="text/plain"
    ),
    "form-encoded": Bad(
        "/api/v1/keys",
        b"name=ok&scopes=inference",
        415,
        "unsupported_media_type",
        content_type="application/x-www-form-urlencoded",
    ),
    "xml": Bad(
        "/api/v1/keys", b"<key/>", 415, "unsupported_media_type", content_type="application/xml"
    ),
    "invitation-bad-email": Bad(
        "/api/v1/orgs/{org}/invitations",
        j({"email": "not-an-email"}),
        400,
        "invalid_request",
        "email",
    ),
    "invitation-bad-role": Bad(
        "/api/v1/orgs/{org}/invitations",
        j({"email": "a@example.test", "role": "god"}),
        400,
        "invalid_request",
        "role",
    ),
    "member-email-number": Bad(
        "/api/v1/orgs/{org}/members", j({"email": 5}), 400, "invalid_request", "email"
    ),
    "unknown-url": Bad("/api/v1/nope", j(VALID), 404, "not_found"),
    "trailing-slash": Bad("/api/v1/keys/", j(VALID), 404, "not_found"),
    "key-id-not-a-number": Bad("/api/v1/keys/abc", b"", 404, "not_found", method="delete"),
    "key-id-unknown": Bad("/api/v1/keys/987654321", b"", 404, "not_found", method="delete"),
    "unknown-url-get": Bad("/api/v1/keys/1/secret", b"", 404, "not_found", method="get"),
    "method-not-allowed": Bad("/api/v1/keys", j(VALID), 405, "method_not_allowed", method="put"),
}


@pytest.mark.parametrize("case", BAD_KEY_REQUESTS.values(), ids=BAD_KEY_REQUESTS.keys())
def test_bad_input_is_refused_in_the_error_shape_and_writes_nothing(org, admin_client, case):
    # given
    org.seats = 5
    org.save(update_fields=["seats"])
    before = row_counts()

    # when
    response = getattr(admin_client, case.method)(
        case.path.format(org=org.pk),
        data=case.body,
        content_type=case.content_type,
        HTTP_IDEMPOTENCY_KEY=f"bad-{case.code}",
    )

    # then
    error = assert_error_shape(response, case.status, case.code)
    if case.param is not None:
        assert error["param"] is not None and error["param"].split(".")[0] == case.param
    assert row_counts() == before


def test_a_body_over_the_limit_is_refused_with_413_before_it_is_read(org, admin_client):
    # given
    before = row_counts()
    name = "n" * settings.API_MAX_BODY_BYTES
    body = j({"name": name, "scopes": ["inference"]})
    assert len(body) > settings.API_MAX_BODY_BYTES

    # when
    response = admin_client.post(
        "/api/v1/keys", data=body, content_type="application/json", HTTP_IDEMPOTENCY_KEY="huge"
    )

    # then
    assert_error_shape(response, 413, "request_too_large")
    assert row_counts() == before


@pytest.mark.parametrize("charset", ["base64", "hex", "zlib", "rot13", "no-such-charset"])
def test_a_body_whose_charset_is_not_text_is_refused_with_415(org, admin_client, charset):
    # given
    before = row_counts()

    # when
    response = admin_client.post(
        "/api/v1/keys",
        data=j(VALID),
        content_type=f"application/json; charset={charset}",
        HTTP_IDEMPOTENCY_KEY=f"charset-{charset}",
    )

    # then
    assert_error_shape(response, 415, "unsupported_media_type")
    assert row_counts() == before


def test_a_non_numeric_content_length_is_refused(org, admin_client):
    # given
    before = row_counts()

    # when
    response = admin_client.post(
        "/api/v1/keys", data=j(VALID), content_type="application/json", CONTENT_LENGTH="lots"
    )

    # then
    assert_error_shape(response, 400, "invalid_request")
    assert row_counts() == before


@pytest.mark.parametrize("method", ["get", "post"])
def test_a_request_without_credentials_is_refused_with_401(org, method):
    # given
    before = row_counts()

    # when
    response = getattr(Client(), method)(
        "/api/v1/keys",
        **({"data": j(VALID), "content_type": "application/json"} if method == "post" else {}),
        HTTP_IDEMPOTENCY_KEY="anon",
    )

    # then
    assert_error_shape(response, 401, "authentication_failed")
    assert response["WWW-Authenticate"] == "Bearer"
    assert row_counts() == before


@pytest.mark.parametrize("path", ["/api/v1/nope", "/api/v1/", "/api/v2/keys", "/api/v1/me/x"])
def test_an_unknown_url_under_the_api_answers_a_json_404(path):
    # when
    response = Client().get(path)

    # then
    assert_error_shape(response, 404, "not_found")


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/api/v1/keys?limit=1&limit=200", "limit"),
        ("/api/v1/credits/ledger?cursor=&cursor=", "cursor"),
        ("/api/v1/usage?group_by=key&group_by=day", "group_by"),
        ("/api/v1/jobs?status=queued&status=running", "status"),
        ("/api/v1/market/listings?currency=usd&currency=eur", "currency"),
        ("/api/v1/market/orders?status=paid&status=pending", "status"),
        ("/api/v1/market/sales?proceeds=pending&proceeds=paid_out", "proceeds"),
    ],
)
def test_a_query_parameter_given_twice_is_refused_naming_it(org, make_key, path, param):
    # given a key with every scope: each list reads its parameters
    _key, raw = make_key(org, scopes=Scope.values)

    # when a parameter comes twice (it was read as the last of them: `?limit=1&limit=200`
    # a page of 200, `?status=queued&status=running` only the running jobs, silently)
    response = key_client(raw).get(path)

    # then
    error = assert_error_shape(response, 400, "invalid_request")
    assert error["param"] == param
    assert "more than once" in error["message"]


def _another_key(org, request) -> None:
    apikey_create(organization=org, name="spare", scopes=[Scope.INFERENCE])


def _two_members(org, request) -> None:
    for _ in range(2):
        membership_add(organization=org, user=UserFactory())


def _two_invitations(org, request) -> None:
    for n in range(2):
        invitation_create(organization=org, email=f"invitee{n}@example.test")


def _two_grants(org, request) -> None:
    grant = request.getfixturevalue("grant")
    for _ in range(2):
        grant(org, credits(1))


def _two_invoices(org, request) -> None:
    request.getfixturevalue("stripe_standin")  # the customer is made at Stripe
    customer = billing_customer_ensure(organization=org).stripe_customer_id
    for n in range(2):
        invoice_sync(
            invoice={
                "id": f"in_list_{org.pk}_{n}",
                "customer": customer,
                "status": "open",
                "currency": "usd",
                "amount_due": 100,
                "amount_paid": 0,
                "created": 1_700_000_000 + n,
                "hosted_invoice_url": f"https://invoice.stripe.test/{n}",
                "billing_reason": "subscription_cycle",
            },
            subscription=None,
        )


# The lists that take only `cursor` and `limit`, and how to give each two rows or more
# (making the caller's key writes one key, and its audit event).
PAGE_ONLY_LISTS = {
    "keys": ("/api/v1/keys", _another_key),
    "audit": ("/api/v1/audit", _another_key),
    "members": ("/api/v1/orgs/{org}/members", _two_members),
    "invitations": ("/api/v1/orgs/{org}/invitations", _two_invitations),
    "ledger": ("/api/v1/credits/ledger", _two_grants),
    "lots": ("/api/v1/credits/lots", _two_grants),
    "invoices": ("/api/v1/billing/invoices", _two_invoices),
}


@pytest.mark.parametrize(("path", "seed"), PAGE_ONLY_LISTS.values(), ids=PAGE_ONLY_LISTS.keys())
def test_a_list_refuses_a_query_parameter_it_does_not_take_naming_it(
    org, make_key, request, path, seed
):
    # given a list of two rows or more, read with a key of every scope
    org.seats = 5
    org.save(update_fields=["seats"])
    _key, raw = make_key(org, scopes=Scope.values)
    seed(org, request)
    client = key_client(raw)
    path = path.format(org=org.pk)

    # when a parameter is misspelt, is a filter the list does not have, or comes twice
    # (the first two were ignored: the client got the default page, and took it for
    # the one it asked for)
    refused = {
        "limt": client.get(path, {"limt": "1"}),
        "status": client.get(path, {"status": "open"}),
        "limit": client.get(f"{path}?limit=1&limit=200"),
    }

    # then each is a 400 naming it
    for param, response in refused.items():
        error = assert_error_shape(response, 400, "invalid_request")
        assert error["param"] == param
    # while `limit` and `cursor` page through the list as before, each row once
    everything = client.get(path, {"cursor": "", "limit": ""})
    assert everything.status_code == 200, everything.content
    expected = [row["id"] for row in everything.json()["results"]]
    assert len(expected) >= 2
    paged, url = [], f"{path}?limit=1"
    while url:
        page = client.get(url)
        assert page.status_code == 200, page.content
        assert len(page.json()["results"]) == 1
        paged += [row["id"] for row in page.json()["results"]]
        url = page.json()["next"]
    assert paged == expected


def test_a_bad_member_role_change_writes_nothing(org, admin_client, member_of):
    # given
    org.seats = 5
    org.save(update_fields=["seats"])
    user = member_of(org, Role.MEMBER)
    membership = Membership.objects.get(user=user, organization=org)
    before = row_counts()

    # when
    responses = [
        admin_client.patch(
            f"/api/v1/orgs/{org.pk}/members/{membership.pk}",
            data=body,
            content_type="application/json",
        )
        for body in (j({"role": "god"}), j({"role": None}), j({}), j({"role": "admin", "x": 1}))
    ]

    # then
    for response in responses:
        assert_error_shape(response, 400, "invalid_request")
    membership.refresh_from_db()
    assert membership.role == Role.MEMBER
    assert row_counts() == before


def test_another_organizations_id_in_the_path_is_not_found(org, admin_client):
    # given
    other = OrganizationFactory()
    before = row_counts()

    # when
    response = admin_client.post(
        f"/api/v1/orgs/{other.pk}/invitations",
        data=j({"email": "a@example.test"}),
        content_type="application/json",
    )

    # then
    assert_error_shape(response, 404, "not_found")
    assert row_counts() == before


def test_a_valid_request_after_all_that_still_works(org, admin_client, admin_key):
    # given: the key was used for garbage first
    for case in list(BAD_KEY_REQUESTS.values())[:5]:
        admin_client.post(case.path, data=case.body, content_type=case.content_type)

    # when
    response = key_client(admin_key[1]).post(
        "/api/v1/keys", data=j(VALID), content_type="application/json"
    )

    # then
    assert response.status_code == 201
