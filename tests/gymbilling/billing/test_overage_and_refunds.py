"""Overage reported to the Stripe meter once; refunds and disputes claw back what
is unspent, record the rest as a loss and freeze reselling; stripe_reconcile."""

from __future__ import annotations

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from accounts.errors import ApplicationError
from gymbilling import stripe_client
from gymbilling.models import (
    BillingCustomer,
    CheckoutSession,
    Invoice,
    OverageReport,
    PaymentReversal,
    Plan,
    StripeEvent,
    Subscription,
)
from gymbilling.reconcile import stripe_reconcile
from gymbilling.selectors import reversals_by_customer
from gymbilling.services import (
    overage_report,
    payment_reversals_pending_settle,
    stripe_event_process,
)
from gymbilling.services.events import invoice_refresh, subscription_refresh
from gymbilling.services.invoices import invoice_payment_intent_id, invoice_sync
from gymbilling.services.overage import meter_timestamp, overage_used, overage_used_at
from metering.models import MICRO, CreditLot, Hold, JournalTransaction, LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import credits_expire, hold_capture, hold_place, hold_release
from tests.factories import OrganizationFactory
from tests.helpers import ledger_rows

pytestmark = pytest.mark.django_db


def spend(org, credits: int, key: str) -> None:
    hold_place(organization=org, amount=credits, key=key)
    hold_capture(key=key, amount=credits)


def test_overage_is_reported_to_the_meter_once(customer, subscribed, stripe_standin):
    # given: Pro (12,000 credits a month, overage allowed) and 12,500.4 credits spent
    subscribed("pro")
    org = customer.organization
    spend(org, 12_500 * MICRO + 400_000, key="job-1")
    cus = BillingCustomer.objects.get(organization=org).stripe_customer_id

    # when: the report runs, twice
    assert overage_report() == 500
    assert overage_report() == 0

    # then: Stripe's meter has 500 whole credits, in one event; the 0.4 waits
    events = stripe_standin.meter_events(cus)
    assert [int(e["value"]) for e in events] == [500]
    # when: 0.6 more credit is used, the carried fraction makes one more credit
    spend(org, 600_000, key="job-2")
    assert overage_report() == 1
    assert sum(int(e["value"]) for e in stripe_standin.meter_events(cus)) == 501


def _adjust(admin_client, org, amount: str, key: str):
    return admin_client.post(
        f"/admin/metering/ledgeraccount/adjust/{org.pk}/",
        {"credits": amount, "reason": "Duplicate grant, ticket 7", "key": key},
    )


@pytest.mark.parametrize("plan_credits", ["spent", "held by a running job"])
def test_a_finance_debit_never_draws_on_the_overage_allowance(
    customer, subscribed, stripe_standin, admin_client, plan_credits
):
    # given: Pro (12,000 credits a month, overage allowed) with its 12,000 spent, or held
    # by a job still running: only the overage allowance is left in the wallet
    subscribed("pro")
    org = customer.organization
    if plan_credits == "spent":
        spend(org, 12_000 * MICRO, key="job-1")
    else:
        hold_place(organization=org, amount=12_000 * MICRO, key="job-1")
    allowance = CreditLot.objects.get(organization=org, source="overage")
    assert organization_balance(organization=org).available == allowance.amount
    rows = ledger_rows()

    # when: finance open the adjustment form, and remove 50 credits
    form = admin_client.get(f"/admin/metering/ledgeraccount/adjust/{org.pk}/")
    response = _adjust(admin_client, org, "-50", key="k1")

    # then: the form says nothing can be removed, and the debit is refused on the form,
    # moving nothing: the allowance is lent, not the member's
    assert b'id="available">0<' in form.content
    assert response.status_code == 200
    assert "insufficient_credits" in " ".join(response.context["form"].non_field_errors())
    assert ledger_rows() == rows
    allowance.refresh_from_db()
    assert allowance.remaining == allowance.amount

    # and: once the job ends (all it held used), the meter is told of no overage
    if plan_credits != "spent":
        hold_capture(key="job-1", amount=12_000 * MICRO)
    assert overage_report() == 0
    cus = BillingCustomer.objects.get(organization=org).stripe_customer_id
    assert stripe_standin.meter_events(cus) == []
    assert ledger_reconcile().ok


def test_a_finance_debit_burns_plan_credits_and_overage_counts_only_usage(
    customer, subscribed, stripe_standin, admin_client
):
    # given: Pro with 11,950 of its 12,000 credits spent: 50 plan credits left
    subscribed("pro")
    org = customer.organization
    spend(org, 11_950 * MICRO, key="job-1")
    allowance = CreditLot.objects.get(organization=org, source="overage")
    form = admin_client.get(f"/admin/metering/ledgeraccount/adjust/{org.pk}/")

    # when: finance remove those 50 credits, then 1 more
    removed = _adjust(admin_client, org, "-50", key="k1")
    rows = ledger_rows()
    refused = _adjust(admin_client, org, "-1", key="k2")

    # then: the form offered the 50; the debit took them from the plan's lot, not the
    # allowance; the second was refused and moved nothing
    assert b'id="available">50<' in form.content
    assert removed.status_code == 302
    assert refused.status_code == 200
    assert "insufficient_credits" in " ".join(refused.context["form"].non_field_errors())
    assert ledger_rows() == rows
    plan_lot = CreditLot.objects.get(organization=org, source="subscription")
    allowance.refresh_from_db()
    assert (plan_lot.remaining, allowance.remaining) == (0, allowance.amount)

    # when: the overage report runs, then a job uses 7 credits and it runs again
    first = overage_report()
    spend(org, 7 * MICRO, key="job-2")
    second = overage_report()

    # then: the debit was not overage; the job's 7 credits are, reported once
    cus = BillingCustomer.objects.get(organization=org).stripe_customer_id
    assert (first, second) == (0, 7)
    assert [int(e["value"]) for e in stripe_standin.meter_events(cus)] == [7]
    assert ledger_reconcile().ok


def test_overage_is_stamped_with_when_it_was_used_not_when_it_was_reported(
    customer, subscribed, stripe_standin
):
    # given: 10 credits of overage used a minute before T (a period's end, say)
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    used_at = timezone.now()
    period_end = used_at + timedelta(minutes=1)

    # when: the report runs a minute after T
    assert overage_report(now=period_end + timedelta(minutes=1)) == 10

    # then: Stripe's meter event is stamped inside the period, at the usage
    cus = BillingCustomer.objects.get(organization=org).stripe_customer_id
    [event] = stripe_standin.meter_events(cus)
    assert used_at.timestamp() - 5 <= int(event["timestamp"]) <= period_end.timestamp()


def test_overage_stamps_stay_in_their_period_and_in_stripe_s_window(
    customer, subscribed, stripe_standin
):
    # given: a period's overage allowance, and a job held in it that settles after its end
    subscribed("pro")
    org = customer.organization
    spend(org, 12_000 * MICRO, key="job-1")
    hold_place(organization=org, amount=10 * MICRO, key="job-2")
    allowance = CreditLot.objects.get(organization=org, source="overage")
    period_end = timezone.now() - timedelta(seconds=30)  # as if the period ended meanwhile
    allowance.expires_at = period_end

    # when: the job settles
    hold_capture(key="job-2", amount=10 * MICRO)

    # then: its usage is the period's, stamped at the period's last second
    assert overage_used_at(allowance) == period_end - timedelta(seconds=1)
    # and a batch older than Stripe takes (35 days) is stamped as old as it takes
    now = period_end + timedelta(days=40)
    assert meter_timestamp(used_at=period_end, now=now) == int(
        (now - timedelta(days=35) + timedelta(hours=1)).timestamp()
    )


def test_an_overage_batch_lost_in_a_crash_is_resent_with_the_same_identifier(
    customer, subscribed, stripe_standin
):
    # given: a batch reported, then (as after a crash before sent_at was saved) marked unsent
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    overage_report()
    OverageReport.objects.update(sent_at=None)

    # when: the next run resends it
    assert overage_report() == 10

    # then: Stripe refused the duplicate identifier; the meter still counts 10
    cus = BillingCustomer.objects.get(organization=org).stripe_customer_id
    assert sum(int(e["value"]) for e in stripe_standin.meter_events(cus)) == 10
    assert OverageReport.objects.get().sent_at is not None


def test_a_report_for_a_customer_stripe_never_knew_waits_without_holding_back_the_others(
    customer, subscribed, stripe_standin
):
    # given: a batch of a subscription whose customer Stripe never knew (404: a key of
    # another account or mode, say), written before a good one
    from tests.factories import OrganizationFactory

    subscribed("pro")
    org = customer.organization
    gone = OrganizationFactory()
    BillingCustomer.objects.create(organization=gone, stripe_customer_id="cus_unknown_to_stripe")
    now = timezone.now()
    stuck = OverageReport.objects.create(
        identifier="ovg_gone_1",
        organization=gone,
        subscription=Subscription.objects.create(
            organization=gone,
            stripe_subscription_id="sub_of_the_deleted_customer",
            stripe_customer_id="cus_unknown_to_stripe",
            plan=Plan.objects.get(code="pro"),
            status="canceled",
            current_period_start=now - timedelta(days=30),
            current_period_end=now,
        ),
        lot_id=0,
        credits=3,
    )
    spend(org, 12_004 * MICRO, key="job-1")

    # when: the report runs
    assert overage_report() == 4

    # then: the good batch reached the meter; the other waits, unsent and not failed, to
    # be sent once the key is put right (only a customer Stripe deleted fails a batch for
    # good: tests/gymbilling/billing/test_customer_deleted.py), and waits again next run
    cus = BillingCustomer.objects.get(organization=org).stripe_customer_id
    assert [int(e["value"]) for e in stripe_standin.meter_events(cus)] == [4]
    stuck.refresh_from_db()
    assert (stuck.sent_at, stuck.failed_at, stuck.error) == (None, None, "")
    assert overage_report() == 0
    stuck.refresh_from_db()
    assert (stuck.sent_at, stuck.failed_at) == (None, None)


@pytest.mark.parametrize("end_first", [False, True], ids=["paid, then ended", "end first"])
def test_a_subscription_ended_mid_period_ends_its_overage_allowance(
    customer, catalog, stripe_standin, stripe_sdk, deliver, end_first
):
    # given: Pro (overage allowed), paid: its month's credits and its overage allowance
    org = customer.organization
    pro = Plan.objects.get(code="pro")
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    session = stripe_standin.pay_checkout(response.json()["session_id"])
    if not end_first:
        deliver()
        assert organization_balance(organization=org).available == (
            pro.monthly_credits + pro.fair_use_ceiling
        )

    # when: the subscription is canceled now, mid-period (Stripe invoices no usage after
    # it), its deletion applied after its payment, or before it (events come in any
    # order), then invoice.paid alone (an endpoint may listen to nothing more)
    ended = stripe_sdk.v1.subscriptions.cancel(session["subscription"])
    if end_first:
        subscription_refresh(subscription_id=ended.id)
        invoice_refresh(invoice_id=ended.latest_invoice)
    else:
        deliver()

    # then: the credits paid for stay; the allowance, which only a live subscription's
    # meter would invoice, is gone, so no work can run on it unbilled
    assert organization_balance(organization=org).available == pro.monthly_credits
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=org, amount=pro.monthly_credits + 1, key="job-after-the-end")
    assert refused.value.code == "insufficient_credits"
    assert ledger_reconcile().ok


@pytest.mark.parametrize("used", [0, 30], ids=["job released", "job used less than it held"])
def test_allowance_running_work_held_at_the_end_is_not_spendable_after_it(
    customer, catalog, stripe_standin, stripe_sdk, deliver, used
):
    # given: Pro paid (month's credits + overage allowance), the month's credits spent, and a
    # job running on the allowance (its worst case held: a big max_tokens)
    org = customer.organization
    pro = Plan.objects.get(code="pro")
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    session = stripe_standin.pay_checkout(response.json()["session_id"])
    deliver()
    spend(org, pro.monthly_credits, key="spent")
    hold_place(organization=org, amount=100 * MICRO, key="running")

    # when: the subscription is canceled at once, mid-period; then the job ends early,
    # having used `used` credits of the 100 it held
    stripe_sdk.v1.subscriptions.cancel(session["subscription"])
    deliver()
    if used:
        hold_capture(key="running", amount=used * MICRO)
    else:
        hold_release(key="running")

    # then: what the job gave back is not available, and no new work can run on it unbilled
    assert organization_balance(organization=org).available == 0
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=org, amount=1 * MICRO, key="after-the-end")
    assert refused.value.code == "insufficient_credits"
    # and what the job used is the allowance's overage, reported to the meter; the
    # minute's sweep expires the rest of the allowance
    credits_expire(now=timezone.now())
    allowance = CreditLot.objects.get(organization=org, source="overage")
    assert (allowance.remaining, overage_used(allowance)) == (0, used * MICRO)
    assert overage_report() == used
    if used:
        # burned after the allowance ended, stamped before its end
        assert Hold.objects.get(key="running").settled_at > allowance.expires_at
        assert overage_used_at(allowance) < allowance.expires_at
    assert ledger_reconcile().ok


def test_a_refunded_pack_takes_back_what_is_unspent_and_records_the_loss(
    customer, catalog, stripe_standin, stripe_sdk, deliver
):
    # given: a 1,000-credit pack bought, 300 credits spent
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    deliver()
    spend(org, 300 * MICRO, key="job-1")
    checkout = CheckoutSession.objects.get()

    # when: the whole payment is refunded at Stripe
    stripe_sdk.v1.refunds.create(params={"payment_intent": checkout.stripe_payment_intent_id})
    deliver()

    # then: 700 credits taken back, 300 recorded as lost, reselling frozen
    reversal = PaymentReversal.objects.get()
    assert (reversal.kind, reversal.credits_clawed_back, reversal.credits_lost) == (
        "refund",
        700 * MICRO,
        300 * MICRO,
    )
    assert organization_balance(organization=org).available == 0
    assert BillingCustomer.objects.get(organization=org).resale_frozen_at is not None


def test_a_partial_refund_takes_back_its_share_once(
    customer, catalog, stripe_standin, stripe_sdk, deliver
):
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    deliver()
    checkout = CheckoutSession.objects.get()

    # when: a quarter of $12.00 is refunded; finance lifts the resale freeze;
    # then the event is delivered again
    stripe_sdk.v1.refunds.create(
        params={"payment_intent": checkout.stripe_payment_intent_id, "amount": 300}
    )
    deliver()
    BillingCustomer.objects.filter(organization=org).update(resale_frozen_at=None)

    refunded = StripeEvent.objects.get(type="charge.refunded")
    assert stripe_event_process(event_pk=refunded.pk, force=True) == "processed"

    # then: a quarter of the credits is taken back, once, and the replay did
    # not freeze reselling again
    assert PaymentReversal.objects.get().credits_clawed_back == 250 * MICRO
    assert organization_balance(organization=org).available == 750 * MICRO
    assert BillingCustomer.objects.get(organization=org).resale_frozen_at is None


def test_two_partial_refunds_record_what_each_returned(customer, buy, stripe_sdk, deliver):
    # given: a pack bought for $12.00
    org = customer.organization
    buy(org, pack="boost-1k")
    checkout = CheckoutSession.objects.get()

    # when: $3.00 is refunded, then $3.00 more, each applied as its webhook arrives
    for _ in range(2):
        stripe_sdk.v1.refunds.create(
            params={"payment_intent": checkout.stripe_payment_intent_id, "amount": 300}
        )
        deliver()

    # then: half the credits are back, and the reversals say $6.00 was refunded, not $9.00
    assert organization_balance(organization=org).available == 500 * MICRO
    reversals = PaymentReversal.objects.order_by("pk")
    assert [r.amount for r in reversals] == [300, 300]
    now = timezone.now()
    (row,) = reversals_by_customer(start=now - timedelta(days=1), end=now + timedelta(days=1))
    assert (row["refunded"], row["credits_clawed_back"]) == (600, 500 * MICRO)


def test_a_disputed_subscription_payment_claws_back_and_freezes_resale(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Basic, 2,000 credits, 500 spent
    sub = subscribed("basic")
    org = customer.organization
    spend(org, 500 * MICRO, key="job-1")
    invoice = sub.invoices.get()
    intent = stripe_sdk.v1.payment_intents.retrieve(invoice.stripe_payment_intent_id)
    charge = (
        intent.latest_charge if isinstance(intent.latest_charge, str) else intent.latest_charge.id
    )

    # when: the cardholder disputes the charge
    stripe_standin.dispute(charge)
    deliver()

    # then
    reversal = PaymentReversal.objects.get(kind="dispute")
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (1_500 * MICRO, 500 * MICRO)
    assert BillingCustomer.objects.get(organization=org).resale_frozen_at is not None
    # the paid invoice keeps its one grant: reconcile still agrees with Stripe
    assert stripe_reconcile().ok


def test_stripe_reconcile_reports_a_paid_invoice_without_a_grant(
    customer, subscribed, stripe_standin
):
    # given: a reconciled subscription, then a renewal whose webhooks never arrived
    sub = subscribed("basic")
    out = io.StringIO()
    call_command("stripe_reconcile", stdout=out)
    assert "0 mismatches" in out.getvalue()
    stripe_standin.advance(sub.stripe_subscription_id)

    # when
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_:
        call_command("stripe_reconcile", stdout=out)

    # then
    assert exit_.value.code == 1
    assert "MISMATCH paid invoice" in out.getvalue() and "0 grants, expected 1" in out.getvalue()
    assert (
        JournalTransaction.objects.filter(idempotency_key__startswith="grant:invoice:").count() == 1
    )
    assert (
        CreditLot.objects.filter(organization=customer.organization, source="subscription").count()
        == 1
    )


def test_ledger_reconcile_reports_a_paid_subscription_invoice_mirrored_without_its_subscription(
    customer, catalog, stripe_standin, deliver
):
    # given: Basic paid at Stripe, its first invoice mirrored with no subscription
    # (as when subscription_sync refused the subscription) and so granted nothing
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    session = stripe_client.checkout_session_retrieve(response.json()["session_id"])
    stripe_sub = stripe_client.subscription_retrieve(session["subscription"])
    stripe_invoice = stripe_client.invoice_retrieve(stripe_sub["latest_invoice"])
    invoice_sync(invoice=stripe_invoice, subscription=None)

    # when
    report = ledger_reconcile()

    # then: the invoice is reported as paid and never granted
    flagged = [v for v in report.violations if v.check == "paid_invoice_granted"]
    assert [row["stripe_invoice_id"] for v in flagged for row in v.rows] == [stripe_invoice["id"]]

    # when: its events are processed, the subscription with them
    assert "failed" not in deliver()

    # then: granted once, and reconcile agrees
    assert Invoice.objects.get(stripe_invoice_id=stripe_invoice["id"]).credits_granted == (
        2_000 * MICRO
    )
    assert ledger_reconcile().ok


def test_a_refund_reaches_credits_that_were_listed_and_stops_the_listing(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    """Listed credits live in escrow lots: the refund first ends the listings."""
    from gymbilling.market.services import listing_create
    from gymbilling.models import MarketListing

    # given: Basic (2,000 credits), 1,500 of them listed on the marketplace
    sub = subscribed("basic")
    org = customer.organization
    listing = listing_create(seller=org, quantity=1_500 * MICRO, price_per_1k=500, currency="usd")
    invoice = sub.invoices.get()

    # when: the subscription payment is refunded in full
    stripe_sdk.v1.refunds.create(params={"payment_intent": invoice.stripe_payment_intent_id})
    deliver()

    # then: the listing ended, and all 2,000 credits were taken back, none lost
    assert MarketListing.objects.get(pk=listing.pk).status == "canceled"
    reversal = PaymentReversal.objects.get()
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (2_000 * MICRO, 0)
    assert organization_balance(organization=org).available == 0
    assert organization_balance(organization=org).escrowed == 0


def test_a_refund_reaches_credits_that_came_back_from_an_abandoned_marketplace_order(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    """Each move through escrow splits a lot from its parent: a reservation
    that is released and a listing withdrawn make great-great-grandchildren."""
    from gymbilling.market.services import (
        listing_cancel,
        listing_create,
        order_release,
        order_reserve,
    )
    from tests.factories import OrganizationFactory

    # given: Basic (2,000 credits), 1,500 listed, 1,000 of them reserved by a
    # buyer who never paid (released back to the listing), then the listing
    # canceled (back to the wallet)
    sub = subscribed("basic")
    org = customer.organization
    listing = listing_create(seller=org, quantity=1_500 * MICRO, price_per_1k=500, currency="usd")
    order = order_reserve(
        buyer=OrganizationFactory(), quantity=1_000 * MICRO, max_price_per_1k=500, currency="usd"
    )
    assert order_release(order_id=order.pk, status="expired", code="checkout_expired")
    listing_cancel(seller=org, listing_id=listing.pk)
    assert organization_balance(organization=org).available == 2_000 * MICRO

    # when: the subscription payment is refunded in full
    invoice = sub.invoices.get()
    stripe_sdk.v1.refunds.create(params={"payment_intent": invoice.stripe_payment_intent_id})
    deliver()

    # then: all 2,000 credits were taken back, none recorded as lost
    reversal = PaymentReversal.objects.get()
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (2_000 * MICRO, 0)
    assert organization_balance(organization=org).available == 0


def test_credits_backing_a_running_job_are_not_clawed_back_from_under_it(
    customer, catalog, stripe_standin, stripe_sdk, deliver
):
    # given: a 1,000-credit pack, 400 of it held by a running job
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    deliver()
    hold_place(organization=org, amount=400 * MICRO, key="job-running")

    # when: the pack is refunded
    checkout = CheckoutSession.objects.get()
    stripe_sdk.v1.refunds.create(params={"payment_intent": checkout.stripe_payment_intent_id})
    deliver()

    # then: 600 come back now; the job's 400 are still there for its capture
    reversal = PaymentReversal.objects.get()
    assert reversal.credits_clawed_back == 600 * MICRO
    hold_capture(key="job-running", amount=400 * MICRO)
    assert organization_balance(organization=org).available == 0


def taken_pending_lost(reversal: PaymentReversal) -> tuple[int, int, int]:
    return (reversal.credits_clawed_back, reversal.credits_pending, reversal.credits_lost)


def refunded_pack_while_a_job_holds_it(customer, stripe_standin, stripe_sdk, deliver):
    """A 1,000-credit pack, all of it held by a running job, then refunded in full."""
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    deliver()
    hold_place(organization=org, amount=1_000 * MICRO, key="job-running")
    checkout = CheckoutSession.objects.get()
    stripe_sdk.v1.refunds.create(params={"payment_intent": checkout.stripe_payment_intent_id})
    deliver()
    return org


def test_refunded_credits_a_job_held_come_back_as_it_settles(
    customer, catalog, stripe_standin, stripe_sdk, deliver
):
    # given: a refunded pack whose every credit a running job holds
    org = refunded_pack_while_a_job_holds_it(customer, stripe_standin, stripe_sdk, deliver)

    # then: nothing could be taken yet, and nothing is called lost either
    reversal = PaymentReversal.objects.get()
    assert taken_pending_lost(reversal) == (0, 1_000 * MICRO, 0)

    # when: the job uses 400 and gives 600 back, and the minute's sweep runs
    hold_capture(key="job-running", amount=400 * MICRO)
    taken = payment_reversals_pending_settle()

    # then: the 600 are taken back and the 400 the job used are the loss;
    # the member keeps nothing of the refunded pack
    reversal.refresh_from_db()
    assert taken == 600 * MICRO
    assert taken_pending_lost(reversal) == (600 * MICRO, 0, 400 * MICRO)
    assert organization_balance(organization=org).total == 0
    assert payment_reversals_pending_settle() == 0


def wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


def refused_hold(org, credits: int, key: str) -> ApplicationError:
    """A hold the ledger must refuse; nothing of it written."""
    rows = ledger_rows()
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=org, amount=credits, key=key)
    assert ledger_rows() == rows
    assert (refused.value.code, refused.value.status) == ("insufficient_credits", 402)
    return refused.value


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_refunded_credits_a_job_gave_back_cannot_be_held_again_before_the_sweep_takes_them(
    customer, catalog, stripe_standin, stripe_sdk, deliver, grant, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the placement statement and post() agree
    # given: 200 credits of the member's own that never expire (burned after
    # the pack), then a refunded pack whose every credit a running job holds
    org = customer.organization
    grant(org, 200 * MICRO, source="promotion", paid=False, resellable=False, expires_at=None)
    refunded_pack_while_a_job_holds_it(customer, stripe_standin, stripe_sdk, deliver)
    reversal = PaymentReversal.objects.get()
    assert taken_pending_lost(reversal) == (0, 1_000 * MICRO, 0)

    # then: the wallet claims the 1,000 pending credits; while the job runs,
    # the member's own 200 are short of that claim too (it is conservative)
    assert wallet_claim(org) == 1_000 * MICRO
    assert refused_hold(org, 1 * MICRO, key="job-meanwhile").extra["available"] == 0

    # when: the job ends without using them: they are back in the wallet, set aside
    hold_release(key="job-running")
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (1_200 * MICRO, 1_000 * MICRO)
    assert balance.available == 200 * MICRO

    # then: before the sweep runs, no new hold can take them, only the 200
    assert refused_hold(org, 1_000 * MICRO, key="job-after").extra["available"] == 200 * MICRO
    refused_hold(org, 201 * MICRO, key="job-after")
    assert ledger_reconcile().ok

    # when: the sweep runs
    taken = payment_reversals_pending_settle()

    # then: all 1,000 came back, none lost, the claim is gone, and the
    # member's own 200 can be held and spent
    reversal.refresh_from_db()
    assert taken == 1_000 * MICRO
    assert taken_pending_lost(reversal) == (1_000 * MICRO, 0, 0)
    assert wallet_claim(org) == 0
    spend(org, 200 * MICRO, key="job-own")
    assert organization_balance(organization=org).total == 0
    assert payment_reversals_pending_settle() == 0


def test_work_started_after_a_refund_does_not_shelter_the_refunded_credits(
    customer, catalog, stripe_standin, stripe_sdk, deliver, grant
):
    # given: a refunded pack a running job held, 500 of the member's own
    # credits that never expire, and a job started after the refund, while the
    # first still ran, holding those 500
    org = customer.organization
    refunded_pack_while_a_job_holds_it(customer, stripe_standin, stripe_sdk, deliver)
    grant(org, 500 * MICRO, source="promotion", paid=False, resellable=False, expires_at=None)
    hold_release(key="job-running")
    hold_place(organization=org, amount=500 * MICRO, key="job-after")

    # when: the sweep runs, then the new job uses all it holds, and it runs again
    first = payment_reversals_pending_settle()
    hold_capture(key="job-after", amount=500 * MICRO)
    second = payment_reversals_pending_settle()

    # then: the whole pack came back at once (the new job sheltered none of
    # it: its capture burned the member's own credits), nothing lost
    reversal = PaymentReversal.objects.get()
    assert (first, second) == (1_000 * MICRO, 0)
    assert taken_pending_lost(reversal) == (1_000 * MICRO, 0, 0)
    assert organization_balance(organization=org).total == 0
    assert CreditLot.objects.get(organization=org, source="promotion").remaining == 0


def test_a_dispute_inquiry_moves_nothing(customer, subscribed, stripe_standin, stripe_sdk):
    from gymbilling.services.events import dispute_refresh

    # given: a paid Basic subscription, its credits granted, and an inquiry opened on its
    # charge (a question from the card's bank: no funds withdrawn)
    sub = subscribed("basic")
    org = customer.organization
    intent = stripe_sdk.v1.payment_intents.retrieve(sub.invoices.get().stripe_payment_intent_id)
    charge = (
        intent.latest_charge if isinstance(intent.latest_charge, str) else intent.latest_charge.id
    )
    dispute = stripe_standin.dispute(charge, status="warning_needs_response")
    rows, balance = ledger_rows(), organization_balance(organization=org)
    assert balance.available == Plan.objects.get(code="basic").monthly_credits

    # when: the dispute is applied
    applied = dispute_refresh(dispute_id=dispute["id"])

    # then: nothing is taken back: no reversal, no ledger row, the balance as it was
    assert applied is False
    assert not PaymentReversal.objects.exists()
    assert ledger_rows() == rows
    assert organization_balance(organization=org) == balance


# --- a refund or dispute processed before the payment that bought the credits -------------

# The types of the events that reverse a payment, processed before the payment's own.
REVERSALS_FIRST = ("charge.refunded", "charge.dispute.created")


def charge_of(payment_intent: str) -> str:
    charge = stripe_client.payment_intent_retrieve(payment_intent)["latest_charge"]
    return charge["id"] if isinstance(charge, dict) else charge


def reverse_at_stripe(stripe_standin, stripe_sdk, payment_intent: str, kind: str) -> None:
    """The whole payment refunded, or disputed, at Stripe."""
    if kind == "refund":
        stripe_sdk.v1.refunds.create(params={"payment_intent": payment_intent})
    else:
        stripe_standin.dispute(charge_of(payment_intent))


def paid_checkout_intent(session_id: str) -> str:
    """The PaymentIntent that paid a Checkout session: its own, or its first invoice's."""
    session = stripe_client.checkout_session_retrieve(session_id)
    if session.get("payment_intent"):
        return session["payment_intent"]
    stripe_sub = stripe_client.subscription_retrieve(session["subscription"])
    return invoice_payment_intent_id(stripe_client.invoice_retrieve(stripe_sub["latest_invoice"]))


@pytest.mark.parametrize("kind", ["refund", "dispute"])
@pytest.mark.parametrize(
    ("purchase", "source", "bought"),
    [
        ({"plan": "basic"}, "subscription", 2_000 * MICRO),
        ({"pack": "boost-1k"}, "pack", 1_000 * MICRO),
    ],
    ids=["invoice", "pack"],
)
def test_a_reversal_processed_before_the_payment_takes_back_what_it_bought(
    kind, purchase, source, bought, customer, catalog, stripe_standin, stripe_sdk, deliver
):
    # given: Basic (its first invoice) or a pack bought through Checkout and paid,
    # then refunded or disputed in full at Stripe before any webhook was processed
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", purchase, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    intent = paid_checkout_intent(response.json()["session_id"])
    reverse_at_stripe(stripe_standin, stripe_sdk, intent, kind)

    # when: the reversal's event is processed first (nothing bought yet: ignored),
    # then invoice.paid or checkout.session.completed
    assert "failed" not in deliver(first=REVERSALS_FIRST)

    # then: the payment granted once, and all of it was taken back on the spot
    assert [lot.amount for lot in CreditLot.objects.filter(organization=org, source=source)] == [
        bought
    ]
    reversal = PaymentReversal.objects.get()
    assert (reversal.kind, reversal.credits_clawed_back, reversal.credits_lost) == (kind, bought, 0)
    assert organization_balance(organization=org).available == 0
    assert BillingCustomer.objects.get(organization=org).resale_frozen_at is not None


@pytest.mark.parametrize("wrong", [0, 1_500 * MICRO], ids=["missing", "stuck"])
def test_claims_repair_sets_a_wallets_claim_to_what_is_pending(
    customer, catalog, stripe_standin, stripe_sdk, deliver, wrong
):
    # given a refund waiting on a running job (1,000 pending, claimed), and then a claim
    # that old code running beside the migration left wrong: none, or too much
    org = refunded_pack_while_a_job_holds_it(customer, stripe_standin, stripe_sdk, deliver)
    wallet = LedgerAccount.objects.filter(organization=org, kind="wallet")
    assert wallet.get().claimed == PaymentReversal.objects.get().credits_pending == 1_000 * MICRO
    wallet.update(claimed=wrong)
    assert [v.check for v in ledger_reconcile().violations] == ["wallet_claim_pending"]

    # when finance run the repair
    out = io.StringIO()
    call_command("claims_repair", stdout=out)

    # then the claim is what is pending again, and said so; a second run changes nothing
    assert wallet.get().claimed == 1_000 * MICRO
    assert f"organization {org.pk}: claim" in out.getvalue()
    assert ledger_reconcile().ok
    again = io.StringIO()
    call_command("claims_repair", stdout=again)
    assert again.getvalue().strip() == "0 wallets repaired"


def test_claims_repair_marks_the_lots_its_claim_covers_so_new_work_burns_them_last(
    customer, catalog, stripe_standin, stripe_sdk, deliver, grant
):
    # given: 200 credits of the member's own that never expire (burned after the pack),
    # and a refund waiting on a running job that holds the whole pack; then, as old code
    # beside the migration left it, neither the claim nor the lot's mark
    org = customer.organization
    grant(org, 200 * MICRO, source="promotion", paid=False, resellable=False, expires_at=None)
    refunded_pack_while_a_job_holds_it(customer, stripe_standin, stripe_sdk, deliver)
    reversal = PaymentReversal.objects.get()
    pack = CreditLot.objects.filter(organization=org, source="pack")
    LedgerAccount.objects.filter(organization=org, kind="wallet").update(claimed=0)
    pack.update(claimed_at=None)

    # when finance run the repair
    call_command("claims_repair", stdout=io.StringIO())

    # then the claim is back and the pack's lot is marked with the refund's time, as
    # the refund's own claim marked it
    assert wallet_claim(org) == 1_000 * MICRO
    assert pack.get().claimed_at == reversal.created_at

    # when: the job gives the pack back and, before the sweep, the member runs a job on
    # their own 200 (what the claim leaves them)
    hold_release(key="job-running")
    spend(org, 200 * MICRO, key="job-own")

    # then: it burned the member's own credits, not the pack's, and the sweep takes the
    # whole pack back: nothing lost, nothing claimed, no lot marked
    assert pack.get().remaining == 1_000 * MICRO
    assert payment_reversals_pending_settle() == 1_000 * MICRO
    reversal.refresh_from_db()
    assert taken_pending_lost(reversal) == (1_000 * MICRO, 0, 0)
    assert wallet_claim(org) == 0
    assert pack.get().claimed_at is None
    assert organization_balance(organization=org).total == 0


def test_claims_repair_of_a_claim_nothing_waits_for_unmarks_the_lots(
    customer, catalog, stripe_standin, stripe_sdk, deliver
):
    # given: a refund that waited on a running job and has settled, with a claim and a
    # lot mark that old code left behind (nothing is pending any more)
    org = refunded_pack_while_a_job_holds_it(customer, stripe_standin, stripe_sdk, deliver)
    hold_release(key="job-running")
    assert payment_reversals_pending_settle() == 1_000 * MICRO
    pack = CreditLot.objects.filter(organization=org, source="pack")
    LedgerAccount.objects.filter(organization=org, kind="wallet").update(claimed=300 * MICRO)
    pack.update(claimed_at=PaymentReversal.objects.get().created_at)

    # when finance run the repair
    call_command("claims_repair", stdout=io.StringIO())

    # then: nothing is claimed and no lot is marked, as when a claim settles in full
    assert wallet_claim(org) == 0
    assert pack.get().claimed_at is None


def test_one_reversal_the_sweep_cannot_settle_does_not_hold_back_the_others(
    customer, catalog, stripe_standin, stripe_sdk, deliver, caplog
):
    # given: a refunded pack a job held and has given back, and a pending reversal whose
    # payment bought nothing here (a broken row)
    org = refunded_pack_while_a_job_holds_it(customer, stripe_standin, stripe_sdk, deliver)
    hold_release(key="job-running")
    broken = PaymentReversal.objects.create(
        key="refund:ch_broken:1",
        kind="refund",
        organization=OrganizationFactory(),
        stripe_charge_id="ch_broken",
        stripe_payment_intent_id="pi_nothing_here",
        amount=100,
        currency="usd",
        credits_bought=MICRO,
        credits_pending=MICRO,
    )

    # when: the sweep runs
    taken = payment_reversals_pending_settle()

    # then: the broken one is logged and left pending; the pack's 1,000 came back anyway
    assert taken == 1_000 * MICRO
    assert PaymentReversal.objects.get(pk=broken.pk).credits_pending == MICRO
    assert f"payment reversal {broken.pk} failed" in caplog.text
    assert organization_balance(organization=org).total == 0


def test_a_refund_takes_back_credits_a_pending_marketplace_order_held_once_it_is_released(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    """Credits a buyer's pending order reserved are neither in the wallet nor spent when the
    payment that bought them is refunded: released, they come home, and go back."""
    from gymbilling.market.services import listing_create, order_release, order_reserve

    # given: Basic (2,000 credits), 1,500 listed, 1,000 of them reserved by a buyer's
    # order not paid yet; the payment is refunded in full: the refund takes the 1,000
    # at home and counts the reserved 1,000 lost
    sub = subscribed("basic")
    org = customer.organization
    listing_create(seller=org, quantity=1_500 * MICRO, price_per_1k=500, currency="usd")
    order = order_reserve(
        buyer=OrganizationFactory(), quantity=1_000 * MICRO, max_price_per_1k=500, currency="usd"
    )
    invoice = sub.invoices.get()
    stripe_sdk.v1.refunds.create(params={"payment_intent": invoice.stripe_payment_intent_id})
    deliver()
    reversal = PaymentReversal.objects.get()
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (1_000 * MICRO, 1_000 * MICRO)

    # when: the buyer never pays, and the reservation runs out
    assert order_release(order_id=order.pk, status="expired", code="reservation_timeout")

    # then: the 1,000 that came home went back too: the member keeps none of the
    # refunded credits, and none was lost
    reversal.refresh_from_db()
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (2_000 * MICRO, 0)
    assert organization_balance(organization=org).available == 0
    assert organization_balance(organization=org).escrowed == 0
    assert ledger_reconcile().ok
