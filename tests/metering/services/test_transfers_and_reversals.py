"""Transfers between organization accounts, reversals, and finance adjustments."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.errors import ApplicationError
from metering.models import (
    AccountKind,
    CreditLot,
    Hold,
    HoldStatus,
    JournalTransaction,
    LedgerAccount,
    LotSource,
    TransactionKind,
)
from metering.selectors import organization_balance
from metering.services import (
    credits_adjust,
    credits_expire,
    credits_transfer,
    hold_capture,
    hold_place,
    hold_release,
    transaction_reverse,
)
from tests.helpers import credits, ledger_rows, system_balance

pytestmark = pytest.mark.django_db


def remaining(*lots: CreditLot) -> list[int]:
    return [CreditLot.objects.get(pk=lot.pk).remaining for lot in lots]


def lot_state(organization) -> list[tuple]:
    return list(
        CreditLot.objects.filter(organization=organization)
        .order_by("pk")
        .values_list("pk", "account__kind", "remaining")
    )


def capture(org, amount: int) -> Hold:
    key = f"job-{uuid.uuid4()}"
    hold_place(organization=org, amount=amount, key=key)
    return hold_capture(key=key, amount=amount)


# --- transfers -----------------------------------------------------------------


def test_wallet_to_wallet_transfer_keeps_each_lots_expiry_priority_and_rights(
    org, other_org, grant
):
    # given
    soon = timezone.now() + timedelta(days=3)
    later = timezone.now() + timedelta(days=40)
    free = grant(
        org,
        credits(10),
        source=LotSource.PROMOTION,
        paid=False,
        resellable=False,
        priority=20,
        expires_at=soon,
    )
    paid = grant(org, credits(50), paid=True, resellable=True, priority=100, expires_at=later)

    # when
    txn = credits_transfer(
        source=org, destination=other_org, amount=credits(25), key="t-1", memo="gift"
    )

    # then
    assert txn.kind == TransactionKind.TRANSFER
    assert txn.memo == "gift"
    assert organization_balance(organization=org).available == credits(35)
    assert organization_balance(organization=other_org).available == credits(25)
    assert remaining(free, paid) == [0, credits(35)]
    arrived = list(CreditLot.objects.filter(organization=other_org).order_by("parent_id"))
    assert [
        (
            lot.parent_id,
            lot.amount,
            lot.source,
            lot.paid,
            lot.resellable,
            lot.priority,
            lot.expires_at,
        )
        for lot in arrived
    ] == [
        (free.pk, credits(10), LotSource.PROMOTION, False, False, 20, soon),
        (paid.pk, credits(15), LotSource.SUBSCRIPTION, True, True, 100, later),
    ]
    assert all(lot.account.kind == AccountKind.WALLET for lot in arrived)
    assert all(lot.created_by_id == txn.pk for lot in arrived)
    destination_wallet = LedgerAccount.objects.get(organization=other_org, kind=AccountKind.WALLET)
    assert destination_wallet.next_expiry_at == soon


def test_transfer_may_set_the_arriving_lots_source_and_resellability(org, other_org, grant):
    # given
    grant(org, credits(10), paid=True, resellable=True)

    # when
    credits_transfer(
        source=org,
        destination=other_org,
        amount=credits(4),
        key="fill-1",
        lot_source=LotSource.MARKETPLACE,
        resellable=False,
    )

    # then
    lot = CreditLot.objects.get(organization=other_org)
    assert (lot.source, lot.paid, lot.resellable, lot.remaining) == (
        LotSource.MARKETPLACE,
        True,
        False,
        credits(4),
    )


def test_only_resellable_burns_only_resellable_lots(org, other_org, grant):
    # given: a free lot that the burn order would otherwise take first
    free = grant(
        org, credits(50), source=LotSource.PROMOTION, paid=False, resellable=False, priority=1
    )
    resellable = grant(org, credits(10), paid=True, resellable=True)

    # when
    credits_transfer(
        source=org, destination=other_org, amount=credits(6), key="t-1", only_resellable=True
    )

    # then
    assert remaining(free, resellable) == [credits(50), credits(4)]
    assert organization_balance(organization=other_org).available == credits(6)


def test_only_resellable_without_enough_resellable_credits_is_refused(org, other_org, grant):
    # given
    grant(org, credits(50), source=LotSource.PROMOTION, paid=False, resellable=False)
    grant(org, credits(10), paid=True, resellable=True)
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_transfer(
            source=org, destination=other_org, amount=credits(11), key="t-1", only_resellable=True
        )

    # then
    assert exc.value.code == "insufficient_resellable_credits"
    assert exc.value.status == 402
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(60)
    assert organization_balance(organization=other_org).available == 0


def test_transfer_of_more_than_available_is_refused(org, other_org, grant):
    # given: most of the wallet is held by running work
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(80), key="job-1")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_transfer(source=org, destination=other_org, amount=credits(21), key="t-1")

    # then
    assert exc.value.code == "insufficient_credits"
    assert exc.value.status == 402
    assert ledger_rows() == rows
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(20), credits(80))


def test_wallet_to_escrow_and_escrow_to_a_buyers_wallet(org, other_org, grant):
    # given
    expires_at = timezone.now() + timedelta(days=30)
    seller_lot = grant(org, credits(100), paid=True, resellable=True, expires_at=expires_at)

    # when: the seller lists 40 credits
    credits_transfer(
        source=org,
        destination=org,
        amount=credits(40),
        key="listing-1",
        destination_kind=AccountKind.ESCROW,
        only_resellable=True,
    )

    # then
    seller = organization_balance(organization=org)
    assert (seller.available, seller.held, seller.escrowed) == (credits(60), 0, credits(40))
    escrow_lot = CreditLot.objects.get(organization=org, account__kind=AccountKind.ESCROW)
    assert (escrow_lot.parent_id, escrow_lot.remaining, escrow_lot.expires_at) == (
        seller_lot.pk,
        credits(40),
        expires_at,
    )

    # when: a buyer fills 15 of them
    credits_transfer(
        source=org,
        destination=other_org,
        amount=credits(15),
        key="fill-1",
        source_kind=AccountKind.ESCROW,
        lot_source=LotSource.MARKETPLACE,
        resellable=False,
    )

    # then
    seller = organization_balance(organization=org)
    assert (seller.available, seller.escrowed) == (credits(60), credits(25))
    assert organization_balance(organization=other_org).available == credits(15)
    bought = CreditLot.objects.get(organization=other_org)
    assert (bought.parent_id, bought.source, bought.resellable, bought.expires_at) == (
        escrow_lot.pk,
        LotSource.MARKETPLACE,
        False,
        expires_at,
    )

    # when: the seller delists the rest
    credits_transfer(
        source=org,
        destination=org,
        amount=credits(25),
        key="delist-1",
        source_kind=AccountKind.ESCROW,
    )

    # then
    seller = organization_balance(organization=org)
    assert (seller.available, seller.escrowed) == (credits(85), 0)


def test_transfer_replays_under_the_same_key_and_conflicts_with_another_amount(
    org, other_org, grant
):
    # given
    grant(org, credits(100))
    first = credits_transfer(source=org, destination=other_org, amount=credits(10), key="t-1")
    rows = ledger_rows()

    # when
    again = credits_transfer(source=org, destination=other_org, amount=credits(10), key="t-1")
    with pytest.raises(ApplicationError) as exc:
        credits_transfer(source=org, destination=other_org, amount=credits(11), key="t-1")

    # then
    assert again.pk == first.pk
    assert exc.value.code == "idempotency_conflict"
    assert exc.value.status == 409
    assert ledger_rows() == rows
    assert organization_balance(organization=other_org).available == credits(10)


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"amount": 0}, "invalid_amount"),
        ({"amount": -1}, "invalid_amount"),
        ({"amount": True}, "invalid_amount"),
        ({"key": ""}, "invalid_idempotency_key"),
        ({"source_kind": AccountKind.HOLDS}, "invalid_account"),
        ({"destination_kind": AccountKind.ISSUANCE}, "invalid_account"),
        ({"same_account": True}, "invalid_transfer"),
        ({"lot_source": "stolen"}, "invalid_source"),
    ],
)
def test_bad_transfers_are_refused_and_change_nothing(org, other_org, grant, kwargs, code):
    # given
    grant(org, credits(100))
    params = {"source": org, "destination": other_org, "amount": credits(1), "key": "t-1"}
    if kwargs.pop("same_account", False):
        params["destination"] = org
    params.update(kwargs)
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_transfer(**params)

    # then
    assert exc.value.code == code
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(100)


# --- reversals -------------------------------------------------------------------


def test_reversing_a_grant_takes_its_credits_back(org, grant):
    # given
    issuance_before = system_balance(AccountKind.ISSUANCE)
    lot = grant(org, credits(100))
    original = lot.created_by

    # when
    reversal = transaction_reverse(original=original, reason="invoice refunded")

    # then
    assert reversal.kind == TransactionKind.REVERSAL
    assert reversal.reverses_id == original.pk
    assert reversal.memo == "invoice refunded"
    assert organization_balance(organization=org).available == 0
    assert remaining(lot) == [0]
    assert system_balance(AccountKind.ISSUANCE) == issuance_before
    entries = sorted(reversal.entries.values_list("amount", flat=True))
    assert entries == [-credits(100), credits(100)]
    # the original is untouched
    assert sorted(original.entries.values_list("amount", flat=True)) == entries


def test_reversing_a_positive_adjustment(org):
    # given
    original = credits_adjust(organization=org, amount=credits(5), reason="goodwill", key="a-1")

    # when
    transaction_reverse(original=original, reason="granted in error")

    # then
    assert organization_balance(organization=org).available == 0
    assert system_balance(AccountKind.ADJUSTMENTS) == 0


def test_reversing_a_negative_adjustment_gives_the_burned_lots_their_credits_back(org, grant):
    # given
    expires_at = timezone.now() + timedelta(days=10)
    first = grant(org, credits(10), expires_at=expires_at)
    second = grant(org, credits(10), expires_at=None)
    original = credits_adjust(organization=org, amount=-credits(15), reason="chargeback", key="a-1")
    assert remaining(first, second) == [0, credits(5)]

    # when
    transaction_reverse(original=original, reason="chargeback lost")

    # then
    assert remaining(first, second) == [credits(10), credits(10)]
    assert organization_balance(organization=org).available == credits(20)
    assert system_balance(AccountKind.ADJUSTMENTS) == 0


def test_reversing_a_transfer_returns_the_credits_to_their_lots(org, other_org, grant):
    # given
    lot = grant(org, credits(100))
    original = credits_transfer(source=org, destination=other_org, amount=credits(30), key="t-1")
    arrived = CreditLot.objects.get(organization=other_org)

    # when
    transaction_reverse(original=original, reason="sent to the wrong team")

    # then
    assert organization_balance(organization=org).available == credits(100)
    assert organization_balance(organization=other_org).available == 0
    assert remaining(lot, arrived) == [credits(100), 0]


def test_reversing_a_capture_refunds_the_work_but_does_not_reopen_the_hold(org, grant):
    # given
    consumed_before = system_balance(AccountKind.CONSUMPTION)
    soon_lot = grant(org, credits(10), expires_at=timezone.now() + timedelta(days=2))
    later_lot = grant(org, credits(100), expires_at=None)
    hold_place(organization=org, amount=credits(50), key="job-1")
    hold = hold_capture(key="job-1", amount=credits(30))

    # when
    transaction_reverse(original=hold.settle_transaction, reason="bad output")

    # then
    hold.refresh_from_db()
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, credits(30))
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(110), 0)
    assert system_balance(AccountKind.CONSUMPTION) == consumed_before
    assert remaining(soon_lot, later_lot) == [credits(10), credits(100)]


def test_reversing_twice_replays_the_first_reversal(org, grant):
    # given
    lot = grant(org, credits(100))
    first = transaction_reverse(original=lot.created_by, reason="refund")
    rows = ledger_rows()

    # when
    second = transaction_reverse(original=lot.created_by, reason="refund, retried")

    # then
    assert second.pk == first.pk
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == 0


def test_a_reversal_cannot_be_reversed(org, grant):
    # given
    lot = grant(org, credits(100))
    reversal = transaction_reverse(original=lot.created_by, reason="refund")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        transaction_reverse(original=reversal, reason="undo the refund")

    # then
    assert exc.value.code == "not_reversible"
    assert ledger_rows() == rows


@pytest.mark.parametrize("settle", ["place", "release", "expire"])
def test_hold_placements_releases_and_expiries_are_not_reversible(org, grant, settle):
    # given
    expires_at = timezone.now() + timedelta(days=1)
    grant(org, credits(100), expires_at=expires_at)
    hold = hold_place(organization=org, amount=credits(10), key="job-1")
    if settle == "place":
        original = hold.place_transaction
    elif settle == "release":
        original = hold_release(key="job-1").settle_transaction
    else:
        hold_release(key="job-1")
        credits_expire(now=expires_at)
        original = JournalTransaction.objects.get(kind=TransactionKind.EXPIRY, organization=org)
    rows = ledger_rows()
    before = organization_balance(organization=org)

    # when
    with pytest.raises(ApplicationError) as exc:
        transaction_reverse(original=original, reason="try")

    # then
    assert exc.value.code == "not_reversible"
    assert exc.value.status == 400
    assert ledger_rows() == rows
    assert organization_balance(organization=org) == before


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_a_reversal_needs_a_reason(org, grant, reason):
    # given
    lot = grant(org, credits(100))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        transaction_reverse(original=lot.created_by, reason=reason)

    # then
    assert exc.value.code == "reason_required"
    assert ledger_rows() == rows


def test_reversing_a_grant_whose_credits_were_partly_spent_is_refused(org, grant):
    # given: the free lot burns first, and the wallet still holds enough from the paid one
    expires_at = timezone.now() + timedelta(days=30)
    free = grant(
        org,
        credits(100),
        paid=False,
        resellable=False,
        source=LotSource.PROMOTION,
        expires_at=expires_at,
    )
    paid = grant(org, credits(100), paid=True, expires_at=expires_at)
    capture(org, credits(50))
    rows = ledger_rows()
    lots = lot_state(org)

    # when
    with pytest.raises(ApplicationError) as exc:
        transaction_reverse(original=free.created_by, reason="promotion withdrawn")

    # then
    assert exc.value.code == "reversal_not_possible"
    assert exc.value.status == 409
    assert ledger_rows() == rows
    assert lot_state(org) == lots
    assert remaining(free, paid) == [credits(50), credits(100)]
    assert organization_balance(organization=org).available == credits(150)


def test_reversing_a_grant_whose_credits_were_all_spent_is_refused_as_not_possible(org, grant):
    # given
    lot = grant(org, credits(100))
    capture(org, credits(100))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        transaction_reverse(original=lot.created_by, reason="invoice refunded")

    # then: the credits are gone, which is a conflict with history, not a lack of funds
    assert exc.value.code == "reversal_not_possible"
    assert exc.value.status == 409
    assert ledger_rows() == rows
    assert remaining(lot) == [0]
    assert organization_balance(organization=org).available == 0


def test_reversing_a_transfer_whose_credits_the_recipient_spent_is_refused(org, other_org, grant):
    # given: the recipient spent the transferred credits first, and has others left
    grant(org, credits(100), expires_at=timezone.now() + timedelta(days=2))
    grant(other_org, credits(100), expires_at=None)
    original = credits_transfer(source=org, destination=other_org, amount=credits(30), key="t-1")
    capture(other_org, credits(20))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        transaction_reverse(original=original, reason="sent to the wrong team")

    # then
    assert exc.value.code == "reversal_not_possible"
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(70)
    assert organization_balance(organization=other_org).available == credits(110)


# --- adjustments -----------------------------------------------------------------


def test_a_positive_adjustment_grants_a_free_lot_from_the_adjustments_account(org):
    # given
    expires_at = timezone.now() + timedelta(days=14)

    # when
    txn = credits_adjust(
        organization=org,
        amount=credits(12),
        reason="outage credit",
        key="a-1",
        expires_at=expires_at,
    )

    # then
    assert txn.kind == TransactionKind.ADJUSTMENT
    assert txn.memo == "outage credit"
    lot = txn.created_lots.get()
    assert (lot.source, lot.paid, lot.resellable, lot.remaining, lot.expires_at) == (
        LotSource.ADJUSTMENT,
        False,
        False,
        credits(12),
        expires_at,
    )
    assert organization_balance(organization=org).available == credits(12)
    assert system_balance(AccountKind.ADJUSTMENTS) == -credits(12)


def test_a_negative_adjustment_removes_credits_in_burn_order(org, grant):
    # given
    lot = grant(org, credits(20))

    # when
    txn = credits_adjust(organization=org, amount=-credits(8), reason="duplicate grant", key="a-1")

    # then
    assert txn.kind == TransactionKind.ADJUSTMENT
    assert txn.memo == "duplicate grant"
    assert organization_balance(organization=org).available == credits(12)
    assert remaining(lot) == [credits(12)]
    assert system_balance(AccountKind.ADJUSTMENTS) == credits(8)


def test_a_negative_adjustment_cannot_take_held_credits(org, grant):
    # given
    grant(org, credits(20))
    hold_place(organization=org, amount=credits(15), key="job-1")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_adjust(organization=org, amount=-credits(6), reason="fix", key="a-1")

    # then
    assert exc.value.code == "insufficient_credits"
    assert ledger_rows() == rows
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(5), credits(15))


@pytest.mark.parametrize("amount", [credits(3), -credits(3)], ids=["positive", "negative"])
def test_adjusting_twice_under_one_key_adjusts_once(org, grant, amount):
    # given
    grant(org, credits(10))
    first = credits_adjust(organization=org, amount=amount, reason="fix", key="a-1")
    rows = ledger_rows()

    # when
    second = credits_adjust(organization=org, amount=amount, reason="fix", key="a-1")

    # then
    assert second.pk == first.pk
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(10) + amount


def test_reusing_an_adjustment_key_for_another_amount_is_a_conflict(org, grant):
    # given
    grant(org, credits(10))
    credits_adjust(organization=org, amount=-credits(3), reason="fix", key="a-1")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_adjust(organization=org, amount=-credits(4), reason="fix", key="a-1")

    # then
    assert exc.value.code == "idempotency_conflict"
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(7)


def test_reusing_an_adjustment_key_with_the_opposite_sign_is_a_conflict(org, grant):
    # given
    grant(org, credits(10))
    credits_adjust(organization=org, amount=credits(5), reason="goodwill", key="a-1")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_adjust(organization=org, amount=-credits(5), reason="goodwill undone", key="a-1")

    # then
    assert exc.value.code == "idempotency_conflict"
    assert exc.value.status == 409
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(15)


@pytest.mark.parametrize("reason", ["", "  ", None])
def test_an_adjustment_needs_a_reason(org, grant, reason):
    # given
    grant(org, credits(10))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_adjust(organization=org, amount=credits(1), reason=reason, key="a-1")

    # then
    assert exc.value.code == "reason_required"
    assert exc.value.param == "reason"
    assert ledger_rows() == rows


@pytest.mark.parametrize("amount", [0, True, 1.5, "5"])
def test_an_adjustment_of_a_bad_amount_is_refused(org, grant, amount):
    # given
    grant(org, credits(10))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_adjust(organization=org, amount=amount, reason="fix", key="a-1")

    # then
    assert exc.value.code == "invalid_amount"
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(10)
