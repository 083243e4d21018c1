"""The marketplace's reconcile checks (gymbilling/market/reconcile.py) over real histories.

Stripe is the local stand-in over HTTP; refunds and disputes are processed as the webhook
would (`deliver`). A corruption is made inside a block that is rolled back, so that it
never outlives the test (every test ends with the ledger reconciled).
"""

from __future__ import annotations

import pytest
from django.db import transaction
from django.db.models import F

from gymbilling.models import MarketReversal
from metering.reconcile import ledger_reconcile
from tests.gymbilling.market.conftest import market_member, refunded_then_disputed
from tests.helpers import credits

pytestmark = pytest.mark.django_db

CHECK = "market_reversal_amount"


class Rollback(Exception):
    """Raised at the end of a corruption block so that it never outlives the test."""


def _refunds_and_disputes(market_stripe, deliver) -> None:
    """Two sales half refunded, then disputed whole (62 of each returned beyond the sale):
    one of them after the rest was paid out (its dispute's 56 a loss), and won."""
    for paid_out_and_won in (False, True):
        refunded_then_disputed(
            market_stripe,
            market_member(credits_amount=credits(1000)),
            market_member(),
            deliver,
            paid_out=paid_out_and_won,
            won=paid_out_and_won,
        )


def test_refunds_and_disputes_beyond_the_sale_and_won_reconcile(market_stripe, deliver):
    # given: refunds and disputes, some returning more than the sale had left, one won
    # (its loss zeroed on the row, its money given back by transactions of its own)
    _refunds_and_disputes(market_stripe, deliver)
    won = MarketReversal.objects.get(kind="dispute", reinstated_at__isnull=False)
    assert (won.amount, won.unapplied, won.fee_reversed, won.seller_reversed, won.loss) == (
        62,
        62,
        6,
        0,
        0,
    )

    # when
    report = ledger_reconcile()

    # then: each one's amount is what the money ledger took back under it
    assert CHECK in report.checked
    assert report.ok, report.violations


def test_a_reversal_whose_amount_is_not_what_the_ledger_took_back_is_reported(
    market_stripe, deliver
):
    # given: the same history
    _refunds_and_disputes(market_stripe, deliver)
    won = MarketReversal.objects.get(kind="dispute", reinstated_at__isnull=False)

    with pytest.raises(Rollback), transaction.atomic():
        # and the won dispute recorded as the code before gymbilling/0022 wrote it: all it
        # returned in its amount
        MarketReversal.objects.filter(pk=won.pk).update(
            amount=F("amount") + F("unapplied"), unapplied=0
        )

        # when
        report = ledger_reconcile()

        # then: it alone is reported, with what the ledger took back under it
        violations = {v.check: v for v in report.violations}
        assert set(violations) == {CHECK}
        assert violations[CHECK].rows == [
            {"id": won.pk, "key": won.key, "amount": 124, "unapplied": 0, "moved": 62}
        ]
        raise Rollback

    # and the corruption is gone with the rollback
    assert ledger_reconcile().ok
