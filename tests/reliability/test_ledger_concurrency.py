"""Races on the credit ledger: many threads, one PostgreSQL connection each.

Every thread opens its own connection, waits at a barrier so the calls
really overlap, runs its share of the work through the services and closes
its connection when it is done. The tests use committed rows
(`transaction=True`) so each thread sees what the others wrote. What must
hold: no overdraft, no double settlement, one effect per idempotency key,
and no error other than the documented refusals reaching a caller (a
deadlock retried inside a service is fine; one that escapes is not).
"""

from __future__ import annotations

import contextlib
import queue
import random
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.db import DatabaseError, connection
from django.utils import timezone

from accounts.errors import ApplicationError
from metering.models import CreditLot, Hold, HoldStatus, JournalTransaction, TransactionKind
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import (
    credits_adjust,
    credits_expire,
    credits_grant,
    credits_transfer,
    hold_capture,
    hold_place,
    hold_release,
    transaction_reverse,
)
from tests.factories import OrganizationFactory
from tests.helpers import credits

WALLET, ESCROW = "wallet", "escrow"

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@dataclass
class Outcome:
    item: Any
    value: Any = None
    code: str | None = None  # ApplicationError.code
    error: BaseException | None = None  # anything else: always a failure

    @property
    def ok(self) -> bool:
        return self.code is None and self.error is None


def run_concurrently(
    work: Callable[[Any], Any], items: Iterable[Any], *, threads: int
) -> list[Outcome]:
    """Run `work(item)` for every item on `threads` threads, each with its own connection."""
    todo: queue.Queue = queue.Queue()
    for item in items:
        todo.put(item)
    outcomes: list[Outcome] = []
    worker_errors: list[BaseException] = []  # a thread that could not even start
    lock = threading.Lock()
    barrier = threading.Barrier(threads)

    def worker() -> None:
        try:
            connection.ensure_connection()
            # Find deadlocks in 50 ms instead of the default second, so a race
            # that deadlocks fails the test quickly instead of slowly. Only a
            # superuser may set it; elsewhere the default stays.
            with contextlib.suppress(DatabaseError), connection.cursor() as cursor:
                cursor.execute("SET deadlock_timeout = '50ms'")
            barrier.wait(timeout=60)
            while True:
                try:
                    item = todo.get_nowait()
                except queue.Empty:
                    return
                outcome = Outcome(item=item)
                try:
                    outcome.value = work(item)
                except ApplicationError as exc:
                    outcome.code = exc.code
                except BaseException as exc:
                    outcome.error = exc
                with lock:
                    outcomes.append(outcome)
        except BaseException as exc:
            with lock:
                worker_errors.append(exc)
        finally:
            connection.close()

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in pool), "a worker thread is stuck"
    assert worker_errors == []
    return outcomes


def unexpected(outcomes: list[Outcome], *allowed_codes: str) -> list[str]:
    return [
        repr(o.error) if o.error is not None else f"ApplicationError({o.code})"
        for o in outcomes
        if o.error is not None or (o.code is not None and o.code not in allowed_codes)
    ]


def grant(organization, amount: int, **kwargs) -> CreditLot:
    params = {
        "source": "pack",
        "paid": True,
        "resellable": False,
        "key": f"race-grant-{uuid.uuid4().hex}",
    }
    params.update(kwargs)
    return credits_grant(organization=organization, amount=amount, **params)


def test_holds_racing_for_one_wallet_never_overdraw_it():
    # given a wallet holding 300 credits
    org = OrganizationFactory()
    grant(org, credits(300))

    # when 500 holds of 1 credit each race for it on 32 connections
    outcomes = run_concurrently(
        lambda n: hold_place(organization=org, amount=credits(1), key=f"race-hold-{n}"),
        range(500),
        threads=32,
    )

    # then exactly 300 were placed and 200 refused for want of credits, nothing else
    assert unexpected(outcomes, "insufficient_credits") == []
    assert len(outcomes) == 500
    assert sum(o.ok for o in outcomes) == 300
    assert sum(o.code == "insufficient_credits" for o in outcomes) == 200
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (0, credits(300))
    assert Hold.objects.filter(organization=org, status=HoldStatus.PENDING).count() == 300
    assert JournalTransaction.objects.filter(kind=TransactionKind.HOLD_PLACE).count() == 300
    assert {o.value.key for o in outcomes if o.ok} == set(
        Hold.objects.filter(organization=org).values_list("key", flat=True)
    )
    assert ledger_reconcile().ok


def test_ring_transfers_in_both_directions_conserve_credits():
    # given three organizations with 50 credits each, in lots that differ in
    # priority, expiry and paid flag so transfers split lots
    orgs = [OrganizationFactory() for _ in range(3)]
    for org in orgs:
        grant(org, credits(20), priority=10, source="promotion", paid=False)
        grant(org, credits(30), priority=100, expires_at=timezone.now() + timedelta(days=30))
    rng = random.Random(20240607)
    ring = [(0, 1), (1, 2), (2, 0)]
    transfers = [
        (n, *(pair if rng.random() < 0.5 else pair[::-1]), rng.randint(1, 20_000_000))
        for n, pair in enumerate(rng.choice(ring) for _ in range(200))
    ]

    # when 200 transfers run A->B->C->A and the other way round on 16 connections
    outcomes = run_concurrently(
        lambda t: credits_transfer(
            source=orgs[t[1]], destination=orgs[t[2]], amount=t[3], key=f"race-ring-{t[0]}"
        ),
        transfers,
        threads=16,
    )

    # then only refusals for want of credits reached a caller, and every
    # organization holds its start plus what it received less what it sent
    assert unexpected(outcomes, "insufficient_credits") == []
    assert len(outcomes) == 200
    succeeded = [o.item for o in outcomes if o.ok]
    assert succeeded, "no transfer went through"
    assert JournalTransaction.objects.filter(kind=TransactionKind.TRANSFER).count() == len(
        succeeded
    )
    expected = [credits(50)] * 3
    for _, src, dst, amount in succeeded:
        expected[src] -= amount
        expected[dst] += amount
    balances = [organization_balance(organization=org) for org in orgs]
    assert [b.available for b in balances] == expected
    assert sum(b.available for b in balances) == credits(150)
    assert all(b.held == 0 and b.escrowed == 0 for b in balances)
    report = ledger_reconcile()
    assert report.ok, report.violations


def test_one_grant_key_sent_fifty_times_at_once_grants_once():
    # given a new organization (its ledger accounts do not exist yet)
    org = OrganizationFactory()

    # when the same grant under one key is sent 50 times at once, on 32 connections
    outcomes = run_concurrently(
        lambda _: credits_grant(
            organization=org,
            amount=credits(25),
            source="subscription",
            paid=True,
            resellable=True,
            key="invoice-in_race",
        ),
        range(50),
        threads=32,
    )

    # then every caller got the one lot, and the credits arrived once
    assert unexpected(outcomes) == []
    lot_pks = {o.value.pk for o in outcomes}
    assert len(lot_pks) == 1
    assert JournalTransaction.objects.filter(idempotency_key="grant:invoice-in_race").count() == 1
    assert list(CreditLot.objects.filter(organization=org).values_list("pk", flat=True)) == list(
        lot_pks
    )
    assert organization_balance(organization=org).available == credits(25)


def test_one_hold_key_sent_fifty_times_at_once_holds_once():
    # given a wallet of 100 credits
    org = OrganizationFactory()
    grant(org, credits(100))

    # when the same hold (one job id) is placed 50 times at once, on 32 connections
    outcomes = run_concurrently(
        lambda _: hold_place(organization=org, amount=credits(30), key="job-race"),
        range(50),
        threads=32,
    )

    # then there is one hold, every caller got it, and 30 credits are held once
    assert unexpected(outcomes) == []
    assert len({o.value.pk for o in outcomes}) == 1
    assert Hold.objects.filter(key="job-race").count() == 1
    assert JournalTransaction.objects.filter(kind=TransactionKind.HOLD_PLACE).count() == 1
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(70), credits(30))


def test_fifty_identical_captures_of_one_hold_capture_once():
    # given a hold of 40 credits on a wallet of 100
    org = OrganizationFactory()
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(40), key="job-capture-same")

    # when the same capture of 25 credits is sent 50 times at once (worker retries)
    outcomes = run_concurrently(
        lambda _: hold_capture(key="job-capture-same", amount=credits(25)),
        range(50),
        threads=32,
    )

    # then each caller sees the one settlement and 25 credits were spent once
    assert unexpected(outcomes) == []
    assert {(o.value.status, o.value.captured) for o in outcomes} == {
        (HoldStatus.CAPTURED, credits(25))
    }
    assert JournalTransaction.objects.filter(kind=TransactionKind.HOLD_CAPTURE).count() == 1
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(75), 0)


def test_fifty_different_captures_of_one_hold_settle_it_once():
    # given a hold of 50 credits on a wallet of 100
    org = OrganizationFactory()
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(50), key="job-capture-diff")

    # when captures of 1, 2, ... 50 credits are sent at once, on 32 connections
    outcomes = run_concurrently(
        lambda n: hold_capture(key="job-capture-diff", amount=credits(n)),
        range(1, 51),
        threads=32,
    )

    # then exactly one capture won, the other 49 were told the hold is settled
    assert unexpected(outcomes, "hold_already_settled") == []
    winners = [o for o in outcomes if o.ok]
    assert len(winners) == 1
    assert sum(o.code == "hold_already_settled" for o in outcomes) == 49
    captured = credits(winners[0].item)
    hold = Hold.objects.get(key="job-capture-diff")
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, captured)
    assert JournalTransaction.objects.filter(kind=TransactionKind.HOLD_CAPTURE).count() == 1
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(100) - captured, 0)


def test_mixed_ledger_traffic_keeps_every_invariant():
    # given three organizations with lots that expire over the next days
    orgs = [OrganizationFactory() for _ in range(3)]
    start = timezone.now()
    for org in orgs:
        grant(org, credits(40), resellable=True, expires_at=start + timedelta(days=2))
        grant(org, credits(40), source="promotion", paid=False, priority=10)
    rng = random.Random(7)
    kinds = ["hold", "hold", "transfer", "transfer", "grant", "adjust", "grant_reversed", "expire"]
    ops = [
        (n, rng.choice(kinds), rng.randrange(3), rng.randrange(3), rng.random()) for n in range(300)
    ]

    def op(item):
        n, kind, a, b, x = item
        amount = 1 + int(x * credits(8))
        if kind == "hold":
            hold_place(organization=orgs[a], amount=amount, key=f"mix-hold-{n}")
            if x < 0.2:
                hold_release(key=f"mix-hold-{n}")
                return ("captured", 0)
            captured = hold_capture(key=f"mix-hold-{n}", amount=amount // (1 + n % 3)).captured
            return ("captured", captured)
        if kind == "transfer":
            source_kind, destination_kind = [
                (WALLET, WALLET),
                (WALLET, ESCROW),
                (ESCROW, WALLET),
            ][n % 3]
            if a == b and source_kind == destination_kind:
                b = (b + 1) % 3
            credits_transfer(
                source=orgs[a],
                destination=orgs[b],
                amount=amount,
                key=f"mix-transfer-{n}",
                source_kind=source_kind,
                destination_kind=destination_kind,
                only_resellable=destination_kind == ESCROW,
            )
            return ("moved", 0)
        if kind == "grant":
            grant(orgs[a], amount, expires_at=start + timedelta(days=1 + n % 4))
            return ("granted", amount)
        if kind == "adjust":
            credits_adjust(organization=orgs[a], amount=-amount, reason="race", key=f"mix-adj-{n}")
            return ("removed", amount)
        if kind == "grant_reversed":
            lot = grant(orgs[a], amount)
            try:
                transaction_reverse(original=lot.created_by, reason="race")
            except ApplicationError as exc:
                # Another thread spent from it first: the grant stands.
                assert exc.code in ("insufficient_credits", "reversal_not_possible"), exc.code
                return ("granted", amount)
            return ("granted", 0)
        expired = credits_expire(now=start + timedelta(days=1 + n % 5))
        return ("expired", expired)

    # when 300 holds, captures, transfers, grants, adjustments, reversals and
    # expiry sweeps (with a simulated clock) run on 16 connections
    outcomes = run_concurrently(op, ops, threads=16)

    # then only the documented refusals reached a caller, no hold is left
    # pending, every invariant holds, and the credits add up
    assert unexpected(outcomes, "insufficient_credits", "insufficient_resellable_credits") == []
    assert len(outcomes) == 300
    report = ledger_reconcile()
    assert report.ok, report.violations
    totals = Counter()
    for o in outcomes:
        if o.ok:
            totals[o.value[0]] += o.value[1]
    balances = [organization_balance(organization=org) for org in orgs]
    assert all(b.held == 0 for b in balances)
    in_organizations = sum(b.available + b.escrowed for b in balances)
    assert in_organizations == (
        credits(240)
        + totals["granted"]
        - totals["captured"]
        - totals["removed"]
        - totals["expired"]
    )


def test_captures_racing_transfers_into_the_same_wallet_do_not_deadlock_out():
    # given 20 pending holds on one organization, and another with credits to send it
    payer, receiver = OrganizationFactory(), OrganizationFactory()
    grant(receiver, credits(20))
    grant(payer, credits(20))
    for n in range(20):
        hold_place(organization=receiver, amount=credits(1), key=f"settle-race-{n}")

    # when its jobs settle while transfers keep arriving in its wallet, on 8 connections
    def op(n):
        if n % 2:
            return hold_capture(key=f"settle-race-{n // 2}", amount=credits("0.5"))
        return credits_transfer(
            source=payer, destination=receiver, amount=credits(1), key=f"arrive-{n}"
        )

    outcomes = run_concurrently(op, range(40), threads=8)

    # then every settlement and every transfer went through
    assert unexpected(outcomes) == []
    balance = organization_balance(organization=receiver)
    assert (balance.available, balance.held) == (credits(30), 0)
    assert organization_balance(organization=payer).available == 0
