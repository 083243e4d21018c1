"""Holds: reserve before the work, settle exactly once after."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone

from accounts.errors import ApplicationError
from metering.models import (
    AccountKind,
    CreditLot,
    Hold,
    HoldStatus,
    LedgerAccount,
    LotMovement,
    TransactionKind,
)
from metering.selectors import account_balance, organization_balance
from metering.services import hold_capture, hold_place, hold_release, holds_expire
from tests.helpers import credits, ledger_rows

pytestmark = pytest.mark.django_db


def consumed() -> int:
    account = LedgerAccount.objects.filter(
        kind=AccountKind.CONSUMPTION, organization__isnull=True
    ).first()
    return account_balance(account=account) if account else 0


def remaining(*lots: CreditLot) -> list[int]:
    return [CreditLot.objects.get(pk=lot.pk).remaining for lot in lots]


# --- place ---------------------------------------------------------------------


def test_placing_a_hold_moves_credits_from_available_to_held(org, grant):
    # given
    lot = grant(org, credits(100))

    # when
    before = timezone.now()
    hold = hold_place(organization=org, amount=credits(30), key="job-1", memo="job 1")

    # then
    balance = organization_balance(organization=org)
    assert balance.available == credits(70)
    assert balance.held == credits(30)
    assert balance.total == credits(100)
    hold.refresh_from_db()
    assert hold.status == HoldStatus.PENDING
    assert hold.amount == credits(30)
    assert hold.captured == 0
    assert hold.organization == org
    assert hold.settle_transaction is None
    assert before + settings.METERING_HOLD_TTL <= hold.expires_at
    assert hold.expires_at <= timezone.now() + settings.METERING_HOLD_TTL
    assert hold.place_transaction.kind == TransactionKind.HOLD_PLACE
    # Placing burns no lot: the credits are only reserved.
    assert remaining(lot) == [credits(100)]


def test_a_hold_takes_its_ttl(org, grant):
    # given
    grant(org, credits(10))

    # when
    before = timezone.now()
    hold = hold_place(organization=org, amount=credits(1), key="job-ttl", ttl=timedelta(minutes=5))

    # then
    assert before + timedelta(minutes=5) <= hold.expires_at <= timezone.now() + timedelta(minutes=5)


def test_placing_more_than_available_is_refused_with_402_and_writes_nothing(org, grant):
    # given
    grant(org, credits(10))
    hold_place(organization=org, amount=credits(6), key="job-a")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=credits(5), key="job-b")

    # then
    assert exc.value.code == "insufficient_credits"
    assert exc.value.status == 402
    assert exc.value.extra == {"required": credits(5), "available": credits(4)}
    assert ledger_rows() == rows
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(4), credits(6))
    assert not Hold.objects.filter(key="job-b").exists()


def test_an_organization_with_no_credits_cannot_place_a_hold(org):
    # given
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=1, key="job-empty")

    # then
    assert exc.value.code == "insufficient_credits"
    assert exc.value.status == 402
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == 0


def test_a_hold_can_take_exactly_everything_available(org, grant):
    # given
    grant(org, credits(10))

    # when
    hold_place(organization=org, amount=credits(10), key="job-all")

    # then
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (0, credits(10))


def test_another_organizations_credits_are_not_available(org, other_org, grant):
    # given
    grant(other_org, credits(100))

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=credits(1), key="job-x")

    # then
    assert exc.value.code == "insufficient_credits"
    assert organization_balance(organization=other_org).available == credits(100)


def test_placing_twice_with_the_same_key_places_once(org, grant):
    # given
    grant(org, credits(100))
    first = hold_place(organization=org, amount=credits(30), key="job-1")
    rows = ledger_rows()

    # when
    second = hold_place(organization=org, amount=credits(30), key="job-1")

    # then
    assert second.pk == first.pk
    assert ledger_rows() == rows
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(70), credits(30))


def test_placing_with_a_used_key_and_another_amount_is_a_conflict(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(30), key="job-1")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=credits(31), key="job-1")

    # then
    assert exc.value.code == "idempotency_conflict"
    assert exc.value.status == 409
    assert ledger_rows() == rows
    assert organization_balance(organization=org).held == credits(30)


@pytest.mark.parametrize("amount", [0, -5, 2.5, True, "10"])
def test_a_hold_of_a_bad_amount_is_refused(org, grant, amount):
    # given
    grant(org, credits(100))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=amount, key="job-bad")

    # then
    assert exc.value.code == "invalid_amount"
    assert ledger_rows() == rows


@pytest.mark.parametrize("key", ["", "  ", "j" * 201])
def test_a_hold_with_a_bad_key_is_refused(org, grant, key):
    # given
    grant(org, credits(100))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_place(organization=org, amount=credits(1), key=key)

    # then
    assert exc.value.code == "invalid_idempotency_key"
    assert ledger_rows() == rows


# --- capture -------------------------------------------------------------------


def test_capturing_all_of_a_hold_consumes_it(org, grant):
    # given
    lot = grant(org, credits(100))
    hold_place(organization=org, amount=credits(40), key="job-1")
    consumed_before = consumed()

    # when
    hold = hold_capture(key="job-1", amount=credits(40))

    # then
    hold.refresh_from_db()
    assert hold.status == HoldStatus.CAPTURED
    assert hold.captured == credits(40)
    assert hold.settled_at is not None
    assert hold.settle_transaction.kind == TransactionKind.HOLD_CAPTURE
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(60), 0)
    assert consumed() - consumed_before == credits(40)
    assert remaining(lot) == [credits(60)]


def test_partial_capture_burns_lots_in_burn_order_and_releases_the_rest(org, grant):
    # given: a free lot that expires first and a paid lot that expires later
    soon = timezone.now() + timedelta(days=5)
    later = timezone.now() + timedelta(days=30)
    paid_later = grant(org, credits(100), paid=True, resellable=True, expires_at=later)
    free_soon = grant(
        org, credits(100), paid=False, resellable=False, source="promotion", expires_at=soon
    )
    hold_place(organization=org, amount=credits(150), key="job-1")
    consumed_before = consumed()

    # when
    hold = hold_capture(key="job-1", amount=credits(120))

    # then
    assert hold.status == HoldStatus.CAPTURED
    assert hold.captured == credits(120)
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(80), 0)
    assert consumed() - consumed_before == credits(120)
    assert remaining(free_soon, paid_later) == [0, credits(80)]
    burned = dict(
        LotMovement.objects.filter(transaction=hold.settle_transaction).values_list(
            "lot_id", "amount"
        )
    )
    assert burned == {free_soon.pk: -credits(100), paid_later.pk: -credits(20)}


def test_capturing_nothing_releases_everything_and_burns_no_lot(org, grant):
    # given
    lot = grant(org, credits(10))
    hold_place(organization=org, amount=credits(10), key="job-0")

    # when
    hold = hold_capture(key="job-0", amount=0)

    # then
    assert hold.status == HoldStatus.CAPTURED
    assert hold.captured == 0
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(10), 0)
    assert remaining(lot) == [credits(10)]
    assert not LotMovement.objects.filter(transaction=hold.settle_transaction).exists()


def test_capturing_twice_with_the_same_amount_replays(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(50), key="job-1")
    first = hold_capture(key="job-1", amount=credits(20))
    rows = ledger_rows()

    # when
    second = hold_capture(key="job-1", amount=credits(20))

    # then
    assert second.pk == first.pk
    assert second.settle_transaction_id == first.settle_transaction_id
    assert ledger_rows() == rows
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(80), 0)


def test_capturing_again_with_another_amount_is_refused(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(50), key="job-1")
    hold_capture(key="job-1", amount=credits(20))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_capture(key="job-1", amount=credits(21))

    # then
    assert exc.value.code == "hold_already_settled"
    assert exc.value.status == 409
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(80)
    assert Hold.objects.get(key="job-1").captured == credits(20)


def test_capturing_more_than_the_hold_is_refused_and_leaves_it_pending(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(50), key="job-1")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_capture(key="job-1", amount=credits(50) + 1)

    # then
    assert exc.value.code == "capture_exceeds_hold"
    assert exc.value.status == 400
    assert ledger_rows() == rows
    assert Hold.objects.get(key="job-1").status == HoldStatus.PENDING
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(50), credits(50))


@pytest.mark.parametrize("amount", [-1, 1.0, True, None])
def test_capturing_a_bad_amount_is_refused(org, grant, amount):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(50), key="job-1")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_capture(key="job-1", amount=amount)

    # then
    assert exc.value.code == "invalid_amount"
    assert ledger_rows() == rows
    assert Hold.objects.get(key="job-1").status == HoldStatus.PENDING


def test_settling_an_unknown_hold_is_404(db):
    # given
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as capture_exc:
        hold_capture(key="no-such-job", amount=1)
    with pytest.raises(ApplicationError) as release_exc:
        hold_release(key="no-such-job")

    # then
    assert (capture_exc.value.code, capture_exc.value.status) == ("hold_not_found", 404)
    assert (release_exc.value.code, release_exc.value.status) == ("hold_not_found", 404)
    assert ledger_rows() == rows


# --- release -------------------------------------------------------------------


def test_releasing_gives_the_whole_hold_back(org, grant):
    # given
    lot = grant(org, credits(100))
    hold_place(organization=org, amount=credits(70), key="job-1")
    consumed_before = consumed()

    # when
    hold = hold_release(key="job-1")

    # then
    assert hold.status == HoldStatus.RELEASED
    assert hold.captured == 0
    assert hold.settle_transaction.kind == TransactionKind.HOLD_RELEASE
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(100), 0)
    assert consumed() == consumed_before
    assert remaining(lot) == [credits(100)]


def test_releasing_twice_replays(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(70), key="job-1")
    first = hold_release(key="job-1")
    rows = ledger_rows()

    # when
    second = hold_release(key="job-1")

    # then
    assert second.settle_transaction_id == first.settle_transaction_id
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(100)


def test_release_after_capture_is_refused(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(70), key="job-1")
    hold_capture(key="job-1", amount=credits(10))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_release(key="job-1")

    # then
    assert exc.value.code == "hold_already_settled"
    assert exc.value.status == 409
    assert ledger_rows() == rows
    hold = Hold.objects.get(key="job-1")
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, credits(10))
    assert organization_balance(organization=org).available == credits(90)


def test_capture_after_release_is_refused(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(70), key="job-1")
    hold_release(key="job-1")
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_capture(key="job-1", amount=credits(10))

    # then
    assert exc.value.code == "hold_already_settled"
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(100)


def test_a_settled_key_is_not_placed_again(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(30), key="job-1")
    hold_capture(key="job-1", amount=credits(30))
    rows = ledger_rows()

    # when: a retried placement of the same job after it settled
    hold = hold_place(organization=org, amount=credits(30), key="job-1")

    # then: it replays the settled hold and reserves nothing more
    assert hold.status == HoldStatus.CAPTURED
    assert ledger_rows() == rows
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(70), 0)


# --- expire --------------------------------------------------------------------


def test_holds_expire_releases_only_past_due_pending_holds(org, grant):
    # given
    grant(org, credits(100))
    short = hold_place(organization=org, amount=credits(10), key="short", ttl=timedelta(minutes=1))
    long = hold_place(organization=org, amount=credits(20), key="long", ttl=timedelta(hours=2))
    hold_place(organization=org, amount=credits(30), key="done", ttl=timedelta(minutes=1))
    hold_capture(key="done", amount=credits(5))
    consumed_before = consumed()

    # when
    count = holds_expire(now=timezone.now() + timedelta(minutes=10))

    # then
    assert count == 1
    short.refresh_from_db()
    long.refresh_from_db()
    assert short.status == HoldStatus.EXPIRED
    assert short.captured == 0
    assert short.settle_transaction.kind == TransactionKind.HOLD_EXPIRE
    assert long.status == HoldStatus.PENDING
    done = Hold.objects.get(key="done")
    assert (done.status, done.captured) == (HoldStatus.CAPTURED, credits(5))
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(75), credits(20))
    assert consumed() == consumed_before


def test_holds_expire_with_nothing_due_does_nothing(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(10), key="job-1")
    rows = ledger_rows()

    # when
    count = holds_expire()

    # then
    assert count == 0
    assert ledger_rows() == rows
    assert Hold.objects.get(key="job-1").status == HoldStatus.PENDING


def test_holds_expire_twice_expires_once(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(10), key="job-1", ttl=timedelta(minutes=1))
    later = timezone.now() + timedelta(minutes=10)
    assert holds_expire(now=later) == 1
    rows = ledger_rows()

    # when
    count = holds_expire(now=later)

    # then
    assert count == 0
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(100)


def test_an_expired_hold_can_no_longer_be_captured(org, grant):
    # given
    grant(org, credits(100))
    hold_place(organization=org, amount=credits(10), key="job-1", ttl=timedelta(minutes=1))
    holds_expire(now=timezone.now() + timedelta(minutes=10))

    # when
    with pytest.raises(ApplicationError) as exc:
        hold_capture(key="job-1", amount=credits(10))

    # then
    assert exc.value.code == "hold_already_settled"
    assert organization_balance(organization=org).available == credits(100)


def test_many_holds_never_overdraw_the_wallet(org, grant):
    # given
    grant(org, credits(10))
    placed = 0
    refused = 0

    # when
    for i in range(15):
        try:
            hold_place(organization=org, amount=credits(1), key=f"job-{i}")
            placed += 1
        except ApplicationError as exc:
            assert exc.code == "insufficient_credits"
            refused += 1

    # then
    assert (placed, refused) == (10, 5)
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (0, credits(10))
