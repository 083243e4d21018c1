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


def split_pro_rata(amount: int, weights: list[int]) -> list[int]:
    """`amount` split over `weights` in proportion, in integers adding up to exactly `amount`.

    Largest remainder (Hamilton's method): each part is its exact share rounded
    down, and the units that leaves go one each to the parts with the largest
    fractional remainders, ties to the earlier part (the caller's order, fills
    by primary key: deterministic, whatever the database returns). So every
    part is its exact share rounded down or up, never further: where no exact
    share is over its weight (`amount` at most the sum), no part is either.
    """
    total = sum(weights)
    if amount < 0 or amount > total or any(weight < 0 for weight in weights):
        raise ValueError(f"cannot split {amount} over {weights}")
    if amount == 0:
        return [0] * len(weights)
    parts = [amount * weight // total for weight in weights]
    left = amount - sum(parts)  # fewer than the parts with a remainder
    by_remainder = sorted(range(len(weights)), key=lambda i: (-(amount * weights[i] % total), i))
    for i in by_remainder[:left]:
        parts[i] += 1
    return parts


def refund_split(*, amount: int, fills: list[tuple[int, int]]) -> list[int]:
    """A refund of `amount` over an order's fills, each `(gross, refunded so far)`, pro rata
    to their gross: every seller bears their share, not the first seller all of it.

    Counted over the order's refunds so far, not this one alone: each fill's
    weight is how far it is behind its exact share of everything refunded
    once this one is applied, so after any sequence of partial refunds each
    fill has given back its exact share of their sum, rounded up or down (less
    than a minor unit off), and a refund of all the rest takes exactly what
    each fill has left. Exact integers, adding up to the
    refund (`split_pro_rata`), never more than what a fill has left to refund;
    more than the order has left is not applied: the parts then add up to less
    than `amount`, and the caller records the rest (MarketReversal.unapplied).
    """
    gross = sum(g for g, _ in fills)
    refunded = sum(r for _, r in fills)
    amount = max(0, min(amount, gross - refunded))
    if amount == 0:
        return [0] * len(fills)
    # Scaled by `gross`, to stay in integers: fill i's exact share of all refunded
    # is (refunded + amount) * g_i / gross. These add up to at least amount * gross
    # (exactly, when no earlier rounding put a fill ahead of its share), so each part's
    # exact share of `amount` is at most its weight / gross <= g_i - r_i.
    total = refunded + amount
    weights = [max(0, total * g - r * gross) for g, r in fills]
    return split_pro_rata(amount, weights)
