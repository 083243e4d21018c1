"""The refund of what a paid order could not deliver (its shortfall), when Stripe will not
take it: retried while Stripe is unreachable, left to finance once Stripe refuses it.

Stripe is the stand-in over HTTP; "finance refunded it in the dashboard" is a
refund made at the stand-in under a key of the test's own.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.market.services import SHORTFALL_REASON, orders_expire
from gymbilling.models import MarketOrder
from tests.gymbilling.market.conftest import shortfall_unrefunded
from tests.gymbilling.test_admin import offered_actions, run_action, staff_with

CHANGELIST = "/admin/gymbilling/marketorder/"


def _refused_logs(caplog, order: MarketOrder) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and f"market order {order.pk}: shortfall refund" in r.message
    ]


def made_with_answer_lost(order: MarketOrder, intent: str, *, amount: int) -> dict:
    """A refund of `amount` marked as the order's shortfall refund, as a send of ours whose
    answer was lost made it, its key long forgotten at Stripe (a day on): made at the
    stand-in directly, with the metadata our send carries."""
    return stripe_client.refund_create(
        key=f"lost-answer:{order.pk}",
        payment_intent=intent,
        amount=amount,
        metadata={"market_order": str(order.pk), "reason": SHORTFALL_REASON},
    )


def assert_recorded(order: MarketOrder, refund: dict) -> None:
    """The order's shortfall is refunded, by `refund`, and nothing of it is left to finance."""
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert order.shortfall_refund_id == refund["id"]
    assert (order.shortfall_refund_refused_at, order.shortfall_refund_error) == (None, "")


def test_a_shortfall_refund_stripe_refuses_is_left_to_finance_not_retried_every_minute(
    market_stripe, unrefunded_shortfall, caplog
):
    # given: finance refunded the whole charge in Stripe's dashboard meanwhile
    order, intent = unrefunded_shortfall
    stripe_client.refund_create(key=f"dashboard:{order.pk}", payment_intent=intent)
    assert market_stripe.refunded(intent) == 30

    # when: the sweep tries the shortfall refund, and runs again a minute later
    caplog.set_level(logging.ERROR, logger="gymbilling.market.services")
    orders_expire()
    order.refresh_from_db()
    refused_at = order.shortfall_refund_refused_at
    orders_expire(now=timezone.now() + timedelta(minutes=1))

    # then: Stripe's refusal is recorded on the order for finance, logged once with the
    # order's id, and not sent again; nothing more was refunded
    order.refresh_from_db()
    assert refused_at is not None and order.shortfall_refund_refused_at == refused_at
    assert order.shortfall_refunded_at is None
    assert order.shortfall_refund_error.startswith("charge_already_refunded:")
    [logged] = _refused_logs(caplog, order)
    assert "charge_already_refunded" in logged
    assert market_stripe.refunded(intent) == 30
    # and finance finds it in the admin's list of refused shortfall refunds
    assert list(
        MarketOrder.objects.filter(
            shortfall_refund_refused_at__isnull=False, shortfall_refunded_at__isnull=True
        )
    ) == [order]


def test_a_shortfall_refund_stripe_cannot_be_reached_for_is_retried_until_taken(
    market_stripe, unrefunded_shortfall
):
    order, intent = unrefunded_shortfall
    # when: Stripe is still down at the next run, then back
    market_stripe.down = True
    orders_expire()
    order.refresh_from_db()
    assert (order.shortfall_refunded_at, order.shortfall_refund_refused_at) == (None, None)
    market_stripe.down = False
    orders_expire()

    # then: refunded once it could be
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert order.shortfall_refund_refused_at is None
    assert market_stripe.refunded(intent) == 30


def test_finance_retries_a_refused_shortfall_refund_from_the_admin(
    market_stripe, unrefunded_shortfall, admin_client
):
    # given: a shortfall refund Stripe refused (more than is left to refund: finance
    # refunded 20 of the 30 by hand), no longer retried by the sweep
    order, intent = unrefunded_shortfall
    stripe_client.refund_create(key=f"dashboard:{order.pk}", payment_intent=intent, amount=20)
    orders_expire()
    order.refresh_from_db()
    assert order.shortfall_refund_error.startswith("amount_too_large:")
    listed = admin_client.get(CHANGELIST, {"shortfall_refund": "refused"})
    assert [o.pk for o in listed.context["cl"].result_list] == [order.pk]
    # staff who may only view orders are not offered the retry
    assert "retry_shortfall_refund" not in offered_actions(
        staff_with("view_marketorder"), CHANGELIST
    )

    # when: finance retries it from the admin as it is
    response = run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)

    # then: it was sent again and Stripe refused it again: recorded anew, still in the
    # admin's list, and nothing refunded beyond the 20
    assert response.status_code == 302
    again = MarketOrder.objects.get(pk=order.pk)
    assert again.shortfall_refund_refused_at > order.shortfall_refund_refused_at
    assert again.shortfall_refunded_at is None
    assert again.shortfall_refund_error.startswith("amount_too_large:")
    listed = admin_client.get(CHANGELIST, {"shortfall_refund": "refused"})
    assert [o.pk for o in listed.context["cl"].result_list] == [order.pk]
    assert market_stripe.refunded(intent) == 20


def test_a_refused_shortfall_refund_finance_retries_once_its_cause_is_fixed_is_refunded(
    market_stripe, unrefunded_shortfall, admin_client
):
    # given: Stripe refused the shortfall refund for a cause finance can fix (the
    # platform's balance could not cover it), so the sweep left it to finance
    order, intent = unrefunded_shortfall
    market_stripe.standin.refuse_refunds("balance_insufficient")
    try:
        orders_expire()
    finally:
        market_stripe.standin.refuse_refunds(None)
    order.refresh_from_db()
    assert order.shortfall_refund_error.startswith("balance_insufficient:")

    # when: finance fixed the cause (refunds are taken again), and retries it from the
    # admin the same day (Stripe still keeps the refused request's idempotency key)
    response = run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)

    # then: it is refunded, not the first refusal replayed
    assert response.status_code == 302
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert order.shortfall_refund_refused_at is None
    assert market_stripe.refunded(intent) == 30
    # and nothing refunds it again
    orders_expire()
    run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)
    assert market_stripe.refunded(intent) == 30


def test_a_shortfall_refund_stripe_made_but_whose_answer_was_lost_is_recorded_not_made_again(
    market_stripe, unrefunded_shortfall
):
    # given: an earlier send of the shortfall refund reached Stripe and made it, but its
    # answer was lost, and its idempotency key is long forgotten at Stripe (a day on)
    order, intent = unrefunded_shortfall
    lost = made_with_answer_lost(order, intent, amount=30)

    # when: the retry runs
    orders_expire()

    # then: the refund Stripe holds is recorded as the order's, and no other is made
    assert_recorded(order, lost)
    assert market_stripe.refunded(intent) == 30
    assert [r["id"] for r in stripe_client.refunds_list(payment_intent=intent)] == [lost["id"]]


def test_a_shortfall_refund_stripe_lists_past_its_first_page_is_found_not_made_again(
    market_stripe, seller, buyer, django_capture_on_commit_callbacks
):
    # given: an order paid 154 that delivered 124 and not the other 30; its shortfall
    # refund made at Stripe, the answer lost; then 100 refunds more of the charge (1 each,
    # by hand): Stripe lists refunds newest first, 100 a page, the shortfall's on the second
    order, intent = shortfall_unrefunded(
        market_stripe, buyer, django_capture_on_commit_callbacks, seller=seller
    )
    assert order.amount_total == 154
    lost = made_with_answer_lost(order, intent, amount=30)
    for n in range(100):
        stripe_client.refund_create(key=f"by-hand:{order.pk}:{n}", payment_intent=intent, amount=1)

    # when: the retry runs
    orders_expire()

    # then: it found the shortfall's refund and recorded it; none other was made
    assert_recorded(order, lost)
    assert market_stripe.refunded(intent) == 130
    # and the client lists every refund, oldest first
    refunds = stripe_client.refunds_list(payment_intent=intent)
    assert (len(refunds), refunds[0]["id"]) == (101, lost["id"])


def test_a_shortfall_refund_found_at_stripe_for_another_amount_goes_to_finance_not_recorded(
    market_stripe, unrefunded_shortfall, caplog, admin_client
):
    # given: a refund of 20 at Stripe marked as the order's shortfall refund (made by hand
    # with our metadata), where the order is owed 30
    order, intent = unrefunded_shortfall
    other = made_with_answer_lost(order, intent, amount=20)

    # when: the retry runs
    caplog.set_level(logging.ERROR, logger="gymbilling.market.services")
    orders_expire()

    # then: not recorded as the shortfall's refund, and none other made: the order is in
    # finance's list of refused shortfall refunds, saying which refund and why, and logged
    order.refresh_from_db()
    assert (order.shortfall_refunded_at, order.shortfall_refund_id) == (None, "")
    assert order.shortfall_refund_refused_at is not None
    assert order.shortfall_refund_error.startswith(
        f"refund {other['id']} at Stripe is marked as this shortfall's refund, but of 20 usd, "
        "not the shortfall's 30"
    )
    assert any(
        f"market order {order.pk}: shortfall refund not recorded" in r.getMessage()
        for r in caplog.records
    )
    assert market_stripe.refunded(intent) == 20
    listed = admin_client.get(CHANGELIST, {"shortfall_refund": "refused"})
    assert [o.pk for o in listed.context["cl"].result_list] == [order.pk]

    # and a retry from the admin, while that refund stands, refunds nothing more
    run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)
    order.refresh_from_db()
    assert order.shortfall_refunded_at is None
    assert market_stripe.refunded(intent) == 20
