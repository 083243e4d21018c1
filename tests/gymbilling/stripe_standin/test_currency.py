"""The stand-in refuses a currency mixed into a subscription, as Stripe does, over HTTP
through our client module (gymbilling.stripe_client): what services are answered.

Stripe keeps a subscription in one currency for life and a customer's live
subscriptions in one (docs.stripe.com/invoicing/multi-currency-customers); a request
that would mix them is a 400 `invalid_request_error` that changes nothing. Our code
creates subscriptions only through Checkout, so the client module has no function for
a subscription or an item created by the API: those requests go through its `_call`,
which turns the SDK's answer into the errors services handle, as every function of it
does.
"""

from __future__ import annotations

import uuid

import pytest
import stripe

from gymbilling import stripe_client as ours

CARD_OK = "4242424242424242"


@pytest.fixture
def via_ours(settings, stripe_standin):
    """Our client module pointed at this module's stand-in."""
    settings.STRIPE_SECRET_KEY = "sk_test_standin"
    settings.STRIPE_API_BASE = stripe_standin.api_base
    settings.STRIPE_MAX_NETWORK_RETRIES = 0


def _key() -> str:
    return f"test:{uuid.uuid4()}"


def _monthly(client: stripe.StripeClient, currency: str, unit_amount: int = 2000) -> str:
    product = client.v1.products.create(
        params={"id": f"prod_gym_{uuid.uuid4().hex[:10]}", "name": "Gym membership"}
    )
    return client.v1.prices.create(
        params={
            "product": product.id,
            "currency": currency,
            "unit_amount": unit_amount,
            "recurring": {"interval": "month"},
        }
    ).id


def _subscribed_in_dollars(client, standin) -> dict:
    """A customer with a card, subscribed through Checkout to a dollar price; Stripe's
    subscription as our client module reads it."""
    session = client.v1.checkout.sessions.create(
        params={
            "mode": "subscription",
            "customer_email": f"member-{uuid.uuid4().hex[:8]}@example.com",
            "line_items": [{"price": _monthly(client, "usd"), "quantity": 1}],
            "success_url": "http://127.0.0.1/done",
            "cancel_url": "http://127.0.0.1/cancel",
        }
    )
    standin.pay_checkout(session.id, CARD_OK)
    session = client.v1.checkout.sessions.retrieve(session.id)
    return ours.subscription_retrieve(session.subscription)


def _refusal(raised: pytest.ExceptionInfo) -> tuple:
    exc = raised.value
    return type(exc.__cause__), exc.status, exc.code, str(exc)


def _expected(price_currency: str, subscription_currency: str) -> str:
    return (
        f"The price specified only supports `{price_currency}`. This doesn't match the "
        f"expected currency: `{subscription_currency}`."
    )


def test_an_update_putting_a_price_in_another_currency_on_an_item_is_refused_whole(
    stripe_client, stripe_standin, via_ours
):
    # given a subscription in dollars, and a price in euros
    sub = _subscribed_in_dollars(stripe_client, stripe_standin)
    euros = _monthly(stripe_client, "eur")
    item = sub["items"]["data"][0]

    # when its item is moved to the euro price, with new metadata, charged now
    with pytest.raises(ours.StripeRequestRefused) as raised:
        ours.subscription_update(
            sub["id"],
            key=_key(),
            items=[{"id": item["id"], "price": euros, "quantity": 2}],
            metadata={"plan": "euro"},
            proration_behavior="always_invoice",
        )

    # then refused as Stripe refuses it, and none of the update is applied: no item price,
    # quantity or metadata changed, no invoice issued
    assert _refusal(raised) == (stripe.InvalidRequestError, 400, "", _expected("eur", "usd"))
    assert ours.subscription_retrieve(sub["id"]) == sub


def test_an_update_adding_an_item_in_another_currency_is_refused(
    stripe_client, stripe_standin, via_ours
):
    # given a subscription in dollars
    sub = _subscribed_in_dollars(stripe_client, stripe_standin)

    # when an item at a euro price is added to it by an update
    with pytest.raises(ours.StripeRequestRefused) as raised:
        ours.subscription_update(
            sub["id"], key=_key(), items=[{"price": _monthly(stripe_client, "eur")}]
        )

    # then refused, nothing added
    assert _refusal(raised) == (stripe.InvalidRequestError, 400, "", _expected("eur", "usd"))
    assert ours.subscription_retrieve(sub["id"]) == sub


def test_a_subscription_item_created_in_another_currency_is_refused(
    stripe_client, stripe_standin, via_ours
):
    # given a subscription in dollars
    sub = _subscribed_in_dollars(stripe_client, stripe_standin)
    client = ours._client()

    # when an item at a euro price is created on it, then one at a dollar price
    with pytest.raises(ours.StripeRequestRefused) as raised:
        ours._call(
            client.v1.subscription_items.create,
            key=_key(),
            subscription=sub["id"],
            price=_monthly(stripe_client, "eur"),
        )
    refused_leaves = ours.subscription_retrieve(sub["id"])
    dollars = _monthly(stripe_client, "usd", unit_amount=500)
    added = ours._call(
        client.v1.subscription_items.create,
        key=_key(),
        subscription=sub["id"],
        price=dollars,
        quantity=3,
        proration_behavior="none",
    )

    # then the euro item is refused as Stripe refuses it, and nothing added; the dollar one
    # is added
    assert _refusal(raised) == (stripe.InvalidRequestError, 400, "", _expected("eur", "usd"))
    assert refused_leaves == sub
    assert (added["object"], added["price"]["id"], added["quantity"]) == (
        "subscription_item",
        dollars,
        3,
    )
    items = ours.subscription_retrieve(sub["id"])["items"]["data"]
    assert [item["price"]["currency"] for item in items] == ["usd", "usd"]


def test_a_subscription_in_another_currency_than_the_customer_s_live_one_is_refused(
    stripe_client, stripe_standin, via_ours
):
    # given a customer subscribed in dollars, and a price in euros
    sub = _subscribed_in_dollars(stripe_client, stripe_standin)
    customer = sub["customer"]
    euros = _monthly(stripe_client, "eur")
    client = ours._client()

    # when a second subscription, in euros, is created for them: by the API, and by
    # Checkout
    with pytest.raises(ours.StripeRequestRefused) as created:
        ours._call(
            client.v1.subscriptions.create, key=_key(), customer=customer, items=[{"price": euros}]
        )
    with pytest.raises(ours.StripeRequestRefused) as checked_out:
        ours.checkout_session_create(
            key=_key(),
            mode="subscription",
            customer=customer,
            line_items=[{"price": euros, "quantity": 1}],
            success_url="http://127.0.0.1/done",
            cancel_url="http://127.0.0.1/cancel",
        )

    # then both are refused as Stripe refuses them, and the customer has only the one
    combine = (
        "You cannot combine currencies on a single customer. This customer has an active "
        "subscription, subscription schedule, discount, quote, or invoice item with currency usd."
    )
    assert _refusal(created) == (stripe.InvalidRequestError, 400, "", combine)
    assert _refusal(checked_out) == (stripe.InvalidRequestError, 400, "", combine)
    assert [s["id"] for s in ours.subscriptions_list(customer=customer)] == [sub["id"]]


def test_a_customer_whose_subscriptions_ended_may_subscribe_in_another_currency(
    stripe_client, stripe_standin, via_ours
):
    # given a customer whose dollar subscription was canceled
    sub = _subscribed_in_dollars(stripe_client, stripe_standin)
    stripe_client.v1.subscriptions.cancel(sub["id"])
    euros = _monthly(stripe_client, "eur")

    # when they subscribe in euros
    created = ours._call(
        ours._client().v1.subscriptions.create,
        key=_key(),
        customer=sub["customer"],
        items=[{"price": euros}],
    )

    # then Stripe takes it (multi-currency customers), in euros, paid with the card on file
    assert (created["currency"], created["status"]) == ("eur", "active")


def test_one_subscription_priced_in_two_currencies_is_refused(
    stripe_client, stripe_standin, via_ours
):
    # given a customer with no subscription, and a dollar and a euro price
    customer = stripe_client.v1.customers.create(params={"email": "mixed@example.com"}).id
    prices = [_monthly(stripe_client, "usd"), _monthly(stripe_client, "eur")]

    # when one subscription is made of both
    with pytest.raises(ours.StripeRequestRefused) as raised:
        ours._call(
            ours._client().v1.subscriptions.create,
            key=_key(),
            customer=customer,
            items=[{"price": price} for price in prices],
        )

    # then refused, and none made
    assert _refusal(raised) == (
        stripe.InvalidRequestError,
        400,
        "",
        "Currency and interval fields must match across all plans on this subscription. "
        "Found mismatch in currency field.",
    )
    assert ours.subscriptions_list(customer=customer) == []
