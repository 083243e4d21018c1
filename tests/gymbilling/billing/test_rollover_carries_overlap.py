"""Two rollovers waiting for the same plan credits a running job holds: a job that still
runs when a second period ends holds credits the first period's rollover already left over
its cap. Each credit is claimed once across the carries, and what the first rollover
expires is counted against what the second waits for, so the member ends with the cap.

Pro: 12,000 credits a month, 25% (3,000) roll over. The member's own 5,000 never expire,
so the job's hold is backed by the plan's lot; Stripe is the stand-in over HTTP.
"""

from __future__ import annotations

import pytest
from django.utils import timezone

from gymbilling.market.rollover import rollover_holds_settle
from gymbilling.models import RolloverCarry
from gymbilling.reconcile import stripe_reconcile
from metering.models import MICRO, CreditLot, LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place, hold_release

pytestmark = pytest.mark.django_db

PLAN, OWN, CAP = 12_000 * MICRO, 5_000 * MICRO, 3_000 * MICRO


def _wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


def _pro_with_jobs_holding_the_plan(customer, subscribed, grant, jobs: dict[str, int]):
    """Pro subscribed, the member's own 5,000 beside it, and jobs (key: what it holds)
    holding the period's 12,000 between them; returns the subscription and the period's
    lot."""
    sub = subscribed("pro")
    org = customer.organization
    grant(org, OWN, source="promotion", paid=False, resellable=False, expires_at=None)
    for key, amount in jobs.items():
        hold_place(organization=org, amount=amount, key=key)
    [lot] = CreditLot.objects.filter(organization=org, source="subscription")
    return sub, lot


@pytest.mark.parametrize(
    ("captured", "kept"),
    [
        (0, CAP),  # given back whole: the first rollover expires 9,000, the second none
        (5_000 * MICRO, CAP),  # 7,000 back: the first expires 4,000, the second none
        (11_000 * MICRO, 1_000 * MICRO),  # 1,000 back: under both caps, all kept
    ],
)
def test_two_rollovers_over_the_credits_one_job_holds_claim_and_expire_them_once(
    customer, subscribed, grant, stripe_standin, deliver, captured, kept
):
    # given: a job holds the first period's 12,000 while that period ends (9,000 over the
    # cap claimed) and while the next one ends too (the second period's own 12,000 were
    # free: its trim took them, and the job's 12,000 are over its cap as well)
    sub, old_lot = _pro_with_jobs_holding_the_plan(
        customer, subscribed, grant, {"job-running": PLAN}
    )
    org = customer.organization
    for _ in range(2):
        stripe_standin.advance(sub.stripe_subscription_id)
        assert "failed" not in deliver()
    first, second = RolloverCarry.objects.filter(organization=org).order_by("pk")
    assert (first.held_over, first.held_lots) == (PLAN - CAP, [old_lot.pk])
    assert (second.held_over, second.held_lots) == (PLAN - CAP, [old_lot.pk])

    # then: the 9,000 over the cap are claimed once, by the first rollover
    assert (first.held_claimed, second.held_claimed) == (PLAN - CAP, 0)
    balance = organization_balance(organization=org)
    assert balance.set_aside == PLAN - CAP
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the job ends, spending `captured` and giving the rest back
    wallet = balance.wallet
    _job_ends("job-running", captured)

    # then: what came back is in the wallet, and the 9,000 are still claimed once (till
    # the sweep: the claim waits for it, as with one rollover)
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet + PLAN - captured, PLAN - CAP)

    # when: the rollovers' sweep runs, twice; then: the old period's lot keeps what the
    # caps allow, nothing is claimed any more
    _swept_twice_leaves(org, old_lot, kept=kept, wallet=wallet)


@pytest.mark.parametrize(
    ("captured", "kept"),
    [
        (0, CAP),  # the 8,000 given back: the first rollover expires the 5,000 left due
        (6_000 * MICRO, 2_000 * MICRO),  # 2,000 back: under the cap, all kept
    ],
)
def test_a_later_rollover_that_trimmed_an_older_one_s_claimed_credits_lowers_its_claim(
    customer, subscribed, grant, stripe_standin, deliver, captured, kept
):
    # given: two jobs hold the first period's 12,000 while that period ends (9,000 over
    # the cap claimed by its rollover), and the shorter one gives its 4,000 back before
    # the next period ends: that period's trim takes them (they are free), and the job
    # still running holds 8,000 over both caps
    sub, old_lot = _pro_with_jobs_holding_the_plan(
        customer, subscribed, grant, {"job-long": 8_000 * MICRO, "job-short": 4_000 * MICRO}
    )
    org = customer.organization
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    assert RolloverCarry.objects.get(organization=org).held_claimed == PLAN - CAP
    hold_release(key="job-short")

    # when: the next period ends
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()

    # then: the first rollover's due is what the second's trim left of its excess (9,000
    # less the 4,000 trimmed: 5,000, the 8,000 held less the cap), and the wallet claims
    # that once, at once: not the 9,000 the first rollover claimed, which would keep
    # 4,000 of the member's new credits from them until the job ends
    old_lot.refresh_from_db()
    assert old_lot.remaining == 8_000 * MICRO
    first, second = RolloverCarry.objects.filter(organization=org).order_by("pk")
    assert (first.held_over, first.held_claimed) == (PLAN - CAP, 5_000 * MICRO)
    assert (second.held_over, second.held_claimed, second.held_lots) == (
        5_000 * MICRO,
        0,
        [old_lot.pk],
    )
    balance = organization_balance(organization=org)
    assert (balance.set_aside, _wallet_claim(org)) == (5_000 * MICRO, 5_000 * MICRO)
    assert balance.available == balance.wallet - 5_000 * MICRO
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the job ends, spending `captured` and giving the rest back
    wallet = balance.wallet
    _job_ends("job-long", captured)

    # and the rollovers' sweep runs, twice; then: the old period's lot keeps what the cap
    # allows, nothing is claimed any more, all the wallet is available
    _swept_twice_leaves(org, old_lot, kept=kept, wallet=wallet)
    assert organization_balance(organization=org).available == wallet + kept


def _job_ends(key: str, captured: int) -> None:
    """The job `key` ends, spending `captured` and giving the rest back."""
    if captured:
        hold_capture(key=key, amount=captured)
    else:
        hold_release(key=key)


def _swept_twice_leaves(org, old_lot, *, kept: int, wallet: int) -> None:
    """Run the rollovers' sweep twice (the second finds nothing) and check what it left: the
    old period's lot holds `kept`, no carry waits or claims, and the wallet is `wallet`
    and `kept`, nothing set aside, the ledger reconciled."""
    rollover_holds_settle(now=timezone.now())
    assert rollover_holds_settle(now=timezone.now()) == 0
    old_lot.refresh_from_db()
    assert old_lot.remaining == kept
    assert list(
        RolloverCarry.objects.filter(organization=org)
        .order_by("pk")
        .values_list("held_over", "held_claimed")
    ) == [(0, 0), (0, 0)]
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet + kept, 0)
    assert _wallet_claim(org) == 0
    assert ledger_reconcile().ok and stripe_reconcile().ok
