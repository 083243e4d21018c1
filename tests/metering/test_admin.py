"""The ledger in the Django admin, as finance staff read it."""

from __future__ import annotations

import pytest

from metering.models import AccountKind, LedgerAccount
from tests.factories import OrganizationFactory
from tests.helpers import changelist_column, credits, system_balance

pytestmark = pytest.mark.django_db


def test_the_account_list_shows_a_system_accounts_balance_as_the_sum_of_its_entries(
    admin_client, grant, django_assert_max_num_queries
):
    # given credits granted to two organizations: the issuance (system)
    # account takes the negative of both, and keeps no cached balance
    first, second = OrganizationFactory(), OrganizationFactory()
    grant(first, credits(5))
    grant(second, credits(3))
    issuance = LedgerAccount.objects.get(kind=AccountKind.ISSUANCE, organization=None)
    wallet = LedgerAccount.objects.get(kind=AccountKind.WALLET, organization=first)
    assert issuance.balance == 0

    # when finance open the account list (its balances in the list's own query)
    with django_assert_max_num_queries(5):
        page = admin_client.get("/admin/metering/ledgeraccount/").content.decode()

    # then the issuance account shows -8 credits (its true balance), a wallet
    # its own, under a heading that says how a system account's figure is made
    shown = changelist_column(page, "true_balance")
    assert shown[str(issuance.pk)] == str(-credits(8)) == str(system_balance("issuance"))
    assert shown[str(wallet.pk)] == str(credits(5))
    assert "Balance (system: sum of entries)" in page
    # and the account's own page shows the same figure, not the unused column's 0
    detail = admin_client.get(f"/admin/metering/ledgeraccount/{issuance.pk}/change/")
    assert f'<div class="readonly">{-credits(8)}</div>' in detail.content.decode()
