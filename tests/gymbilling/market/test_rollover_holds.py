"""The rollover cap over plan credits that a running job's hold kept from the trim."""

from __future__ import annotations

import pytest
from django.utils import timezone

from gymbilling.market.rollover import rollover_holds_settle
from gymbilling.market.tasks import market_reversals_pending_settle_task
from metering.reconcile import ledger_reconcile
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


def test_given_back_credits_a_later_job_holds_expire_as_that_job_gives_them_back(db, market_stripe):
    # given: the job that held 600 at the rollover gave them all back, and before the
    # sweep ran a new job held 550 of them
    org, expiry_before = _rolled_over_with_a_job_holding(credits(600))
    hold_release(key=f"job-{org.pk}")
    hold_place(organization=org, amount=credits(550), key=f"later-{org.pk}")

    # when: the sweep runs while the new job runs
    rollover_holds_settle(now=timezone.now())

    # then: only what the new job leaves free expires; the job can still settle
    assert system_balance("expiry") - expiry_before == credits(400 + 50)
    assert ledger_reconcile().ok

    # when: the new job fails (gives all back), and the sweep runs, twice
    hold_release(key=f"later-{org.pk}")
    rollover_holds_settle(now=timezone.now())
    rows = ledger_rows()
    assert rollover_holds_settle(now=timezone.now()) == 0

    # then: the member keeps the cap, and the second run moved nothing
    assert subscription_credits_owned(org) == credits(100)
    assert system_balance("expiry") - expiry_before == credits(900)
    assert ledger_rows() == rows
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
