"""The marketplace's arithmetic: every rounding of money happens here.

Prices are minor units per 1,000 credits; quantities are micro-credits
(metering.models.MICRO per credit); amounts are integers of minor units.
"""

from __future__ import annotations

from metering.models import MICRO

# Micro-credits in the 1,000 credits a price is quoted for.
PRICE_UNIT = 1_000 * MICRO
BPS = 10_000


def fill_amount(*, quantity: int, price_per_1k: int) -> int:
    """Minor units a buyer pays for `quantity` micro-credits at `price_per_1k`.

    Rounded UP to the minor unit, per fill: a seller asked at least this price
    for every credit, so a fraction of a cent is never taken out of the
    seller's price; the buyer's cost is over the exact price by less than one
    minor unit per listing filled. An order's total is the sum of its fills.
    """
    return -(-quantity * price_per_1k // PRICE_UNIT)


def platform_fee(*, gross: int, fee_bps: int) -> int:
    """The platform's fee on one fill's `gross`, at `fee_bps` basis points.

    Rounded HALF UP to the minor unit (0.5 goes to the platform): ordinary
    commercial rounding, so neither side is favoured by more than half a
    minor unit per fill, and one fee per fill means the sum of the sellers'
    proceeds and the fees is exactly what buyers paid.
    """
    return (2 * gross * fee_bps + BPS) // (2 * BPS)


def share_ceil(total: int, part: int, whole: int) -> int:
    """`total * part / whole`, rounded up (a refund of any part takes back at least that share)."""
    return -(-total * part // whole) if whole > 0 else total
