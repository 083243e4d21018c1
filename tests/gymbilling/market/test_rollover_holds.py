"""The rollover cap over plan credits that a running job's hold kept from the trim."""

from __future__ import annotations

import pytest
from django.utils import timezone

from accounts.errors import ApplicationError
from gymbilling.market.rollover import rollover_holds_settle
from gymbilling.market.tasks import market_reversals_pending_settle_task
from gymbilling.models import RolloverCarry
from gymbilling.reconcile import wallet_claims_repair
from metering.models import CreditLot, LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place, hold_release
from tests.gymbilling.market.conftest import roll, rollover_member, subscription_credits_owned
from tests.helpers import credits, ledger_rows, system_balance


def _rolled_over_with_a_job_holding(amount: int):
    """A member of a 1,000-credit plan that rolls 100 over, whose job holds `amount` of the
    period's credits when it ends: the rollover trims only what the job will not burn."""
    org, stripe_sub, _ = rollover_member()
    hold_place(organization=org, amount=amount, key=f"job-{org.pk}")
    expiry_before = system_balance("expiry")
    roll(stripe_sub)
    assert system_balance("expiry") - expiry_before == credits(1000) - amount
    return org, expiry_before


@pytest.mark.parametrize(
    ("captured", "owned", "expired"),
    [
        (0, credits(100), credits(900)),  # released whole: the cap, as if home at the rollover
        (credits(300), credits(100), credits(600)),  # 300 back: 100 kept, 200 expire on return
        (credits(550), credits(50), credits(400)),  # 50 back: under the cap, all kept
    ],
)
def test_credits_a_running_job_kept_from_the_rollover_trim_come_back_capped(
    db, market_stripe, captured, owned, expired
):
    # given: the job holds 600 of the 1,000 when the period ends (the trim took 400)
    org, expiry_before = _rolled_over_with_a_job_holding(credits(600))

    # when: the job ends, spending `captured` of its hold and giving back the rest
    if captured:
        hold_capture(key=f"job-{org.pk}", amount=captured)
    else:
        hold_release(key=f"job-{org.pk}")
    # and the market's pending sweep runs (every 10 seconds)
    market_reversals_pending_settle_task()

    # then: the member keeps at most the cap of the old period's credits
    assert subscription_credits_owned(org) == owned
    assert system_balance("expiry") - expiry_before == expired
    assert ledger_reconcile().ok


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_a_later_job_cannot_spend_what_the_rollover_left_over_the_cap(
    db, market_stripe, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the placement statement and post() agree
    # given: the job that held 600 at the rollover (the trim took the free 400) failed
    # and gave them all back, and the sweep has not run yet
    org, expiry_before = _rolled_over_with_a_job_holding(credits(600))
    hold_release(key=f"job-{org.pk}")

    # then: of the 600 home again, only the cap is the member's to spend; the 500 over
    # it are set aside for the sweep to expire
    balance = organization_balance(organization=org)
    assert (balance.available, balance.set_aside) == (credits(100), credits(500))

    # when: a new job asks for 550 of them
    rows = ledger_rows()
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=org, amount=credits(550), key=f"later-{org.pk}")

    # then: it is refused and nothing moved
    assert refused.value.code == "insufficient_credits"
    assert ledger_rows() == rows
    assert ledger_reconcile().ok  # the claim is what the rollover waits for

    # when: a new job spends the cap instead, and the sweep runs, twice
    spent = hold_place(organization=org, amount=credits(100), key=f"later-{org.pk}")
    hold_capture(key=spent.key, amount=credits(100))
    market_reversals_pending_settle_task()
    rows = ledger_rows()
    assert rollover_holds_settle(now=timezone.now()) == 0

    # then: the 500 over the cap expired, nothing is set aside any more, the member
    # spent exactly the cap of the old period's credits, and the second run moved nothing
    assert system_balance("expiry") - expiry_before == credits(900)
    assert subscription_credits_owned(org) == 0
    balance = organization_balance(organization=org)
    assert (balance.available, balance.set_aside) == (0, 0)
    assert ledger_rows() == rows
    assert ledger_reconcile().ok


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_work_paid_from_a_pack_does_not_spend_the_credits_held_over_the_cap(
    db, market_stripe, grant, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the settlement function and the ORM agree
    # given: a member with a pack of 1,000 credits besides the plan's, whose job holds
    # 600 of the plan's credits when the period ends (the trim took the free 400)
    org, stripe_sub, _ = rollover_member()
    pack = grant(org, credits(1000), source="pack", resellable=False, expires_at=None)
    hold_place(organization=org, amount=credits(600), key=f"job-{org.pk}")
    expiry_before = system_balance("expiry")
    roll(stripe_sub)
    assert system_balance("expiry") - expiry_before == credits(400)

    # when: while that job runs, another spends 500 (what the pack leaves besides the
    # 500 held over the cap), then the first job fails and the sweep runs
    hold_place(organization=org, amount=credits(500), key=f"later-{org.pk}")
    hold_capture(key=f"later-{org.pk}", amount=credits(500))
    hold_release(key=f"job-{org.pk}")
    market_reversals_pending_settle_task()

    # then: the new work was paid from the pack, not from the old period's credits, and
    # of those the member keeps the cap: the 500 over it expired
    pack.refresh_from_db()
    assert pack.remaining == credits(500)
    assert subscription_credits_owned(org) == credits(100)
    assert system_balance("expiry") - expiry_before == credits(900)
    balance = organization_balance(organization=org)
    assert (balance.available, balance.set_aside) == (credits(600), 0)
    assert ledger_reconcile().ok


def test_a_job_still_running_keeps_the_sweep_waiting(db, market_stripe):
    # given: the job that held 600 at the rollover still runs
    org, expiry_before = _rolled_over_with_a_job_holding(credits(600))

    # when: the sweep runs
    assert rollover_holds_settle(now=timezone.now()) == 0

    # then: nothing moves; the job spends all it held and the sweep finds nothing over
    assert system_balance("expiry") - expiry_before == credits(400)
    hold_capture(key=f"job-{org.pk}", amount=credits(600))
    assert rollover_holds_settle(now=timezone.now()) == 0
    assert subscription_credits_owned(org) == 0
    assert ledger_reconcile().ok


def test_claims_repair_restores_what_a_rollover_claimed_over_the_cap(db, market_stripe):
    # given: the job holds 600 at the rollover (500 over the cap claimed); then, as a
    # process without claims may leave it, no claim and no lot marked
    org, _ = _rolled_over_with_a_job_holding(credits(600))
    carry = RolloverCarry.objects.get(organization=org)
    wallet = LedgerAccount.objects.filter(organization=org, kind="wallet")
    wallet.update(claimed=0)
    CreditLot.objects.filter(organization=org).update(claimed_at=None)

    # when: the repair runs
    repaired = wallet_claims_repair()

    # then: the wallet claims the carry's 500 again, and the plan lot is marked with the
    # rollover's time, as the rollover's own claim marked it
    assert repaired == [{"organization_id": org.pk, "before": 0, "after": credits(500)}]
    assert wallet.get().claimed == credits(500)
    [held] = CreditLot.objects.filter(pk__in=carry.held_lots)
    assert held.claimed_at == carry.created_at
    assert ledger_reconcile().ok
