"""Marketplace reads: the order book, a quote, the caller's listings and orders, and a
seller's sales, earnings and payouts.

Every read here of an organization's rows is scoped to it. Money is integers
of minor units, per currency, never added across currencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import (
    BigIntegerField,
    Case,
    Count,
    ExpressionWrapper,
    F,
    IntegerField,
    Min,
    OuterRef,
    Prefetch,
    Q,
    QuerySet,
    Subquery,
    Sum,
    Value,
    When,
)
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.models import Organization
from gymbilling.market.rules import fill_amount
from gymbilling.models import (
    FillStatus,
    ListingStatus,
    MarketFill,
    MarketListing,
    MarketOrder,
    MarketPayout,
    MoneyAccountKind,
    MoneyEntry,
    PayoutStatus,
    ProceedsState,
)
from metering.models import CreditLot


def _listing_lots(now: datetime) -> QuerySet:
    return CreditLot.objects.filter(
        market_listing_lot__listing=OuterRef("pk"), remaining__gt=0
    ).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))


def listings_with_availability(*, now: datetime | None = None) -> QuerySet:
    """Listings annotated with `available` (unexpired, unreserved escrowed micro-credits)
    and `next_expiry_at` (the soonest expiry among them)."""
    now = now or timezone.now()
    lots = _listing_lots(now).order_by().values("market_listing_lot__listing")
    return MarketListing.objects.annotate(
        available=Coalesce(
            Subquery(lots.annotate(s=Sum("remaining")).values("s")[:1]),
            0,
            output_field=IntegerField(),
        ),
        next_expiry_at=Subquery(lots.annotate(m=Min("expires_at")).values("m")[:1]),
    )


def order_book(
    *, currency: str, limit: int = 50, now: datetime | None = None
) -> list[MarketListing]:
    """Open offers with something to sell, cheapest first."""
    return list(
        listings_with_availability(now=now)
        .filter(status=ListingStatus.OPEN, currency=currency, available__gt=0)
        .order_by("price_per_1k", "pk")[:limit]
    )


@dataclass(frozen=True)
class Quote:
    quantity: int
    fillable: int
    best_price_per_1k: int | None
    worst_price_per_1k: int | None
    amount: int
    depth: int


def order_book_quote(
    *,
    currency: str,
    quantity: int,
    max_price_per_1k: int | None = None,
    exclude: Organization | None = None,
) -> Quote:
    """What buying `quantity` now would fill and cost: cheapest first, as `order_reserve` takes it."""
    qs = listings_with_availability().filter(
        status=ListingStatus.OPEN, currency=currency, available__gt=0
    )
    if max_price_per_1k is not None:
        qs = qs.filter(price_per_1k__lte=max_price_per_1k)
    if exclude is not None:
        qs = qs.exclude(seller=exclude)
    need, amount, best, worst, depth = quantity, 0, None, None, 0
    for listing in qs.order_by("price_per_1k", "pk"):
        depth += listing.available
        take = min(need, listing.available)
        if take:
            best = listing.price_per_1k if best is None else best
            worst = listing.price_per_1k
            amount += fill_amount(quantity=take, price_per_1k=listing.price_per_1k)
            need -= take
    return Quote(
        quantity=quantity,
        fillable=quantity - need,
        best_price_per_1k=best,
        worst_price_per_1k=worst,
        amount=amount,
        depth=depth,
    )


def organization_listing(*, organization: Organization, listing_id: int) -> MarketListing | None:
    return listings_with_availability().filter(pk=listing_id, seller=organization).first()


def organization_listings(*, organization: Organization) -> QuerySet[MarketListing]:
    """The seller's listings, newest first, with their availability."""
    return listings_with_availability().filter(seller=organization).order_by("-created_at", "-pk")


def organization_orders(
    *, organization: Organization, status: str | None = None
) -> QuerySet[MarketOrder]:
    """The buyer's orders, newest first (of one status, if given), with their fills."""
    orders = MarketOrder.objects.filter(buyer=organization)
    if status is not None:
        orders = orders.filter(status=status)
    return orders.prefetch_related(
        Prefetch("fills", queryset=MarketFill.objects.order_by("pk"))
    ).order_by("-pk")


def organization_order(*, organization: Organization, order_id: int) -> MarketOrder | None:
    return organization_orders(organization=organization).filter(pk=order_id).first()


# --- a seller's side: sales, earnings, payouts ------------------------------------------

# What the seller has earned of a fill: the buyer's payment less the platform's
# fee and what refunds and disputes took back of the seller's share before it was
# paid out (one taken after payout is the platform's loss: the seller keeps it).
_EARNED = F("gross") - F("fee") - F("seller_reversed")
# Of that, what is not paid out yet, while the fill is pending or available: the
# balance the money ledger holds for it in the seller's pending or available
# account (services._seller_share_left; market_proceeds_match_fills checks it).
# A won dispute's share of a fill paid out before it is owed again, less what
# those payouts sent (`earlier_payouts`).
_UNPAID = _EARNED - F("earlier_payouts")


def _sales(organization: Organization) -> QuerySet[MarketFill]:
    # A fill is a sale once credits were delivered and paid for: not while reserved,
    # nor one released, nor one whose credits all expired while reserved (gross 0).
    return MarketFill.objects.filter(seller=organization, status=FillStatus.DELIVERED, gross__gt=0)


def organization_sales(
    *, organization: Organization, proceeds: str | None = None
) -> QuerySet[MarketFill]:
    """The seller's sales (fills of their listings, delivered), newest first, each with
    `earned` (gross - fee - seller_reversed) and `unpaid` (of it, what waits for payout).

    Of one proceeds state (pending, available, paid_out), if given.
    """
    sales = _sales(organization)
    if proceeds is not None:
        sales = sales.filter(proceeds=proceeds)
    return sales.annotate(
        earned=ExpressionWrapper(_EARNED, output_field=IntegerField()),
        unpaid=Case(
            When(
                proceeds__in=(ProceedsState.PENDING, ProceedsState.AVAILABLE),
                then=ExpressionWrapper(_UNPAID, output_field=IntegerField()),
            ),
            default=Value(0),
            output_field=IntegerField(),
        ),
    ).order_by("-pk")


@dataclass(frozen=True)
class Earnings:
    """A seller's marketplace money in one currency, minor units.

    earned = gross - fees - reversed = pending + available + in_transit + paid_out.
    """

    currency: str
    sales: int  # fills sold
    sold_quantity: int  # micro-credits delivered
    gross: int  # what buyers paid
    fees: int  # the platform's fee on it
    reversed: int  # taken back by refunds and disputes before payout
    pending: int  # in the holding period
    available: int  # past it, waiting for the next payout
    in_transit: int  # in a payout recorded, not yet sent to Stripe
    paid_out: int  # in payouts Stripe took
    next_available_at: datetime | None  # when the soonest pending sale becomes available

    @property
    def earned(self) -> int:
        return self.gross - self.fees - self.reversed


_PENDING = Q(proceeds=ProceedsState.PENDING)
# Each figure of Earnings, as an aggregate of the seller's sales in one currency.
_SALES_FIGURES = {
    "sales": Count("pk"),
    "sold_quantity": Sum("delivered_quantity"),
    "gross": Sum("gross"),
    "fees": Sum("fee"),
    "reversed": Sum("seller_reversed"),
    "pending": Sum(_UNPAID, filter=_PENDING),
    "available": Sum(_UNPAID, filter=Q(proceeds=ProceedsState.AVAILABLE)),
}
# And of the payouts: a refused one (failed) paid nothing, its proceeds back to available.
_PAYOUT_FIGURES = {
    "in_transit": Sum("amount", filter=Q(status=PayoutStatus.PENDING)),
    "paid_out": Sum("amount", filter=Q(status=PayoutStatus.SENT)),
}


def _by_currency(rows: QuerySet, figures: dict) -> dict[str, dict]:
    """`figures` aggregated per currency. Their aliases are prefixed: an alias named as a
    column ("gross") would be what a later aggregate's F("gross") reads."""
    totals = (
        rows.order_by()
        .values("currency")
        .annotate(**{f"total_{name}": aggregate for name, aggregate in figures.items()})
    )
    return {row["currency"]: {name: row[f"total_{name}"] for name in figures} for row in totals}


def organization_earnings(*, organization: Organization) -> list[Earnings]:
    """The seller's earnings per currency (those they sold or were paid in), by currency.

    Two queries, whatever the number of sales: one over the fills, one over the payouts.
    """
    sales = _by_currency(
        _sales(organization),
        _SALES_FIGURES | {"next_available_at": Min("available_at", filter=_PENDING)},
    )
    payouts = _by_currency(MarketPayout.objects.filter(seller=organization), _PAYOUT_FIGURES)
    earnings = []
    for currency in sorted(sales.keys() | payouts.keys()):
        figures = sales.get(currency, {}) | payouts.get(currency, {})
        earnings.append(
            Earnings(
                currency=currency,
                # Integers (PostgreSQL's SUM of bigint is numeric), 0 where none.
                **{
                    name: int(figures.get(name) or 0)
                    for name in (*_SALES_FIGURES, *_PAYOUT_FIGURES)
                },
                next_available_at=figures.get("next_available_at"),
            )
        )
    return earnings


def shortfall_refund_owed(order: MarketOrder) -> bool:
    """Whether the order owes the buyer its undelivered shortfall: not refunded by Stripe
    nor by hand, waiting to be sent or refused."""
    return bool(
        order.shortfall_amount
        and order.shortfall_refunded_at is None
        and order.shortfall_refund_resolved_at is None
    )


def payment_market_order(*, payment_intent_id: str) -> MarketOrder | None:
    """The marketplace order a payment paid for, if any."""
    if not payment_intent_id:
        return None
    return MarketOrder.objects.filter(stripe_payment_intent_id=payment_intent_id).first()


def organization_payouts(*, organization: Organization) -> QuerySet[MarketPayout]:
    """The seller's payouts, newest first: sent, being sent (pending), or refused (failed,
    their proceeds back to available)."""
    return MarketPayout.objects.filter(seller=organization).order_by("-pk")


def payouts_with_losses(queryset: QuerySet[MarketPayout]) -> QuerySet[MarketPayout]:
    """`queryset` with `lost`: what refunds and disputes of each payout's sales booked as
    the platform's loss against it, in minor units (0: none).

    A sale refunded once its payout is recorded finds its fill paid out: the seller's share
    of the refund is the platform's, whether Stripe took the payout already or it is still
    pending. Net of what a refusal of the payout recovered from the seller (payout_failed)
    and of what finance's mark paid booked again (payout_marked_paid): the money entries of
    the losses account that name the payout. A dispute won later gives its loss back by a
    reinstatement that names the fill, not the payout: not counted here.
    """
    lost = (
        MoneyEntry.objects.filter(
            transaction__payout=OuterRef("pk"), account__kind=MoneyAccountKind.LOSSES
        )
        .order_by()
        .values("transaction__payout")
        .annotate(total=Sum("amount"))
        .values("total")
    )
    # The losses account's debits are negative (a loss booked is -amount there).
    return queryset.annotate(
        lost=ExpressionWrapper(
            Value(0) - Coalesce(Subquery(lost, output_field=BigIntegerField()), Value(0)),
            output_field=BigIntegerField(),
        )
    )
