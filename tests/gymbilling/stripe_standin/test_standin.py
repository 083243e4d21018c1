"""The Stripe stand-in drives a whole subscription lifecycle through the real SDK over HTTP.

No mocks: a stand-in process, the `stripe` SDK pinned to `stripe.api_version`,
and a webhook receiver that verifies every signature.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid

import pytest
import stripe

from gymbilling.stripe_standin.process import StandInError, StripeStandIn

CARD_OK = "4242424242424242"
CARD_DECLINED = "4000000000000002"
CARD_FAILS_OFF_SESSION = "4000000000000341"


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def _monthly_price(
    client: stripe.StripeClient, *, unit_amount: int = 2000, **recurring: object
) -> stripe.Price:
    product = client.v1.products.create(
        params={"id": _unique("prod_gym"), "name": "Gym membership"}
    )
    return client.v1.prices.create(
        params={
            "product": product.id,
            "currency": "usd",
            "unit_amount": unit_amount,
            "recurring": {"interval": "month", **recurring},
            "lookup_key": _unique("pro_monthly"),
            "metadata": {"credits": "1000"},
        }
    )


def _subscribe(client, standin, price, *, quantity: int = 1, card: str = CARD_OK):
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "customer_email": f"{_unique('member')}@example.com",
            "line_items": [{"price": price.id, "quantity": quantity}],
            "success_url": "http://127.0.0.1/done?session={CHECKOUT_SESSION_ID}",
            "cancel_url": "http://127.0.0.1/cancel",
            "client_reference_id": "org-42",
            "subscription_data": {"metadata": {"organization": "42"}},
        }
    )
    standin.pay_checkout(session.id, card)
    session = client.v1.checkout.sessions.retrieve(session.id)
    return session, client.v1.subscriptions.retrieve(session.subscription)


def test_price_is_found_by_lookup_key(stripe_client):
    # given a recurring price with a lookup key
    price = _monthly_price(stripe_client)

    # when prices are listed by that lookup key
    found = stripe_client.v1.prices.list(params={"lookup_keys": [price.lookup_key], "active": True})

    # then exactly that price comes back, in the full shape
    assert [p.id for p in found.data] == [price.id]
    assert found.data[0].recurring.interval == "month"
    assert found.data[0].unit_amount == 2000
    assert found.data[0].product.startswith("prod_gym_")


def test_checkout_subscription_is_paid_and_signed_events_arrive(
    stripe_client, stripe_standin, webhook_receiver
):
    # given a monthly price
    price = _monthly_price(stripe_client)

    # when a customer pays the Checkout page with a good card
    session, subscription = _subscribe(stripe_client, stripe_standin, price, quantity=2)

    # then the session is complete, the subscription active, its first invoice paid
    assert (session.status, session.payment_status) == ("complete", "paid")
    assert session.customer.startswith("cus_")
    assert subscription.status == "active"
    assert subscription.metadata["organization"] == "42"
    item = subscription["items"].data[0]
    assert (item.price.id, item.price.lookup_key, item.quantity) == (price.id, price.lookup_key, 2)
    assert item.current_period_end > item.current_period_start
    invoice = stripe_client.v1.invoices.retrieve(subscription.latest_invoice)
    assert (invoice.status, invoice.billing_reason, invoice.amount_paid) == (
        "paid",
        "subscription_create",
        4000,
    )
    assert invoice.parent.subscription_details.subscription == subscription.id
    assert invoice.lines.data[0].pricing.price_details.price == price.id
    customer = stripe_client.v1.customers.retrieve(session.customer)
    assert customer.invoice_settings.default_payment_method.startswith("pm_")
    # and the signed webhooks arrive
    assert (
        webhook_receiver.wait_for("checkout.session.completed", session.id).data.object.subscription
        == subscription.id
    )
    assert webhook_receiver.wait_for("invoice.paid", invoice.id).data.object.status == "paid"
    webhook_receiver.wait_for("invoice.payment_succeeded", invoice.id)
    webhook_receiver.wait_for("customer.subscription.created", subscription.id)
    assert webhook_receiver.rejected == []


def test_events_arrive_in_creation_order(stripe_client, stripe_standin, webhook_receiver):
    # given a paid checkout
    session, subscription = _subscribe(stripe_client, stripe_standin, _monthly_price(stripe_client))
    webhook_receiver.wait_for("checkout.session.completed", session.id)

    # then the invoice's events arrive in the order they were sent
    sent = [
        e["type"] for e in stripe_standin.events() if e["object_id"] == subscription.latest_invoice
    ]
    assert sent == [
        "invoice.created",
        "invoice.finalized",
        "invoice.paid",
        "invoice.payment_succeeded",
    ]
    assert webhook_receiver.types_for(subscription.latest_invoice) == sent


def test_declined_card_leaves_checkout_session_open(stripe_client, stripe_standin):
    # given an open Checkout Session
    price = _monthly_price(stripe_client)
    session = stripe_client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "customer_email": "declined@example.com",
            "line_items": [{"price": price.id, "quantity": 1}],
            "success_url": "http://127.0.0.1/done",
        }
    )

    # when the customer pays with a card that is declined
    with pytest.raises(StandInError) as declined:
        stripe_standin.pay_checkout(session.id, CARD_DECLINED)

    # then the error says so and the session stays open, without a subscription
    assert declined.value.status == 402
    assert declined.value.body["error"]["code"] == "card_declined"
    session = stripe_client.v1.checkout.sessions.retrieve(session.id)
    assert (session.status, session.subscription) == ("open", None)
    page = urllib.request.urlopen(session.url).read().decode()
    assert "card" in page


@pytest.mark.parametrize(
    ("ahead", "accepted"),
    [(29 * 60, False), (30 * 60, True), (24 * 3600, True), (24 * 3600 + 60, False)],
)
def test_checkout_expires_at_must_be_30_minutes_to_24_hours_ahead(
    stripe_client, stripe_standin, ahead, accepted
):
    # given a price, and the stand-in's clock (this machine's)
    price = _monthly_price(stripe_client)
    params = {
        "mode": "subscription",
        "customer_email": "expiry@example.com",
        "line_items": [{"price": price.id, "quantity": 1}],
        "success_url": "http://127.0.0.1/done",
        "expires_at": int(time.time()) + ahead,
    }

    # when a session is asked to expire that far ahead
    if not accepted:
        with pytest.raises(stripe.InvalidRequestError) as refused:
            stripe_client.v1.checkout.sessions.create(params=params)
        # then Stripe's bounds refuse it, naming the parameter
        assert refused.value.param == "expires_at"
        return
    session = stripe_client.v1.checkout.sessions.create(params=params)

    # then it is open until then
    assert (session.status, session.expires_at) == ("open", params["expires_at"])


def test_a_checkout_session_past_its_expires_at_is_expired_and_cannot_be_paid(
    stripe_client, stripe_standin, webhook_receiver
):
    # given an open session that expires in an hour
    price = _monthly_price(stripe_client)
    session = stripe_client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "customer_email": "late@example.com",
            "line_items": [{"price": price.id, "quantity": 1}],
            "success_url": "http://127.0.0.1/done",
            "expires_at": int(time.time()) + 3600,
        }
    )

    # when it is an hour older
    stripe_standin.age_checkout(session.id, 3600)

    # then it is expired, said so by a webhook, and paying it is refused
    assert stripe_client.v1.checkout.sessions.retrieve(session.id).status == "expired"
    webhook_receiver.wait_for("checkout.session.expired", session.id)
    with pytest.raises(StandInError) as refused:
        stripe_standin.pay_checkout(session.id, CARD_OK)
    assert refused.value.status == 400
    assert stripe_client.v1.checkout.sessions.retrieve(session.id).subscription is None


def test_advance_renews_with_a_paid_cycle_invoice(stripe_client, stripe_standin, webhook_receiver):
    # given an active subscription
    _, subscription = _subscribe(stripe_client, stripe_standin, _monthly_price(stripe_client))
    first_end = subscription["items"].data[0].current_period_end

    # when its period ends
    stripe_standin.advance(subscription.id)

    # then the next period starts and its cycle invoice is paid
    subscription = stripe_client.v1.subscriptions.retrieve(subscription.id)
    assert subscription.status == "active"
    assert subscription["items"].data[0].current_period_start == first_end
    invoice = stripe_client.v1.invoices.retrieve(subscription.latest_invoice)
    assert (invoice.billing_reason, invoice.status, invoice.amount_paid) == (
        "subscription_cycle",
        "paid",
        2000,
    )
    webhook_receiver.wait_for("invoice.paid", invoice.id)


@pytest.mark.parametrize(
    ("credit", "charged", "left"), [(600, 1400, 0), (2500, None, -500)], ids=["part", "all"]
)
def test_a_customer_balance_credit_pays_what_it_covers_of_the_next_invoice(
    stripe_client, stripe_standin, credit, charged, left
):
    # given an active $20.00 subscription, and a credit on the customer's balance (as
    # marketplace proceeds are paid)
    _, subscription = _subscribe(stripe_client, stripe_standin, _monthly_price(stripe_client))
    stripe_client.v1.customers.balance_transactions.create(
        subscription.customer, params={"amount": -credit, "currency": "usd"}
    )

    # when its period ends
    stripe_standin.advance(subscription.id)

    # then the renewal's total is the same; the balance paid what it covers, the card the
    # rest (no charge at all where the balance covered it), as Stripe records it
    subscription = stripe_client.v1.subscriptions.retrieve(subscription.id)
    invoice = stripe_client.v1.invoices.retrieve(subscription.latest_invoice)
    assert (invoice.status, invoice.total, invoice.starting_balance, invoice.ending_balance) == (
        "paid",
        2000,
        -credit,
        left,
    )
    assert invoice.amount_due == invoice.amount_paid == (charged or 0)
    if charged:
        intent = stripe_client.v1.payment_intents.retrieve(invoice.payment_intent)
        assert intent.amount == charged
    else:
        assert invoice.payment_intent is None
    customer = stripe_client.v1.customers.retrieve(subscription.customer)
    assert customer.balance == left
    applied = stripe_client.v1.customers.balance_transactions.list(subscription.customer).data[0]
    assert (applied.type, applied.amount, applied.invoice) == (
        "applied_to_invoice",
        min(credit, 2000),
        invoice.id,
    )


def test_failing_card_makes_renewal_past_due_until_the_invoice_is_paid(
    stripe_client, stripe_standin, webhook_receiver
):
    # given an active subscription whose card now fails off-session
    session, subscription = _subscribe(stripe_client, stripe_standin, _monthly_price(stripe_client))
    stripe_standin.set_card(session.customer, CARD_FAILS_OFF_SESSION)

    # when the period ends
    stripe_standin.advance(subscription.id)

    # then the renewal fails: open invoice, past_due subscription, payment_failed event
    subscription = stripe_client.v1.subscriptions.retrieve(subscription.id)
    invoice = stripe_client.v1.invoices.retrieve(subscription.latest_invoice)
    assert (subscription.status, invoice.status) == ("past_due", "open")
    webhook_receiver.wait_for("invoice.payment_failed", invoice.id)
    with pytest.raises(stripe.CardError):
        stripe_client.v1.invoices.pay(invoice.id)

    # when the card is fixed and the invoice paid again
    stripe_standin.set_card(session.customer, CARD_OK)
    paid = stripe_client.v1.invoices.pay(invoice.id)

    # then the invoice is paid and the subscription active again
    assert paid.status == "paid"
    assert stripe_client.v1.subscriptions.retrieve(subscription.id).status == "active"
    webhook_receiver.wait_for("invoice.paid", invoice.id)


def _half_up(amount: int, remaining: int, period: int) -> int:
    return (amount * remaining * 2 + period) // (2 * period)


def test_always_invoice_upgrade_prorates_to_the_minor_unit(
    stripe_client, stripe_standin, webhook_receiver
):
    # given an active subscription at 19.99 x 1
    _, subscription = _subscribe(
        stripe_client, stripe_standin, _monthly_price(stripe_client, unit_amount=1999)
    )
    item = subscription["items"].data[0]
    bigger = _monthly_price(stripe_client, unit_amount=4999)

    # when it moves to 49.99 x 3 with always_invoice
    subscription = stripe_client.v1.subscriptions.update(
        subscription.id,
        params={
            "items": [{"id": item.id, "price": bigger.id, "quantity": 3}],
            "proration_behavior": "always_invoice",
            "payment_behavior": "error_if_incomplete",
        },
    )

    # then a subscription_update invoice credits the unused old time and charges the new
    invoice = stripe_client.v1.invoices.retrieve(subscription.latest_invoice)
    assert (invoice.billing_reason, invoice.status) == ("subscription_update", "paid")
    credit, charge = invoice.lines.data
    assert credit.proration and charge.proration
    remaining = credit.period.end - credit.period.start
    period = item.current_period_end - item.current_period_start
    assert credit.amount == -_half_up(1999, remaining, period)
    assert charge.amount == _half_up(4999 * 3, remaining, period)
    assert invoice.amount_paid == credit.amount + charge.amount
    assert subscription["items"].data[0].price.id == bigger.id
    webhook_receiver.wait_for("customer.subscription.updated", subscription.id)


def test_cancel_at_period_end_cancels_on_advance(stripe_client, stripe_standin, webhook_receiver):
    # given a subscription set to cancel at period end
    _, subscription = _subscribe(stripe_client, stripe_standin, _monthly_price(stripe_client))
    stripe_client.v1.subscriptions.update(subscription.id, params={"cancel_at_period_end": True})

    # when the period ends
    stripe_standin.advance(subscription.id)

    # then it is canceled, without a new invoice
    canceled = stripe_client.v1.subscriptions.retrieve(subscription.id)
    assert canceled.status == "canceled"
    assert canceled.latest_invoice == subscription.latest_invoice
    webhook_receiver.wait_for("customer.subscription.deleted", subscription.id)


def test_a_deactivated_meter_refuses_events_until_reactivated_unless_its_name_is_taken(
    stripe_client, stripe_standin
):
    # given a meter for an event name, deactivated, and a customer to report usage for
    event_name = _unique("tokens")
    meter_params = {
        "display_name": "Tokens",
        "event_name": event_name,
        "default_aggregation": {"formula": "sum"},
    }
    meter = stripe_client.v1.billing.meters.create(params=meter_params)
    customer = stripe_client.v1.customers.create(params={"name": "Lifting Club"}).id
    stripe_client.v1.billing.meters.deactivate(meter.id)

    def report(identifier: str) -> None:
        stripe_client.v1.billing.meter_events.create(
            params={
                "event_name": event_name,
                "identifier": identifier,
                "payload": {"stripe_customer_id": customer, "value": "7"},
            }
        )

    # when usage is reported to it, then it is refused: no active meter has the name
    with pytest.raises(stripe.InvalidRequestError) as refused:
        report("while-inactive")
    assert refused.value.code == "resource_missing"

    # when it is reactivated, then it takes events again, and says it is no longer deactivated
    reactivated = stripe_client.v1.billing.meters.reactivate(meter.id)
    assert reactivated.status == "active"
    assert reactivated.status_transitions.deactivated_at is None
    report("after-reactivation")
    assert [e["meter"] for e in stripe_standin.meter_events(customer)] == [meter.id]

    # when it is deactivated, a second meter takes its name, and the first is reactivated,
    # then that is refused as creating a second active meter for the name would be
    stripe_client.v1.billing.meters.deactivate(meter.id)
    stripe_client.v1.billing.meters.create(params=meter_params)
    with pytest.raises(stripe.InvalidRequestError) as taken:
        stripe_client.v1.billing.meters.reactivate(meter.id)
    assert taken.value.code == "resource_already_exists"
    assert stripe_client.v1.billing.meters.retrieve(meter.id).status == "inactive"


def test_a_meter_event_identifier_is_refused_for_a_day_then_taken_again_as_at_stripe(
    stripe_client, stripe_standin
):
    # given a meter, a customer, and an event reported under an identifier
    event_name = _unique("tokens")
    stripe_client.v1.billing.meters.create(
        params={"display_name": "Tokens", "event_name": event_name}
    )
    customer = stripe_client.v1.customers.create(params={"name": "Lifting Club"}).id
    other = stripe_client.v1.customers.create(params={"name": "Rowing Club"}).id

    def report(identifier: str, who: str = customer, timestamp: int | None = None) -> None:
        params = {
            "event_name": event_name,
            "identifier": identifier,
            "payload": {"stripe_customer_id": who, "value": "7"},
        }
        if timestamp is not None:
            params["timestamp"] = timestamp
        stripe_client.v1.billing.meter_events.create(params=params)

    report(f"{customer}-1")
    report(f"{other}-1", who=other)

    # when it is sent again within the day, then it is refused as one Stripe has
    stripe_standin.age_meter_events(24 * 3600 - 60, customer)
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        report(f"{customer}-1")
    assert duplicate.value.code == "resource_already_exists"

    # when a day has passed since it was taken, then the same identifier is taken, and
    # counted, again; another customer's events are as they were
    assert stripe_standin.age_meter_events(120, customer) == 1
    report(f"{customer}-1")
    assert stripe_standin.meter_events_total(customer) == 14
    with pytest.raises(stripe.InvalidRequestError):
        report(f"{other}-1", who=other)

    # and a timestamp older than 35 days, or over 5 minutes ahead, is refused at once
    now = int(time.time())
    for timestamp, code in (
        (now - 35 * 24 * 3600 - 60, "timestamp_too_far_in_past"),
        (now + 10 * 60, "timestamp_in_future"),
    ):
        with pytest.raises(stripe.InvalidRequestError) as refused:
            report(_unique("at"), timestamp=timestamp)
        assert (refused.value.http_status, refused.value.code) == (400, code)
    report(_unique("at"), timestamp=now - 34 * 24 * 3600)
    assert stripe_standin.meter_events_total(customer) == 21


def test_a_meter_event_it_cannot_attribute_is_taken_then_reported_in_a_thin_event(
    stripe_client, stripe_standin
):
    # given a meter, a customer deleted, and validation later, as at Stripe
    event_name = _unique("tokens")
    meter = stripe_client.v1.billing.meters.create(
        params={"display_name": "Tokens", "event_name": event_name}
    )
    customer = stripe_client.v1.customers.create(params={"name": "Lifting Club"}).id
    stripe_client.v1.customers.delete(customer)
    usage = {
        "event_name": event_name,
        "identifier": f"{customer}-u-1",
        "payload": {"stripe_customer_id": customer, "value": "7"},
    }
    stripe_standin.validate_meter_events_later()
    try:
        # when usage is reported for it, then again under its identifier (another request)
        taken = stripe_client.v1.billing.meter_events.create(
            params=usage, options={"idempotency_key": "usage-1:attempt-1"}
        )
        with pytest.raises(stripe.InvalidRequestError) as duplicate:
            stripe_client.v1.billing.meter_events.create(
                params=usage, options={"idempotency_key": "usage-1:attempt-2"}
            )
    finally:
        stripe_standin.validate_meter_events_later(False)

    # then it is taken (200) and never counted; its identifier stays taken
    assert taken.identifier == f"{customer}-u-1"
    assert stripe_standin.meter_events(customer) == []
    assert duplicate.value.code == "resource_already_exists"
    # and a thin error report about the meter names it, whole when read back by its id,
    # by its request's idempotency key (as Stripe's does), not the event's identifier
    [record] = [
        e
        for e in stripe_standin.events("v1.billing.meter.error_report_triggered")
        if e["object_id"] == meter.id
    ]
    event = stripe_client.v2.core.events.retrieve(record["id"]).to_dict()
    assert event["related_object"]["id"] == meter.id
    [error_type] = event["data"]["reason"]["error_types"]
    assert (error_type["code"], error_type["error_count"]) == ("meter_event_customer_not_found", 1)
    assert error_type["sample_errors"][0]["request"] == {"identifier": "usage-1:attempt-1"}
    assert event["data"]["validation_start"] < event["data"]["validation_end"]


def test_meter_events_refuse_duplicates_and_bill_usage_on_the_next_cycle(
    stripe_client, stripe_standin
):
    # given a metered price on a meter, and a subscription to it plus a licensed price
    event_name = _unique("tokens")
    meter = stripe_client.v1.billing.meters.create(
        params={
            "display_name": "Tokens",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )
    metered = _monthly_price(stripe_client, unit_amount=3, usage_type="metered", meter=meter.id)
    session, subscription = _subscribe(stripe_client, stripe_standin, metered)
    customer = session.customer

    # when usage is reported, once twice with the same identifier
    for identifier, value in (("u-1", "1000"), ("u-2", "234")):
        stripe_client.v1.billing.meter_events.create(
            params={
                "event_name": event_name,
                "identifier": f"{customer}-{identifier}",
                "payload": {"stripe_customer_id": customer, "value": value},
            }
        )
    # (sent again under another idempotency key, after Stripe forgot the first request's:
    # the identifier alone is refused twice)
    stripe_standin.expire_idempotency_keys()
    with pytest.raises(stripe.InvalidRequestError) as duplicate:
        stripe_client.v1.billing.meter_events.create(
            params={
                "event_name": event_name,
                "identifier": f"{customer}-u-1",
                "payload": {"stripe_customer_id": customer, "value": "5"},
            },
            options={"idempotency_key": f"{customer}-u-1:a-second-attempt"},
        )
    with pytest.raises(stripe.InvalidRequestError):
        stripe_client.v1.billing.meter_events.create(
            params={
                "event_name": "no_such_meter",
                "payload": {"stripe_customer_id": customer, "value": "5"},
            }
        )

    # then the duplicate is refused like Stripe, and only accepted usage counts
    assert duplicate.value.http_status == 400
    assert duplicate.value.code == "resource_already_exists"
    assert sum(int(e["value"]) for e in stripe_standin.meter_events(customer)) == 1234

    # and the next cycle invoice bills it
    stripe_standin.advance(subscription.id)
    invoice = stripe_client.v1.invoices.retrieve(
        stripe_client.v1.subscriptions.retrieve(subscription.id).latest_invoice
    )
    usage_lines = [line for line in invoice.lines.data if line.amount]
    assert [line.amount for line in usage_lines] == [1234 * 3]
    assert invoice.amount_paid == 1234 * 3


def test_transfer_with_the_same_idempotency_key_is_created_once(stripe_client, webhook_receiver):
    # given a connected account
    account = stripe_client.v1.accounts.create(
        params={"type": "express", "email": "seller@example.com"}
    )
    assert account.charges_enabled and account.payouts_enabled
    params = {
        "amount": 1500,
        "currency": "usd",
        "destination": account.id,
        "transfer_group": "order-7",
    }
    key = _unique("payout")

    # when the same transfer is sent twice with one idempotency key
    first = stripe_client.v1.transfers.create(params=params, options={"idempotency_key": key})
    second = stripe_client.v1.transfers.create(params=params, options={"idempotency_key": key})

    # then one transfer exists
    assert first.id == second.id
    assert [
        t.id for t in stripe_client.v1.transfers.list(params={"destination": account.id}).data
    ] == [first.id]
    webhook_receiver.wait_for("transfer.created", first.id)

    # and a reversal is reported
    stripe_client.v1.transfers.reversals.create(first.id, params={"amount": 500})
    assert (
        webhook_receiver.wait_for("transfer.reversed", first.id).data.object.amount_reversed == 500
    )


def test_an_idempotency_key_expired_as_after_24_hours_runs_the_request_again(
    stripe_client, stripe_standin
):
    # given a transfer sent with an idempotency key, in a group of its own
    account = stripe_client.v1.accounts.create(params={"type": "express"})
    group = _unique("group")
    params = {"amount": 700, "currency": "usd", "destination": account.id, "transfer_group": group}
    key = _unique("payout")
    first = stripe_client.v1.transfers.create(params=params, options={"idempotency_key": key})
    other = stripe_client.v1.transfers.create(
        params=params | {"transfer_group": _unique("group")},
        options={"idempotency_key": _unique("k")},
    )

    # when Stripe has forgotten the key (a day later) and the same request comes again
    stripe_standin.expire_idempotency_keys()
    again = stripe_client.v1.transfers.create(params=params, options={"idempotency_key": key})

    # then it is a second transfer, as at Stripe; listing by transfer_group finds exactly
    # that group's transfers (newest first), and by destination all of the account's
    assert again.id != first.id
    by_group = stripe_client.v1.transfers.list(params={"transfer_group": group}).data
    assert [t.id for t in by_group] == [again.id, first.id]
    both = stripe_client.v1.transfers.list(
        params={"transfer_group": group, "destination": account.id}
    ).data
    assert [t.id for t in both] == [again.id, first.id]
    by_account = stripe_client.v1.transfers.list(params={"destination": account.id}).data
    assert {t.id for t in by_account} == {first.id, again.id, other.id}
    # and by created, a hash of bounds as Stripe takes it
    later = stripe_client.v1.transfers.list(
        params={"destination": account.id, "created": {"gt": again.created}}
    ).data
    assert later == []
    since = stripe_client.v1.transfers.list(
        params={"transfer_group": group, "created": {"gte": first.created, "lte": again.created}}
    ).data
    assert [t.id for t in since] == [again.id, first.id]


def test_a_transfer_to_an_account_that_cannot_receive_transfers_is_refused(
    stripe_client, stripe_standin
):
    # given an account whose transfers capability Stripe turned off
    account = stripe_client.v1.accounts.create(params={"type": "express"})
    stripe_standin.set_capabilities(account.id, transfers="inactive")
    params = {"amount": 700, "currency": "usd", "destination": account.id}

    # when a transfer is sent to it
    with pytest.raises(stripe.InvalidRequestError) as refused:
        stripe_client.v1.transfers.create(params=params)

    # then Stripe's 400, and no transfer; turned on again, the transfer is made
    assert (refused.value.http_status, refused.value.code) == (
        400,
        "insufficient_capabilities_for_transfer",
    )
    assert not stripe_client.v1.transfers.list(params={"destination": account.id}).data
    stripe_standin.set_capabilities(account.id, transfers="active")
    assert stripe_client.v1.transfers.create(params=params).amount == 700


def _one_time_payment(client, standin):
    product = client.v1.products.create(params={"name": "Credit pack"})
    price = client.v1.prices.create(
        params={"product": product.id, "currency": "usd", "unit_amount": 5000}
    )
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "payment",
            "customer_email": "buyer@example.com",
            "line_items": [{"price": price.id, "quantity": 1}],
            "success_url": "http://127.0.0.1/done",
            "payment_intent_data": {"metadata": {"pack": "big"}, "transfer_group": "order-9"},
        }
    )
    standin.pay_checkout(session.id, CARD_OK)
    return client.v1.payment_intents.retrieve(
        client.v1.checkout.sessions.retrieve(session.id).payment_intent
    )


def test_refund_sends_charge_refunded(stripe_client, stripe_standin, webhook_receiver):
    # given a paid one-time Checkout payment
    intent = _one_time_payment(stripe_client, stripe_standin)
    assert (intent.status, intent.metadata["pack"], intent.transfer_group) == (
        "succeeded",
        "big",
        "order-9",
    )

    # when part of it is refunded
    refund = stripe_client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 2000})

    # then the charge reports the refund
    charge_id = refund.charge
    event = webhook_receiver.wait_for("charge.refunded", charge_id)
    assert (event.data.object.amount_refunded, event.data.object.refunded) == (2000, False)
    webhook_receiver.wait_for("refund.created", refund.id)


def test_a_failed_refund_sends_its_events_and_gives_the_money_back(
    stripe_client, stripe_standin, webhook_receiver
):
    # given a payment, part of it refunded
    intent = _one_time_payment(stripe_client, stripe_standin)
    refund = stripe_client.v1.refunds.create(params={"payment_intent": intent.id, "amount": 2000})

    # when the refund fails (the card was closed)
    failed = stripe_standin.fail_refund(refund.id)

    # then Stripe's events of a failed refund are sent, reading it says failed, and the
    # charge no longer counts it: it can be refunded again
    assert (failed["status"], failed["failure_reason"]) == ("failed", "expired_or_canceled_card")
    for event_type in ("charge.refund.updated", "refund.updated", "refund.failed"):
        event = webhook_receiver.wait_for(event_type, refund.id)
        assert (event.data.object.status, event.data.object.charge) == ("failed", refund.charge)
    assert stripe_client.v1.refunds.retrieve(refund.id).status == "failed"
    assert stripe_client.v1.charges.retrieve(refund.charge).amount_refunded == 0
    listed = stripe_client.v1.refunds.list(params={"charge": refund.charge}).data
    assert [(r.id, r.status) for r in listed] == [(refund.id, "failed")]
    # and a failed refund does not fail again
    with pytest.raises(StandInError) as again:
        stripe_standin.fail_refund(refund.id)
    assert again.value.status == 400


def test_dispute_sends_charge_dispute_created(stripe_client, stripe_standin, webhook_receiver):
    # given a paid one-time payment
    intent = _one_time_payment(stripe_client, stripe_standin)
    charge_id = (
        intent.latest_charge if isinstance(intent.latest_charge, str) else intent.latest_charge.id
    )

    # when the cardholder disputes it
    dispute = stripe_standin.dispute(charge_id)

    # then a dispute needing a response is reported
    event = webhook_receiver.wait_for("charge.dispute.created", dispute["id"])
    assert (event.data.object.charge, event.data.object.payment_intent) == (charge_id, intent.id)
    assert (event.data.object.amount, event.data.object.status) == (5000, "needs_response")


def test_a_won_dispute_sends_funds_reinstated_then_closed(
    stripe_client, stripe_standin, webhook_receiver
):
    # given a disputed payment
    intent = _one_time_payment(stripe_client, stripe_standin)
    charge_id = (
        intent.latest_charge if isinstance(intent.latest_charge, str) else intent.latest_charge.id
    )
    dispute = stripe_standin.dispute(charge_id)

    # when the card network decides for the merchant
    won = stripe_standin.close_dispute(dispute["id"], status="won")

    # then the funds come back, the dispute closes, and reading it says won
    assert won["status"] == "won"
    reinstated = webhook_receiver.wait_for("charge.dispute.funds_reinstated", dispute["id"])
    closed = webhook_receiver.wait_for("charge.dispute.closed", dispute["id"])
    assert (reinstated.data.object.status, closed.data.object.status) == ("won", "won")
    assert stripe_client.v1.disputes.retrieve(dispute["id"]).status == "won"
    # and a closed dispute does not end again
    with pytest.raises(StandInError) as again:
        stripe_standin.close_dispute(dispute["id"], status="lost")
    assert again.value.status == 400


def test_portal_session_page_lists_the_subscription(stripe_client, stripe_standin):
    # given a subscribed customer
    session, subscription = _subscribe(stripe_client, stripe_standin, _monthly_price(stripe_client))

    # when a portal session is opened
    portal = stripe_client.v1.billing_portal.sessions.create(
        params={"customer": session.customer, "return_url": "http://127.0.0.1/account"}
    )

    # then its page loads and offers to cancel that subscription
    page = urllib.request.urlopen(portal.url).read().decode()
    assert subscription.id in page
    assert "Cancel at period end" in page
    assert "http://127.0.0.1/account" in page


def test_a_deleted_customer_is_answered_deleted_and_its_subscriptions_end(
    stripe_client, stripe_standin, webhook_receiver
):
    # given a subscribed customer
    session, subscription = _subscribe(stripe_client, stripe_standin, _monthly_price(stripe_client))

    # when it is deleted
    deleted = stripe_client.v1.customers.delete(session.customer)

    # then Stripe's answer, and retrieving it, say deleted (a 200, as Stripe answers)
    assert (deleted.id, deleted.deleted) == (session.customer, True)
    again = stripe_client.v1.customers.retrieve(session.customer)
    assert (again.id, again.to_dict().get("deleted")) == (session.customer, True)
    # and its subscription was canceled at once, with its event
    assert stripe_client.v1.subscriptions.retrieve(subscription.id).status == "canceled"
    webhook_receiver.wait_for("customer.subscription.deleted", subscription.id)
    webhook_receiver.wait_for("customer.deleted", session.customer)
    # and a request naming it is refused as Stripe refuses it: 400, resource_missing
    with pytest.raises(stripe.InvalidRequestError) as refused:
        stripe_client.v1.billing_portal.sessions.create(
            params={"customer": session.customer, "return_url": "http://127.0.0.1/account"}
        )
    assert (refused.value.http_status, refused.value.code) == (400, "resource_missing")
    assert json.loads(refused.value.http_body)["error"]["param"] == "customer"
    # and one never made is a 404
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v1.customers.retrieve("cus_never_made")
    assert (missing.value.http_status, missing.value.code) == (404, "resource_missing")


def test_errors_have_stripes_shape(stripe_client):
    # when a missing object is asked for
    with pytest.raises(stripe.InvalidRequestError) as missing:
        stripe_client.v1.prices.retrieve("price_missing")

    # then the SDK raises Stripe's error with its code
    assert missing.value.http_status == 404
    assert missing.value.code == "resource_missing"
    assert json.loads(missing.value.http_body)["error"]["type"] == "invalid_request_error"


# --- injected faults: 429 and 5xx (/_config/faults) ----------------------------------------


@pytest.fixture
def faults(stripe_standin):
    """The session's stand-in, its faults forgotten after the test (others share it)."""
    yield stripe_standin
    stripe_standin.clear_faults()


def _customers_with(client, email: str) -> list[str]:
    return [c.id for c in client.v1.customers.list(params={"email": email}).data]


def test_a_429_fault_answers_the_next_requests_without_running_them(stripe_client, faults):
    # given the next two customer creations rate limited
    faults.fault("/v1/customers", 429, count=2)
    email = f"{_unique('member')}@example.com"
    params, key = {"email": email}, _unique("customer")

    # when a customer is created, three times under one idempotency key
    refused = []
    for _ in range(2):
        with pytest.raises(stripe.RateLimitError) as limited:
            stripe_client.v1.customers.create(params=params, options={"idempotency_key": key})
        refused.append(limited.value)
    created = stripe_client.v1.customers.create(params=params, options={"idempotency_key": key})

    # then the first two are Stripe's 429, and run nothing: the key kept no answer, so the
    # third runs, and makes the one customer
    for error in refused:
        body = json.loads(error.http_body)["error"]
        assert (error.http_status, body["type"], body["code"]) == (
            429,
            "invalid_request_error",
            "rate_limit",
        )
    assert _customers_with(stripe_client, email) == [created.id]
    assert [(f["status"], f["remaining"], f["faulted"]) for f in faults.faults()] == [(429, 0, 2)]
    # and the key now keeps the customer
    again = stripe_client.v1.customers.create(params=params, options={"idempotency_key": key})
    assert again.id == created.id


def test_a_5xx_fault_is_retried_by_the_sdk_and_runs_once(stripe_standin, faults):
    # given an SDK that retries once, and the next customer creation answered 503
    client = stripe.StripeClient(
        "sk_test_standin",
        base_addresses={"api": stripe_standin.api_base},
        stripe_version=stripe.api_version,
        max_network_retries=1,
    )
    faults.fault("/v1/customers", 503)
    email = f"{_unique('member')}@example.com"

    # when a customer is created
    created = client.v1.customers.create(params={"email": email})

    # then the 503 was answered, the SDK's retry made the customer, once
    assert [(f["status"], f["faulted"]) for f in faults.faults()] == [(503, 1)]
    assert _customers_with(client, email) == [created.id]


def test_a_5xx_fault_after_the_request_ran_is_kept_under_its_idempotency_key(stripe_client, faults):
    # given the next customer creation run, then answered 500 (taken)
    faults.fault("/v1/customers", 500, taken=True)
    email = f"{_unique('member')}@example.com"
    params, key = {"email": email}, _unique("customer")

    # when it is created, then sent again under the same key
    with pytest.raises(stripe.APIError) as failed:
        stripe_client.v1.customers.create(params=params, options={"idempotency_key": key})
    with pytest.raises(stripe.APIError) as replayed:
        stripe_client.v1.customers.create(params=params, options={"idempotency_key": key})

    # then both are Stripe's 500, saying not to retry; the customer was made once, and the
    # second answer is the first, kept under its key, as Stripe keeps it
    assert (failed.value.http_status, failed.value.code) == (500, None)
    assert json.loads(failed.value.http_body)["error"]["type"] == "api_error"
    assert failed.value.headers["Stripe-Should-Retry"] == "false"
    assert replayed.value.http_body == failed.value.http_body
    assert replayed.value.headers["Idempotent-Replayed"] == "true"
    assert replayed.value.headers["Stripe-Should-Retry"] == "false"
    assert len(_customers_with(stripe_client, email)) == 1
    assert [f["faulted"] for f in faults.faults()] == [1]


def test_faults_are_checked_and_forgotten(faults, tmp_path):
    # when faults Stripe cannot answer are asked for, they are refused, naming the parameter
    for body, param in [
        ({"path": "/v1/customers", "status": 404}, "status"),
        ({"path": "/_config/faults", "status": 503}, "path"),
        ({"path": "/v1/customers", "status": 429, "taken": True}, "taken"),
        ({"path": "/v1/customers", "status": 503, "count": 0}, "count"),
    ]:
        with pytest.raises(StandInError) as refused:
            faults.config("POST", "/_config/faults", body)
        assert (refused.value.status, refused.value.body["error"]["param"]) == (400, param)
    assert faults.faults() == []

    # when faults are added, then forgotten
    faults.fault("/v1/customers", 429, count=3)
    faults.fault("/v1/billing/meter_events", 503, method="post")
    assert [(f["method"], f["path"], f["remaining"]) for f in faults.faults()] == [
        ("POST", "/v1/customers", 3),
        ("POST", "/v1/billing/meter_events", 1),
    ]
    faults.clear_faults()

    # then none is left
    assert faults.faults() == []


def test_forgetting_the_data_forgets_the_faults(tmp_path):
    # given a stand-in of its own (forgetting the session's data would end others' state)
    # with a fault
    with StripeStandIn(data_dir=tmp_path) as standin:
        standin.fault("/v1/customers", 503, count=5)

        # when everything is forgotten
        standin.reset()

        # then the fault is too
        assert standin.faults() == []
