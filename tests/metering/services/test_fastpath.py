"""The SQL fast path writes exactly what the ORM path writes.

Every other ledger test runs with the fast path on (the default); here one
scenario runs through each path and the rows are compared field by field.
"""

from datetime import timedelta

import pytest
from django.utils import timezone

from metering.models import CreditLot, Hold, JournalTransaction, LedgerEntry, LotMovement
from metering.selectors import organization_balance
from metering.services import credits_grant, hold_capture, hold_place, hold_release
from tests.factories import OrganizationFactory
from tests.helpers import credits

pytestmark = pytest.mark.django_db


def run_scenario(tag: str) -> dict:
    org = OrganizationFactory()
    soon = timezone.now() + timedelta(days=3)
    later = timezone.now() + timedelta(days=30)
    credits_grant(
        organization=org, amount=credits(5), source="promotion", paid=False,
        resellable=False, key=f"{tag}-promo", expires_at=soon, priority=50,
    )  # fmt: skip
    credits_grant(
        organization=org, amount=credits(20), source="subscription", paid=True,
        resellable=True, key=f"{tag}-sub", expires_at=later,
    )  # fmt: skip
    hold_place(organization=org, amount=credits(8), key=f"{tag}-a")
    hold_place(organization=org, amount=credits(3), key=f"{tag}-b")
    hold_place(organization=org, amount=credits(2), key=f"{tag}-c")
    hold_capture(key=f"{tag}-a", amount=credits(7))  # burns the promotion first, then paid
    hold_capture(key=f"{tag}-b", amount=credits(3))  # a full capture: nothing goes back
    hold_release(key=f"{tag}-c")

    entries = [
        (e.transaction.kind, e.account.kind, e.amount, e.balance_after)
        for e in LedgerEntry.objects.filter(transaction__organization=org)
        .select_related("transaction", "account")
        .order_by("transaction_id", "account__kind")
    ]
    holds = [
        (h.key.removeprefix(f"{tag}-"), h.amount, h.captured, h.status, h.settle_transaction.kind)
        for h in Hold.objects.filter(organization=org).select_related("settle_transaction")
    ]
    lots = sorted(
        (lot.source, lot.amount, lot.remaining)
        for lot in CreditLot.objects.filter(organization=org)
    )
    movements = sorted(
        (m.transaction.kind, m.lot.source, m.amount)
        for m in LotMovement.objects.filter(lot__organization=org).select_related(
            "transaction", "lot"
        )
    )
    keys = sorted(
        k.removeprefix("grant:").replace(tag, "T")
        for k in JournalTransaction.objects.filter(organization=org).values_list(
            "idempotency_key", flat=True
        )
    )
    return {
        "balance": organization_balance(organization=org),
        "entries": entries,
        "holds": sorted(holds),
        "lots": lots,
        "movements": movements,
        "keys": keys,
    }


def test_the_fast_path_and_the_orm_path_write_the_same_rows(settings):
    # given the same scenario through each path
    settings.METERING_FAST_PATH = False
    orm = run_scenario("orm")
    settings.METERING_FAST_PATH = True
    fast = run_scenario("fast")

    # then every row matches, and the scenario did what it says
    assert fast == orm
    assert fast["balance"].available == credits(25) - credits(10)
    assert fast["lots"] == [
        ("promotion", credits(5), 0),
        ("subscription", credits(20), credits(15)),
    ]
    # the full capture gave nothing back: only capture "a" returned credits to the wallet
    wallet_returns = [e for e in fast["entries"] if e[:2] == ("hold_capture", "wallet")]
    assert [e[2] for e in wallet_returns] == [credits(1)]


def test_the_fast_path_falls_back_for_everything_unusual(settings, org, grant):
    # given the fast path on, and a wallet that is short
    settings.METERING_FAST_PATH = True
    grant(org, credits(1))

    # when a hold asks for more, the ORM path gives the typed error
    from accounts.errors import ApplicationError

    with pytest.raises(ApplicationError) as short:
        hold_place(organization=org, amount=credits(2), key="too-big")

    # and a replayed placement, and a second settlement, are answered as before
    first = hold_place(organization=org, amount=credits(1), key="job")
    again = hold_place(organization=org, amount=credits(1), key="job")
    captured = hold_capture(key="job", amount=credits(1))
    with pytest.raises(ApplicationError) as settled:
        hold_capture(key="job", amount=0)

    # then
    assert short.value.code == "insufficient_credits"
    assert again.pk == first.pk
    assert captured.status == "captured"
    assert settled.value.code == "hold_already_settled"
    assert Hold.objects.filter(organization=org).count() == 1
