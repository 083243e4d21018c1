"""Tenant isolation: organization B can neither see nor touch anything of organization A's.

The walk covers every operation under /api/v1/ in the OpenAPI schema, so a
new route is checked the day it is added. B calls with everything it can
hold: an API key with every scope, and its owner's session, each both
plainly and naming A in `X-Organization`. Every path parameter is filled
with A's object (and, where a path has several, with A's object beside B's
own), and must answer 404 in the error shape, exactly like an id that does
not exist: never 403, which would confirm the id is real, and never 2xx.
Every other answer must carry none of A's distinctive values, and A's rows
must be as they were after the walk.

A path parameter the walker does not know fails the test: add A's and B's
object for it to `Tenant.path_ids` below.
"""

from __future__ import annotations

import itertools
import json
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.test import Client
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator

from accounts.models import (
    ApiKey,
    AuditEvent,
    Invitation,
    Membership,
    Organization,
    Role,
    Scope,
    User,
)
from accounts.services import apikey_create, invitation_create, membership_add
from inference.models import CatalogModel, Job, JobStatus, ServerPool
from inference.services import job_submit
from inference.services.jobs import SubmitParams
from metering.models import CreditLot, Hold, LedgerEntry, UsageRecord
from metering.selectors import organization_balance
from metering.services import (
    Usage,
    credits_grant,
    hold_place,
    price_book_publish,
    usage_record_create,
)
from tests.factories import OrganizationFactory, UserFactory

pytestmark = pytest.mark.django_db

API_PREFIX = "/api/v1/"
HTTP_METHODS = ("get", "post", "put", "patch", "delete")
# Fewer operations than this means the schema, not the API, went missing.
MIN_OPERATIONS = 10

# A's values are chosen so that none can turn up in B's answers by chance:
# every string carries "tenant-a", and the amounts are odd 8- and 9-digit numbers.
A_GRANT = 987_654_321
A_HOLD = 24_681_357
A_USAGE_CREDITS = 13_579_246
# A's marketplace listing (micro-credits moved from its wallet into escrow).
A_LISTED = 10_000_000


@dataclass
class Tenant:
    org: Organization
    owner: User
    owner_membership: Membership
    key: ApiKey
    raw_key: str
    # Path parameter name -> this tenant's object id.
    path_ids: dict[str, int]
    member: Membership | None = None
    invitation_token: str = ""
    # Values that identify this tenant's rows in any JSON answer.
    fingerprints: list[str] = field(default_factory=list)


def inference_job_for(org: Organization, key: ApiKey, *, prompt: str):
    """A queued job through the real service. Under the `db` fixture nothing is
    ever committed, so the on-commit enqueue never fires: no worker is needed."""
    if not CatalogModel.objects.filter(name="walker-model").exists():
        price_book_publish(
            prices=[
                {
                    "model_name": "walker-model",
                    "input_rate": Decimal("1"),
                    "cached_input_rate": Decimal("1"),
                    "output_rate": Decimal("1"),
                }
            ]
        )
        pool = ServerPool.objects.create(name="walker-pool", grpc_urls=["127.0.0.1:1"])
        CatalogModel.objects.create(name="walker-model", pool=pool)
    return job_submit(
        organization=org,
        api_key=key,
        model_name="walker-model",
        prompt=prompt,
        params=SubmitParams(max_tokens=4),
        kind="async",
    )


def market_objects(org: Organization, *, list_credits: bool) -> tuple[int, int]:
    """A listing of `org`'s (or, without resellable credits, of another seller's
    it may not touch) and an order of `org`'s, reserved without Stripe."""
    from gymbilling.market.services import listing_create, order_reserve

    seller = OrganizationFactory()
    credits_grant(
        organization=seller, amount=100 * 10**6, source="subscription", paid=True,
        resellable=True, key=f"market-seller-{uuid.uuid4()}",
        expires_at=timezone.now() + timedelta(days=30),
    )  # fmt: skip
    other = listing_create(seller=seller, quantity=20 * 10**6, price_per_1k=400, currency="usd")
    listing = (
        listing_create(seller=org, quantity=A_LISTED, price_per_1k=321, currency="usd")
        if list_credits
        else other
    )
    order = order_reserve(
        buyer=org, quantity=10**6, max_price_per_1k=400, currency="usd", listing_id=other.pk
    )
    return listing.pk, order.pk


@pytest.fixture
def tenant_a() -> Tenant:
    """A, with something of everything: members, a key, an invitation, ledger, audit, usage."""
    org = OrganizationFactory(slug="tenant-a-acme", name="Tenant-A Acme", seats=5)
    owner = UserFactory(email="owner@tenant-a.test")
    member_user = UserFactory(email="member@tenant-a.test")
    owner_membership = membership_add(organization=org, user=owner, role=Role.OWNER)
    member = membership_add(organization=org, user=member_user, role=Role.MEMBER, actor=owner)
    key, raw_key = apikey_create(
        organization=org, name="tenant-a-key", scopes=Scope.values, actor=owner
    )
    invitation, token = invitation_create(
        organization=org, email="invitee@tenant-a.test", role=Role.ADMIN, actor=owner
    )
    credits_grant(
        organization=org,
        amount=A_GRANT,
        source="subscription",
        paid=True,
        resellable=True,
        key=f"tenant-a-grant-{uuid.uuid4()}",
        expires_at=timezone.now() + timedelta(days=30),
        memo="tenant-a grant",
    )
    hold = hold_place(
        organization=org, amount=A_HOLD, key=f"tenant-a-hold-{uuid.uuid4()}", memo="tenant-a hold"
    )
    usage_record_create(
        organization_id=org.pk,
        job_id=f"tenant-a-job-{uuid.uuid4()}",
        model_name="tenant-a-model",
        priority="standard",
        usage=Usage(input_tokens=1_234_567, output_tokens=7_654_321),
        credits=A_USAGE_CREDITS,
        api_key_id=key.pk,
        hold=hold,
    )
    job = inference_job_for(org, key, prompt="tenant-a prompt")
    listing_id, order_id = market_objects(org, list_credits=True)
    assert AuditEvent.objects.filter(organization=org).exists()
    return Tenant(
        org=org,
        owner=owner,
        owner_membership=owner_membership,
        key=key,
        raw_key=raw_key,
        # The member is the target that isolation alone protects: removing
        # or promoting the owner would also trip on the last-owner rule.
        path_ids={
            "org_id": org.pk,
            "key_id": key.pk,
            "member_id": member.pk,
            "invitation_id": invitation.pk,
            "job_id": job.public_id,
            "listing_id": listing_id,
            "order_id": order_id,
        },
        member=member,
        invitation_token=token,
        fingerprints=[
            "tenant-a",  # slug, name, emails, key name, memos, model and job names
            key.public_id,  # the key's prefix, and usage grouped by key
            str(A_GRANT),
            str(A_HOLD),
            str(A_USAGE_CREDITS),
            invitation.email,
        ],
    )


@pytest.fixture
def tenant_b() -> Tenant:
    """B: an owner, and an API key with every scope. Limits high enough for the walk."""
    org = OrganizationFactory(
        slug="tenant-b-globex", name="Tenant-B Globex", seats=5, requests_per_minute=1_000_000
    )
    owner = UserFactory(email="owner@tenant-b.test")
    owner_membership = membership_add(organization=org, user=owner, role=Role.OWNER)
    key, raw_key = apikey_create(organization=org, name="b-walker", scopes=Scope.values)
    invitation, _token = invitation_create(
        organization=org, email="invitee@tenant-b.test", actor=owner
    )
    credits_grant(
        organization=org, amount=A_GRANT // 7, source="pack", paid=True, resellable=False,
        key=f"tenant-b-grant-{uuid.uuid4()}",
    )  # fmt: skip
    job = inference_job_for(org, key, prompt="b prompt")
    listing_id, order_id = market_objects(org, list_credits=False)
    return Tenant(
        org=org,
        owner=owner,
        owner_membership=owner_membership,
        key=key,
        raw_key=raw_key,
        path_ids={
            "org_id": org.pk,
            "key_id": key.pk,
            "member_id": owner_membership.pk,
            "invitation_id": invitation.pk,
            "job_id": job.public_id,
            "listing_id": listing_id,
            "order_id": order_id,
        },
    )


# --- the walk -------------------------------------------------------------------------


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    spec: dict[str, Any]

    @property
    def operation_id(self) -> str:
        return self.spec["operationId"]

    @property
    def path_params(self) -> list[str]:
        return [p["name"] for p in self.spec.get("parameters", []) if p["in"] == "path"]

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.path}"


def api_operations() -> tuple[dict[str, Any], list[Operation]]:
    schema = SchemaGenerator().get_schema(request=None, public=True)
    operations = [
        Operation(method=method, path=path, spec=spec)
        for path, item in schema["paths"].items()
        if path.startswith(API_PREFIX)
        for method, spec in item.items()
        if method in HTTP_METHODS
    ]
    return schema, operations


def path_variants(operation: Operation, a: Tenant, b: Tenant) -> list[dict[str, int]]:
    """Every filling of the path that names at least one of A's objects.

    All of A's, and, where a path has several parameters, each mix with B's
    own: B's organization with A's member must fail as surely as A's with A's.
    """
    names = operation.path_params
    for name in names:
        if name not in a.path_ids or name not in b.path_ids:
            pytest.fail(
                f"{operation} has the path parameter {{{name}}}, which the isolation walker "
                f"does not know: add A's and B's object for it to Tenant.path_ids in {__name__}."
            )
    variants = []
    for owners in itertools.product((a, b), repeat=len(names)):
        if a in owners:
            variants.append({n: t.path_ids[n] for n, t in zip(names, owners, strict=True)})
    return variants


def request_bodies(a: Tenant, b: Tenant) -> dict[str, dict[str, Any]]:
    """Per operationId, the most damaging body B could send: join A, promote, steal."""
    return {
        "api_v1_keys_create": {"name": "b-walker-created", "scopes": ["admin"]},
        "api_v1_orgs_members_create": {"email": b.owner.email, "role": Role.OWNER},
        "api_v1_orgs_members_partial_update": {"role": Role.OWNER},
        "api_v1_orgs_invitations_create": {"email": b.owner.email, "role": Role.OWNER},
        # A's real invitation, sent to someone else.
        "api_v1_invitations_accept_create": {"token": a.invitation_token},
    }


# Open to everyone, signed in or not: naming A's organization changes nothing.
PUBLIC_OPERATIONS = {"api_v1_plans_retrieve"}

# Query parameters that make an answer show rows the default would not.
QUERIES = {"api_v1_usage_retrieve": "?group_by=model"}


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        node = schema["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    if "allOf" in node and len(node["allOf"]) == 1:
        return resolve(schema, node["allOf"][0])
    return node


def minimal_value(schema: dict[str, Any], node: dict[str, Any], where: str) -> Any:
    node = resolve(schema, node)
    if "enum" in node:
        return node["enum"][0]
    kind = node.get("type")
    if kind == "string":
        return {"email": "walker@tenant-b.test", "date-time": "2099-01-01T00:00:00Z"}.get(
            node.get("format"), "walker"
        )
    if kind == "integer":
        return max(1, node.get("minimum", 1))
    if kind == "boolean":
        return False
    if kind == "array":
        return [minimal_value(schema, node["items"], where)] * max(1, node.get("minItems", 1))
    if kind == "object" or "properties" in node:
        return {
            name: minimal_value(schema, node["properties"][name], f"{where}.{name}")
            for name in node.get("required", [])
        }
    pytest.fail(f"cannot derive a value for {where} ({node}): add a body to request_bodies().")


def body_for(
    schema: dict[str, Any], operation: Operation, bodies: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    if operation.operation_id in bodies:
        return bodies[operation.operation_id]
    content = operation.spec.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        return None
    return minimal_value(schema, content["application/json"]["schema"], operation.operation_id)


@dataclass(frozen=True)
class Caller:
    """How B presents itself."""

    name: str
    use_key: bool
    name_a_in_header: bool  # X-Organization: <A's slug>

    def client(self, a: Tenant, b: Tenant) -> tuple[Client, dict[str, str]]:
        client = Client()
        headers = {}
        if self.use_key:
            headers["Authorization"] = f"Bearer {b.raw_key}"
        else:
            client.force_login(b.owner)
        if self.name_a_in_header:
            headers["X-Organization"] = a.org.slug
        return client, headers


CALLERS = [
    Caller("B's API key", use_key=True, name_a_in_header=False),
    Caller("B's API key naming A", use_key=True, name_a_in_header=True),
    Caller("B's owner session", use_key=False, name_a_in_header=False),
    Caller("B's owner session naming A", use_key=False, name_a_in_header=True),
]


def send(client: Client, headers: dict[str, str], method: str, url: str, body: Any):
    if body is None:
        return client.generic(method.upper(), url, headers=headers)
    return client.generic(
        method.upper(), url, json.dumps(body), content_type="application/json", headers=headers
    )


def assert_not_found(response, what: str) -> None:
    assert response.status_code == 404, (
        f"{what}: expected 404, got {response.status_code}: {response.content[:500]!r}"
    )
    error = response.json()["error"]
    assert set(error) >= {"type", "code", "message", "param"}, f"{what}: {error}"
    assert error["type"] == "invalid_request_error", f"{what}: {error}"


def assert_nothing_of(a: Tenant, response, what: str) -> None:
    text = response.content.decode()
    leaked = [value for value in a.fingerprints if value in text]
    assert not leaked, f"{what} shows A's {leaked}: {text[:1000]}"


def snapshot(org: Organization) -> dict[str, Any]:
    """Everything of A's that B might change."""
    balance = organization_balance(organization=org)
    org.refresh_from_db()
    return {
        "organization": (org.slug, org.name, org.seats, org.standing, org.requests_per_minute),
        "keys": list(
            ApiKey.objects.filter(organization=org)
            .order_by("pk")
            .values_list("pk", "name", "scopes", "revoked_at", "expires_at", "requests_per_minute")
        ),
        "memberships": list(
            Membership.objects.filter(organization=org)
            .order_by("pk")
            .values_list("pk", "user_id", "role")
        ),
        "invitations": list(
            Invitation.objects.filter(organization=org)
            .order_by("pk")
            .values_list("pk", "email", "role", "accepted_at", "revoked_at")
        ),
        "balance": (balance.available, balance.held, balance.escrowed),
        "lots": list(
            CreditLot.objects.filter(organization=org).order_by("pk").values_list("pk", "remaining")
        ),
        "entries": LedgerEntry.objects.filter(account__organization=org).count(),
        "holds": list(
            Hold.objects.filter(organization=org).order_by("pk").values_list("pk", "status")
        ),
        "usage": list(UsageRecord.objects.filter(organization=org).values_list("pk", flat=True)),
        "audit": list(
            AuditEvent.objects.filter(organization=org).order_by("pk").values_list("pk", flat=True)
        ),
    }


@pytest.mark.parametrize("caller", CALLERS, ids=lambda c: c.name)
def test_organization_b_cannot_see_or_touch_organization_a(
    caller, tenant_a, tenant_b, stripe_standin
):
    # given
    schema, operations = api_operations()
    bodies = request_bodies(tenant_a, tenant_b)
    client, headers = caller.client(tenant_a, tenant_b)
    before = snapshot(tenant_a.org)
    walked: set[str] = set()
    requests = 0

    for operation in operations:
        body = body_for(schema, operation, bodies)
        query = QUERIES.get(operation.operation_id, "")
        if operation.path_params:
            for ids in path_variants(operation, tenant_a, tenant_b):
                # when
                response = send(
                    client, headers, operation.method, operation.path.format(**ids) + query, body
                )
                requests += 1
                # then
                what = f"{caller.name}: {operation} with {ids}"
                assert_not_found(response, what)
                assert_nothing_of(tenant_a, response, what)
        else:
            # when
            response = send(client, headers, operation.method, operation.path + query, body)
            requests += 1
            # then
            what = f"{caller.name}: {operation}"
            if (
                caller.name_a_in_header
                and not caller.use_key
                and (operation.operation_id not in PUBLIC_OPERATIONS)
            ):
                # A session may act for another of the user's organizations, never for one
                # it is not a member of.
                assert_not_found(response, what)
            elif operation.method == "get":
                # B reads its own data, so the check below is not passing on an empty page.
                assert response.status_code == 200, (
                    f"{what}: {response.status_code} {response.content[:500]!r}"
                )
            assert response.status_code < 500, f"{what}: {response.status_code}"
            assert_nothing_of(tenant_a, response, what)
        walked.add(str(operation))

    # then: the walk covered the API, and A is exactly as it was
    assert len(walked) >= MIN_OPERATIONS, f"only {sorted(walked)} were walked"
    assert requests > len(walked)  # the multi-parameter paths were tried in every mix
    assert snapshot(tenant_a.org) == before
    assert tenant_a.member is not None
    assert Membership.objects.filter(pk=tenant_a.member.pk, role=Role.MEMBER).exists()
    assert not Membership.objects.filter(organization=tenant_a.org, user=tenant_b.owner).exists()
    assert ApiKey.objects.get(pk=tenant_a.key.pk).revoked_at is None
    a_job = Job.objects.get(organization=tenant_a.org)
    assert a_job.status == JobStatus.QUEUED  # B's cancel of A's job did not reach it
    assert organization_balance(organization=tenant_a.org).available == (
        A_GRANT - A_HOLD - a_job.hold_amount - A_LISTED
    )
