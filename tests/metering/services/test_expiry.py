"""Expiry: unspent credits of a lot past its expiry go to the expiry account, never to work.

Lots must expire in the future when granted, and hold_place reads the real
clock, so the tests that need a lot to be really past its expiry grant one
that expires a fraction of a second later and sleep until then (one short
sleep per test). The sweeper itself takes `now`, so the rest look ahead.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.utils import timezone

from accounts.errors import ApplicationError
from metering.models import (
    AccountKind,
    CreditLot,
    Hold,
    HoldStatus,
    JournalTransaction,
    LedgerAccount,
    TransactionKind,
)
from metering.selectors import (
    account_balance,
    organization_balance,
    organization_lots,
    overage_allowance_available,
)
from metering.services import (
    credits_adjust,
    credits_expire,
    credits_transfer,
    hold_capture,
    hold_place,
    hold_release,
)
from metering.services.postings import accounts_for
from tests.helpers import (
    StatementLog,
    credits,
    expire_just_after,
    expire_now,
    ledger_rows,
    listed,
    lots_due_while_a_job_runs,
)

pytestmark = pytest.mark.django_db


def expired_total() -> int:
    account = LedgerAccount.objects.filter(
        kind=AccountKind.EXPIRY, organization__isnull=True
    ).first()
    return account_balance(account=account) if account else 0


def remaining(*lots: CreditLot) -> list[int]:
    return [CreditLot.objects.get(pk=lot.pk).remaining for lot in lots]


def wallet(org) -> LedgerAccount:
    return LedgerAccount.objects.get(organization=org, kind=AccountKind.WALLET)


def soon() -> datetime:
    """A moment the test's setup (grants, a hold) finishes before, however loaded the machine
    (a grant's expiry must be in the future), and that the test then sleeps past."""
    return timezone.now() + timedelta(milliseconds=1500)


def sleep_past(moment: datetime) -> None:
    time.sleep(max(0.0, (moment - timezone.now()).total_seconds()) + 0.05)


def expired_lot_kept_for_a_job(org, grant, *, key="job-before", job_after: int = 0):
    """10 credits that expire while a job placed before (`key`) holds them, 100 that never
    expire, and, with `job_after`, a second job placed after the expiry.

    The lot's expiry is then moved to just after the job's placement, as the passing of
    time would have it, and the wallet told, as a grant tells it: no sleep, so a loaded
    machine cannot place the job after the expiry by accident."""
    expiring = grant(org, credits(10), expires_at=timezone.now() + timedelta(days=1), priority=1)
    forever = grant(org, credits(100), expires_at=None)
    expire_just_after(hold_place(organization=org, amount=credits(10), key=key), expiring)
    if job_after:
        hold_place(organization=org, amount=job_after, key="job-after")
    return expiring, forever


# --- the sweeper -----------------------------------------------------------------


def test_sweeper_moves_the_remainder_of_expired_lots_to_the_expiry_account(org, grant):
    # given: a lot partly spent, and a lot that never expires
    expires_at = timezone.now() + timedelta(days=30)
    expiring = grant(org, credits(100), expires_at=expires_at)
    forever = grant(org, credits(50), expires_at=None)
    hold_place(organization=org, amount=credits(30), key="job-1")
    hold_capture(key="job-1", amount=credits(30))
    before = expired_total()

    # when
    expired = credits_expire(now=expires_at + timedelta(seconds=1))

    # then
    assert expired == credits(70)
    assert expired_total() - before == credits(70)
    assert remaining(expiring, forever) == [0, credits(50)]
    assert organization_balance(organization=org).available == credits(50)
    txn = JournalTransaction.objects.get(kind=TransactionKind.EXPIRY, organization=org)
    assert dict(txn.lot_movements.values_list("lot_id", "amount")) == {expiring.pk: -credits(70)}
    assert wallet(org).next_expiry_at is None


def test_sweeper_expires_only_lots_past_due_and_moves_next_expiry_forward(org, grant):
    # given
    first = timezone.now() + timedelta(days=10)
    second = timezone.now() + timedelta(days=20)
    early = grant(org, credits(10), expires_at=first)
    late = grant(org, credits(20), expires_at=second)

    # when
    expired = credits_expire(now=first + timedelta(days=1))

    # then
    assert expired == credits(10)
    assert remaining(early, late) == [0, credits(20)]
    assert organization_balance(organization=org).available == credits(20)
    assert wallet(org).next_expiry_at == second


def test_sweeper_at_the_exact_expiry_moment_expires_the_lot(org, grant):
    # given
    expires_at = timezone.now() + timedelta(days=1)
    lot = grant(org, credits(10), expires_at=expires_at)

    # when
    expired = credits_expire(now=expires_at)

    # then
    assert expired == credits(10)
    assert remaining(lot) == [0]


def test_sweeper_with_nothing_due_writes_nothing(org, grant):
    # given
    grant(org, credits(10), expires_at=timezone.now() + timedelta(days=30))
    grant(org, credits(10), expires_at=None)
    rows = ledger_rows()

    # when
    expired = credits_expire(now=timezone.now())

    # then
    assert expired == 0
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(20)


def test_sweeping_twice_expires_once(org, grant):
    # given
    expires_at = timezone.now() + timedelta(days=1)
    grant(org, credits(10), expires_at=expires_at)
    later = expires_at + timedelta(hours=1)
    assert credits_expire(now=later) == credits(10)
    rows = ledger_rows()
    before = expired_total()

    # when
    expired = credits_expire(now=later)

    # then
    assert expired == 0
    assert ledger_rows() == rows
    assert expired_total() == before


def test_sweeper_covers_every_organization_and_escrow(org, other_org, grant):
    # given: org lists part of its credits in escrow
    expires_at = timezone.now() + timedelta(days=7)
    grant(org, credits(10), expires_at=expires_at)
    grant(other_org, credits(5), expires_at=expires_at)
    listed(org, credits(4), key="list-1")
    before = expired_total()

    # when
    expired = credits_expire(now=expires_at + timedelta(minutes=1))

    # then
    assert expired == credits(15)
    assert expired_total() - before == credits(15)
    mine = organization_balance(organization=org)
    assert (mine.available, mine.held, mine.escrowed) == (0, 0, 0)
    assert organization_balance(organization=other_org).available == 0


def test_one_account_the_sweep_cannot_expire_does_not_stop_the_others(
    org, other_org, grant, caplog
):
    # given: two organizations' lots due, and the first one's wallet edited by
    # hand to hold less than its lots (a ledger that disagrees with itself)
    expires_at = timezone.now() + timedelta(days=7)
    grant(org, credits(10), expires_at=expires_at)
    grant(other_org, credits(5), expires_at=expires_at)
    broken = wallet(org)
    LedgerAccount.objects.filter(pk=broken.pk).update(balance=credits(1))

    # when
    expired = credits_expire(now=expires_at + timedelta(minutes=1))

    # then: the other organization's credits expired, and the failure is logged
    assert expired == credits(5)
    assert organization_balance(organization=other_org).available == 0
    assert f"account {broken.pk}: its expiry sweep failed" in caplog.text
    # (the hand edit undone, for the reconcile every test ends with)
    LedgerAccount.objects.filter(pk=broken.pk).update(balance=credits(10))


# --- spending after expiry, before the sweeper ------------------------------------


def test_a_hold_placed_after_expiry_cannot_spend_expired_credits(org, grant):
    # given: the sweeper has not run since the lot expired
    expires_at = soon()
    expiring = grant(org, credits(10), expires_at=expires_at)
    forever = grant(org, credits(5), expires_at=None)
    sleep_past(expires_at)
    rows = ledger_rows()

    # when: more than the unexpired credits is refused
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=credits(6), key="job-too-big")

    # then
    assert exc.value.code == "insufficient_credits"
    assert exc.value.status == 402
    assert ledger_rows() == rows

    # when: what the unexpired lot holds may still be reserved
    before = expired_total()
    hold_place(organization=org, amount=credits(5), key="job-ok")

    # then: the expired remainder was swept first, in the same transaction
    assert expired_total() - before == credits(10)
    assert remaining(expiring, forever) == [0, credits(5)]
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (0, credits(5))


def test_only_expired_credits_cannot_be_held_at_all(org, grant):
    # given
    expires_at = soon()
    grant(org, credits(10), expires_at=expires_at)
    sleep_past(expires_at)
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=1, key="job-1")

    # then: refused, and the refused transaction left nothing behind
    assert exc.value.code == "insufficient_credits"
    assert ledger_rows() == rows
    # the sweeper then takes them
    assert credits_expire(now=timezone.now()) == credits(10)
    assert organization_balance(organization=org).available == 0


def test_adjustments_and_transfers_cannot_spend_expired_credits(org, other_org, grant):
    # given: both organizations hold only credits that just expired
    expires_at = soon()
    grant(org, credits(10), expires_at=expires_at)
    grant(other_org, credits(10), expires_at=expires_at)
    sleep_past(expires_at)
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as adjust_exc:
        credits_adjust(organization=org, amount=-credits(1), reason="fix", key="adj-1")
    with pytest.raises(ApplicationError) as transfer_exc:
        credits_transfer(source=other_org, destination=org, amount=credits(1), key="t-1")

    # then
    assert adjust_exc.value.code == "insufficient_credits"
    assert transfer_exc.value.code == "insufficient_credits"
    assert ledger_rows() == rows


# --- expired credits that back a pending hold -------------------------------------


def test_expired_credits_backing_a_pending_hold_wait_until_it_is_captured(org, grant):
    # given: a hold placed while the lot was valid, still pending at its expiry
    expires_at = timezone.now() + timedelta(days=30)
    lot = grant(org, credits(10), expires_at=expires_at)
    hold_place(organization=org, amount=credits(10), key="job-1")
    after_expiry = expires_at + timedelta(seconds=1)
    before = expired_total()

    # when: the sweeper runs while the hold is pending
    first_sweep = credits_expire(now=after_expiry)

    # then: nothing can move; the hold still owns the credits
    assert first_sweep == 0
    assert remaining(lot) == [credits(10)]
    assert Hold.objects.get(key="job-1").status == HoldStatus.PENDING
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (0, credits(10))

    # when: the hold is captured in part, then the sweeper runs again
    hold_capture(key="job-1", amount=credits(4))
    second_sweep = credits_expire(now=after_expiry)

    # then: what the work used is consumed, the rest expires
    assert second_sweep == credits(6)
    assert expired_total() - before == credits(6)
    assert remaining(lot) == [0]
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (0, 0)


def test_expired_credits_backing_a_released_hold_expire_after_the_release(org, grant):
    # given: more expired credits than the pending hold covers
    expires_at = timezone.now() + timedelta(days=30)
    lot = grant(org, credits(30), expires_at=expires_at)
    hold_place(organization=org, amount=credits(10), key="job-1")
    after_expiry = expires_at + timedelta(seconds=1)

    # when
    first_sweep = credits_expire(now=after_expiry)

    # then: only the part not backing the hold expires
    assert first_sweep == credits(20)
    assert remaining(lot) == [credits(10)]
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (0, credits(10))

    # when
    hold_release(key="job-1")
    second_sweep = credits_expire(now=after_expiry)

    # then
    assert second_sweep == credits(10)
    assert remaining(lot) == [0]
    assert organization_balance(organization=org).total == 0


def test_a_pending_hold_on_expired_credits_does_not_block_spending_unexpired_ones(org, grant):
    # given: a hold backed by a lot that then expires, and plenty of credits that never expire
    expiring, forever = expired_lot_kept_for_a_job(org, grant, key="job-running")

    # when: new work reserves some of the unexpired credits
    hold = hold_place(organization=org, amount=credits(20), key="job-new")

    # then
    assert hold.status == HoldStatus.PENDING
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(80), credits(30))
    assert remaining(expiring, forever) == [credits(10), credits(100)]


def test_expired_credits_are_not_kept_for_a_hold_placed_after_they_expired(org, grant):
    # given: a hold placed while a 10-credit lot was valid, and after its
    # expiry a second hold, which only unexpired credits can back
    expiring, forever = expired_lot_kept_for_a_job(org, grant, job_after=credits(20))

    # when: the first job ends without using anything, and the sweeper runs
    hold_release(key="job-before")
    swept = credits_expire(now=timezone.now())

    # then: the expired lot expires in full (the later hold never backed it),
    # and only the unexpired credits not held remain to spend
    assert swept == credits(10)
    assert remaining(expiring) == [0]
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(80), credits(20))
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=credits(81), key="job-too-big")
    assert exc.value.code == "insufficient_credits"
    # and the later job's capture burns unexpired credits
    hold_capture(key="job-after", amount=credits(20))
    assert remaining(expiring, forever) == [0, credits(80)]


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_a_capture_burns_no_expired_credit_kept_for_an_earlier_hold(
    org, grant, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the settlement function and the ORM agree
    # given: a hold on a lot that then expired, and a hold placed after that
    expiring, forever = expired_lot_kept_for_a_job(org, grant, job_after=credits(20))

    # when: the later hold is captured first, then the earlier one released
    hold_capture(key="job-after", amount=credits(20))
    hold_release(key="job-before")
    credits_expire(now=timezone.now())

    # then: the later job was served from unexpired credits, and the expired
    # lot expired in full: 80 left, not 90
    assert remaining(expiring, forever) == [0, credits(80)]
    assert organization_balance(organization=org).available == credits(80)


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_what_expires_under_a_pending_hold_is_what_its_capture_would_not_burn(
    org, grant, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the settlement function and the ORM agree
    # given: a plan's credits (burned first) and an overage allowance (burned
    # last) that expire together, and a job placed before they expired
    tomorrow = timezone.now() + timedelta(days=1)
    plan = grant(org, credits(200), expires_at=tomorrow, priority=100)
    allowance = grant(
        org, credits(1000), expires_at=tomorrow, priority=1000, paid=False, resellable=False
    )
    expire_just_after(
        hold_place(organization=org, amount=credits(150), key="job-1"), plan, allowance
    )

    # when: the sweeper runs, then the job is captured
    swept = credits_expire(now=timezone.now())

    # then: the allowance expired in full and the plan's credits wait for the
    # job, which burns them: no overage is used for work the plan covered
    assert swept == credits(1050)
    assert remaining(plan, allowance) == [credits(150), 0]
    hold_capture(key="job-1", amount=credits(100))
    assert remaining(plan, allowance) == [credits(50), 0]
    assert credits_expire(now=timezone.now()) == credits(50)


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_a_capture_leaves_a_later_hold_the_expired_lot_only_it_may_still_use(
    org, grant, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the settlement function and the ORM agree
    # given: an allowance (burned last) that expires while job 1 runs, plan
    # credits (burned first) that expire later, while jobs 1 and 2 both run,
    # and credits that never expire
    tomorrow = timezone.now() + timedelta(days=1)
    allowance = grant(org, credits(10), expires_at=tomorrow, priority=1000)
    plan = grant(org, credits(10), expires_at=tomorrow, priority=100)
    forever = grant(org, credits(10), expires_at=None)
    expire_just_after(hold_place(organization=org, amount=credits(10), key="job-1"), allowance)
    assert credits_expire(now=timezone.now()) == 0  # the allowance waits for job 1
    expire_just_after(hold_place(organization=org, amount=credits(20), key="job-2"), plan)

    # when: job 1 ends, using all it holds
    hold_capture(key="job-1", amount=credits(10))

    # then: it burned the allowance, which job 2 (placed after it expired)
    # may not use, and left job 2 the plan's credits; nothing is due to expire
    assert remaining(allowance, plan, forever) == [0, credits(10), credits(10)]
    assert credits_expire(now=timezone.now()) == 0
    hold_capture(key="job-2", amount=credits(20))
    assert remaining(allowance, plan, forever) == [0, 0, 0]


def test_a_debit_does_not_take_expired_credits_kept_for_a_pending_hold(org, grant):
    # given: a hold on a lot that then expired, and credits that never expire
    expiring, forever = expired_lot_kept_for_a_job(org, grant)

    # when: finance debits 5 credits, then the job ends unused and the sweeper runs
    credits_adjust(organization=org, amount=-credits(5), key="debit-1", reason="correction")
    hold_release(key="job-before")
    credits_expire(now=timezone.now())

    # then: the debit came out of unexpired credits, and the expired lot expired in full
    assert remaining(expiring, forever) == [0, credits(95)]
    assert organization_balance(organization=org).available == credits(95)


def test_expired_credits_in_escrow_cannot_be_sold_to_a_buyer(org, other_org, grant):
    # given: credits listed on the marketplace, then past their expiry before a fill
    expires_at = soon()
    grant(org, credits(10), paid=True, resellable=True, expires_at=expires_at)
    listed(org, credits(10))
    sleep_past(expires_at)
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_transfer(
            source=org,
            destination=other_org,
            amount=credits(4),
            key="fill-1",
            source_kind=AccountKind.ESCROW,
            lot_source="marketplace",
            resellable=False,
        )

    # then: expired credits are never spent, sold or transferred; the seller's escrow
    # keeps them for the sweep, and shows none of them
    assert exc.value.code == "insufficient_credits"
    assert ledger_rows() == rows
    assert organization_balance(organization=other_org).available == 0
    assert organization_balance(organization=org).escrowed == 0


# --- what the balance shows before the sweep runs ---------------------------------


def _overage_allowance(grant, org, amount: int):
    """A plan's overage allowance, as subscriptions grant it: lent, not resellable, burned
    last, until tomorrow."""
    return grant(
        org,
        amount,
        source="overage",
        paid=False,
        resellable=False,
        priority=1000,
        expires_at=timezone.now() + timedelta(days=1),
    )


def test_the_balance_does_not_count_credits_past_their_expiry_before_the_sweep(org, grant):
    # given: 10 credits past their expiry (not swept yet), 5 unexpired, 3 of which are
    # an overage allowance
    expiring = grant(org, credits(10), expires_at=timezone.now() + timedelta(days=1))
    grant(org, credits(2), expires_at=None)
    _overage_allowance(grant, org, credits(3))
    expire_now(expiring)

    # when
    balance = organization_balance(organization=org)

    # then: only what a hold may take is shown, as a hold finds it
    assert (balance.available, balance.held, balance.total) == (credits(5), 0, credits(5))
    assert overage_allowance_available(organization=org, available=balance.available) == (
        credits(3)
    )
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=org, amount=credits(5) + 1, key="job-1")
    assert refused.value.code == "insufficient_credits"


def test_an_expired_overage_allowance_is_not_shown_available(org, grant):
    # given: an allowance past its expiry, not swept yet
    allowance = _overage_allowance(grant, org, credits(3))
    expire_now(allowance)

    # then: even with a larger `available` said by the caller, none of it is allowance
    assert overage_allowance_available(organization=org, available=credits(3)) == 0
    assert organization_balance(organization=org).available == 0


def test_the_balance_counts_expired_credits_a_running_job_holds_as_held_until_it_ends(org, grant):
    # given: a job placed while 10 credits were valid, which then expired; 100 never expire
    expiring, _ = expired_lot_kept_for_a_job(org, grant, key="job-running")
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(100), credits(10))

    # when: the job ends without using them, before any sweep
    hold_release(key="job-running")

    # then: what it gave back is not available
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held, balance.total) == (credits(100), 0, credits(100))
    assert remaining(expiring) == [credits(10)]  # the sweep's to move


def test_the_balance_costs_one_query_while_nothing_is_due(org, grant, django_assert_num_queries):
    # given: credits expiring in the future, 4 of them listed (the dashboard reads the
    # balance on every page, inference after a job the settlement did not answer for)
    grant(org, credits(10), expires_at=timezone.now() + timedelta(days=1))
    listed(org, credits(4))

    # then: one query for the balance, and one for its lots
    with django_assert_num_queries(1):
        balance = organization_balance(organization=org)
    assert (balance.available, balance.escrowed) == (credits(6), credits(4))
    with django_assert_num_queries(1):
        lots = organization_lots(organization=org)
    assert sorted(lot.left for lot in lots) == [credits(4), credits(6)]


def test_the_lots_listed_are_as_the_sweep_leaves_them_and_fill_their_page(org, grant):
    # given: 10 credits a running job holds 4 of, past their expiry, 10 nothing holds
    # that expired before it, 100 that never expire, and 1 that expires later
    held, _gone, _forever = lots_due_while_a_job_runs(org, grant)
    later = grant(org, credits(1), expires_at=timezone.now() + timedelta(days=2))

    # when: two lots, soonest expiry first
    lots = organization_lots(organization=org, limit=2)

    # then: `gone` is the sweep's, so the page takes the next lot in its place; `held`
    # shows only what the job holds of it, and says it is past its expiry
    assert [(lot.pk, lot.left, lot.past_expiry) for lot in lots] == [
        (held.pk, credits(4), True),
        (later.pk, credits(1), False),
    ]
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held, balance.total) == (
        credits(101),
        credits(4),
        credits(105),
    )
    assert sum(lot.left for lot in organization_lots(organization=org)) == balance.total


def test_the_balance_does_not_count_listed_credits_past_their_expiry_before_the_sweep(org, grant):
    # given: 10 listed credits past their expiry (not swept yet), and 5 listed that are not
    expiring = grant(org, credits(10), expires_at=timezone.now() + timedelta(days=1))
    grant(org, credits(5), expires_at=timezone.now() + timedelta(days=2))
    listed(org, credits(15))
    expire_now(CreditLot.objects.get(parent=expiring))

    # when
    balance = organization_balance(organization=org)

    # then: escrow shows only the 5 a buyer may still be sold, as the sweep leaves it
    assert (balance.available, balance.escrowed) == (0, credits(5))
    assert credits_expire(now=timezone.now()) == credits(10)
    assert organization_balance(organization=org).escrowed == credits(5)


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_a_settlement_does_not_report_credits_that_expired_while_its_job_ran(
    org, grant, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the settlement function and the ORM agree
    # given: a job placed while 10 credits were valid, which then expired (not swept
    # yet), and 100 that never expire; the consumption account open, so that the
    # settlement is the function's on the fast path
    expiring, _ = expired_lot_kept_for_a_job(org, grant, key="job-running")
    accounts_for(org, AccountKind.CONSUMPTION)

    # when: the job ends having used 4 of them (the settlement inference answers from)
    with connection.execute_wrapper(statements := StatementLog()):
        settled = hold_capture(key="job-running", amount=credits(4))

    # then: it does not say the 106 in the wallet are left, 6 of which the sweep will
    # move: it says nothing, and the answer asks the balance, which says 100 (the header
    # X-Gym-Credits-Remaining, tests/inference/test_wait_timeout.py)
    assert any("metering_hold_settle(" in sql for sql in statements.sql) == fast_path
    assert getattr(settled, "wallet_balance_after", None) is None
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(100), 0)
    assert remaining(expiring) == [credits(6)]
    assert wallet(org).balance == credits(106)


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
@pytest.mark.parametrize(
    "used", [credits(4), credits(10)], ids=["leaving-some-of-it", "burning-all-of-it"]
)
def test_a_wallet_is_due_only_while_a_job_holds_part_of_an_expired_lot(
    org, grant, settings, fast_path, used
):
    settings.METERING_FAST_PATH = fast_path  # the settlement function and the ORM agree
    # given: a job placed while 10 credits were valid, which then expired, 100 credits that
    # expire in a month, and a second job placed after the expiry (its placement swept: the
    # 10 wait for the first job); the consumption account open, so that a settlement is
    # the function's on the fast path
    in_a_month = timezone.now() + timedelta(days=30)
    expiring, forever = expired_lot_kept_for_a_job(org, grant, key="job-1")
    later = grant(org, credits(100), expires_at=in_a_month)
    hold_place(organization=org, amount=credits(20), key="job-2")
    accounts_for(org, AccountKind.CONSUMPTION)
    # the minute's sweep while the first job runs: the wallet stays due (transient)
    assert credits_expire(now=timezone.now()) == 0
    assert wallet(org).next_expiry_at <= timezone.now()

    # when: the first job ends using `used` of the expired 10 (the settlement says nothing
    # of the balance while the wallet is due), and the minute's sweep runs after it
    assert getattr(hold_capture(key="job-1", amount=used), "wallet_balance_after", None) is None
    credits_expire(now=timezone.now())

    # then: the wallet is due again only when the month's lot expires, whether the job
    # burned all it held of the expired lot or the sweep moved what it left
    assert remaining(expiring) == [0]
    assert wallet(org).next_expiry_at == in_a_month
    # and the next settlement on the fast path says what remains (the ORM's never says):
    # the 100 that never expire and the month's 100, less the 20 the second job burned
    settled = hold_capture(key="job-2", amount=credits(20))
    assert getattr(settled, "wallet_balance_after", None) == (credits(180) if fast_path else None)
    assert organization_balance(organization=org).available == credits(180)
    assert remaining(later, forever) == [credits(80), credits(100)]


def test_the_sweep_moves_the_next_expiry_on_past_a_lot_spent_before_it_expired(org, grant):
    # given: a lot spent in full before its expiry, and a lot that expires a month later
    tomorrow = timezone.now() + timedelta(days=1)
    in_a_month = tomorrow + timedelta(days=29)
    spent = grant(org, credits(10), expires_at=tomorrow, priority=1)
    grant(org, credits(100), expires_at=in_a_month)
    hold_place(organization=org, amount=credits(10), key="job-1")
    hold_capture(key="job-1", amount=credits(10))
    assert (remaining(spent), wallet(org).next_expiry_at) == ([0], tomorrow)

    # when: the sweep runs once the spent lot's expiry has come
    expired = credits_expire(now=tomorrow + timedelta(seconds=1))

    # then: nothing expired, and the wallet is due again only when the month's lot is
    assert expired == 0
    assert wallet(org).next_expiry_at == in_a_month
