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
    sub = subscribed("pro")
    org = customer.organization
    grant(org, OWN, source="promotion", paid=False, resellable=False, expires_at=None)
    hold_place(organization=org, amount=PLAN, key="job-running")
    [old_lot] = CreditLot.objects.filter(organization=org, source="subscription")
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
    if captured:
        hold_capture(key="job-running", amount=captured)
    else:
        hold_release(key="job-running")

    # then: what came back is in the wallet, and the 9,000 are still claimed once (till
    # the sweep: the claim waits for it, as with one rollover)
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet + PLAN - captured, PLAN - CAP)

    # when: the rollovers' sweep runs, twice
    rollover_holds_settle(now=timezone.now())
    assert rollover_holds_settle(now=timezone.now()) == 0

    # then: the old period's lot keeps what the caps allow, nothing is claimed any more
    old_lot.refresh_from_db()
    assert old_lot.remaining == kept
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.held_over, first.held_claimed, second.held_over, second.held_claimed) == (
        0,
        0,
        0,
        0,
    )
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside) == (wallet + kept, 0)
    assert _wallet_claim(org) == 0
    assert ledger_reconcile().ok and stripe_reconcile().ok
