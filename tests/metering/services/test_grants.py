"""credits_grant: one business event issues one lot, once."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.utils import timezone

from accounts.errors import ApplicationError
from metering.models import (
    AccountKind,
    LotSource,
    TransactionKind,
)
from metering.selectors import organization_balance
from metering.services import credits_grant
from tests.helpers import credits, ledger_rows, system_balance

pytestmark = pytest.mark.django_db


def grant_params(**overrides):
    params = {
        "amount": credits(100),
        "source": LotSource.SUBSCRIPTION,
        "paid": True,
        "resellable": True,
        "key": "promo:spring-123",
        "expires_at": timezone.now() + timedelta(days=30),
    }
    params.update(overrides)
    return params


def test_grant_creates_one_lot_with_its_source_rights_priority_and_expiry(org):
    # given
    expires_at = timezone.now() + timedelta(days=30)

    # when
    lot = credits_grant(
        organization=org,
        amount=credits(250),
        source=LotSource.PACK,
        paid=True,
        resellable=False,
        key="pack:order-1",
        expires_at=expires_at,
        priority=40,
        memo="credit pack 250",
    )

    # then
    lot.refresh_from_db()
    assert lot.organization == org
    assert lot.account.kind == AccountKind.WALLET
    assert lot.account.organization == org
    assert lot.source == LotSource.PACK
    assert lot.paid is True
    assert lot.resellable is False
    assert lot.priority == 40
    assert lot.expires_at == expires_at
    assert lot.amount == credits(250)
    assert lot.remaining == credits(250)
    assert lot.parent is None
    txn = lot.created_by
    assert txn.kind == TransactionKind.GRANT
    assert txn.organization == org
    assert txn.memo == "credit pack 250"
    assert sorted(txn.entries.values_list("amount", flat=True)) == [-credits(250), credits(250)]
    assert list(lot.movements.values_list("amount", flat=True)) == [credits(250)]
    assert organization_balance(organization=org).available == credits(250)
    assert organization_balance(organization=org).held == 0
    assert lot.account.next_expiry_at == expires_at


def test_grant_defaults_to_priority_100_and_no_expiry(org):
    # given / when
    lot = credits_grant(
        organization=org,
        amount=credits(5),
        source=LotSource.PROMOTION,
        paid=False,
        resellable=False,
        key="promo:welcome",
    )

    # then
    lot.refresh_from_db()
    assert lot.priority == 100
    assert lot.expires_at is None
    assert lot.account.next_expiry_at is None
    assert organization_balance(organization=org).available == credits(5)


def test_grant_is_funded_by_issuance_and_an_adjustment_lot_by_adjustments(org):
    # given
    issuance_before = system_balance(AccountKind.ISSUANCE)
    adjustments_before = system_balance(AccountKind.ADJUSTMENTS)

    # when
    credits_grant(**grant_params(organization=org, amount=credits(10), key="a"))
    credits_grant(
        **grant_params(
            organization=org,
            amount=credits(3),
            key="b",
            source=LotSource.ADJUSTMENT,
            paid=False,
            resellable=False,
        )
    )

    # then
    assert system_balance(AccountKind.ISSUANCE) == issuance_before - credits(10)
    assert system_balance(AccountKind.ADJUSTMENTS) == adjustments_before - credits(3)
    assert organization_balance(organization=org).available == credits(13)


def test_granting_twice_under_one_key_grants_once_and_returns_the_same_lot(org):
    # given
    params = grant_params(organization=org)
    first = credits_grant(**params)
    rows = ledger_rows()

    # when
    second = credits_grant(**params)

    # then
    assert second.pk == first.pk
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(100)


def test_same_key_with_a_different_amount_is_a_conflict_and_writes_nothing(org):
    # given
    params = grant_params(organization=org)
    credits_grant(**params)
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_grant(**{**params, "amount": credits(101)})

    # then
    assert exc.value.code == "idempotency_conflict"
    assert exc.value.status == 409
    assert exc.value.param == "key"
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(100)


def test_same_key_for_another_organization_is_a_conflict(org, other_org):
    # given
    params = grant_params(organization=org)
    credits_grant(**params)
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_grant(**{**params, "organization": other_org})

    # then
    assert exc.value.code == "idempotency_conflict"
    assert ledger_rows() == rows
    assert organization_balance(organization=other_org).available == 0


@pytest.mark.parametrize(
    "amount",
    [0, -1, -credits(5), 1.5, float(credits(1)), Decimal("1000000"), "1000000", None, True, False],
    ids=[
        "zero",
        "minus-one",
        "negative",
        "float",
        "whole-float",
        "decimal",
        "str",
        "none",
        "true",
        "false",
    ],
)
def test_bad_amount_is_refused_and_changes_nothing(org, amount):
    # given
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_grant(**grant_params(organization=org, amount=amount))

    # then
    assert exc.value.code == "invalid_amount"
    assert exc.value.status == 400
    assert exc.value.param == "amount"
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == 0


@pytest.mark.parametrize(
    "key", ["", "   ", "k" * 201, None, 42], ids=["empty", "blank", "long", "none", "int"]
)
def test_bad_key_is_refused_and_changes_nothing(org, key):
    # given
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_grant(**grant_params(organization=org, key=key))

    # then
    assert exc.value.code == "invalid_idempotency_key"
    assert ledger_rows() == rows


@pytest.mark.parametrize(
    "delta", [timedelta(seconds=-1), timedelta(days=-30)], ids=["just-past", "long-past"]
)
def test_expiry_in_the_past_is_refused_and_changes_nothing(org, delta):
    # given
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_grant(**grant_params(organization=org, expires_at=timezone.now() + delta))

    # then
    assert exc.value.code == "lot_expired"
    assert exc.value.param == "expires_at"
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == 0


def test_naive_expiry_is_refused_and_changes_nothing(org):
    # given
    naive = timezone.make_naive(timezone.now() + timedelta(days=30))
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_grant(**grant_params(organization=org, expires_at=naive))

    # then
    assert exc.value.code == "invalid_expiry"
    assert exc.value.param == "expires_at"
    assert ledger_rows() == rows


@pytest.mark.parametrize("source", ["gift", "", "SUBSCRIPTION", None])
def test_unknown_source_is_refused_and_changes_nothing(org, source):
    # given
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_grant(**grant_params(organization=org, source=source))

    # then
    assert exc.value.code == "invalid_source"
    assert exc.value.param == "source"
    assert ledger_rows() == rows


def test_resellable_credits_that_were_not_paid_for_are_refused(org):
    # given
    rows = ledger_rows()

    # when
    with pytest.raises(ApplicationError) as exc:
        credits_grant(
            **grant_params(
                organization=org, source=LotSource.PROMOTION, paid=False, resellable=True
            )
        )

    # then
    assert exc.value.code == "invalid_lot"
    assert exc.value.param == "resellable"
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == 0


def test_a_refused_grant_does_not_burn_its_key(org):
    # given: a first attempt with bad input
    with pytest.raises(ApplicationError):
        credits_grant(**grant_params(organization=org, amount=0, key="promo:retry"))

    # when: the caller fixes the input and retries under the same key
    lot = credits_grant(**grant_params(organization=org, amount=credits(7), key="promo:retry"))

    # then
    assert lot.amount == credits(7)
    assert organization_balance(organization=org).available == credits(7)


def test_each_new_lot_lowers_the_wallets_next_expiry(org, grant):
    # given
    soon = timezone.now() + timedelta(days=3)
    later = timezone.now() + timedelta(days=20)
    grant(org, credits(1), expires_at=later)

    # when
    lot = grant(org, credits(1), expires_at=soon)
    grant(org, credits(1), expires_at=None)

    # then
    lot.account.refresh_from_db()
    assert lot.account.next_expiry_at == soon
