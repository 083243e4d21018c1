"""The burn order documented in metering/services/lots.py.

1. lots already past expiry that back a pending hold;
2. lower priority first;
3. soonest expiry first, never-expiring last;
4. free before paid;
5. oldest first.
"""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from metering.models import CreditLot, LotMovement
from metering.selectors import organization_balance
from metering.services import credits_adjust, hold_capture, hold_place
from tests.helpers import credits

pytestmark = pytest.mark.django_db


def remaining(*lots: CreditLot) -> list[int]:
    return [CreditLot.objects.get(pk=lot.pk).remaining for lot in lots]


def spend(org, amount: int) -> dict[int, int]:
    """Spend through a hold captured in full; returns {lot id: micro-credits burned}."""
    key = f"job-{uuid.uuid4()}"
    hold_place(organization=org, amount=amount, key=key)
    hold = hold_capture(key=key, amount=amount)
    return dict(
        LotMovement.objects.filter(transaction=hold.settle_transaction).values_list(
            "lot_id", "amount"
        )
    )


def burn_sequence(org, lots: list[CreditLot]) -> list[CreditLot]:
    """Take one credit at a time (each lot holds one) and list the lots in the order they empty."""
    order = []
    for i in range(len(lots)):
        credits_adjust(
            organization=org, amount=-credits(1), reason="burn order probe", key=f"probe-{i}"
        )
        emptied = [lot for lot in lots if lot not in order and remaining(lot) == [0]]
        assert len(emptied) == 1, f"step {i} emptied {emptied}"
        order.extend(emptied)
    return order


def test_lower_priority_burns_first(org, grant):
    # given: the low-priority lot is the newest and expires last
    soon = timezone.now() + timedelta(days=2)
    later = timezone.now() + timedelta(days=60)
    high = grant(org, credits(10), priority=200, expires_at=soon)
    mid = grant(org, credits(10), priority=100, expires_at=soon)
    low = grant(org, credits(10), priority=10, expires_at=later)

    # when
    burned = spend(org, credits(15))

    # then
    assert burned == {low.pk: -credits(10), mid.pk: -credits(5)}
    assert remaining(low, mid, high) == [0, credits(5), credits(10)]


def test_soonest_expiry_burns_first_and_never_expiring_last(org, grant):
    # given: created in the opposite of their burn order
    never = grant(org, credits(10), expires_at=None)
    far = grant(org, credits(10), expires_at=timezone.now() + timedelta(days=90))
    near = grant(org, credits(10), expires_at=timezone.now() + timedelta(days=3))

    # when
    burned = spend(org, credits(25))

    # then
    assert burned == {near.pk: -credits(10), far.pk: -credits(10), never.pk: -credits(5)}
    assert remaining(near, far, never) == [0, 0, credits(5)]


def test_free_burns_before_paid_at_the_same_priority_and_expiry(org, grant):
    # given: the paid lot is older
    expires_at = timezone.now() + timedelta(days=30)
    paid = grant(org, credits(10), paid=True, resellable=True, expires_at=expires_at)
    free = grant(
        org, credits(10), source="promotion", paid=False, resellable=False, expires_at=expires_at
    )

    # when
    burned = spend(org, credits(12))

    # then
    assert burned == {free.pk: -credits(10), paid.pk: -credits(2)}
    assert remaining(free, paid) == [0, credits(8)]


def test_free_burns_before_paid_when_neither_expires(org, grant):
    # given
    paid = grant(org, credits(10), paid=True, resellable=False, expires_at=None)
    free = grant(
        org, credits(10), source="promotion", paid=False, resellable=False, expires_at=None
    )

    # when
    burned = spend(org, credits(3))

    # then
    assert burned == {free.pk: -credits(3)}
    assert remaining(free, paid) == [credits(7), credits(10)]


def test_oldest_burns_first_when_all_else_is_equal(org, grant):
    # given
    expires_at = timezone.now() + timedelta(days=30)
    first = grant(org, credits(10), expires_at=expires_at)
    second = grant(org, credits(10), expires_at=expires_at)
    third = grant(org, credits(10), expires_at=expires_at)

    # when
    burned = spend(org, credits(15))

    # then
    assert burned == {first.pk: -credits(10), second.pk: -credits(5)}
    assert remaining(first, second, third) == [0, credits(5), credits(10)]


def test_expiry_outranks_free_before_paid(org, grant):
    # given: a paid lot that expires sooner than a free one
    paid_soon = grant(org, credits(10), paid=True, expires_at=timezone.now() + timedelta(days=2))
    free_later = grant(
        org,
        credits(10),
        source="promotion",
        paid=False,
        resellable=False,
        expires_at=timezone.now() + timedelta(days=20),
    )

    # when
    burned = spend(org, credits(10))

    # then
    assert burned == {paid_soon.pk: -credits(10)}
    assert remaining(paid_soon, free_later) == [0, credits(10)]


def test_the_whole_documented_order(org, grant):
    # given: one credit per lot, granted in scrambled order
    soon = timezone.now() + timedelta(days=5)
    later = timezone.now() + timedelta(days=50)
    lots = {}
    lots["p100_never_paid"] = grant(org, credits(1), priority=100, expires_at=None, paid=True)
    lots["p100_later_free"] = grant(
        org, credits(1), priority=100, expires_at=later, paid=False, resellable=False
    )
    lots["p200_soon_free"] = grant(
        org, credits(1), priority=200, expires_at=soon, paid=False, resellable=False
    )
    lots["p100_soon_paid"] = grant(org, credits(1), priority=100, expires_at=soon, paid=True)
    lots["p100_soon_free_a"] = grant(
        org, credits(1), priority=100, expires_at=soon, paid=False, resellable=False
    )
    lots["p50_never_paid"] = grant(org, credits(1), priority=50, expires_at=None, paid=True)
    lots["p100_soon_free_b"] = grant(
        org, credits(1), priority=100, expires_at=soon, paid=False, resellable=False
    )
    lots["p100_never_free"] = grant(
        org, credits(1), priority=100, expires_at=None, paid=False, resellable=False
    )
    names = {lot.pk: name for name, lot in lots.items()}

    # when
    order = burn_sequence(org, list(lots.values()))

    # then
    assert [names[lot.pk] for lot in order] == [
        "p50_never_paid",
        "p100_soon_free_a",
        "p100_soon_free_b",
        "p100_soon_paid",
        "p100_later_free",
        "p100_never_free",
        "p100_never_paid",
        "p200_soon_free",
    ]
    assert organization_balance(organization=org).available == 0


def test_negative_adjustments_burn_in_the_same_order(org, grant):
    # given
    never = grant(org, credits(10), expires_at=None, priority=10)
    low_priority_soon = grant(org, credits(10), priority=300)
    first_choice = grant(
        org, credits(10), priority=10, expires_at=timezone.now() + timedelta(days=1)
    )

    # when
    credits_adjust(organization=org, amount=-credits(15), reason="refund", key="adj-1")

    # then
    assert remaining(first_choice, never, low_priority_soon) == [0, credits(5), credits(10)]
    assert organization_balance(organization=org).available == credits(15)


def test_expired_lots_that_back_a_pending_hold_burn_first(org, grant):
    # given: a lot that would burn last by priority, about to expire, backing a pending hold
    expires_at = timezone.now() + timedelta(milliseconds=1500)  # after the setup, however slow
    expiring = grant(org, credits(10), priority=500, expires_at=expires_at)
    preferred = grant(org, credits(100), priority=1, expires_at=None)
    hold_place(organization=org, amount=credits(50), key="job-1")
    time.sleep(max(0.0, (expires_at - timezone.now()).total_seconds()) + 0.05)

    # when
    hold = hold_capture(key="job-1", amount=credits(30))

    # then: the expired lot is spent first, so no expired credit is left behind
    burned = dict(
        LotMovement.objects.filter(transaction=hold.settle_transaction).values_list(
            "lot_id", "amount"
        )
    )
    assert burned == {expiring.pk: -credits(10), preferred.pk: -credits(20)}
    assert remaining(expiring, preferred) == [0, credits(80)]
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(80), 0)
