"""The API keeps the promises its OpenAPI schema makes, under generated requests.

schemathesis reads the schema the app serves at /api/schema/ and, for every
operation under /api/v1/, sends generated requests (valid ones, and the edge
and invalid values of its coverage phase) into the real WSGI application,
on the real PostgreSQL and Redis. Every answer must be:

- not a server error;
- a status the schema documents for that operation (errors included: they are
  documented once, for every operation, by gymbilling.openapi);
- of a documented content type, and matching the documented body schema.

Generated ids are almost never the caller's, so each case that has path
parameters is also sent aimed at the caller's own objects: that is what
reaches the success answers of the detail operations. And so the test cannot
pass on a wall of 401s or 404s, every operation must have answered 2xx at
least once.

The application runs in this process on the test's own database connection,
inside the test's transaction (`db`, rolled back afterwards): as Django's
test client does, the WSGI handler is kept from closing that connection
between requests. Committing every request instead (`transaction=True`)
works too, but flushing every table after each of the operations doubles
the run time.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal

import pytest
import schemathesis
from django.core.signals import request_finished, request_started
from django.db import close_old_connections
from django.utils import timezone
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from accounts.models import Role, Scope
from accounts.services import apikey_create, invitation_create, membership_add
from gymbilling.services import billing_customer_ensure, catalog_sync
from gymbilling.services.catalog import catalog_seed_defaults
from gymbilling.wsgi import application
from inference.models import CatalogModel, ServerPool
from inference.services import job_submit
from inference.services.jobs import SubmitParams
from metering.services import (
    Usage,
    credits_grant,
    hold_place,
    price_book_publish,
    usage_record_create,
)
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import credits

pytestmark = pytest.mark.django_db

MODEL = "schemathesis-model"

# Operations whose valid bodies random generation almost never hits (exactly one
# of messages/prompt, a priority the plan allows): one known-good body each, so
# their success responses are checked against the schema too.
KNOWN_GOOD_BODIES = {
    "POST /api/v1/jobs": {"model": MODEL, "prompt": "hello", "max_tokens": 4},
    "POST /api/v1/billing/checkout": {"pack": "boost-1k"},
    "POST /api/v1/market/listings": {"quantity": 10_000_000, "price_per_1k": 300},
}

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]

# Operations that cannot answer 2xx to generated input, and why.
NO_SUCCESS_EXPECTED = {
    # Only a signed-in person may accept, with a token mailed to them; API keys get 403.
    "POST /api/v1/invitations/accept",
    # Adds an existing user by email; a generated email matches no user (404).
    "POST /api/v1/orgs/{org_id}/members",
    # Opens a Stripe Checkout; with no STRIPE_SECRET_KEY here it answers 503
    # billing_not_configured (tests/gymbilling/market cover its success).
    "POST /api/v1/market/orders",
}

schema = schemathesis.openapi.from_wsgi("/api/schema/?format=json", application).include(
    path_regex="^/api/v1/"
)


@dataclass
class Caller:
    headers: dict[str, str]
    # Path parameter name -> the caller's own object.
    own_ids: dict[str, int]


@pytest.fixture(autouse=True)
def _wsgi_keeps_the_test_connection():
    """Stop the WSGI handler closing the connection, and so the test's transaction, per request.

    This is what django.test.Client does around each request it sends.
    """
    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    try:
        yield
    finally:
        request_started.connect(close_old_connections)
        request_finished.connect(close_old_connections)


@pytest.fixture
def caller(stripe_standin) -> Caller:
    """An owner's organization with something of everything, and an API key with every scope.

    The limit is high enough that hundreds of requests in a minute are not refused.
    """
    org = OrganizationFactory(seats=1_000, requests_per_minute=1_000_000_000)
    owner = UserFactory()
    membership_add(organization=org, user=owner, role=Role.OWNER)
    member = membership_add(organization=org, user=UserFactory(), role=Role.MEMBER)
    invitation, _token = invitation_create(
        organization=org, email=f"invitee-{uuid.uuid4().hex}@example.test"
    )
    key, raw = apikey_create(organization=org, name="schemathesis", scopes=Scope.values)
    # Revoking this one, not the caller's own, keeps the caller signed in.
    spare, _ = apikey_create(organization=org, name="spare", scopes=[Scope.INFERENCE])
    credits_grant(
        organization=org,
        amount=credits(100),
        source="subscription",
        paid=True,
        resellable=True,
        key=f"schemathesis-{uuid.uuid4()}",
        expires_at=timezone.now() + timedelta(days=30),
    )
    hold = hold_place(organization=org, amount=credits(1), key=f"schemathesis-{uuid.uuid4()}")
    usage_record_create(
        organization_id=org.pk,
        job_id=f"schemathesis-{uuid.uuid4()}",
        model_name="llama-test",
        priority="standard",
        usage=Usage(input_tokens=100, output_tokens=20),
        credits=credits(1),
        api_key_id=key.pk,
        hold=hold,
    )
    # A priced catalog model and a queued job. Under `db` nothing commits, so
    # the job's on-commit enqueue never fires: no worker or Triton is needed.
    price_book_publish(
        prices=[
            {
                "model_name": MODEL,
                "input_rate": Decimal("1"),
                "cached_input_rate": Decimal("1"),
                "output_rate": Decimal("1"),
            }
        ]
    )
    # Plans and packs on sale at the Stripe stand-in, so checkout can succeed.
    catalog_seed_defaults()
    catalog_sync()
    pool = ServerPool.objects.create(name="schemathesis", grpc_urls=["127.0.0.1:1"])
    CatalogModel.objects.create(name=MODEL, pool=pool)
    job = job_submit(
        organization=org,
        api_key=key,
        model_name=MODEL,
        prompt="hello",
        params=SubmitParams(max_tokens=4),
        kind="async",
    )
    from django.conf import settings as django_settings

    from gymbilling.market.services import listing_create, order_pay, order_reserve, payouts_run

    seller = OrganizationFactory()
    credits_grant(
        organization=seller, amount=credits(100), source="subscription", paid=True,
        resellable=True, key=f"schemathesis-{uuid.uuid4()}",
        expires_at=timezone.now() + timedelta(days=30),
    )  # fmt: skip
    offer = listing_create(seller=seller, quantity=credits(50), price_per_1k=400, currency="usd")
    listing = listing_create(seller=org, quantity=credits(10), price_per_1k=300, currency="usd")
    order = order_reserve(buyer=org, quantity=credits(1), max_price_per_1k=400, currency="usd",
                          listing_id=offer.pk)  # fmt: skip
    # A sale of the caller's, paid, and paid out: its sales, earnings and payouts have rows.
    billing_customer_ensure(organization=org)
    sale = order_reserve(buyer=seller, quantity=credits(5), max_price_per_1k=300, currency="usd",
                         listing_id=listing.pk)  # fmt: skip
    order_pay(order_id=sale.pk, payment_intent_id=f"pi_schemathesis_{sale.pk}")
    payouts_run(now=timezone.now() + django_settings.MARKET_PAYOUT_HOLDING + timedelta(days=1))
    return Caller(
        headers={"Authorization": f"Bearer {raw}"},
        own_ids={
            "listing_id": listing.pk,
            "order_id": order.pk,
            "org_id": org.pk,
            "key_id": spare.pk,
            "member_id": member.pk,
            "invitation_id": invitation.pk,
            "job_id": job.public_id,
        },
    )


@pytest.fixture
def answers():
    """The statuses seen per operation; afterwards each must have succeeded at least once."""
    seen: dict[str, list[int]] = defaultdict(list)
    yield seen
    for label, statuses in seen.items():
        if label not in NO_SUCCESS_EXPECTED:
            assert any(200 <= s < 300 for s in statuses), (
                f"{label} never answered 2xx to {len(statuses)} requests: {sorted(set(statuses))}"
            )


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    database=None,
    # `caller` is shared by a test's examples on purpose: they act on one organization.
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
def test_api_conforms_to_its_schema(case, caller, answers):
    # given: the case as generated and, when it has path parameters, aimed at the caller's own
    cases = [case]
    if case.path_parameters:
        cases.append(
            case.operation.Case(
                path_parameters={name: caller.own_ids[name] for name in case.path_parameters},
                headers=case.headers,
                cookies=case.cookies,
                query=case.query,
                body=case.body,
                media_type=case.media_type,
            )
        )
    if isinstance(case.body, dict) and "model" in case.body:
        # A generated model name never names a catalog model: try the real one too.
        cases.append(
            case.operation.Case(
                path_parameters=case.path_parameters,
                headers=case.headers,
                cookies=case.cookies,
                query=case.query,
                body={**case.body, "model": MODEL},
                media_type=case.media_type,
            )
        )
    if case.operation.label in KNOWN_GOOD_BODIES:
        cases.append(
            case.operation.Case(
                path_parameters=case.path_parameters,
                headers=case.headers,
                body=KNOWN_GOOD_BODIES[case.operation.label],
                media_type="application/json",
            )
        )
    for each in cases:
        # when
        response = each.call(headers=caller.headers)
        answers[case.operation.label].append(response.status_code)
        # then
        each.validate_response(response, checks=CHECKS, headers=caller.headers)
