"""What a lot was sold for, at its grant and through its splits (LotSale, lot_create)."""

from __future__ import annotations

import pytest

from metering.models import CreditLot
from metering.services import LotSale, credits_transfer
from tests.factories import OrganizationFactory
from tests.helpers import credits

pytestmark = pytest.mark.django_db


def test_a_lot_split_from_one_an_old_process_left_unrooted_finds_the_granted_root(grant):
    # given credits granted to one team, moved to a second, and the second's lot left
    # without its root, as a process still running the code before lots had roots
    # inserted it during a rolling deploy
    first, second, third = (OrganizationFactory() for _ in range(3))
    granted = grant(first, credits(10), sale=LotSale(revenue=700, currency="usd", origin="pro"))
    credits_transfer(source=first, destination=second, amount=credits(4), key="to-second")
    middle = CreditLot.objects.get(organization=second)
    CreditLot.objects.filter(pk=middle.pk).update(root=None)

    # when the new code splits that lot again
    credits_transfer(source=second, destination=third, amount=credits(3), key="to-third")

    # then the new lot's root is the granted lot, whose sale it earns at, not its parent
    assert CreditLot.objects.get(organization=third).root_id == granted.pk
