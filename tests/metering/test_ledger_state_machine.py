"""The credit ledger against an in-memory model, driven by Hypothesis on real PostgreSQL.

A `RuleBasedStateMachine` grants credits (every source, paid or free,
resellable or not, several priorities and expiries), places, captures (in
part) and releases holds, moves credits between three organizations (wallet
to wallet, wallet to escrow, escrow to wallet), adjusts, expires and reverses.
The model keeps every organization's wallet, holds and escrow balance, every
lot's remaining credits (burned in the order documented in
metering/services/lots.py) and every hold's state. After each step the
database must equal the model and every invariant of `ledger_reconcile()`
must hold; a refusal the model expects must carry the expected code and
change nothing at all (rows, balances, lots, holds).

Time: services that spend read `timezone.now()`, and a lot must expire in
the future when granted, so every expiry is a day or more ahead of real time.
Time passing is simulated by a monotonic clock handed to the sweepers
(`credits_expire`, `account_expire_lots`, `holds_expire`), which take `now`.
Spending therefore never meets a lot that is expired in real time.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pytest
from django.db import transaction
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from accounts.errors import ApplicationError
from metering.models import (
    CreditLot,
    Hold,
    HoldStatus,
    JournalTransaction,
    LedgerAccount,
    LedgerEntry,
    LotMovement,
    LotSource,
    TransactionKind,
)
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
    holds_expire,
    transaction_reverse,
)
from metering.services.lots import account_expire_lots
from tests.factories import OrganizationFactory
from tests.helpers import MICRO, credits

WALLET, HOLDS, ESCROW = "wallet", "holds", "escrow"
ORGS = 3
REVERSIBLE = {
    TransactionKind.GRANT,
    TransactionKind.ADJUSTMENT,
    TransactionKind.TRANSFER,
    TransactionKind.HOLD_CAPTURE,
}

ROUTES = [(WALLET, WALLET), (WALLET, ESCROW), (ESCROW, WALLET)]

org_index = st.integers(min_value=0, max_value=ORGS - 1)
# Whole credits make exact ties (a hold of everything, a lot burned to zero)
# likely; odd micro-credit amounts split lots at arbitrary points.
amounts = st.one_of(st.integers(1, 40).map(credits), st.integers(1, 40 * MICRO))
spend_amounts = st.one_of(st.integers(1, 12).map(credits), st.integers(1, 12 * MICRO))
# How an amount relates to the balance it spends: some of it (most often), as
# drawn (often more than there is), all of it, one micro-credit more than all.
how_much = st.sampled_from(["part", "part", "drawn", "all", "one_more"])
# (organization, amount, source, paid, resellable, priority, expires in hours)
lot_terms = st.tuples(
    org_index,
    amounts,
    st.sampled_from(LotSource.values),
    st.booleans(),
    st.booleans(),
    st.sampled_from([10, 50, 100]),
    st.none() | st.integers(24, 24 * 30),
)
pick = st.integers(min_value=0, max_value=10**6)


@dataclass
class LotModel:
    pk: int
    account: tuple[int, str]
    source: str
    paid: bool
    resellable: bool
    priority: int
    expires_at: datetime | None
    amount: int
    remaining: int


@dataclass
class HoldModel:
    key: str
    org: int
    amount: int
    expires_at: datetime
    status: str = HoldStatus.PENDING
    captured: int = 0
    placed_at: datetime | None = None  # the hold row's created_at


@dataclass
class TxnModel:
    """A journal transaction the machine made, with what reversing it must undo."""

    pk: int
    kind: str
    # Organization-account entries of the original: ((org, kind), amount).
    postings: list[tuple[tuple[int, str], int]] = field(default_factory=list)
    # Lot movements of the original: (lot pk, amount).
    movements: list[tuple[int, int]] = field(default_factory=list)
    reversed_by: int | None = None


def spend_order(lot: LotModel) -> tuple:
    """The documented burn order for lots not yet expired: priority, expiry, free first, age."""
    expiry = (0, lot.expires_at.timestamp()) if lot.expires_at else (1, 0.0)
    return (lot.priority, expiry, lot.paid, lot.pk)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.orgs = []
        self.bal: dict[tuple[int, str], int] = {
            (o, kind): 0 for o in range(ORGS) for kind in (WALLET, HOLDS, ESCROW)
        }
        self.lots: dict[int, LotModel] = {}
        self.holds: list[HoldModel] = []
        self.txns: list[TxnModel] = []
        self.grants: list[tuple[int, dict]] = []  # (lot pk, the grant's keyword arguments)

    # --- helpers -------------------------------------------------------------

    def snapshot(self) -> tuple:
        """Everything a refused request must leave exactly as it was."""
        return (
            JournalTransaction.objects.count(),
            LedgerEntry.objects.count(),
            LotMovement.objects.count(),
            CreditLot.objects.count(),
            Hold.objects.count(),
            LedgerAccount.objects.count(),
            sorted(
                LedgerAccount.objects.filter(organization__in=self.orgs).values_list(
                    "pk", "balance", "next_expiry_at"
                )
            ),
            sorted(
                CreditLot.objects.filter(organization__in=self.orgs).values_list("pk", "remaining")
            ),
            sorted(
                Hold.objects.filter(organization__in=self.orgs).values_list(
                    "pk", "status", "captured"
                )
            ),
        )

    def refused(self, code: str, call) -> None:
        before = self.snapshot()
        with pytest.raises(ApplicationError) as excinfo:
            call()
        assert excinfo.value.code == code, (excinfo.value.code, excinfo.value.message)
        assert self.snapshot() == before, f"refused with {code} but the database changed"

    def unchanged(self, call):
        before = self.snapshot()
        result = call()
        assert self.snapshot() == before, "a replay changed the database"
        return result

    def amount_for(self, how: str, drawn: int, balance: int) -> int:
        if how == "part" and balance > 0:
            return 1 + drawn % balance
        if how == "all" and balance > 0:
            return balance
        if how == "one_more":
            return balance + 1
        return drawn

    def open_lots(self, account: tuple[int, str]) -> list[LotModel]:
        return [lot for lot in self.lots.values() if lot.account == account and lot.remaining > 0]

    def burn(self, lots: list[LotModel], amount: int) -> list[tuple[int, int]]:
        taken = []
        left = amount
        for lot in sorted(lots, key=spend_order):
            if left == 0:
                break
            take = min(lot.remaining, left)
            lot.remaining -= take
            left -= take
            taken.append((lot.pk, take))
        assert left == 0, "the model's lots do not cover its balance"
        return taken

    def add_lot(self, lot: CreditLot, account: tuple[int, str]) -> None:
        self.lots[lot.pk] = LotModel(
            pk=lot.pk,
            account=account,
            source=lot.source,
            paid=lot.paid,
            resellable=lot.resellable,
            priority=lot.priority,
            expires_at=lot.expires_at,
            amount=lot.amount,
            remaining=lot.amount,
        )

    def backing(self, account: tuple[int, str], now: datetime) -> dict[int, int]:
        """holds_backing: what of each lot the pending holds will burn, each hold replayed
        over the lots in its capture's order, the most recently placed first. A capture
        burns the lots that expired after its hold was placed first, soonest-expired
        first, then the unexpired ones in spend order; never those expired before."""
        if account[1] != WALLET:
            return {}
        lots = self.open_lots(account)
        free = {lot.pk: lot.remaining for lot in lots}
        pending = [h for h in self.holds if h.org == account[0] and h.status == HoldStatus.PENDING]
        for hold in sorted(pending, key=lambda h: h.placed_at, reverse=True):
            usable = sorted(
                (
                    lot
                    for lot in lots
                    if lot.expires_at is not None and hold.placed_at < lot.expires_at <= now
                ),
                key=lambda lot: (lot.expires_at, *spend_order(lot)),
            )
            unexpired = sorted(
                (lot for lot in lots if lot.expires_at is None or lot.expires_at > now),
                key=spend_order,
            )
            left = hold.amount
            for lot in (*usable, *unexpired):
                take = min(free[lot.pk], left)
                free[lot.pk] -= take
                left -= take
        return {lot.pk: lot.remaining - free[lot.pk] for lot in lots}

    def expire_account(self, account: tuple[int, str], now: datetime) -> int:
        """account_expire_lots: expired remainders go, less what pending holds will burn."""
        backing = self.backing(account, now)
        movable = 0
        for lot in self.open_lots(account):
            if lot.expires_at is not None and lot.expires_at <= now:
                take = lot.remaining - backing.get(lot.pk, 0)
                lot.remaining -= take
                movable += take
        self.bal[account] -= movable
        return movable

    def record_new_expiries(self) -> None:
        known = {t.pk for t in self.txns}
        for pk in JournalTransaction.objects.filter(
            kind=TransactionKind.EXPIRY, organization__in=self.orgs
        ).values_list("pk", flat=True):
            if pk not in known:
                self.txns.append(TxnModel(pk=pk, kind=TransactionKind.EXPIRY))

    # --- rules -------------------------------------------------------------------

    @initialize(start=st.lists(lot_terms, min_size=2, max_size=8))
    def open_organizations(self, start) -> None:
        self.start = timezone.now()
        self.clock = self.start
        self.orgs = [OrganizationFactory() for _ in range(ORGS)]
        for terms in start:
            self.grant_lot(*terms)

    def grant_lot(self, org, amount, source, paid, resellable, priority, expires_in_hours):
        kwargs = {
            "organization": self.orgs[org],
            "amount": amount,
            "source": source,
            "paid": paid,
            "resellable": resellable and paid,  # only paid credits may be resold
            "priority": priority,
            "expires_at": (
                None if expires_in_hours is None else self.start + timedelta(hours=expires_in_hours)
            ),
            "key": f"sm-{uuid.uuid4().hex}",
        }
        lot = credits_grant(**kwargs)
        assert (lot.amount, lot.remaining, lot.priority) == (amount, amount, priority)
        self.add_lot(lot, (org, WALLET))
        self.bal[(org, WALLET)] += amount
        self.grants.append((lot.pk, kwargs))
        self.txns.append(
            TxnModel(
                pk=lot.created_by_id,
                kind=TransactionKind.GRANT,
                postings=[((org, WALLET), amount)],
                movements=[(lot.pk, amount)],
            )
        )

    @rule(terms=lot_terms)
    def grant(self, terms) -> None:
        self.grant_lot(*terms)

    @rule(
        org=org_index,
        how=how_much,
        drawn=spend_amounts,
        ttl_hours=st.integers(1, 24 * 10),
        then=st.sampled_from(["leave_pending", "leave_pending", "capture_part", "capture_all"]),
        part=pick,
    )
    def place_hold(self, org, how, drawn, ttl_hours, then, part) -> None:
        """Place a hold; as often as not, its job finishes at once and it is captured."""
        available = self.bal[(org, WALLET)]
        amount = self.amount_for(how, drawn, available)
        key = f"sm-job-{uuid.uuid4().hex}"

        def call():
            return hold_place(
                organization=self.orgs[org], amount=amount, key=key, ttl=timedelta(hours=ttl_hours)
            )

        if amount > available:
            self.refused("insufficient_credits", call)
            return
        hold = call()
        assert (hold.amount, hold.status, hold.captured) == (amount, HoldStatus.PENDING, 0)
        self.bal[(org, WALLET)] -= amount
        self.bal[(org, HOLDS)] += amount
        self.holds.append(
            HoldModel(
                key=key,
                org=org,
                amount=amount,
                expires_at=hold.expires_at,
                placed_at=hold.created_at,
            )
        )
        self.txns.append(TxnModel(pk=hold.place_transaction_id, kind=TransactionKind.HOLD_PLACE))
        if then != "leave_pending":
            self.settle(self.holds[-1], then, part)

    @precondition(lambda self: self.grants or self.holds)
    @rule(which=st.sampled_from(["grant", "hold"]), idx=pick, same_request=st.booleans())
    def repeat_request(self, which, idx, same_request) -> None:
        """A retry under the same key replays the first result; another request conflicts."""
        if which == "grant" and self.grants:
            lot_pk, kwargs = self.grants[idx % len(self.grants)]
            if same_request:
                lot = self.unchanged(lambda: credits_grant(**kwargs))
                assert lot.pk == lot_pk
            else:
                self.refused(
                    "idempotency_conflict",
                    lambda: credits_grant(**{**kwargs, "amount": kwargs["amount"] + 1}),
                )
        elif self.holds:
            model = self.holds[idx % len(self.holds)]
            organization = self.orgs[model.org]
            amount = model.amount if same_request else model.amount + 1

            def call():
                return hold_place(organization=organization, amount=amount, key=model.key)

            if same_request:
                hold = self.unchanged(call)
                assert (hold.key, hold.status) == (model.key, model.status)
            else:
                self.refused("idempotency_conflict", call)

    @precondition(lambda self: self.holds)
    @rule(
        idx=pick,
        action=st.sampled_from(
            ["capture_all", "capture_part", "capture_none", "capture_too_much", "release", "repeat"]
        ),
        part=pick,
        a_pending_one=st.booleans(),
    )
    def settle_hold(self, idx, action, part, a_pending_one) -> None:
        pending = [h for h in self.holds if h.status == HoldStatus.PENDING]
        candidates = pending if a_pending_one and pending else self.holds
        self.settle(candidates[idx % len(candidates)], action, part)

    def settle(self, model: HoldModel, action: str, part: int) -> None:
        if action == "repeat":
            # Settle again exactly as before (or release a pending one).
            action = "capture" if model.status == HoldStatus.CAPTURED else "release"
            captured = model.captured
        else:
            captured = {
                "capture_all": model.amount,
                "capture_part": 1 + part % max(1, model.amount - 1),
                "capture_none": 0,
                "capture_too_much": model.amount + 1,
                "release": 0,
            }[action]
        status = HoldStatus.RELEASED if action == "release" else HoldStatus.CAPTURED

        def call():
            if status == HoldStatus.RELEASED:
                return hold_release(key=model.key)
            return hold_capture(key=model.key, amount=captured)

        if model.status != HoldStatus.PENDING:
            if model.status == status and model.captured == captured:
                hold = self.unchanged(call)
                assert (hold.status, hold.captured) == (model.status, model.captured)
            else:
                self.refused("hold_already_settled", call)
            return
        if captured > model.amount:
            self.refused("capture_exceeds_hold", call)
            return

        hold = call()
        assert (hold.status, hold.captured) == (status, captured)
        org = model.org
        self.bal[(org, HOLDS)] -= model.amount
        self.bal[(org, WALLET)] += model.amount - captured
        burned = self.burn(self.open_lots((org, WALLET)), captured) if captured else []
        model.status, model.captured = status, captured
        if status == HoldStatus.RELEASED:
            self.txns.append(
                TxnModel(pk=hold.settle_transaction_id, kind=TransactionKind.HOLD_RELEASE)
            )
            return
        postings = [((org, HOLDS), -model.amount)]
        if model.amount - captured:
            postings.append(((org, WALLET), model.amount - captured))
        self.txns.append(
            TxnModel(
                pk=hold.settle_transaction_id,
                kind=TransactionKind.HOLD_CAPTURE,
                postings=postings,
                movements=[(pk, -taken) for pk, taken in burned],
            )
        )

    @rule(
        src=org_index,
        dst=org_index,
        route=pick,
        how=how_much,
        drawn=spend_amounts,
        only_resellable=st.booleans(),
        as_marketplace_purchase=st.booleans(),
    )
    def transfer(self, src, dst, route, how, drawn, only_resellable, as_marketplace_purchase):
        # Most often a route whose source has credits: an empty escrow would
        # otherwise turn most transfers into refusals.
        funded = [r for r in ROUTES if self.bal[(src, r[0])] > 0]
        routes = funded if funded and how != "one_more" else ROUTES
        src_kind, dst_kind = routes[route % len(routes)]
        if src == dst and src_kind == dst_kind:
            dst = (dst + 1) % ORGS  # one account to itself: see invalid_request
        source, destination = (src, src_kind), (dst, dst_kind)
        amount = self.amount_for(how, drawn, self.bal[source])
        overrides = (
            {"lot_source": LotSource.MARKETPLACE, "resellable": False}
            if as_marketplace_purchase
            else {}
        )

        def call():
            return credits_transfer(
                source=self.orgs[src],
                destination=self.orgs[dst],
                amount=amount,
                key=f"sm-transfer-{uuid.uuid4().hex}",
                source_kind=src_kind,
                destination_kind=dst_kind,
                only_resellable=only_resellable,
                **overrides,
            )

        if amount > self.bal[source]:
            self.refused("insufficient_credits", call)
            return
        candidates = [
            lot for lot in self.open_lots(source) if lot.resellable or not only_resellable
        ]
        if sum(lot.remaining for lot in candidates) < amount:
            self.refused("insufficient_resellable_credits", call)
            return

        txn = call()
        parents = {lot.pk: lot for lot in candidates}
        burned = self.burn(candidates, amount)
        self.bal[source] -= amount
        self.bal[destination] += amount
        created = list(CreditLot.objects.filter(created_by=txn).order_by("pk"))
        # One new lot per burned lot, in burn order, keeping expiry, priority and paid.
        assert [(lot.parent_id, lot.amount) for lot in created] == burned
        for lot in created:
            parent = parents[lot.parent_id]
            expected_source = LotSource.MARKETPLACE if as_marketplace_purchase else parent.source
            expected_resellable = False if as_marketplace_purchase else parent.resellable
            assert (lot.source, lot.resellable) == (expected_source, expected_resellable)
            assert (lot.paid, lot.priority, lot.expires_at) == (
                parent.paid,
                parent.priority,
                parent.expires_at,
            )
            self.add_lot(lot, destination)
        self.txns.append(
            TxnModel(
                pk=txn.pk,
                kind=TransactionKind.TRANSFER,
                postings=[(source, -amount), (destination, amount)],
                movements=[(pk, -taken) for pk, taken in burned]
                + [(lot.pk, lot.amount) for lot in created],
            )
        )

    @rule(
        org=org_index,
        add=st.booleans(),
        how=how_much,
        drawn=spend_amounts,
        expires_in_hours=st.none() | st.integers(24, 24 * 30),
    )
    def adjust(self, org, add, how, drawn, expires_in_hours) -> None:
        wallet = (org, WALLET)
        key = f"sm-adjust-{uuid.uuid4().hex}"
        if add:
            expires_at = (
                None if expires_in_hours is None else self.start + timedelta(hours=expires_in_hours)
            )
            txn = credits_adjust(
                organization=self.orgs[org],
                amount=drawn,
                reason="goodwill after an outage",
                key=key,
                expires_at=expires_at,
            )
            lot = txn.created_lots.get()
            assert (lot.source, lot.paid, lot.resellable) == (LotSource.ADJUSTMENT, False, False)
            assert (lot.amount, lot.expires_at) == (drawn, expires_at)
            self.add_lot(lot, wallet)
            self.bal[wallet] += drawn
            self.txns.append(
                TxnModel(
                    pk=txn.pk,
                    kind=txn.kind,
                    postings=[(wallet, drawn)],
                    movements=[(lot.pk, drawn)],
                )
            )
            return

        amount = self.amount_for(how, drawn, self.bal[wallet])

        def call():
            return credits_adjust(
                organization=self.orgs[org], amount=-amount, reason="duplicate grant", key=key
            )

        # A debit takes what pending holds leave of each lot, never a plan's overage
        # allowance (lent credits, invoiced as overage when burned).
        now = timezone.now()
        backing = self.backing(wallet, now)
        free = [
            (lot, lot.remaining - backing.get(lot.pk, 0))
            for lot in self.open_lots(wallet)
            if lot.source != LotSource.OVERAGE and (lot.expires_at is None or lot.expires_at > now)
        ]
        if amount > sum(has for _, has in free):
            self.refused("insufficient_credits", call)
            return
        txn = call()
        burned = []
        left = amount
        for lot, has in sorted(free, key=lambda pair: spend_order(pair[0])):
            take = min(has, left)
            if take:
                lot.remaining -= take
                left -= take
                burned.append((lot.pk, take))
        self.bal[wallet] -= amount
        self.txns.append(
            TxnModel(
                pk=txn.pk,
                kind=TransactionKind.ADJUSTMENT,
                postings=[(wallet, -amount)],
                movements=[(pk, -taken) for pk, taken in burned],
            )
        )

    @rule(
        hours=st.integers(0, 48),
        sweeper=st.sampled_from(["credits_expire", "account_expire_lots", "holds_expire"]),
        org=org_index,
        kind=st.sampled_from([WALLET, ESCROW]),
    )
    def time_passes(self, hours, sweeper, org, kind) -> None:
        """Advance the simulated clock and run one sweeper at it."""
        self.clock += timedelta(hours=hours)
        if sweeper == "credits_expire":
            # Sweeps every account in the database (other examples' too), so
            # its total is not asserted; the balances and lots are.
            credits_expire(now=self.clock)
            for o in range(ORGS):
                for k in (WALLET, ESCROW):
                    self.expire_account((o, k), self.clock)
            self.record_new_expiries()
        elif sweeper == "account_expire_lots":
            account = LedgerAccount.objects.filter(organization=self.orgs[org], kind=kind).first()
            if account is None:
                return  # never used: nothing to sweep
            with transaction.atomic():
                expired = account_expire_lots(account=account, now=self.clock)
            assert expired == self.expire_account((org, kind), self.clock)
            self.record_new_expiries()
        else:
            holds_expire(now=self.clock)
            for model in self.holds:
                if model.status == HoldStatus.PENDING and model.expires_at <= self.clock:
                    model.status = HoldStatus.EXPIRED
                    self.bal[(model.org, HOLDS)] -= model.amount
                    self.bal[(model.org, WALLET)] += model.amount
                    settle_pk = Hold.objects.get(key=model.key).settle_transaction_id
                    self.txns.append(TxnModel(pk=settle_pk, kind=TransactionKind.HOLD_EXPIRE))

    @precondition(lambda self: self.txns)
    @rule(idx=pick, prefer=st.sampled_from([None, *sorted(REVERSIBLE)]))
    def reverse(self, idx, prefer) -> None:
        """Reverse any transaction made so far; most often one of a kind not yet reversed."""
        preferred = [t for t in self.txns if t.kind == prefer and t.reversed_by is None]
        candidates = preferred or self.txns
        original = candidates[idx % len(candidates)]
        db_original = JournalTransaction.objects.get(pk=original.pk)

        def call():
            return transaction_reverse(original=db_original, reason="entered in error")

        if original.kind not in REVERSIBLE:
            self.refused("not_reversible", call)
            return
        if original.kind == TransactionKind.HOLD_CAPTURE and not original.movements:
            # A capture of nothing moved no credits; reversing it currently
            # writes a transaction without entries. That case has its own
            # test below, so the machine keeps exploring past it.
            return
        if original.reversed_by is not None:
            reversal = self.unchanged(call)
            assert reversal.pk == original.reversed_by
            return

        deltas: dict[tuple[int, str], int] = {}
        for (org, kind), amount in original.postings:
            # What a capture took from the hold goes back to the wallet.
            account = (org, WALLET) if kind == HOLDS else (org, kind)
            deltas[account] = deltas.get(account, 0) - amount
        # Credits already spent, moved on or expired cannot come back, whether
        # the account or one of the lots the original filled is short.
        if any(self.bal[account] + delta < 0 for account, delta in deltas.items()) or any(
            self.lots[pk].remaining - amount < 0 for pk, amount in original.movements
        ):
            self.refused("reversal_not_possible", call)
            return

        reversal = call()
        assert (reversal.kind, reversal.reverses_id) == (TransactionKind.REVERSAL, original.pk)
        for account, delta in deltas.items():
            self.bal[account] += delta
        for pk, amount in original.movements:
            self.lots[pk].remaining -= amount
        original.reversed_by = reversal.pk
        self.txns.append(TxnModel(pk=reversal.pk, kind=TransactionKind.REVERSAL))

    @rule(
        case=st.sampled_from(
            [
                "grant_zero",
                "grant_bool",
                "grant_free_resellable",
                "grant_already_expired",
                "grant_unknown_source",
                "hold_negative",
                "capture_negative",
                "capture_unknown_hold",
                "adjust_zero",
                "adjust_without_reason",
                "transfer_to_holds",
                "transfer_to_itself",
            ]
        ),
        org=org_index,
    )
    def invalid_request(self, case, org) -> None:
        organization = self.orgs[org]
        grant = {
            "organization": organization,
            "amount": credits(1),
            "source": LotSource.PACK,
            "paid": True,
            "resellable": False,
            "key": f"sm-invalid-{uuid.uuid4().hex}",
        }
        cases = {
            "grant_zero": ("invalid_amount", lambda: credits_grant(**{**grant, "amount": 0})),
            "grant_bool": ("invalid_amount", lambda: credits_grant(**{**grant, "amount": True})),
            "grant_free_resellable": (
                "invalid_lot",
                lambda: credits_grant(**{**grant, "paid": False, "resellable": True}),
            ),
            "grant_already_expired": (
                "lot_expired",
                lambda: credits_grant(**{**grant, "expires_at": timezone.now()}),
            ),
            "grant_unknown_source": (
                "invalid_source",
                lambda: credits_grant(**{**grant, "source": "gift"}),
            ),
            "hold_negative": (
                "invalid_amount",
                lambda: hold_place(organization=organization, amount=-1, key=grant["key"]),
            ),
            "capture_negative": (
                "invalid_amount",
                lambda: hold_capture(key=grant["key"], amount=-1),
            ),
            "capture_unknown_hold": (
                "hold_not_found",
                lambda: hold_capture(key=grant["key"], amount=1),
            ),
            "adjust_zero": (
                "invalid_amount",
                lambda: credits_adjust(
                    organization=organization, amount=0, reason="x", key=grant["key"]
                ),
            ),
            "adjust_without_reason": (
                "reason_required",
                lambda: credits_adjust(
                    organization=organization, amount=-1, reason=" ", key=grant["key"]
                ),
            ),
            "transfer_to_holds": (
                "invalid_account",
                lambda: credits_transfer(
                    source=organization,
                    destination=organization,
                    amount=1,
                    key=grant["key"],
                    destination_kind=HOLDS,
                ),
            ),
            "transfer_to_itself": (
                "invalid_transfer",
                lambda: credits_transfer(
                    source=organization, destination=organization, amount=1, key=grant["key"]
                ),
            ),
        }
        code, call = cases[case]
        self.refused(code, call)

    # --- invariants -----------------------------------------------------------------

    @invariant()
    def database_matches_model(self) -> None:
        if not self.orgs:
            return
        report = ledger_reconcile()
        assert report.ok, report.violations
        for org, organization in enumerate(self.orgs):
            balance = organization_balance(organization=organization)
            assert (balance.available, balance.held, balance.escrowed) == (
                self.bal[(org, WALLET)],
                self.bal[(org, HOLDS)],
                self.bal[(org, ESCROW)],
            ), f"organization {org}"
        lots = dict(
            CreditLot.objects.filter(organization__in=self.orgs).values_list("pk", "remaining")
        )
        assert lots == {pk: lot.remaining for pk, lot in self.lots.items()}
        holds = {
            key: (status, captured)
            for key, status, captured in Hold.objects.filter(
                organization__in=self.orgs
            ).values_list("key", "status", "captured")
        }
        assert holds == {h.key: (h.status, h.captured) for h in self.holds}


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_ledger_matches_its_model_under_random_operations():
    # given fresh organizations in every example, on committed PostgreSQL rows
    # when Hypothesis drives grants, holds, transfers, adjustments, expiry and reversals
    # then after every step the database equals the model and reconcile finds nothing
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=25,
            stateful_step_count=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.django_db(transaction=True)
def test_reversing_a_capture_of_nothing_leaves_the_ledger_balanced():
    # given a hold captured for nothing (the job failed before its first token)
    org = OrganizationFactory()
    credits_grant(
        organization=org,
        amount=credits(10),
        source=LotSource.PACK,
        paid=True,
        resellable=False,
        key=f"zero-capture-{uuid.uuid4().hex}",
    )
    hold_place(organization=org, amount=credits(4), key="zero-capture-job")
    settle = hold_capture(key="zero-capture-job", amount=0).settle_transaction
    entries_before = LedgerEntry.objects.count()

    # when finance reverses that capture
    with pytest.raises(ApplicationError) as refused:
        transaction_reverse(original=settle, reason="refund the failed job")

    # then it is refused: there is nothing to give back
    assert (refused.value.code, refused.value.status) == ("nothing_to_reverse", 409)

    # and no credit moved, and no journal transaction is left without entries
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(10), 0)
    assert LedgerEntry.objects.count() == entries_before
    report = ledger_reconcile()
    assert report.ok, report.violations
