"""Finance refund a marketplace order's payment from its checkout's Refund page in the admin.

An order of 154 that delivered 124 (one seller's fill: fee 12, the seller's 112) and not
the other 30 (credits that expired while reserved) owes the buyer that shortfall. A plain
refund of the payment carries none of the shortfall refund's metadata, so its webhook
would read it as a refund of the delivered sale. The page makes finance say which they
refund; the shortfall goes as the order's own shortfall refund. Stripe is the stand-in
over HTTP; its webhooks are applied as the worker would (`deliver`).
"""

from __future__ import annotations

import threading
import uuid

import pytest

from accounts.models import AuditEvent
from gymbilling import stripe_client
from gymbilling.locks import session_lock
from gymbilling.market.services import (
    SHORTFALL_REASON,
    _shortfall_refund_claim,
    order_shortfall_refund_resolve,
    order_shortfall_refund_retry,
    orders_expire,
)
from gymbilling.models import (
    BillingCustomer,
    MarketFill,
    MarketOrder,
    MarketReversal,
    MoneyAccountKind,
)
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from tests.gymbilling.market.conftest import (
    money,
    refused_for_a_cause_finance_can_fix,
    shortfall_unrefunded,
    sold,
)
from tests.helpers import credits, ledger_rows, lock_waiters, on_own_connection, wait_until

pytestmark = pytest.mark.django_db

NOTE = "Buyer asked for the undelivered part back"


def _refund_url(order: MarketOrder) -> str:
    return f"/admin/gymbilling/checkoutsession/{order.checkout_id}/refund/"


@pytest.fixture
def short_order(market_stripe, seller, buyer, django_capture_on_commit_callbacks, deliver):
    """Makes the order of 154 delivering 124 and owing 30 back, its shortfall refund
    refused by Stripe (in finance's list) or still waiting to be sent; its checkout shows
    its payment. Returns (order, payment intent)."""

    def make(*, refused: bool):
        order, intent = shortfall_unrefunded(
            market_stripe, buyer, django_capture_on_commit_callbacks, seller=seller
        )
        deliver()  # the checkout's own events: the payment recorded on the checkout
        if refused:
            refused_for_a_cause_finance_can_fix(market_stripe, order)
        order.checkout.refresh_from_db()
        assert order.checkout.stripe_payment_intent_id == intent
        return order, intent

    return make


def _sale_and_credits(seller, buyer) -> tuple:
    """What a refund of the sale would take back: the buyer's credits, the seller's
    proceeds, the platform's fees."""
    return (
        organization_balance(organization=buyer).available,
        money(MoneyAccountKind.SELLER_PENDING, organization=seller),
        money(MoneyAccountKind.PLATFORM_FEES),
    )


def _post(admin_client, order, **fields):
    return admin_client.post(_refund_url(order), {"note": NOTE, "key": uuid.uuid4().hex} | fields)


def _form_errors(response) -> str:
    form = response.context["form"]
    return " ".join([*form.non_field_errors(), *(e for es in form.errors.values() for e in es)])


@pytest.mark.parametrize("refused", [True, False], ids=["refused", "waiting"])
def test_finance_refund_the_undelivered_shortfall_from_the_refund_page_and_the_sale_stands(
    market_stripe, seller, buyer, short_order, deliver, admin_client, admin_user, refused
):
    # given: the order owes its 30 back (refused by Stripe, or waiting to be sent)
    order, intent = short_order(refused=refused)
    sale = _sale_and_credits(seller, buyer)
    assert sale[1:] == (112, 12)

    # when: finance open the payment's Refund page, choose the undelivered shortfall, and
    # Stripe's webhooks for the refund arrive
    page = admin_client.get(_refund_url(order))
    response = _post(admin_client, order, part="shortfall", amount="30")
    deliver()

    # then: the page offered the choice with nothing chosen for them
    assert b'value="shortfall"' in page.content and b'value="sale"' in page.content
    assert b"checked" not in page.content
    assert response.status_code == 302, _form_errors(response)
    # Stripe refunded the 30, once, as the order's own shortfall refund
    [made] = stripe_client.refunds_list(payment_intent=intent)
    assert made["amount"] == 30
    assert made["metadata"] == {"market_order": str(order.pk), "reason": SHORTFALL_REASON}
    assert market_stripe.refunded(intent) == 30
    # the order records its shortfall refunded, out of finance's list
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert order.shortfall_refund_id == made["id"]
    assert (order.shortfall_refund_refused_at, order.shortfall_refund_error) == (None, "")
    # the delivered sale is untouched: the buyer's credits, the seller's proceeds, the fee;
    # nothing applied to the fill, the buyer not frozen
    assert _sale_and_credits(seller, buyer) == sale
    assert organization_balance(organization=buyer).available == credits(100)
    assert list(MarketFill.objects.filter(order=order, gross__gt=0).values_list("refunded")) == [
        (0,)
    ]
    assert not MarketReversal.objects.filter(order=order).exists()
    assert BillingCustomer.objects.get(organization=buyer).resale_frozen_at is None
    # who and why in the buyer's audit log
    [event] = AuditEvent.objects.filter(organization=buyer, action="market.shortfall_refunded")
    assert event.actor_user == admin_user
    assert (event.data["amount"], event.data["refund"], event.data["note"]) == (
        30,
        made["id"],
        NOTE,
    )
    assert ledger_reconcile().ok
    # and nothing refunds it again: the sweep, finance's retry, the page once more
    orders_expire()
    order_shortfall_refund_retry(order_id=order.pk)
    again = _post(admin_client, order, part="shortfall")
    assert "shortfall_refund_not_owed" in _form_errors(again)
    assert market_stripe.refunded(intent) == 30


def test_finance_must_say_whether_they_refund_the_shortfall_or_the_sale(
    market_stripe, short_order, admin_client
):
    order, intent = short_order(refused=True)
    before = ledger_rows()

    # when: the form is sent without a choice, or the shortfall with another amount
    unchosen = _post(admin_client, order, amount="30")
    mismatched = _post(admin_client, order, part="shortfall", amount="20")

    # then: refused on the form, nothing refunded or taken back
    assert unchosen.status_code == 200 and "part" in unchosen.context["form"].errors
    assert mismatched.status_code == 200
    assert "shortfall_amount_mismatch" in _form_errors(mismatched)
    assert market_stripe.refunded(intent) == 0
    assert ledger_rows() == before
    order.refresh_from_db()
    assert order.shortfall_refunded_at is None and order.shortfall_refund_refused_at is not None


def test_a_shortfall_refund_another_send_is_making_is_not_made_again_from_the_page(
    market_stripe, short_order, admin_client
):
    # given: a send of the shortfall refund (finance's retry) is at Stripe right now
    order, intent = short_order(refused=True)
    assert _shortfall_refund_claim(order) is not None

    # when: finance also refund the shortfall from the Refund page
    response = _post(admin_client, order, part="shortfall")

    # then: told another send is at Stripe; nothing refunded from here
    assert response.status_code == 200
    assert "shortfall_refund_sending" in _form_errors(response)
    assert market_stripe.refunded(intent) == 0


def test_a_form_drawn_while_the_shortfall_was_owed_is_not_refunded_as_the_sale_once_it_is_not(
    market_stripe, seller, buyer, short_order, deliver, admin_client
):
    # given: finance drew the page while the shortfall was owed; the sweep refunded it since
    order, intent = short_order(refused=False)
    assert b'value="shortfall"' in admin_client.get(_refund_url(order)).content
    orders_expire()
    deliver()
    assert market_stripe.refunded(intent) == 30
    sale = _sale_and_credits(seller, buyer)

    # when: they send it, the shortfall chosen
    response = _post(admin_client, order, part="shortfall", amount="30")

    # then: refused as refunded already; no refund of the sale instead
    assert "shortfall_refund_not_owed" in _form_errors(response)
    assert market_stripe.refunded(intent) == 30
    assert _sale_and_credits(seller, buyer) == sale


def test_a_refund_of_the_delivered_sale_still_takes_its_share_back(
    market_stripe, seller, buyer, short_order, deliver, admin_client
):
    # given: the order owes its shortfall; finance refund half of the delivered sale
    order, intent = short_order(refused=True)

    # when
    response = _post(admin_client, order, part="sale", amount="62")
    deliver()

    # then: as any refund of a sale: half the delivered credits, the fee's and the
    # seller's halves taken back, the buyer frozen; the shortfall is still owed
    assert response.status_code == 302, _form_errors(response)
    assert market_stripe.refunded(intent) == 62
    assert _sale_and_credits(seller, buyer) == (credits(50), 56, 6)
    assert BillingCustomer.objects.get(organization=buyer).resale_frozen_at is not None
    order.refresh_from_db()
    assert order.shortfall_refunded_at is None


def test_a_sale_without_a_shortfall_is_refunded_as_before_with_no_choice_to_make(
    market_stripe, seller, buyer, deliver, admin_client
):
    # given: an order of 124 delivered whole
    order = sold(market_stripe, seller, buyer)
    deliver()
    order.checkout.refresh_from_db()

    # when: finance refund half of it from its Refund page
    page = admin_client.get(_refund_url(order))
    response = _post(admin_client, order, amount="62")
    deliver()

    # then: no choice was offered, and half of the sale is taken back
    assert b'name="part"' not in page.content
    assert response.status_code == 302, _form_errors(response)
    assert _sale_and_credits(seller, buyer) == (credits(50), 56, 6)
    assert order.shortfall_amount == 0


@pytest.mark.parametrize("refused", [True, False], ids=["refused", "waiting"])
def test_a_blank_amount_on_the_delivered_sale_refunds_the_sale_and_leaves_the_shortfall_owed(
    market_stripe, seller, buyer, short_order, deliver, admin_client, refused
):
    # given: the order of 154 delivered 124 and owes its 30 back (refused by Stripe and in
    # finance's list, or waiting to be sent)
    order, intent = short_order(refused=refused)

    # when: finance refund the delivered sale, the amount left blank ("all that is left"),
    # and Stripe's webhooks for the refund arrive
    response = _post(admin_client, order, part="sale")
    deliver()

    # then: Stripe refunded the sale's 124 alone: the 30 the buyer is owed stays refundable
    assert response.status_code == 302, _form_errors(response)
    [made] = stripe_client.refunds_list(payment_intent=intent)
    assert made["amount"] == 124
    assert market_stripe.refunded(intent) == 124
    # the whole sale is taken back (the buyer's delivered credits, the seller's 112, the
    # fee's 12), none of it unapplied
    assert _sale_and_credits(seller, buyer) == (0, 0, 0)
    [reversal] = MarketReversal.objects.filter(order=order)
    assert (reversal.amount, reversal.unapplied) == (124, 0)
    order.refresh_from_db()
    assert order.shortfall_refunded_at is None

    # when: the shortfall refund is sent (finance's retry, or the sweep)
    if refused:
        assert order_shortfall_refund_retry(order_id=order.pk)
    else:
        orders_expire()
    deliver()

    # then: it goes through, and the buyer has had all 154 back, once
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert order.shortfall_refund_refused_at is None
    assert market_stripe.refunded(intent) == 154
    assert MarketReversal.objects.get(order=order).unapplied == 0
    assert ledger_reconcile().ok


def test_a_refund_of_the_delivered_sale_never_takes_the_shortfall_owed(
    market_stripe, seller, buyer, short_order, deliver, admin_client
):
    # given: the order owes its 30 back; finance refunded 100 of the delivered sale
    order, intent = short_order(refused=True)
    assert _post(admin_client, order, part="sale", amount="100").status_code == 302
    deliver()
    before = ledger_rows()

    # when: they refund 25 more of the sale (24 is what it has left), then the sale with
    # the amount blank twice, the second once nothing of it is left
    over = _post(admin_client, order, part="sale", amount="25")
    rest = _post(admin_client, order, part="sale")
    deliver()
    after_rest = ledger_rows()
    nothing = _post(admin_client, order, part="sale")

    # then: the 25 refused before Stripe was called, saying what is left; the blank one
    # refunded the sale's last 24; the second blank one refused: nothing of the sale left
    assert over.status_code == 200 and "refund_exceeds_sale" in _form_errors(over)
    assert "At most 24 usd" in _form_errors(over)
    assert rest.status_code == 302, _form_errors(rest)
    assert after_rest != before
    assert "sale_fully_refunded" in _form_errors(nothing)
    assert ledger_rows() == after_rest
    assert [r["amount"] for r in stripe_client.refunds_list(payment_intent=intent)] == [100, 24]
    # and the 30 owed is still the buyer's to have: the shortfall refund goes through
    assert order_shortfall_refund_retry(order_id=order.pk)
    assert market_stripe.refunded(intent) == 154
    assert sum(r.unapplied for r in MarketReversal.objects.filter(order=order)) == 0


def test_the_delivered_sale_s_refund_sent_twice_from_one_form_is_made_once(
    market_stripe, seller, buyer, short_order, deliver, admin_client, admin_user
):
    # given: the order owes its 30 back; finance refund the delivered sale, amount blank
    order, intent = short_order(refused=False)
    form = {"note": NOTE, "key": uuid.uuid4().hex, "part": "sale"}
    first = admin_client.post(_refund_url(order), form)
    deliver()

    # when: the same form is sent again (a double click; a retry after Stripe's answer
    # was lost), now that what the sale has left reads 0 at Stripe
    again = admin_client.post(_refund_url(order), form)
    deliver()

    # then: both answered with the one refund of the sale's 124, recorded once
    assert (first.status_code, again.status_code) == (302, 302), _form_errors(again)
    [made] = stripe_client.refunds_list(payment_intent=intent)
    assert made["amount"] == 124
    [event] = AuditEvent.objects.filter(organization=buyer, action="payment.refunded")
    assert event.data["refund"] == made["id"]
    assert _sale_and_credits(seller, buyer) == (0, 0, 0)


def test_a_sale_refund_waits_for_one_an_older_process_is_making(
    market_stripe, seller, buyer, short_order, deliver, admin_client, admin_user
):
    """During a rolling deploy a process of the release before takes the sale refund's
    lock by its old name, `market-sale-refund:<payment intent>`: this one must wait for it."""
    # given: the order owes its 30 back; an older process holds the lock, refunding the sale
    order, intent = short_order(refused=False)
    held, release = threading.Event(), threading.Event()
    errors: list = []

    def older_process():
        with session_lock(f"market-sale-refund:{intent}"):
            held.set()
            release.wait(timeout=60)

    refunds_seen_while_waiting: list = []

    def watch():
        # Once this process waits for the lock (or has finished without waiting), let the
        # older one go on.
        wait_until(lambda: lock_waiters() > 0 or release.is_set(), what="the refund to wait")
        if not release.is_set():
            refunds_seen_while_waiting.append(stripe_client.refunds_list(payment_intent=intent))
        release.set()

    older = threading.Thread(target=on_own_connection, args=(older_process, errors))
    older.start()
    assert held.wait(timeout=60)
    watcher = threading.Thread(target=on_own_connection, args=(watch, errors))
    watcher.start()

    # when: finance refund the delivered sale from the page meanwhile
    response = _post(admin_client, order, part="sale", amount="24")
    release.set()
    older.join(timeout=60)
    watcher.join(timeout=60)
    deliver()

    # then: it waited for the older process, Stripe refunding nothing meanwhile; then made
    assert errors == [] and not older.is_alive() and not watcher.is_alive()
    assert refunds_seen_while_waiting == [[]]
    assert response.status_code == 302, _form_errors(response)
    [made] = stripe_client.refunds_list(payment_intent=intent)
    assert made["amount"] == 24


def test_a_blank_sale_refund_counts_a_refund_stripe_made_that_is_not_applied_here_yet(
    market_stripe, seller, buyer, short_order, deliver, admin_client, admin_user
):
    # given: the order of 154 (124 delivered, 30 short); its shortfall refund refused and
    # the buyer paid the 30 back by bank transfer, marked resolved by hand: nothing owed
    order, intent = short_order(refused=True)
    order_shortfall_refund_resolve(order_id=order.pk, note="bank transfer", actor=admin_user)
    # and the whole sale's 124 refunded in Stripe's dashboard (or by another of finance),
    # its webhook not processed yet: the fills here still say 124 of the sale left
    made = stripe_client.refund_create(key=uuid.uuid4().hex, payment_intent=intent, amount=124)
    assert MarketFill.objects.get(order=order, gross__gt=0).refunded == 0

    # when: finance refund the delivered sale, the amount blank, then 30 of it
    blank = _post(admin_client, order, part="sale")
    thirty = _post(admin_client, order, part="sale", amount="30")
    deliver()

    # then: both refused before Stripe was called: the sale was refunded whole already, and
    # the 30 Stripe has left is the shortfall's money, which the buyer already has
    assert (blank.status_code, thirty.status_code) == (200, 200)
    assert "sale_fully_refunded" in _form_errors(blank)
    assert "refund_exceeds_sale" in _form_errors(thirty)
    assert [r["id"] for r in stripe_client.refunds_list(payment_intent=intent)] == [made["id"]]
    assert market_stripe.refunded(intent) == 124
    # the one refund is applied once its webhook comes: the whole sale, none unapplied
    [reversal] = MarketReversal.objects.filter(order=order)
    assert (reversal.amount, reversal.unapplied) == (124, 0)
    assert ledger_reconcile().ok


def test_a_form_whose_sale_refund_failed_at_stripe_says_so_and_asks_for_a_fresh_form(
    market_stripe, seller, buyer, short_order, deliver, admin_client
):
    # given: finance refunded the delivered sale (124) from a form; the refund then failed
    # at Stripe (the buyer's card closed): the money is the gym's again
    order, intent = short_order(refused=False)
    form = {"note": NOTE, "key": uuid.uuid4().hex, "part": "sale"}
    assert admin_client.post(_refund_url(order), form).status_code == 302
    deliver()
    [made] = stripe_client.refunds_list(payment_intent=intent)
    assert market_stripe.standin.fail_refund(made["id"])["status"] == "failed"
    deliver()

    # when: the same form is sent again (the browser's back button, a retry)
    again = admin_client.post(_refund_url(order), form)

    # then: not reported as refunded: the page says the form's refund failed and that a
    # new refund takes a fresh form; nothing more refunded at Stripe
    assert again.status_code == 200
    errors = _form_errors(again)
    assert "refund_failed" in errors and made["id"] in errors
    assert "fresh" in errors
    assert [r["id"] for r in stripe_client.refunds_list(payment_intent=intent)] == [made["id"]]
    assert market_stripe.refunded(intent) == 0

    # and a fresh form refunds the sale again
    assert _post(admin_client, order, part="sale").status_code == 302
    assert market_stripe.refunded(intent) == 124
