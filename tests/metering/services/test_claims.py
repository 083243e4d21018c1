"""A wallet's claim (credits_claim, claim_settle, claim_drop): what a pending refund or
dispute set aside no spend the member starts may take, on either placement path, and
the claim goes as the reversal settles.

gymbilling's reversals are what claim in production (tests/gymbilling/billing and
market); here the services are driven directly. Each test ends with nothing claimed:
the reconcile run after it compares every claim with the reversals' pending credits.
"""

from __future__ import annotations

import pytest
from django.db.models import Q
from django.utils import timezone

from accounts.errors import ApplicationError
from metering.models import LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import credits_removable, organization_balance
from metering.services import (
    claim_drop,
    claim_settle,
    credits_adjust,
    credits_claim,
    credits_transfer,
    hold_capture,
    hold_place,
    hold_release,
)
from tests.helpers import credits, ledger_rows

pytestmark = pytest.mark.django_db


@pytest.fixture(params=[True, False], ids=["sql", "orm"])
def fast_path(request, settings) -> bool:
    settings.METERING_FAST_PATH = request.param  # the placement statement and post() agree
    return request.param


def wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


def claimed_under_a_running_job(org, grant, *, own_priority: int = 100):
    """A 100-credit pack a running job holds all of, claimed by a refund; 30 credits of the
    member's own that never expire (burned after the pack, unless `own_priority` says
    before)."""
    pack = grant(org, credits(100), source="pack", resellable=False)
    hold_place(organization=org, amount=credits(100), key="job-old")
    grant(
        org,
        credits(30),
        source="promotion",
        paid=False,
        resellable=False,
        expires_at=None,
        priority=own_priority,
    )
    refunded_at = timezone.now()
    claimed = credits_claim(
        organization=org, lots=Q(pk=pack.pk), amount=credits(100), at=refunded_at
    )
    assert claimed == credits(100)
    return pack, refunded_at


def settle_the_refund(org, pack, refunded_at) -> tuple[int, int]:
    """The refund's pending settlement of the whole pack (claimed_under_a_running_job's)."""
    return claim_settle(
        organization=org,
        lots=Q(pk=pack.pk),
        pending=credits(100),
        key="refund-1:pending",
        memo="refund",
        placed_before=refunded_at,
    )


def refused(call) -> ApplicationError:
    rows = ledger_rows()
    with pytest.raises(ApplicationError) as exc:
        call()
    assert ledger_rows() == rows
    assert (exc.value.code, exc.value.status) == ("insufficient_credits", 402)
    return exc.value


def test_no_hold_takes_claimed_credits_the_work_gave_back(org, grant, fast_path):
    # given
    pack, refunded_at = claimed_under_a_running_job(org, grant)
    assert wallet_claim(org) == credits(100)

    # then: while the job runs, the member's own 30 are short of the claim too
    assert refused(
        lambda: hold_place(organization=org, amount=credits(1), key="job-meanwhile")
    ).extra == {"required": credits(1), "available": 0}

    # when: the job gives all back
    hold_release(key="job-old")

    # then: 130 in the wallet, of which a hold may take the member's 30 only, and the
    # balance says so
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.set_aside, balance.available) == (
        credits(130),
        credits(100),
        credits(30),
    )
    error = refused(lambda: hold_place(organization=org, amount=credits(31), key="job-new"))
    assert error.extra == {"required": credits(31), "available": credits(30)}
    assert "set 100 credits aside" in error.message

    # when: the refund settles what is pending
    taken, still = settle_the_refund(org, pack, refunded_at)

    # then: all 100 came back, nothing is claimed, and the member's 30 can be held
    assert (taken, still) == (credits(100), 0)
    assert wallet_claim(org) == 0
    hold_place(organization=org, amount=credits(30), key="job-own")
    assert organization_balance(organization=org).held == credits(30)


def test_transfers_and_adjustments_cannot_take_claimed_credits(org, other_org, grant):
    # given: a claimed pack its job gave back, and the member's own 30, burned
    # before the pack (the claim guards the balance, not which lots a spend
    # burns: README, refunds)
    pack, refunded_at = claimed_under_a_running_job(org, grant, own_priority=10)
    hold_release(key="job-old")

    # then: moving or removing more than the member's own 30 is refused too
    refused(
        lambda: credits_transfer(
            source=org, destination=other_org, amount=credits(31), key="give-away"
        )
    )
    refused(
        lambda: credits_adjust(organization=org, amount=-credits(31), reason="fix", key="fix-1")
    )
    credits_transfer(source=org, destination=other_org, amount=credits(30), key="give-own")

    # and the claim settles the same
    assert settle_the_refund(org, pack, refunded_at) == (credits(100), 0)
    assert wallet_claim(org) == 0


def test_a_finance_debit_leaves_claimed_credits_and_the_overage_allowance(org, grant):
    # given: the claimed pack its job gave back and the member's own 30, beside a plan's
    # overage allowance of 1,000 (lent, burned after everything else)
    pack, refunded_at = claimed_under_a_running_job(org, grant)
    hold_release(key="job-old")
    allowance = grant(
        org,
        credits(1000),
        source="overage",
        paid=False,
        resellable=False,
        priority=1000,
    )
    assert organization_balance(organization=org).available == credits(1030)
    assert credits_removable(organization=org) == credits(30)

    # when: finance remove 31 credits, then 30
    error = refused(
        lambda: credits_adjust(organization=org, amount=-credits(31), reason="fix", key="fix-1")
    )
    credits_adjust(organization=org, amount=-credits(30), reason="fix", key="fix-2")

    # then: the first was refused, saying what can be removed; the second took the
    # member's own 30, not the refunded pack nor the allowance
    assert error.extra == {"required": credits(31), "available": credits(30)}
    pack.refresh_from_db()
    allowance.refresh_from_db()
    assert (pack.remaining, allowance.remaining) == (credits(100), credits(1000))
    assert credits_removable(organization=org) == 0

    # and the claim settles the same
    assert settle_the_refund(org, pack, refunded_at) == (credits(100), 0)
    assert wallet_claim(org) == 0


def test_the_claim_waits_for_running_work_and_lets_go_of_what_it_spent(org, grant, fast_path):
    # given: a claimed pack a job still holds
    pack, refunded_at = claimed_under_a_running_job(org, grant)

    def settle(pending: int) -> tuple[int, int]:
        return claim_settle(
            organization=org,
            lots=Q(pk=pack.pk),
            pending=pending,
            key=f"refund-1:pending:{pending}",
            memo="refund",
            placed_before=refunded_at,
        )

    # when: the refund settles while the job runs
    # then: nothing comes back and all stays claimed
    assert settle(credits(100)) == (0, credits(100))
    assert wallet_claim(org) == credits(100)

    # when: the job uses 40 and gives 60 back, and the refund settles again
    hold_capture(key="job-old", amount=credits(40))
    assert settle(credits(100)) == (credits(60), 0)

    # then: the 60 came back; the 40 spent are no longer claimed either
    assert wallet_claim(org) == 0
    assert organization_balance(organization=org).available == credits(30)
    assert ledger_reconcile().ok


def test_a_claim_that_outlives_its_reversal_is_reported_and_can_be_dropped(org, grant):
    # given: a claim no refund or dispute has pending (a claim made by hand)
    claimed_under_a_running_job(org, grant)

    # when
    report = ledger_reconcile()

    # then: reconcile names the wallet
    flagged = [v for v in report.violations if v.check == "wallet_claim_pending"]
    assert [
        (r["organization_id"], r["claimed"], r["pending"]) for v in flagged for r in v.rows
    ] == [(org.pk, credits(100), 0)]

    # when: it is dropped, then dropped again (it never goes below zero)
    claim_drop(organization=org, amount=credits(100))
    claim_drop(organization=org, amount=credits(1))

    # then
    assert wallet_claim(org) == 0
    assert ledger_reconcile().ok
    hold_release(key="job-old")


def test_a_claim_only_counts_what_the_lots_still_hold(org, grant):
    # given: a 100-credit pack, 70 of it spent, 20 held by a running job
    pack = grant(org, credits(100), source="pack", resellable=False)
    hold_place(organization=org, amount=credits(70), key="job-spent")
    hold_capture(key="job-spent", amount=credits(70))
    hold_place(organization=org, amount=credits(20), key="job-running")

    # when: a refund would claim all 100
    claimed = credits_claim(organization=org, lots=Q(pk=pack.pk), amount=credits(100))

    # then: only the 30 the lot still has are claimed
    assert claimed == credits(30)
    assert wallet_claim(org) == credits(30)
    claim_drop(organization=org, amount=claimed)


def test_two_claims_on_the_same_lots_never_set_aside_more_than_they_hold(org, grant):
    # given: a 100-credit pack, 40 of it spent, the other 60 held by two running jobs
    # (30 each); two reversals of the pack (a partial refund, then a dispute) each
    # want 50 back. What each has pending is here a dict, as gymbilling's rows.
    pack = grant(org, credits(100), source="pack", resellable=False)
    credits_adjust(organization=org, amount=-credits(40), reason="spent", key="spent-40")
    hold_place(organization=org, amount=credits(30), key="job-a")
    hold_place(organization=org, amount=credits(30), key="job-b")
    refunded_at = timezone.now()
    pending = {"refund": 0, "dispute": 0}

    def besides(name: str):
        return lambda: sum(amount for other, amount in pending.items() if other != name)

    def claim(name: str) -> int:
        pending[name] = credits_claim(
            organization=org,
            lots=Q(pk=pack.pk),
            amount=credits(50),
            at=refunded_at,
            claimed_by_others=besides(name),
        )
        return pending[name]

    def settle(name: str) -> tuple[int, int]:
        taken, pending[name] = claim_settle(
            organization=org,
            lots=Q(pk=pack.pk),
            pending=pending[name],
            key=f"{name}:pending:{pending[name]}",
            memo=name,
            placed_before=refunded_at,
            claimed_by_others=besides(name),
        )
        return taken, pending[name]

    # when: both claim while the jobs run
    # then: the second claims only what the lots hold beyond the first's 50
    assert (claim("refund"), claim("dispute")) == (credits(50), credits(10))
    assert wallet_claim(org) == credits(60)

    # when: one job spends its 30, and both settle
    hold_capture(key="job-a", amount=credits(30))

    # then: together they wait for the other job's 30, no more
    assert settle("refund") == (0, credits(20))
    assert settle("dispute") == (0, credits(10))
    assert wallet_claim(org) == credits(30)

    # when: the other job gives its 30 back, and both settle
    hold_release(key="job-b")

    # then: the 30 came back between them, and nothing is claimed
    assert settle("refund") == (credits(20), 0)
    assert settle("dispute") == (credits(10), 0)
    assert wallet_claim(org) == 0
    assert organization_balance(organization=org).total == 0


def test_a_settlement_reports_what_is_left_less_the_claim(org, grant, fast_path):
    # given a claim of 100 on a wallet whose old job gave everything back, and a job
    # of the member's own that holds 10 of their 30 (burned before the pack)
    claimed_under_a_running_job(org, grant, own_priority=10)
    hold_release(key="job-old")
    hold_place(organization=org, amount=credits(10), key="job-own")

    # when it captures 4 of them (the settlement inference answers from)
    captured = hold_capture(key="job-own", amount=credits(4))

    # then what it says is left is what a new hold may take: 26 of the member's own,
    # not the 126 in the wallet (the header X-Gym-Credits-Remaining; the ORM path
    # reports nothing and the answer reads the balance instead)
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.available) == (credits(126), credits(26))
    assert getattr(captured, "wallet_balance_after", None) in (
        {credits(26)} if fast_path else {None}
    )
    claim_drop(organization=org, amount=credits(100))


def test_new_work_burns_the_members_own_credits_not_the_claimed_ones(org, grant, fast_path):
    # given a refunded pack that the claim waits for, which the burn order would
    # otherwise take first (the member's own 30 burn after it)
    pack, refunded_at = claimed_under_a_running_job(org, grant)
    pack.refresh_from_db()
    assert pack.claimed_at == refunded_at

    # when the old job gives the pack back, and before the refund's sweep the member
    # runs a job on 20 of their own (the claim allows that much) and it ends
    hold_release(key="job-old")
    hold_place(organization=org, amount=credits(20), key="job-new")
    hold_capture(key="job-new", amount=credits(20))

    # then it burned their own credits, not the pack's
    pack.refresh_from_db()
    assert pack.remaining == credits(100)

    # and when the refund settles, all 100 come back: nothing lost, the member keeps
    # 10 of their own, the lot no longer marked
    taken, still = settle_the_refund(org, pack, refunded_at)
    assert (taken, still) == (credits(100), 0)
    assert organization_balance(organization=org).available == credits(10)
    assert wallet_claim(org) == 0
    pack.refresh_from_db()
    assert pack.claimed_at is None
