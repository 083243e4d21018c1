"""POST /stripe/webhook/: verified, stored once, answered at once; duplicates and
disorder change nothing; Stripe unreachable leaves the event pending."""

from __future__ import annotations

import threading
import time

import pytest
import requests
from django.test import override_settings

from gymbilling.models import (
    EventStatus,
    Invoice,
    Plan,
    StripeEvent,
    StripePrice,
    Subscription,
)
from gymbilling.services import stripe_event_process, stripe_event_record
from gymbilling.services.events import EventRetryLater
from gymbilling.stripe_client import WebhookEvent
from metering.models import MICRO, JournalTransaction
from tests.gymbilling.billing.conftest import event_for, signed
from tests.helpers import ledger_rows, wait_until


def post_event(client, body: bytes, signature: str | None):
    headers = {"HTTP_STRIPE_SIGNATURE": signature} if signature else {}
    return client.post("/stripe/webhook/", data=body, content_type="application/json", **headers)


@pytest.mark.django_db
class TestSignature:
    def test_a_tampered_body_is_refused_and_nothing_is_stored(self, client, stripe_standin):
        # given: a correctly signed event whose body is then changed
        body, signature = signed(event_for({"id": "in_1", "object": "invoice"}, "invoice.paid"))
        tampered = body.replace(b"in_1", b"in_2")

        # when
        response = post_event(client, tampered, signature)

        # then
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_signature"
        assert StripeEvent.objects.count() == 0

    def test_a_six_minute_old_signature_is_refused(self, client, stripe_standin):
        body, signature = signed(
            event_for({"id": "in_1", "object": "invoice"}, "invoice.paid"),
            at=int(time.time()) - 360,
        )
        response = post_event(client, body, signature)
        assert response.status_code == 400
        assert StripeEvent.objects.count() == 0

    def test_a_missing_or_foreign_signature_is_refused(self, client, stripe_standin):
        body, _ = signed(event_for({"id": "in_1", "object": "invoice"}, "invoice.paid"))
        _, foreign = signed(body, secret="whsec_someone_else")
        assert post_event(client, body, None).status_code == 400
        assert post_event(client, body, foreign).status_code == 400
        assert post_event(client, b"not json", signed(b"not json")[1]).status_code == 400
        assert StripeEvent.objects.count() == 0

    @pytest.mark.parametrize(
        "change",
        [
            {"data": ["not", "an", "object"]},
            {"data": {"object": "in_1"}},
            {"created": "yesterday"},
            {"created": 10**20},
            {"created": True},
            {"id": "evt_" + "x" * 300},
            {"api_version": "v" * 65},
            {"data": {"object": {"id": "in_1", "object": "invoice", "total": float("nan")}}},
            {"data": {"object": {"id": "in_1", "object": "invoice", "memo": "a\x00b"}}},
            {"data": {"object": {"id": "in_1", "object": "invoice", "memo": "a\ud800b"}}},
            {"id": "evt_\ud800"},
        ],
        ids=[
            "data a list",
            "object a string",
            "created a word",
            "created past 2106",
            "created a boolean",
            "id too long",
            "api_version too long",
            "NaN",
            "NUL",
            "lone surrogate",
            "lone surrogate in the id",
        ],
    )
    def test_a_signed_body_that_is_no_storable_event_is_refused(
        self, client, stripe_standin, change
    ):
        # given a body signed with the webhook secret, but not shaped as
        # Stripe's events are (only a holder of the secret can send one)
        event = event_for({"id": "in_1", "object": "invoice"}, "invoice.paid") | change
        body, signature = signed(event)

        # when, then: a 400 that says so, nothing stored (it was a 500)
        response = post_event(client, body, signature)
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "invalid_event"
        assert StripeEvent.objects.count() == 0

    @pytest.mark.parametrize("body", [b"[]", b'"evt_1"', b"42", b"null"])
    def test_a_signed_body_that_is_no_json_object_is_refused(self, client, stripe_standin, body):
        # given JSON that is not an object, signed with the webhook secret
        # when, then: a 400 that says so (it was a 500), nothing stored
        response = post_event(client, *signed(body))
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "invalid_event"
        assert StripeEvent.objects.count() == 0

    def test_a_literal_backslash_u0000_in_text_is_not_a_nul(self, client, stripe_standin):
        event = event_for({"id": "in_1", "object": "invoice", "memo": "\\u0000"}, "invoice.paid")
        response = post_event(client, *signed(event))
        assert response.status_code == 200, response.content
        assert StripeEvent.objects.get().payload["data"]["object"]["memo"] == "\\u0000"

    def test_a_thin_event_is_taken_with_its_destinations_own_secret(self, client, stripe_standin):
        # given: a thin meter error report, as an event destination signs it with its own
        # secret, and the same one signed by nobody we know
        thin = {
            "id": "evt_test_thin_1",
            "object": "v2.core.event",
            "type": "v1.billing.meter.error_report_triggered",
            "created": "2026-08-28T20:54:12.051Z",
            "livemode": False,
            "context": None,
            "reason": None,
            "related_object": {
                "id": "mtr_1",
                "type": "billing.meter",
                "url": "/v1/billing/meters/mtr_1",
            },
        }
        body, signature = signed(thin, secret="whsec_thin")
        _, foreign = signed(thin, secret="whsec_someone_else")

        # when: posted
        with override_settings(STRIPE_THIN_WEBHOOK_SECRET="whsec_thin"):
            refused = post_event(client, body, foreign)
            taken = post_event(client, body, signature)

        # then: the one signed by the destination is stored, about its meter, at its time
        assert refused.status_code == 400
        assert taken.status_code == 200, taken.content
        row = StripeEvent.objects.get()
        assert (row.type, row.object_type, row.object_id) == (
            "v1.billing.meter.error_report_triggered",
            "billing.meter",
            "mtr_1",
        )
        assert row.stripe_created_at.isoformat() == "2026-08-28T20:54:12+00:00"

    @pytest.mark.parametrize(
        "change",
        [{"created": 1_700_000_000}, {"created": "yesterday"}, {"related_object": "mtr_1"}],
        ids=["created a Unix time", "created a word", "related object a string"],
    )
    def test_a_signed_thin_body_that_is_no_storable_event_is_refused(
        self, client, stripe_standin, change
    ):
        thin = {
            "id": "evt_test_thin_1",
            "object": "v2.core.event",
            "type": "v1.billing.meter.no_meter_found",
            "created": "2026-08-28T20:54:12.051Z",
        } | change
        response = post_event(client, *signed(thin))
        assert response.status_code == 400, response.content
        assert response.json()["error"]["code"] == "invalid_event"
        assert StripeEvent.objects.count() == 0

    def test_any_method_but_post_is_a_json_405(self, client):
        for method in ("get", "put", "delete"):
            response = getattr(client, method)("/stripe/webhook/")
            assert response.status_code == 405
            assert response.json()["error"]["code"] == "method_not_allowed"
            assert response["Allow"] == "POST"

    def test_webhooks_are_off_without_a_secret(self, client):
        body, signature = signed(event_for({"id": "in_1", "object": "invoice"}, "invoice.paid"))
        with override_settings(STRIPE_WEBHOOK_SECRET=""):
            response = post_event(client, body, signature)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "billing_not_configured"

    def test_an_event_is_stored_once_by_its_id(
        self, client, stripe_standin, django_capture_on_commit_callbacks
    ):
        body, signature = signed(
            event_for(
                {"id": "cus_x", "object": "customer"}, "customer.updated", event_id="evt_once"
            )
        )
        with django_capture_on_commit_callbacks(execute=False):
            first = post_event(client, body, signature)
            second = post_event(client, body, signature)
        assert first.status_code == 200 and first.json()["duplicate"] is False
        assert second.status_code == 200 and second.json()["duplicate"] is True
        assert StripeEvent.objects.filter(stripe_event_id="evt_once").count() == 1


@pytest.mark.django_db
def test_an_upcoming_invoice_without_an_id_is_ignored_not_failed(
    client, stripe_standin, django_capture_on_commit_callbacks
):
    """`invoice.upcoming` (a webhook subscribed to `invoice.*` gets it before each renewal)
    is about an invoice Stripe has not made: it has no id to read it back by."""
    # given: Stripe's upcoming-invoice event, signed
    upcoming = {
        "object": "invoice",
        "customer": "cus_upcoming",
        "status": "draft",
        "billing_reason": "upcoming",
        "currency": "usd",
        "amount_due": 9_900,
        "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": "sub_upcoming"},
        },
        "lines": {"object": "list", "data": []},
    }
    event = event_for(upcoming, "invoice.upcoming", event_id="evt_upcoming")
    before = (ledger_rows(), Invoice.objects.count())

    # when: it is delivered, and its task runs
    with django_capture_on_commit_callbacks(execute=False):
        response = post_event(client, *signed(event))
    assert response.status_code == 200, response.content
    status = stripe_event_process(event_pk=StripeEvent.objects.get().pk)

    # then: ignored, with nothing applied and nothing to replay
    row = StripeEvent.objects.get()
    assert (status, row.status, row.object_id, row.last_error) == ("ignored", "ignored", "", "")
    assert row.processed_at is not None
    assert (ledger_rows(), Invoice.objects.count()) == before


@pytest.mark.django_db(transaction=True)
def test_the_same_paid_invoice_ten_times_at_once_grants_once(
    live_server, celery_worker_process, stripe_standin, catalog, customer, stripe_sdk
):
    """10 concurrent deliveries of invoice.paid and invoice.payment_succeeded -> one grant."""
    # given: a paid subscription whose webhooks were not delivered (no endpoint registered)
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    session = stripe_sdk.v1.checkout.sessions.retrieve(response.json()["session_id"])
    invoice = stripe_sdk.v1.invoices.list(params={"subscription": session.subscription}).data[0]
    assert invoice.status == "paid"
    events = [
        event_for(invoice, kind, event_id=f"evt_{kind}_{invoice.id}")
        for kind in ("invoice.paid", "invoice.payment_succeeded")
    ]

    # when: each is delivered 5 times, all at once
    url = f"{live_server.url}/stripe/webhook/"
    barrier = threading.Barrier(10)
    answers: list[int] = []

    def deliver(event):
        body, signature = signed(event)
        barrier.wait()
        answers.append(
            requests.post(
                url,
                data=body,
                headers={"Stripe-Signature": signature, "Content-Type": "application/json"},
                timeout=30,
            ).status_code
        )

    threads = [threading.Thread(target=deliver, args=(events[i % 2],)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # then: two events stored, both processed, one grant of a month of Basic
    assert answers == [200] * 10
    wait_until(
        lambda: StripeEvent.objects.filter(status=EventStatus.PROCESSED).count() == 2,
        what="both events processed",
    )
    grants = JournalTransaction.objects.filter(idempotency_key=f"grant:invoice:{invoice.id}")
    assert grants.count() == 1
    assert grants.get().entries.get(account__kind="wallet").amount == 2_000 * MICRO
    assert StripeEvent.objects.count() == 2


@pytest.mark.django_db
def test_a_deletion_before_an_older_update_ends_in_stripes_state(
    stripe_standin, catalog, customer, stripe_sdk
):
    """Events carry stale snapshots; processing reads the current object, so order does not matter."""
    # given: a subscription, then canceled at Stripe
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    session = stripe_sdk.v1.checkout.sessions.retrieve(response.json()["session_id"])
    active = stripe_sdk.v1.subscriptions.retrieve(session.subscription)
    stripe_sdk.v1.subscriptions.cancel(session.subscription)
    deleted = stripe_sdk.v1.subscriptions.retrieve(session.subscription)
    assert deleted.status == "canceled"

    # when: the deletion arrives first, then the older "updated" event
    first = record(event_for(deleted, "customer.subscription.deleted"))
    stripe_event_process(event_pk=first.pk)
    older = record(event_for(active, "customer.subscription.updated"))
    stripe_event_process(event_pk=older.pk)

    # then: our row says what Stripe says now
    sub = Subscription.objects.get(stripe_subscription_id=session.subscription)
    assert sub.status == "canceled"
    customer.organization.refresh_from_db()
    assert customer.organization.model_tiers == []


@pytest.mark.django_db
def test_stripe_unreachable_leaves_the_event_pending_and_a_retry_applies_it(
    stripe_standin, catalog, customer, stripe_sdk
):
    # given: a paid pack purchase whose checkout.session.completed is stored
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    assert response.status_code == 200, response.content
    stripe_standin.pay_checkout(response.json()["session_id"])
    session = stripe_sdk.v1.checkout.sessions.retrieve(response.json()["session_id"])
    event = record(event_for(session, "checkout.session.completed"))
    before = ledger_rows()

    # when: Stripe cannot be reached while processing
    unreachable = override_settings(
        STRIPE_API_BASE="http://127.0.0.1:9", STRIPE_MAX_NETWORK_RETRIES=0
    )
    with unreachable, pytest.raises(EventRetryLater):
        stripe_event_process(event_pk=event.pk)

    # then: nothing changed and the event waits, with the reason
    event.refresh_from_db()
    assert event.status == EventStatus.PENDING and "unreachable" in event.last_error
    assert event.attempts == 1
    assert ledger_rows() == before

    # when: the retry runs with Stripe back
    assert stripe_event_process(event_pk=event.pk) == EventStatus.PROCESSED

    # then: the pack's credits are granted, once
    lot = JournalTransaction.objects.get(
        idempotency_key=f"grant:pack:{session.id}"
    ).created_lots.get()
    assert lot.amount == 1_000 * MICRO and lot.source == "pack" and lot.resellable is False
    assert stripe_event_process(event_pk=event.pk, force=True) == EventStatus.PROCESSED
    assert JournalTransaction.objects.filter(idempotency_key__startswith="grant:pack:").count() == 1


@pytest.mark.django_db
def test_a_resubscription_s_invoice_before_the_old_subscription_s_end_waits_for_it(
    stripe_standin, catalog, customer, stripe_sdk, subscribed
):
    # given: Basic, canceled at Stripe, and a new Basic subscription paid there
    old = subscribed("basic")
    stripe_sdk.v1.subscriptions.cancel(old.stripe_subscription_id)
    deleted = stripe_sdk.v1.subscriptions.retrieve(old.stripe_subscription_id)
    new, invoice = subscribe_at_stripe(stripe_sdk, old.organization, "basic")

    # when: the new invoice's invoice.paid is processed before the old subscription's deletion
    paid = record(event_for(invoice, "invoice.paid"))
    with pytest.raises(EventRetryLater):
        stripe_event_process(event_pk=paid.pk)

    # then: it waits to be retried, with the reason; nothing granted for it yet
    paid.refresh_from_db()
    assert paid.status == EventStatus.PENDING and "live subscription" in paid.last_error
    grant = JournalTransaction.objects.filter(idempotency_key=f"grant:invoice:{invoice.id}")
    assert not grant.exists()

    # when: the deletion is processed, then the retry
    ended = record(event_for(deleted, "customer.subscription.deleted"))
    assert stripe_event_process(event_pk=ended.pk) == EventStatus.PROCESSED
    assert stripe_event_process(event_pk=paid.pk) == EventStatus.PROCESSED

    # then: the new subscription's invoice granted a month of Basic, to the new subscription
    row = Invoice.objects.get(stripe_invoice_id=invoice.id)
    assert row.subscription.stripe_subscription_id == new.id
    assert grant.get().entries.get(account__kind="wallet").amount == 2_000 * MICRO


def test_a_late_event_of_an_ended_subscription_leaves_the_new_one_s_entitlements(
    stripe_standin, catalog, customer, stripe_sdk, subscribed
):
    # given: Basic, canceled at Stripe and here, then Pro subscribed and applied here
    old = subscribed("basic")
    old_invoice = stripe_sdk.v1.invoices.retrieve(old.invoices.get().stripe_invoice_id)
    stripe_sdk.v1.subscriptions.cancel(old.stripe_subscription_id)
    deleted = stripe_sdk.v1.subscriptions.retrieve(old.stripe_subscription_id)
    assert stripe_event_process(
        event_pk=record(event_for(deleted, "customer.subscription.deleted")).pk
    ) == (EventStatus.PROCESSED)
    new, invoice = subscribe_at_stripe(stripe_sdk, old.organization, "pro")
    assert stripe_event_process(event_pk=record(event_for(invoice, "invoice.paid")).pk) == (
        EventStatus.PROCESSED
    )
    org = customer.organization
    org.refresh_from_db()
    pro_entitlements = (org.model_tiers, org.max_priority, org.requests_per_minute)
    assert org.model_tiers == Plan.objects.get(code="pro").model_tiers

    # when: a late event of the old subscription arrives (Stripe's order is not
    # guaranteed): its paid invoice's payment_succeeded
    late = record(event_for(old_invoice, "invoice.payment_succeeded"))
    assert stripe_event_process(event_pk=late.pk) == EventStatus.PROCESSED

    # then: the organization keeps what its live Pro subscription entitles it to
    org.refresh_from_db()
    assert (org.model_tiers, org.max_priority, org.requests_per_minute) == pro_entitlements
    assert Subscription.objects.get(stripe_subscription_id=new.id).status == "active"


def subscribe_at_stripe(stripe_sdk, organization, plan: str):
    """A subscription made at Stripe directly (none of its events applied), paid; returns
    it and its first invoice."""
    price = StripePrice.objects.get(plan__code=plan, kind="plan", current=True)
    subscription = stripe_sdk.v1.subscriptions.create(
        params={
            "customer": organization.billing_customer.stripe_customer_id,
            "items": [{"price": price.stripe_price_id}],
        }
    )
    invoice = stripe_sdk.v1.invoices.retrieve(subscription.latest_invoice)
    assert invoice.status == "paid"
    return subscription, invoice


def record(payload: dict) -> StripeEvent:
    """Store an event as the webhook view does after verification.

    These tests run inside one database transaction, so the on-commit task
    is never queued: the test processes the event itself, in the order it chooses.
    """
    obj = payload["data"]["object"]
    row, _ = stripe_event_record(
        event=WebhookEvent(
            id=payload["id"],
            type=payload["type"],
            created=payload["created"],
            livemode=False,
            api_version=payload["api_version"],
            object_type=obj.get("object", ""),
            object_id=obj["id"],
            payload=payload,
        )
    )
    return row
