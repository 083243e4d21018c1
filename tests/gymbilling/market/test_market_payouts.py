"""Payouts sent again: a seller is paid once, whatever happened between the sends.

Stripe is the stand-in over HTTP. "Stripe forgot the key" is the stand-in's
`/_config/idempotency_keys/expire`, what 24 hours do at Stripe.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.contrib.admin import helpers
from django.test import Client
from django.utils import timezone

from accounts.models import AuditEvent
from gymbilling import stripe_client
from gymbilling.market import services as market_services
from gymbilling.market.services import (
    _fill_mature,
    _payout_create_at_stripe,
    _payout_record,
    payout_mark_paid,
    payout_send,
    payouts_retry,
    payouts_run,
)
from gymbilling.models import (
    BillingCustomer,
    MarketFill,
    MarketPayout,
    MarketReversal,
    PayoutMethod,
    PayoutStatus,
    ProceedsState,
)
from gymbilling.services.customers import billing_customer_replace
from gymbilling.services.payments import resale_freeze
from metering.reconcile import ledger_reconcile
from tests.gymbilling.market.conftest import (
    dispute_at_stripe,
    market_member,
    money,
    refund,
    sold,
)
from tests.gymbilling.market.test_market_reversal_lock_order import (
    reversal_held_while_waiting_for_seller_money,
)
from tests.gymbilling.test_admin import offered_actions, run_action, staff_with
from tests.helpers import (
    credits,
    lock_waiters,
    on_own_connection,
    pause_after,
    run_against_paused,
    wait_until,
)

LATER = timedelta(days=8)


def _recorded_while_stripe_is_down(market_stripe) -> MarketPayout:
    market_stripe.down = True
    assert payouts_run(now=timezone.now() + LATER) == 0
    market_stripe.down = False
    payout = MarketPayout.objects.get()
    assert payout.status == PayoutStatus.PENDING
    return payout


def _recorded_not_sent(seller) -> MarketPayout:
    """The seller's proceeds matured and recorded as a payout that no send has reached
    Stripe with yet (the run that recorded it ended before sending it)."""
    later = timezone.now() + LATER
    for pk in MarketFill.objects.filter(seller=seller).values_list("pk", flat=True):
        _fill_mature(fill_id=pk, now=later)
    payout = _payout_record(seller_id=seller.pk, currency="usd")
    assert (payout.status, payout.last_error) == (PayoutStatus.PENDING, "")
    return payout


@pytest.mark.parametrize("method", [PayoutMethod.TRANSFER, PayoutMethod.INVOICE_CREDIT])
def test_a_payout_resent_after_stripe_forgot_its_key_is_found_not_made_again(
    market_stripe, seller, buyer, method
):
    # given: a sale (the seller's 112) whose payout (a Connect transfer, or a balance
    # credit for a seller without a Connect account) was recorded, sent, and made at
    # Stripe, but whose answer never came back (a crash, a timeout): still pending
    account = market_stripe.connect_account(seller) if method == PayoutMethod.TRANSFER else None
    sold(market_stripe, seller, buyer)
    payout = _recorded_while_stripe_is_down(market_stripe)
    made = _payout_create_at_stripe(payout)
    # and more than a day passes: Stripe no longer knows the call's idempotency key
    market_stripe.standin.expire_idempotency_keys()

    # when: the payout run sends the pending payout again
    assert payouts_run(now=timezone.now() + LATER) == 1

    # then: it recorded what Stripe already made; the seller is paid once
    payout.refresh_from_db()
    assert (payout.method, payout.status, payout.stripe_object_id) == (
        method,
        PayoutStatus.SENT,
        made["id"],
    )
    paid = (
        [t["amount"] for t in market_stripe.transfers(account)]
        if account
        else [-c["amount"] for c in market_stripe.balance_credits(seller)]
    )
    assert paid == [112]
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0
    # and a later run sends nothing more
    assert payouts_run(now=timezone.now() + LATER) == 0


def test_a_pending_payout_never_sent_is_sent_after_the_look_up(market_stripe, seller, buyer):
    # given: a payout recorded while Stripe was down, whose send never reached Stripe
    account = market_stripe.connect_account(seller)
    sold(market_stripe, seller, buyer)
    payout = _recorded_while_stripe_is_down(market_stripe)

    # when: Stripe is back
    assert payouts_run(now=timezone.now() + LATER) == 1

    # then: the look-up found nothing, and the transfer was made, in the payout's own group
    [transfer] = market_stripe.transfers(account)
    assert (transfer["amount"], transfer["transfer_group"]) == (112, f"market-payout-{payout.pk}")
    assert MarketPayout.objects.get().stripe_object_id == transfer["id"]


# --- payouts Stripe refuses ---------------------------------------------------------------------

CHANGELIST = "/admin/gymbilling/marketpayout/"


def test_a_payout_stripe_refuses_holds_the_seller_s_payouts_until_finance_retries_it(
    market_stripe, seller, buyer, admin_client
):
    # given: a seller whose Connect account cannot receive transfers (Stripe turned its
    # transfers capability off), with a sale's 112 available
    account = market_stripe.connect_account(seller)
    market_stripe.standin.set_capabilities(account, transfers="inactive")
    sold(market_stripe, seller, buyer)

    # when: the payout run sends it, and runs again, after another sale's 112 matured
    assert payouts_run(now=timezone.now() + LATER) == 0
    sold(market_stripe, seller, buyer)
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert payouts_run(now=timezone.now() + LATER) == 0

    # then: refused once, and not recorded nor sent again: the proceeds wait, available
    [refused] = MarketPayout.objects.all()
    assert refused.status == PayoutStatus.FAILED and refused.retry_allowed_at is None
    assert refused.last_error.startswith("insufficient_capabilities_for_transfer:")
    assert money("seller_available", organization=seller) == 224
    assert money("payouts") == 0
    assert market_stripe.transfers(account) == []
    # and finance finds it among the refused payouts holding a seller's payouts
    listed = admin_client.get(CHANGELIST, {"holding": "yes"})
    assert [p.pk for p in listed.context["cl"].result_list] == [refused.pk]

    # when: the account can receive transfers again; the payout run alone still waits
    market_stripe.standin.set_capabilities(account, transfers="active")
    assert payouts_run(now=timezone.now() + LATER) == 0
    # and finance retries it from the admin
    response = run_action(admin_client, CHANGELIST, "retry_payouts", refused.pk)

    # then: the seller is paid all that is available, once, at once
    assert response.status_code == 302
    assert [t["amount"] for t in market_stripe.transfers(account)] == [224]
    paid = MarketPayout.objects.exclude(pk=refused.pk).get()
    assert (paid.amount, paid.status) == (224, PayoutStatus.SENT)
    assert money("seller_available", organization=seller) == 0
    assert money("payouts") == 224
    assert not admin_client.get(CHANGELIST, {"holding": "yes"}).context["cl"].result_list
    assert payouts_run(now=timezone.now() + LATER) == 0


def test_a_payout_refused_again_after_a_retry_holds_again(market_stripe, seller, buyer):
    # given: a refused payout (an account that cannot receive transfers), retried by
    # finance before the account was fixed
    account = market_stripe.connect_account(seller)
    market_stripe.standin.set_capabilities(account, transfers="inactive")
    sold(market_stripe, seller, buyer)
    assert payouts_run(now=timezone.now() + LATER) == 0
    first = MarketPayout.objects.get()

    # when
    results = payouts_retry(payout_ids=[first.pk])

    # then: sent again and refused again: that one holds now, the proceeds still available
    second = MarketPayout.objects.exclude(pk=first.pk).get()
    assert results == {first.pk: PayoutStatus.FAILED}
    assert second.status == PayoutStatus.FAILED and second.retry_allowed_at is None
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert MarketPayout.objects.count() == 2
    assert money("seller_available", organization=seller) == 112


def test_staff_who_may_only_view_payouts_cannot_retry_them(market_stripe, seller, buyer):
    account = market_stripe.connect_account(seller)
    market_stripe.standin.set_capabilities(account, transfers="inactive")
    sold(market_stripe, seller, buyer)
    payouts_run(now=timezone.now() + LATER)
    refused = MarketPayout.objects.get()
    viewer = staff_with("view_marketpayout")

    # when they post the retry
    run_action(viewer, CHANGELIST, "retry_payouts", refused.pk)

    # then nothing was sent; the action is not offered to them
    assert "retry_payouts" not in offered_actions(viewer, CHANGELIST)
    assert MarketPayout.objects.count() == 1
    assert market_stripe.transfers(account) == []


# --- a seller's Stripe customer deleted at Stripe ------------------------------------------------


def _seller_customer(seller) -> BillingCustomer:
    return BillingCustomer.objects.get(organization=seller)


def test_a_balance_credit_to_a_deleted_customer_goes_to_its_replacement(
    market_stripe, seller, buyer
):
    # given: a seller paid by balance credits (no Connect account) whose payout of 112 was
    # recorded for their Stripe customer; the customer was then deleted at Stripe and
    # replaced (the organization's next checkout did it) before the payout was sent
    sold(market_stripe, seller, buyer)
    payout = _recorded_not_sent(seller)
    gone = _seller_customer(seller)
    market_stripe.delete_customer(gone.stripe_customer_id)
    replacement = billing_customer_replace(customer=gone).stripe_customer_id
    assert replacement != gone.stripe_customer_id

    # when: the payout run sends it
    assert payouts_run(now=timezone.now() + LATER) == 1

    # then: the 112 went to the replacement customer's balance, once, by the same payout
    payout.refresh_from_db()
    assert (payout.status, payout.destination, payout.deleted_destination) == (
        PayoutStatus.SENT,
        replacement,
        gone.stripe_customer_id,
    )
    [credit] = market_stripe.balance_credits(seller)
    assert (credit["amount"], credit["customer"], credit["id"]) == (
        -112,
        replacement,
        payout.stripe_object_id,
    )
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0
    # and the seller's audit log says where it went instead, and why
    [event] = AuditEvent.objects.filter(organization=seller, action="market.payout_redirected")
    assert event.data == {
        "payout": payout.pk,
        "from": gone.stripe_customer_id,
        "to": replacement,
        "why": "deleted at Stripe",
    }
    # and nothing is paid twice: a later run, and the payout sent again after Stripe
    # forgot its key, find the credit made
    market_stripe.standin.expire_idempotency_keys()
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert len(market_stripe.balance_credits(seller)) == 1


def test_a_balance_credit_to_a_deleted_customer_not_replaced_yet_waits_for_its_replacement(
    market_stripe, seller, buyer, admin_client
):
    # given: a seller paid by balance credits whose Stripe customer was deleted at Stripe,
    # with a sale's 112 available
    sold(market_stripe, seller, buyer)
    gone = _seller_customer(seller)
    market_stripe.delete_customer(gone.stripe_customer_id)

    # when: the payout run sends it, then runs again after another sale's 112 matured
    assert payouts_run(now=timezone.now() + LATER) == 0
    sold(market_stripe, seller, buyer)
    assert payouts_run(now=timezone.now() + LATER) == 0

    # then: not paid and not failed for finance: waiting for the seller's new customer,
    # saying so; the proceeds wait available (refunds still reach them), and no payout
    # is recorded for the deleted customer again
    [waiting] = MarketPayout.objects.all()
    assert waiting.status == PayoutStatus.CUSTOMER_DELETED
    assert f"customer {gone.stripe_customer_id} was deleted at Stripe" in waiting.last_error
    assert money("seller_available", organization=seller) == 224
    assert money("payouts") == 0
    # finance see it waiting for the seller's new customer, not among refused payouts
    # they must fix and retry; Retry does nothing to it
    listed = admin_client.get(CHANGELIST, {"holding": "customer"})
    assert [p.pk for p in listed.context["cl"].result_list] == [waiting.pk]
    assert b"was deleted at Stripe" in listed.content
    assert not admin_client.get(CHANGELIST, {"holding": "yes"}).context["cl"].result_list
    assert payouts_retry(payout_ids=[waiting.pk]) == {}

    # when: the organization's next checkout replaces the customer, and the payout run
    # comes
    replacement = billing_customer_replace(customer=gone).stripe_customer_id
    assert payouts_run(now=timezone.now() + LATER) == 1

    # then: all 224 go to the replacement, once; nothing waits any more
    assert [(c["amount"], c["customer"]) for c in market_stripe.balance_credits(seller)] == [
        (-224, replacement)
    ]
    assert money("seller_available", organization=seller) == 0
    assert money("payouts") == 224
    assert not admin_client.get(CHANGELIST, {"holding": "customer"}).context["cl"].result_list
    assert payouts_run(now=timezone.now() + LATER) == 0


def test_a_balance_credit_to_a_customer_stripe_never_knew_is_refused_for_finance(
    market_stripe, seller, buyer
):
    # given: a seller's customer id Stripe answers 404 for (a key of another account or
    # mode): not known to be deleted
    sold(market_stripe, seller, buyer)
    BillingCustomer.objects.filter(organization=seller).update(stripe_customer_id="cus_unknown")

    # when
    assert payouts_run(now=timezone.now() + LATER) == 0

    # then: refused, holding the seller's payouts there until finance retries, as before;
    # nothing moved anywhere else
    [refused] = MarketPayout.objects.all()
    assert (refused.status, refused.destination, refused.deleted_destination) == (
        PayoutStatus.FAILED,
        "cus_unknown",
        "",
    )
    assert refused.last_error.startswith("resource_missing:")
    assert refused.retry_allowed_at is None
    assert money("seller_available", organization=seller) == 112


def _credited_then_deleted(
    market_stripe, seller, buyer, *, replaced: bool, after_the_sale=lambda order: None
):
    """A payout of a sale (112; less what `after_the_sale`, done to it first, took) to the
    seller's customer, sent once and credited there, its answer lost (a timeout); Stripe has
    forgotten the send's key since; then the customer deleted at Stripe (the seller may
    have used the credit first), and replaced by the organization's new customer if
    `replaced`. Returns the payout (pending), the credit Stripe made, and the deleted
    customer."""
    after_the_sale(sold(market_stripe, seller, buyer))
    payout = _recorded_while_stripe_is_down(market_stripe)
    gone = _seller_customer(seller)
    credit = _payout_create_at_stripe(payout)
    assert credit["customer"] == gone.stripe_customer_id
    market_stripe.standin.expire_idempotency_keys()
    market_stripe.delete_customer(gone.stripe_customer_id)
    if replaced:
        billing_customer_replace(customer=gone)
    return payout, credit, gone


@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "not_replaced_yet"])
def test_a_balance_credit_an_earlier_send_may_have_made_to_a_customer_deleted_since_waits_for_finance(
    market_stripe, seller, buyer, admin_client, replaced
):
    # given: a payout of 112 to the seller's customer, sent once and credited there, its
    # answer lost; the customer deleted at Stripe since; the organization has a new
    # customer already, or gets one after the next run
    payout, _credit, gone = _credited_then_deleted(market_stripe, seller, buyer, replaced=replaced)

    # when: the payout run sends the payout again
    assert payouts_run(now=timezone.now() + LATER) == 0

    # then: not paid to the new customer, nor left waiting to be paid there: failed, for
    # finance, saying why; the proceeds back to available
    payout.refresh_from_db()
    assert (payout.status, payout.destination) == (PayoutStatus.FAILED, gone.stripe_customer_id)
    assert payout.may_have_paid
    assert "may have credited it" in payout.last_error
    assert money("payouts") == 0
    assert money("seller_available", organization=seller) == 112
    assert not AuditEvent.objects.filter(action="market.payout_redirected").exists()
    listed = admin_client.get(CHANGELIST, {"holding": "yes"})
    assert [p.pk for p in listed.context["cl"].result_list] == [payout.pk]

    # when: the organization has its new customer, and payout runs come
    if not replaced:
        billing_customer_replace(customer=gone)
    replacement = _seller_customer(seller).stripe_customer_id
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert payouts_run(now=timezone.now() + LATER) == 0

    # then: nothing is paid to it, nor recorded, until finance has looked
    assert market_stripe.balance_credits(seller) == []
    assert MarketPayout.objects.count() == 1
    assert money("seller_available", organization=seller) == 112

    # when: finance found the deleted customer never used the credit, and retry it
    assert payouts_retry(payout_ids=[payout.pk], note="no credit found") == {
        payout.pk: PayoutStatus.SENT
    }

    # then: the 112 go to the new customer, once
    assert [(c["amount"], c["customer"]) for c in market_stripe.balance_credits(seller)] == [
        (-112, replacement)
    ]
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0
    assert payouts_run(now=timezone.now() + LATER) == 0


# --- finance finds at Stripe that a payout that may have paid did -------------------------------


def _may_have_paid(
    market_stripe, seller, buyer, *, before_the_run=lambda: None, after_the_sale=lambda order: None
):
    """`_credited_then_deleted`, replaced, and the payout run that failed it for finance
    (`before_the_run` done before it): returns the payout (failed, may_have_paid) and the
    credit Stripe made."""
    payout, credit, _gone = _credited_then_deleted(
        market_stripe, seller, buyer, replaced=True, after_the_sale=after_the_sale
    )
    before_the_run()
    assert payouts_run(now=timezone.now() + LATER) == 0
    payout.refresh_from_db()
    assert (payout.status, payout.may_have_paid) == (PayoutStatus.FAILED, True)
    return payout, credit


def _finance() -> Client:
    return staff_with("view_marketpayout", "change_marketpayout")


def _mark_paid(client: Client, payout_pk: int, **form):
    """The admin's "Mark paid at Stripe" on the payout: chosen on the list, or with `form`,
    its page's form sent; redirects followed."""
    sent = {"_mark_paid": "Mark paid at Stripe", **form} if form else {}
    return client.post(
        CHANGELIST,
        {"action": "mark_paid_at_stripe", helpers.ACTION_CHECKBOX_NAME: [payout_pk], **sent},
        follow=True,
    )


def _shown(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_finance_marks_a_payout_paid_at_stripe_once_they_found_its_credit(
    market_stripe, seller, buyer
):
    # given: a payout of 112 failed for finance: an earlier send may have credited the
    # seller's customer, deleted at Stripe since; finance found that credit in Stripe's
    # dashboard
    payout, credit = _may_have_paid(market_stripe, seller, buyer)
    finance = _finance()
    assert money("seller_available", organization=seller) == 112

    # when: they choose "Mark paid at Stripe" on it: a page asks for the balance
    # transaction and a note
    page = _mark_paid(finance, payout.pk)
    assert page.status_code == 200
    assert b'id="mark-paid-form"' in page.content and payout.destination.encode() in page.content
    # and they send it
    response = _mark_paid(
        finance, payout.pk, evidence=credit["id"], note="Credit found; the seller used it."
    )

    # then: the payout is sent, to the deleted customer, Stripe's credit as its object
    assert f"Payout {payout.pk} recorded as paid at Stripe" in " ".join(_shown(response))
    payout.refresh_from_db()
    assert (payout.status, payout.destination, payout.stripe_object_id) == (
        PayoutStatus.SENT,
        credit["customer"],
        credit["id"],
    )
    # and the ledger says the 112 were paid out, its sale paid by it: nothing left to pay
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0
    [fill] = MarketFill.objects.filter(seller=seller)
    assert (fill.proceeds, fill.payout_id) == (ProceedsState.PAID_OUT, payout.pk)
    # and the seller's audit log says who, why, and what Stripe showed
    [event] = AuditEvent.objects.filter(organization=seller, action="market.payout_marked_paid")
    assert event.actor_user.has_perm("gymbilling.change_marketpayout")
    assert event.data == {
        "payout": payout.pk,
        "amount": 112,
        "currency": "usd",
        "destination": credit["customer"],
        "evidence": credit["id"],
        "lost": 0,
        "note": "Credit found; the seller used it.",
    }
    # and the seller's payouts are held no more: the next sale is paid to the new
    # customer, and nothing of the first is paid again
    assert not finance.get(CHANGELIST, {"holding": "yes"}).context["cl"].result_list
    assert payouts_retry(payout_ids=[payout.pk]) == {}
    sold(market_stripe, seller, buyer)
    assert payouts_run(now=timezone.now() + LATER) == 1
    assert [-c["amount"] for c in market_stripe.balance_credits(seller)] == [112]
    assert money("payouts") == 224
    assert money("seller_available", organization=seller) == 0


def test_mark_paid_at_stripe_is_refused_for_a_payout_no_send_may_have_paid(
    market_stripe, seller, buyer
):
    # given: a payout Stripe refused at once (a customer id it never knew): nothing of it
    # reached the seller
    sold(market_stripe, seller, buyer)
    BillingCustomer.objects.filter(organization=seller).update(stripe_customer_id="cus_unknown")
    assert payouts_run(now=timezone.now() + LATER) == 0
    [refused] = MarketPayout.objects.all()
    finance = _finance()

    # when: finance chooses "Mark paid at Stripe" on it, and sends a form for it anyway
    chosen = _mark_paid(finance, refused.pk)
    sent = _mark_paid(finance, refused.pk, evidence="cbtxn_123", note="paid")

    # then: refused, back on the list, saying why; nothing changed
    for response in (chosen, sent):
        assert response.redirect_chain == [(CHANGELIST, 302)]
        [shown] = _shown(response)
        assert "payout_not_markable" in shown and "Retry it" in shown, shown
    refused.refresh_from_db()
    assert (refused.status, refused.stripe_object_id) == (PayoutStatus.FAILED, "")
    assert money("payouts") == 0
    assert money("seller_available", organization=seller) == 112
    assert not AuditEvent.objects.filter(action="market.payout_marked_paid").exists()


# --- marked paid after refunds and disputes reached its sale -------------------------------
#
# The sale of 124 (fee 12, the seller's 112) that the payout of 112 paid; half of it (62:
# fee 6, the seller's 56) refunded or disputed while the payout was being sent or since
# Stripe refused it. Marked paid, the ledger must say what it would had the send that
# credited the seller been answered: the 112 paid out, the sale paid out by the payout,
# and the seller's 56 that the refund or dispute gave back to the buyer a loss, as for any
# sale refunded after its payout.


def _marked_paid(payout, credit) -> str:
    """Finance marks the payout paid at Stripe with its credit, on the admin's page; what
    the list then says."""
    response = _mark_paid(_finance(), payout.pk, evidence=credit["id"], note="credit found")
    return " ".join(_shown(response))


def _paid_as_if_answered(payout, credit, seller, *, lost: int) -> MarketFill:
    """The payout sent with its credit, its 112 paid out of the seller's proceeds, `lost` of
    them a loss, its sale paid out by it, the ledger reconciled; returns the sale's fill."""
    payout.refresh_from_db()
    assert (payout.status, payout.stripe_object_id) == (PayoutStatus.SENT, credit["id"])
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0
    assert money("losses") == -lost
    [fill] = MarketFill.objects.filter(seller=seller)
    assert (fill.proceeds, fill.payout_id, fill.seller_reversed) == (
        ProceedsState.PAID_OUT,
        payout.pk,
        0,
    )
    [event] = AuditEvent.objects.filter(organization=seller, action="market.payout_marked_paid")
    assert (event.data["evidence"], event.data["lost"]) == (credit["id"], lost)
    report = ledger_reconcile()
    assert report.ok, report.violations
    return fill


def _nothing_paid_again(market_stripe, seller) -> None:
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert market_stripe.balance_credits(seller) == []
    assert MarketPayout.objects.count() == 1
    assert money("payouts") == 112


@pytest.mark.parametrize(("refunded", "fee_back", "seller_share"), [(62, 6, 56), (124, 12, 112)])
def test_mark_paid_at_stripe_of_a_payout_whose_sale_was_refunded_since_books_the_refund_a_loss(
    market_stripe, seller, buyer, refunded, fee_back, seller_share
):
    # given: a payout of 112 that may have paid the seller; since Stripe refused it, half or
    # all of its sale refunded, the seller's share of it taken from their available
    # proceeds (all of it: the payout run finds the sale owes nothing, and closes it)
    payout, credit = _may_have_paid(market_stripe, seller, buyer)
    order = MarketFill.objects.get(seller=seller).order
    refund(order, refunded)
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert money("seller_available", organization=seller) == 112 - seller_share
    assert money("losses") == 0
    closed = MarketFill.objects.filter(seller=seller, proceeds=ProceedsState.PAID_OUT)
    assert list(closed.values_list("payout", flat=True)) == ([None] if refunded == 124 else [])

    # when: finance marks it paid at Stripe
    shown = _marked_paid(payout, credit)

    # then: the 112 paid out, the refund's share of the seller's a loss (refunded after the
    # payout), and the seller's available proceeds 0, not below
    assert f"Payout {payout.pk} recorded as paid at Stripe" in shown, shown
    _paid_as_if_answered(payout, credit, seller, lost=seller_share)
    [reversal] = MarketReversal.objects.filter(order=order)
    assert (reversal.amount, reversal.fee_reversed, reversal.seller_reversed, reversal.loss) == (
        refunded,
        fee_back,
        0,
        seller_share,
    )
    # and nothing of the sale is paid again
    _nothing_paid_again(market_stripe, seller)


def test_mark_paid_at_stripe_of_a_payout_whose_sale_was_disputed_since_books_the_dispute_a_loss(
    market_stripe, seller, buyer, deliver
):
    # given: a payout of 112 that may have paid the seller; since Stripe refused it, half its
    # sale disputed, the seller's 56 of it taken from their available proceeds
    payout, credit = _may_have_paid(market_stripe, seller, buyer)
    order = MarketFill.objects.get(seller=seller).order
    dispute = dispute_at_stripe(market_stripe, order, amount=62)
    deliver()
    assert money("seller_available", organization=seller) == 56

    # when: finance marks it paid at Stripe
    shown = _marked_paid(payout, credit)

    # then: as if the dispute had come after the payout: the seller's 56 a loss
    assert f"Payout {payout.pk} recorded as paid at Stripe" in shown, shown
    _paid_as_if_answered(payout, credit, seller, lost=56)
    reversal = MarketReversal.objects.get(key=f"dispute:{dispute}")
    assert (reversal.seller_reversed, reversal.loss) == (0, 56)

    # when: the gym wins the dispute
    market_stripe.standin.close_dispute(dispute, status="won")
    deliver()

    # then: the loss comes back to the platform, not to the seller's proceeds (the payout
    # paid them all): the sale stays paid out by it, and nothing is paid again
    assert money("losses") == 0
    assert money("seller_available", organization=seller) == 0
    fill = MarketFill.objects.get(seller=seller)
    assert (fill.proceeds, fill.payout_id, fill.seller_reversed, fill.refunded) == (
        ProceedsState.PAID_OUT,
        payout.pk,
        0,
        0,
    )
    _nothing_paid_again(market_stripe, seller)
    assert ledger_reconcile().ok


def test_mark_paid_at_stripe_of_a_payout_whose_refusal_recovered_a_loss_books_it_lost_again(
    market_stripe, seller, buyer
):
    # given: a payout of 112 that may have paid the seller, half its sale refunded while it
    # was being sent (booked as a loss), which its refusal took back from the seller's
    # proceeds
    def half_refunded():
        refund(MarketFill.objects.get(seller=seller).order, 62)
        assert money("losses") == -56

    payout, credit = _may_have_paid(market_stripe, seller, buyer, before_the_run=half_refunded)
    [fill] = MarketFill.objects.filter(seller=seller)
    [reversal] = MarketReversal.objects.filter(order=fill.order)
    assert reversal.recovered_by_fill == {str(fill.pk): 56}
    assert (money("seller_available", organization=seller), money("losses")) == (56, 0)

    # when: finance marks it paid at Stripe
    shown = _marked_paid(payout, credit)

    # then: the refund's 56 a loss again, as it was booked while the payout was sent, and
    # nothing recovered from the seller
    assert f"Payout {payout.pk} recorded as paid at Stripe" in shown, shown
    _paid_as_if_answered(payout, credit, seller, lost=56)
    reversal.refresh_from_db()
    assert (reversal.seller_reversed, reversal.loss, reversal.recovered_by_fill) == (0, 56, {})
    _nothing_paid_again(market_stripe, seller)


def test_mark_paid_at_stripe_of_a_payout_refused_before_its_sales_were_recorded_says_what_to_do(
    market_stripe, seller, buyer
):
    # given: a payout that may have paid the seller, refused by the release before
    # gymbilling/0040: its sale does not say the payout paid it
    payout, credit = _may_have_paid(market_stripe, seller, buyer)
    MarketFill.objects.filter(refused_payout=payout).update(refused_payout=None)

    # when: finance marks it paid at Stripe
    shown = _marked_paid(payout, credit)

    # then: refused, saying why and what to do instead; nothing changed, still held
    assert "payout_sales_unrecorded" in shown, shown
    assert "before gymbilling/0040" in shown and "Do not Retry it" in shown, shown
    assert credit["id"] in shown and "send engineering" in shown, shown
    payout.refresh_from_db()
    assert (payout.status, payout.stripe_object_id) == (PayoutStatus.FAILED, "")
    assert (money("payouts"), money("seller_available", organization=seller)) == (0, 112)
    assert not AuditEvent.objects.filter(action="market.payout_marked_paid").exists()
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert ledger_reconcile().ok


def test_mark_paid_at_stripe_is_refused_once_a_dispute_from_before_the_payout_was_won_since(
    market_stripe, seller, buyer, deliver
):
    """Paid, the payout would have left the sale paid out; the dispute won then reopens it
    for the share the dispute had taken before the payout (earlier payouts), which a later
    refund would take from differently: not booked here."""
    # given: a sale half disputed in its holding period (the seller's 56 taken back), its
    # other 56 in a payout that may have paid the seller; since Stripe refused it, the gym
    # won the dispute: the seller's 56 back to their available proceeds
    disputed = []

    def half_disputed(order):
        disputed.append(dispute_at_stripe(market_stripe, order, amount=62))
        deliver()

    payout, credit = _may_have_paid(market_stripe, seller, buyer, after_the_sale=half_disputed)
    assert payout.amount == 56
    market_stripe.standin.close_dispute(disputed[0], status="won")
    deliver()
    assert money("seller_available", organization=seller) == 112

    # when: finance marks it paid at Stripe
    shown = _marked_paid(payout, credit)

    # then: refused, saying why and what to do; nothing changed
    assert "payout_sales_changed" in shown and "was undone since" in shown, shown
    assert "Do not Retry it" in shown, shown
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.FAILED
    assert (money("payouts"), money("seller_available", organization=seller)) == (0, 112)
    assert not AuditEvent.objects.filter(action="market.payout_marked_paid").exists()


def test_mark_paid_at_stripe_needs_a_balance_transaction_and_a_note(market_stripe, seller, buyer):
    # given: a payout that may have paid the seller
    payout, credit = _may_have_paid(market_stripe, seller, buyer)
    finance = _finance()

    # when: finance sends the form with something else than a balance transaction's id,
    # then with no note
    wrong = _mark_paid(finance, payout.pk, evidence="ch_3PaidByCard", note="found it")
    bare = _mark_paid(finance, payout.pk, evidence=credit["id"], note="  ")

    # then: the page is drawn again with what is wrong; nothing changed
    assert b"starts with cbtxn_" in wrong.content
    assert wrong.context["form"].errors.keys() == {"evidence"}
    assert bare.context["form"].errors.keys() == {"note"}
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.FAILED
    assert money("seller_available", organization=seller) == 112
    assert not AuditEvent.objects.filter(action="market.payout_marked_paid").exists()
    # and staff who may only view payouts are not offered it
    assert "mark_paid_at_stripe" not in offered_actions(staff_with("view_marketpayout"), CHANGELIST)


def test_a_retry_of_one_payout_that_may_have_paid_leaves_another_held_and_markable(
    market_stripe, seller, buyer
):
    # given: two payouts of 112 (two sales) to the seller's customer, each sent once and
    # credited there, their answers lost; the customer deleted at Stripe since and
    # replaced; the payout run failed both for finance
    for _ in range(2):
        sold(market_stripe, seller, buyer)
        market_stripe.down = True
        assert payouts_run(now=timezone.now() + LATER) == 0
        market_stripe.down = False
    first, second = MarketPayout.objects.order_by("pk")
    gone = _seller_customer(seller)
    _payout_create_at_stripe(first)
    credit = _payout_create_at_stripe(second)
    market_stripe.standin.expire_idempotency_keys()
    market_stripe.delete_customer(gone.stripe_customer_id)
    replacement = billing_customer_replace(customer=gone).stripe_customer_id
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert set(MarketPayout.objects.values_list("status", "may_have_paid")) == {
        (PayoutStatus.FAILED, True)
    }
    assert money("seller_available", organization=seller) == 224

    # when: finance found the first's credit unused, and retry it
    results = payouts_retry(payout_ids=[first.pk], note="its credit was never used")

    # then: the second still holds the seller's payouts: nothing is paid yet
    assert results == {first.pk: f"held by payout {second.pk}"}
    second.refresh_from_db()
    assert (second.status, second.retry_allowed_at) == (PayoutStatus.FAILED, None)
    assert market_stripe.balance_credits(seller) == []
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert money("seller_available", organization=seller) == 224

    # when: finance found the second's credit used, and mark it paid; the payout run comes
    payout_mark_paid(payout_id=second.pk, note="credit used", evidence=credit["id"], actor=None)
    assert payouts_run(now=timezone.now() + LATER) == 1

    # then: each sale paid once: the second's by its credit to the deleted customer, the
    # first's to the new customer
    second.refresh_from_db()
    assert (second.status, second.stripe_object_id) == (PayoutStatus.SENT, credit["id"])
    assert [(c["amount"], c["customer"]) for c in market_stripe.balance_credits(seller)] == [
        (-112, replacement)
    ]
    assert money("payouts") == 224
    assert money("seller_available", organization=seller) == 0
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert ledger_reconcile().ok


def test_a_retry_for_a_frozen_seller_leaves_the_payout_as_it_was(market_stripe, seller, buyer):
    # given: a payout that may have paid the seller, who is frozen by a dispute
    payout, credit = _may_have_paid(market_stripe, seller, buyer)
    resale_freeze(organization=seller, reason="dispute du_1")

    # when: finance retries it
    results = payouts_retry(payout_ids=[payout.pk], note="no credit found")

    # then: frozen, and nothing changed: it still holds, and can still be marked paid
    assert results == {payout.pk: "frozen"}
    payout.refresh_from_db()
    assert (payout.status, payout.retry_allowed_at) == (PayoutStatus.FAILED, None)
    payout_mark_paid(payout_id=payout.pk, note="credit used", evidence=credit["id"], actor=None)
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.SENT
    # and once the freeze is lifted, the run pays nothing of that sale again
    BillingCustomer.objects.filter(organization=seller).update(resale_frozen_at=None)
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert market_stripe.balance_credits(seller) == []
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0


def _retry(client: Client, *payout_pks: int, **form):
    """The admin's "Retry" on the payouts: chosen on the list, or with `form`, its page's
    form sent; redirects followed."""
    sent = {"_retry": "Retry", **form} if form else {}
    return client.post(
        CHANGELIST,
        {"action": "retry_payouts", helpers.ACTION_CHECKBOX_NAME: list(payout_pks), **sent},
        follow=True,
    )


def test_a_retry_of_a_payout_that_may_have_paid_asks_for_a_note_first(market_stripe, seller, buyer):
    # given: a payout of 112 failed for finance: an earlier send may have credited the
    # seller's customer, deleted at Stripe since
    payout, _credit = _may_have_paid(market_stripe, seller, buyer)
    replacement = _seller_customer(seller).stripe_customer_id
    finance = _finance()

    # when: finance choose Retry on it, then send its page's form with no note
    page = _retry(finance, payout.pk)
    bare = _retry(finance, payout.pk, note="  ")

    # then: a page asks for the note, shown again while it is blank; nothing is paid
    assert page.status_code == 200 and b'id="retry-form"' in page.content
    assert payout.destination.encode() in page.content
    assert bare.context["form"].errors.keys() == {"note"}
    payout.refresh_from_db()
    assert (payout.status, payout.retry_allowed_at) == (PayoutStatus.FAILED, None)
    assert market_stripe.balance_credits(seller) == []
    assert money("seller_available", organization=seller) == 112
    # and the service retries none without a note either
    [refused] = payouts_retry(payout_ids=[payout.pk]).values()
    assert refused.startswith("not retried: an earlier send may have paid the seller")

    # when: they send it with a note
    response = _retry(finance, payout.pk, note="No credit of it at Stripe; checked by Ann.")

    # then: the seller is paid to the new customer, once, and the audit log says who and why
    assert f"payout {payout.pk}: {PayoutStatus.SENT}" in " ".join(_shown(response))
    assert [(c["amount"], c["customer"]) for c in market_stripe.balance_credits(seller)] == [
        (-112, replacement)
    ]
    assert money("seller_available", organization=seller) == 0
    [event] = AuditEvent.objects.filter(organization=seller, action="market.payout_retried")
    assert event.actor_user.has_perm("gymbilling.change_marketpayout")
    assert event.data == {
        "payout": payout.pk,
        "amount": 112,
        "currency": "usd",
        "destination": payout.destination,
        "note": "No credit of it at Stripe; checked by Ann.",
    }


@pytest.mark.django_db(transaction=True)
def test_a_retry_sent_while_finance_marks_the_payout_paid_waits_and_pays_nothing_again(
    market_stripe, monkeypatch
):
    # given: a payout that may have paid the seller (its credit found at Stripe); finance
    # marks it paid, paused once the ledger has it paid, before it commits
    seller = market_member(credits_amount=credits(1000))
    buyer = market_member()
    payout, credit = _may_have_paid(market_stripe, seller, buyer)
    paused, resume = pause_after(monkeypatch, market_services, "_payout_book", thread="mark")
    errors: list = []

    def mark():
        payout_mark_paid(
            payout_id=payout.pk, note="credit found", evidence=credit["id"], actor=None
        )

    marking = threading.Thread(name="mark", target=on_own_connection, args=(mark, errors))
    marking.start()
    assert paused.wait(timeout=60)

    # when: another of finance retries it meanwhile
    retried: dict = {}
    retry = threading.Thread(
        name="retry",
        target=on_own_connection,
        args=(
            lambda: retried.update(payouts_retry(payout_ids=[payout.pk], note="unused")),
            errors,
        ),
    )
    run_against_paused(retry, paused=marking, resume=resume, what="the retry to wait")

    # then: the retry waited, and found it paid: nothing was paid again
    assert errors == []
    assert retried == {payout.pk: f"not retried: it is {PayoutStatus.SENT} now"}
    assert market_stripe.balance_credits(seller) == []  # the new customer got nothing
    assert MarketPayout.objects.get().status == PayoutStatus.SENT
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_marking_a_payout_paid_locks_the_reversals_it_books_lost_before_the_seller_s_money(
    market_stripe,
):
    # As the refusal does (test_market_reversal_lock_order): nothing today holds a money
    # account and then waits for a reversal row, so the documented order is what is asserted.
    # given: a payout of 112 that may have paid the seller, half its sale refunded since
    # Stripe refused it
    seller = market_member(credits_amount=credits(1000))
    buyer = market_member()
    payout, credit = _may_have_paid(market_stripe, seller, buyer)
    refund(MarketFill.objects.get(seller=seller).order, 62)
    reversal = MarketReversal.objects.get()

    # when: finance marks it paid, on a connection of its own while another holds the
    # seller's available proceeds account
    # then: while it waits for that account, it holds the reversal it books lost
    assert reversal_held_while_waiting_for_seller_money(
        seller,
        reversal,
        lambda: payout_mark_paid(
            payout_id=payout.pk, note="credit found", evidence=credit["id"], actor=None
        ),
        what="marking the payout paid to wait for the seller's money account",
    )

    # and once it has the account: paid, the refund's 56 of the seller's a loss
    assert MarketPayout.objects.get().status == PayoutStatus.SENT
    reversal.refresh_from_db()
    assert (reversal.seller_reversed, reversal.loss) == (0, 56)
    assert (money("payouts"), money("losses")) == (112, -56)
    assert money("seller_available", organization=seller) == 0
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_two_sends_of_a_payout_around_its_customer_s_replacement_pay_it_once(
    market_stripe, monkeypatch
):
    # given: a seller paid by balance credits, a payout of 112 recorded for their customer
    # and not sent yet; the customer then deleted at Stripe
    seller = market_member(credits_amount=credits(1000))
    buyer = market_member()
    sold(market_stripe, seller, buyer)
    payout = _recorded_not_sent(seller)
    gone = _seller_customer(seller)
    market_stripe.delete_customer(gone.stripe_customer_id)
    # A (the payout run) sends it: Stripe refuses the credit, the customer is deleted and
    # not replaced yet; A pauses once it has decided the payout waits for a replacement
    a_paused, resume_a = pause_after(
        monkeypatch,
        market_services.logger,
        "warning",
        thread="A",
        when=lambda message, *args: message.startswith("market payout %s of seller"),
    )
    # B (finance's Retry, a run that overran) would pause once Stripe credited a customer
    b_paused, resume_b = pause_after(
        monkeypatch, stripe_client, "customer_balance_credit", thread="B"
    )
    errors: list = []
    send = lambda: payout_send(payout_id=payout.pk)  # noqa: E731
    a = threading.Thread(name="A", target=on_own_connection, args=(send, errors))
    b = threading.Thread(name="B", target=on_own_connection, args=(send, errors))
    a.start()
    assert a_paused.wait(timeout=60)

    # when: the organization gets its new customer, and B sends the same payout meanwhile;
    # then A goes on, then B
    replacement = billing_customer_replace(customer=gone).stripe_customer_id
    b.start()
    wait_until(
        lambda: b_paused.is_set() or not b.is_alive() or lock_waiters() > 0,
        what="the second send to credit the new customer, end, or wait for the first",
    )
    resume_a.set()
    a.join(timeout=120)
    resume_b.set()
    b.join(timeout=120)
    assert not a.is_alive() and not b.is_alive() and errors == []
    # and the next payout run comes
    payouts_run(now=timezone.now() + LATER)

    # then: the new customer was credited the 112 once, and the ledger says so: paid out,
    # nothing left available to pay again
    assert [(c["amount"], c["customer"]) for c in market_stripe.balance_credits(seller)] == [
        (-112, replacement)
    ]
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0
    [paid] = MarketPayout.objects.filter(status=PayoutStatus.SENT)
    assert paid.destination == replacement
    assert ledger_reconcile().ok
