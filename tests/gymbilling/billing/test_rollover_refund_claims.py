"""A refund of a period's payment and that period's rollover both waiting for the same plan
credits a running job holds: each credit is set aside once, whichever came first, and the
credits the job gives back are neither spent by new work nor kept over the cap.

Pro: 12,000 credits a month, 25% (3,000) roll over. The member's own 5,000 never expire,
so the job's hold is backed by the plan's lot; Stripe is the stand-in over HTTP.
"""

from __future__ import annotations

import pytest
from django.db.models import Sum
from django.utils import timezone

from accounts.errors import ApplicationError
from gymbilling.market.rollover import rollover_holds_settle
from gymbilling.models import CheckoutSession, Invoice, PaymentReversal, RolloverCarry
from gymbilling.reconcile import stripe_reconcile
from gymbilling.services import payment_reversals_pending_settle
from metering.models import MICRO, CreditLot, LedgerAccount, LotMovement
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place, hold_release, lot_clawback
from tests.factories import OrganizationFactory
from tests.gymbilling.market.conftest import market_member, sold
from tests.helpers import ledger_rows

pytestmark = pytest.mark.django_db

PLAN, OWN = 12_000 * MICRO, 5_000 * MICRO


def _wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


def _pro_with_a_job_holding_the_plan(customer, subscribed, grant):
    """Pro subscribed, the member's own 5,000 beside it, and a job ("job-running") holding
    all 12,000 of the period's credits; returns the subscription and the period's lot."""
    sub = subscribed("pro")
    org = customer.organization
    grant(org, OWN, source="promotion", paid=False, resellable=False, expires_at=None)
    hold_place(organization=org, amount=PLAN, key="job-running")
    [lot] = CreditLot.objects.filter(organization=org, source="subscription")
    return sub, lot


def _refund_first_period(sub, stripe_sdk, cents: int | None = None):
    """The first period's payment refunded at Stripe (`cents` of it, or all); returns the
    refund."""
    first = Invoice.objects.get(subscription=sub, billing_reason="subscription_create")
    params = {"payment_intent": first.stripe_payment_intent_id}
    if cents is not None:
        params["amount"] = cents
    return stripe_sdk.v1.refunds.create(params=params)


def _period_end_and_refund(first, sub, stripe_standin, stripe_sdk, deliver, cents=None):
    """The period ends and `cents` of its payment are refunded (all: None), `first` first."""
    steps = {
        "rollover": lambda: stripe_standin.advance(sub.stripe_subscription_id),
        "refund": lambda: _refund_first_period(sub, stripe_sdk, cents),
    }
    for step in (first, "refund" if first == "rollover" else "rollover"):
        steps[step]()
        assert "failed" not in deliver()


@pytest.mark.parametrize("first", ["rollover", "refund"])
def test_a_refund_and_a_rollover_set_aside_the_credits_a_job_holds_once(
    first, customer, subscribed, grant, stripe_standin, stripe_sdk, deliver
):
    # given: the job holds the period's 12,000 when the period ends (the trim leaves
    # them: 9,000 over the cap wait for the job) and the period's payment is refunded
    # in full (all 12,000 due back, waiting for the job), in either order
    sub, old_lot = _pro_with_a_job_holding_the_plan(customer, subscribed, grant)
    org = customer.organization
    _period_end_and_refund(first, sub, stripe_standin, stripe_sdk, deliver)
    refund = PaymentReversal.objects.get()
    assert (refund.credits_clawed_back, refund.credits_pending) == (0, PLAN)
    assert RolloverCarry.objects.get(organization=org).held_over == PLAN - 3_000 * MICRO

    # then: the old period's 12,000 are set aside once, for the refund; all else in the
    # wallet (the new period's, the member's own, the plan's overage allowance) is free
    balance = organization_balance(organization=org)
    assert balance.set_aside == PLAN
    assert balance.available == balance.wallet - PLAN
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: new work asks for all of that, gives it back, then spends 4,000
    wallet = balance.wallet
    hold_place(organization=org, amount=wallet - PLAN, key="job-all")
    hold_release(key="job-all")
    hold_place(organization=org, amount=4_000 * MICRO, key="job-new")
    hold_capture(key="job-new", amount=4_000 * MICRO)

    # and the old job fails, giving the 12,000 back, and the sweeps run (two beat
    # tasks: the rollover's may come first)
    hold_release(key="job-running")
    rollover_holds_settle(now=timezone.now())
    payment_reversals_pending_settle()
    rollover_holds_settle(now=timezone.now())

    # then: the refund took the old period's 12,000 back, nothing is set aside, and
    # the new work was paid from the new period's credits
    refund.refresh_from_db()
    assert (refund.credits_clawed_back, refund.credits_pending, refund.credits_lost) == (
        PLAN,
        0,
        0,
    )
    old_lot.refresh_from_db()
    assert old_lot.remaining == 0
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet - 4_000 * MICRO, 0)
    assert _wallet_claim(org) == 0
    assert ledger_reconcile().ok and stripe_reconcile().ok


def test_credits_resold_to_another_member_are_not_counted_as_the_refund_s(
    customer, subscribed, grant, stripe_standin, stripe_sdk, deliver, market_stripe
):
    # given: Pro, 2,000 of the period's credits sold on the marketplace to another member
    # (lots of the buyer's, split from the period's lot), the job holding the 10,000 left
    sub = subscribed("pro")
    org = customer.organization
    grant(org, OWN, source="promotion", paid=False, resellable=False, expires_at=None)
    buyer = market_member()
    sold(market_stripe, org, buyer, quantity=2_000 * MICRO, price=500)
    hold_place(organization=org, amount=PLAN - 2_000 * MICRO, key="job-running")

    # when: the period's payment is refunded in full, then the period ends
    _refund_first_period(sub, stripe_sdk)
    assert "failed" not in deliver()
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()

    # then: the refund waits for the 10,000 the job holds (the 2,000 sold are lost to it),
    # and the rollover's 7,000 over the cap are among them: set aside once, the refund's.
    # The buyer's 2,000 are no credits of this wallet that the refund could wait for.
    refund = PaymentReversal.objects.get()
    assert (refund.credits_clawed_back, refund.credits_pending, refund.credits_lost) == (
        0,
        PLAN - 2_000 * MICRO,
        2_000 * MICRO,
    )
    assert RolloverCarry.objects.get(organization=org).held_over == 7_000 * MICRO
    balance = organization_balance(organization=org)
    assert balance.set_aside == PLAN - 2_000 * MICRO
    assert organization_balance(organization=buyer).available == 2_000 * MICRO
    assert ledger_reconcile().ok and stripe_reconcile().ok


def test_a_refund_that_fails_while_the_job_runs_sets_the_rollover_s_excess_aside_again(
    customer, subscribed, grant, stripe_standin, stripe_sdk, deliver
):
    # given: the period's payment refunded while the job holds its 12,000, then the
    # period ends (the rollover's 9,000 over the cap are the refund's already)
    sub, old_lot = _pro_with_a_job_holding_the_plan(customer, subscribed, grant)
    org = customer.organization
    refund = _refund_first_period(sub, stripe_sdk)
    assert "failed" not in deliver()
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    assert organization_balance(organization=org).set_aside == PLAN

    # when: the refund fails (its money is the gym's again) while the job still runs
    stripe_standin.fail_refund(refund.id)
    assert "failed" not in deliver()

    # then: the refund waits for nothing now, and the rollover's 9,000 over the cap are
    # set aside again: once the job gives the 12,000 back, new work may take the cap's
    # 3,000 of them besides what the wallet had, no more
    assert PaymentReversal.objects.get().reinstated_at is not None
    balance = organization_balance(organization=org)
    assert balance.set_aside == PLAN - 3_000 * MICRO
    wallet = balance.wallet
    hold_release(key="job-running")
    rows = ledger_rows()
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=org, amount=wallet + 3_000 * MICRO + 1, key="job-greedy")
    assert refused.value.code == "insufficient_credits"
    assert ledger_rows() == rows

    # when: the rollover's sweep runs
    rollover_holds_settle(now=timezone.now())

    # then: the old period keeps its cap, the rest expired, nothing is set aside
    old_lot.refresh_from_db()
    assert old_lot.remaining == 3_000 * MICRO
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet + 3_000 * MICRO, 0)
    assert ledger_reconcile().ok and stripe_reconcile().ok


def test_a_refund_applied_once_the_jobs_settled_lets_the_rollover_s_claim_go(
    customer, subscribed, grant, stripe_standin, stripe_sdk, deliver
):
    # given: the period ended while the job held its 12,000 (9,000 over the cap set
    # aside), then the job used 1,000 and gave 11,000 back, before the rollover's sweep
    sub, old_lot = _pro_with_a_job_holding_the_plan(customer, subscribed, grant)
    org = customer.organization
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    assert organization_balance(organization=org).set_aside == PLAN - 3_000 * MICRO
    hold_capture(key="job-running", amount=1_000 * MICRO)

    # when: the period's payment is refunded in full: all 12,000 due back
    _refund_first_period(sub, stripe_sdk)
    assert "failed" not in deliver()

    # then: it took the 11,000 the job gave back (the 1,000 spent is lost) and waits for
    # nothing; with nothing left of the old period, the rollover sets nothing aside, so
    # new work may use the whole wallet at once, before any sweep
    refund = PaymentReversal.objects.get()
    assert (refund.credits_clawed_back, refund.credits_pending, refund.credits_lost) == (
        PLAN - 1_000 * MICRO,
        0,
        1_000 * MICRO,
    )
    old_lot.refresh_from_db()
    assert old_lot.remaining == 0
    balance = organization_balance(organization=org)
    assert (balance.set_aside, _wallet_claim(org)) == (0, 0)
    hold_place(organization=org, amount=balance.available, key="job-all")
    assert ledger_reconcile().ok and stripe_reconcile().ok


def test_a_pack_s_refund_waiting_on_spent_credits_leaves_the_rollover_s_claim(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: the period ended while a job held its 12,000 (9,000 over the cap claimed),
    # then a 10,000 pack bought, all the wallet had free held by a second job, and the
    # pack refunded in full: all 10,000 wait for that job
    sub = subscribed("pro")
    org = customer.organization
    hold_place(organization=org, amount=PLAN, key="job-running")
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    response = customer.client.post(
        "/api/v1/billing/checkout", {"pack": "boost-10k"}, format="json"
    )
    stripe_standin.pay_checkout(response.json()["session_id"])
    assert "failed" not in deliver()
    hold_place(
        organization=org, amount=organization_balance(organization=org).available, key="job-pack"
    )
    pack = CheckoutSession.objects.filter(organization=org).exclude(pack=None).get()
    stripe_sdk.v1.refunds.create(params={"payment_intent": pack.stripe_payment_intent_id})
    assert "failed" not in deliver()
    assert PaymentReversal.objects.get().credits_pending == 10_000 * MICRO

    # when: the second job spends the new period's 12,000 and the pack's 10,000 (the pack
    # refund's pending lags till its sweep), and meanwhile a dollar of the new period's
    # payment is refunded (its reversal fits the rollover's claim)
    hold_capture(key="job-pack", amount=22_000 * MICRO)
    new = Invoice.objects.filter(subscription=sub).exclude(billing_reason="subscription_create")
    stripe_sdk.v1.refunds.create(
        params={"payment_intent": new.get().stripe_payment_intent_id, "amount": 100}
    )
    assert "failed" not in deliver()

    # then: the pack's refund waits for nothing of the old period's lot, so the rollover
    # still claims its 9,000 over the cap: once the pack's sweep ran and the first job
    # gave the 12,000 back, new work may take the cap's 3,000 of them, no more
    assert RolloverCarry.objects.get(organization=org).held_claimed == 9_000 * MICRO
    payment_reversals_pending_settle()
    hold_release(key="job-running")
    balance = organization_balance(organization=org)
    assert balance.set_aside == 9_000 * MICRO
    rows = ledger_rows()
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=org, amount=balance.wallet - 9_000 * MICRO + 1, key="job-greedy")
    assert refused.value.code == "insufficient_credits"
    assert ledger_rows() == rows

    # when: the rollover's sweep runs: the old period keeps its cap, the rest expired
    rollover_holds_settle(now=timezone.now())
    assert (
        CreditLot.objects.filter(organization=org, source="subscription")
        .order_by("pk")[0]
        .remaining
        == 3_000 * MICRO
    )
    assert organization_balance(organization=org).set_aside == 0
    assert ledger_reconcile().ok and stripe_reconcile().ok


# $50 of the period's $99 refunded: its credits' share, rounded down to the micro-credit.
HALF_REFUNDED = 12_000 * MICRO * 50 // 99
CAP = 3_000 * MICRO


def _expired_of(lot) -> int:
    """What went from `lot` to the expiry account (trims, held or not)."""
    return -(
        LotMovement.objects.filter(lot=lot, transaction__kind="expiry").aggregate(
            total=Sum("amount", default=0)
        )["total"]
    )


@pytest.mark.parametrize("first", ["rollover", "refund"])
def test_a_partial_refund_of_held_credits_leaves_the_member_the_cap_of_what_it_did_not_take(
    first, customer, subscribed, grant, stripe_standin, stripe_sdk, deliver
):
    # given: the job holds the period's 12,000 when the period ends (9,000 over the 3,000
    # cap), and $50 of the period's $99 is refunded (6,060.606060 due back, waiting for
    # the job), in either order
    sub, old_lot = _pro_with_a_job_holding_the_plan(customer, subscribed, grant)
    org = customer.organization
    _period_end_and_refund(first, sub, stripe_standin, stripe_sdk, deliver, cents=5_000)
    refund = PaymentReversal.objects.get()
    assert (refund.credits_clawed_back, refund.credits_pending) == (0, HALF_REFUNDED)
    carry = RolloverCarry.objects.get(organization=org)
    assert carry.held_over == PLAN - CAP

    # then: what the refund leaves of the 12,000 (5,939.393940) is capped: 2,939.393940
    # over the cap are the rollover's, the refund's 6,060.606060 its own, and the member's
    # 3,000 of the old period are theirs once the job gives them back
    assert carry.held_claimed == PLAN - CAP - HALF_REFUNDED
    balance = organization_balance(organization=org)
    assert balance.set_aside == PLAN - CAP
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the job fails, giving the 12,000 back, and the sweeps run (the rollover's may
    # come first: it waits for the refund)
    wallet = balance.wallet
    hold_release(key="job-running")
    assert organization_balance(organization=org).available == wallet + CAP
    rollover_holds_settle(now=timezone.now())
    payment_reversals_pending_settle()
    rollover_holds_settle(now=timezone.now())

    # then: the refund took its share, the rollover expired the rest over the cap, and the
    # old period keeps the 3,000 cap
    refund.refresh_from_db()
    assert (refund.credits_clawed_back, refund.credits_pending, refund.credits_lost) == (
        HALF_REFUNDED,
        0,
        0,
    )
    old_lot.refresh_from_db()
    assert old_lot.remaining == CAP
    assert _expired_of(old_lot) == PLAN - CAP - HALF_REFUNDED
    carry.refresh_from_db()
    assert (carry.held_over, carry.held_claimed) == (0, 0)
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet + CAP, 0)
    assert _wallet_claim(org) == 0
    assert ledger_reconcile().ok and stripe_reconcile().ok


@pytest.mark.parametrize(
    ("cents", "refunded", "kept"),
    [
        (5_000, HALF_REFUNDED, CAP),  # $50: the cap of what it leaves is kept
        (9_900, PLAN, 0),  # all of it: nothing left, the cap unused
    ],
)
def test_a_refund_once_the_job_ended_leaves_the_cap_and_failing_brings_none_over_it(
    customer, subscribed, grant, stripe_standin, stripe_sdk, deliver, cents, refunded, kept
):
    # given: the period ended while the job held its 12,000 (9,000 over the cap claimed),
    # and the job failed, giving them back, before the rollover's sweep
    sub, old_lot = _pro_with_a_job_holding_the_plan(customer, subscribed, grant)
    org = customer.organization
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    hold_release(key="job-running")
    wallet = organization_balance(organization=org).wallet

    # when: `cents` of the period's payment are refunded: it takes its credits at once
    refund = _refund_first_period(sub, stripe_sdk, cents)
    assert "failed" not in deliver()

    # then: the rollover claims only what is over the cap of what the refund left
    assert PaymentReversal.objects.get().credits_clawed_back == refunded
    carry = RolloverCarry.objects.get(organization=org)
    assert carry.held_claimed == PLAN - refunded - kept
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.available) == (wallet - refunded, wallet - PLAN + kept)

    # when: the rollover's sweep runs
    rollover_holds_settle(now=timezone.now())

    # then: the old period keeps the cap of what the refund left
    old_lot.refresh_from_db()
    assert old_lot.remaining == kept
    assert _expired_of(old_lot) == PLAN - refunded - kept
    assert organization_balance(organization=org).set_aside == 0
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the refund fails afterwards (its money is the gym's again)
    stripe_standin.fail_refund(refund.id)
    assert "failed" not in deliver()

    # then: the credits it took come back to the old lot, filling what the cap left
    # unused; the rest expire, and the member has the 3,000 of the old period, no more
    assert PaymentReversal.objects.get().reinstated_at is not None
    old_lot.refresh_from_db()
    assert old_lot.remaining == CAP
    assert _expired_of(old_lot) == PLAN - CAP
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet - PLAN + CAP, 0)
    assert ledger_reconcile().ok and stripe_reconcile().ok


@pytest.mark.parametrize(
    ("cents", "refunded", "kept"),
    [
        (5_000, HALF_REFUNDED, CAP),  # $50: the cap of what it leaves is kept
        (9_900, PLAN, 0),  # all of it: the refund takes all 12,000, none lost
    ],
)
def test_a_refund_whose_sweep_is_late_takes_its_credits_before_the_period_s_trim(
    customer, subscribed, grant, stripe_standin, stripe_sdk, deliver, cents, refunded, kept
):
    # given: `cents` of the period's payment refunded while the job held its 12,000 (all
    # the refund is owed waits for the job, claimed), then the job failed, giving them
    # back: they are free in the wallet, still claimed, till the refund's sweep takes them
    sub, old_lot = _pro_with_a_job_holding_the_plan(customer, subscribed, grant)
    org = customer.organization
    _refund_first_period(sub, stripe_sdk, cents)
    assert "failed" not in deliver()
    refund = PaymentReversal.objects.get()
    assert (refund.credits_clawed_back, refund.credits_pending) == (0, refunded)
    hold_release(key="job-running")
    wallet = organization_balance(organization=org).wallet
    lots_before = set(CreditLot.objects.filter(organization=org).values_list("pk", flat=True))

    # when: the period ends before that sweep ran (beat late), then the sweeps run
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()

    # then: the refund took what it waited for first (its money bought them), and the
    # period's cap applied to what it left: nothing is claimed any more, at once
    refund.refresh_from_db()
    assert (refund.credits_clawed_back, refund.credits_pending, refund.credits_lost) == (
        refunded,
        0,
        0,
    )
    old_lot.refresh_from_db()
    assert old_lot.remaining == kept
    assert _expired_of(old_lot) == PLAN - refunded - kept
    assert (organization_balance(organization=org).set_aside, _wallet_claim(org)) == (0, 0)
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the sweeps run, late
    assert payment_reversals_pending_settle() == 0
    assert rollover_holds_settle(now=timezone.now()) == 0

    # then: nothing changes: the member keeps the cap of what the refund left, and the
    # new period's grants
    refund.refresh_from_db()
    assert (refund.credits_clawed_back, refund.credits_pending, refund.credits_lost) == (
        refunded,
        0,
        0,
    )
    old_lot.refresh_from_db()
    assert old_lot.remaining == kept
    granted = (
        CreditLot.objects.filter(organization=org)
        .exclude(pk__in=lots_before)
        .aggregate(total=Sum("amount"))["total"]
    )
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet - PLAN + kept + granted, 0)
    assert ledger_reconcile().ok and stripe_reconcile().ok


def test_a_refund_whose_take_fails_at_the_period_s_end_is_left_to_its_sweep(
    customer, subscribed, grant, stripe_standin, stripe_sdk, deliver, caplog
):
    # given: Pro and the member's own 5,000, and a 1,000 pack ($12.00); a job held the
    # period's 12,000, another the pack's 1,000, when $50 of the period's payment and all
    # of the pack's were refunded (6,060.606060 and 1,000 wait for the jobs); then both
    # jobs gave them back, before the refunds' sweep took them
    sub, old_lot = _pro_with_a_job_holding_the_plan(customer, subscribed, grant)
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    assert "failed" not in deliver()
    [pack_lot] = CreditLot.objects.filter(organization=org, source="pack")
    hold_place(organization=org, amount=1_000 * MICRO, key="job-pack")
    _refund_first_period(sub, stripe_sdk, 5_000)
    pack = CheckoutSession.objects.filter(organization=org).exclude(pack=None).get()
    stripe_sdk.v1.refunds.create(params={"payment_intent": pack.stripe_payment_intent_id})
    assert "failed" not in deliver()
    period_refund, pack_refund = PaymentReversal.objects.order_by("pk")
    assert period_refund.stripe_payment_intent_id != pack.stripe_payment_intent_id
    assert (period_refund.credits_pending, pack_refund.credits_pending) == (
        HALF_REFUNDED,
        1_000 * MICRO,
    )
    hold_release(key="job-running")
    hold_release(key="job-pack")
    started = sub.current_period_start

    # No consistent data makes a take fail (payments.payment_reversals_pending_take): the
    # pack refund's is made to, by another write already under the ledger key it takes
    # under (a clawback of another member's)
    other_lot = grant(OrganizationFactory(), MICRO)
    lot_clawback(
        lot=other_lot, amount=MICRO, key=f"{pack_refund.key}:pending:{1_000 * MICRO}", memo="x"
    )

    # when: the period ends (the sync of the subscription's renewal rolls it over)
    stripe_standin.advance(sub.stripe_subscription_id)
    statuses = deliver()

    # then: the period changed all the same; the period's refund took its credits before
    # the trim (the member keeps the cap of what it left), and the pack's refund, logged,
    # still waits for its 1,000, claimed, for its sweep
    assert "failed" not in statuses
    sub.refresh_from_db()
    assert sub.current_period_start > started
    period_refund.refresh_from_db()
    pack_refund.refresh_from_db()
    assert (
        period_refund.credits_clawed_back,
        period_refund.credits_pending,
        period_refund.credits_lost,
    ) == (HALF_REFUNDED, 0, 0)
    assert (
        pack_refund.credits_clawed_back,
        pack_refund.credits_pending,
        pack_refund.credits_lost,
    ) == (0, 1_000 * MICRO, 0)
    old_lot.refresh_from_db()
    pack_lot.refresh_from_db()
    assert (old_lot.remaining, pack_lot.remaining) == (CAP, 1_000 * MICRO)
    assert _expired_of(old_lot) == PLAN - HALF_REFUNDED - CAP
    assert _wallet_claim(org) == 1_000 * MICRO
    [logged] = [r for r in caplog.records if r.levelname == "ERROR"]
    assert f"payment reversal {pack_refund.pk} failed" in logged.getMessage()
    assert ledger_reconcile().ok
