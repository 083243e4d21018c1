"""Marketplace reads: the order book, a quote, the caller's listings and orders."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db.models import IntegerField, Min, OuterRef, Q, QuerySet, Subquery, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.models import Organization
from gymbilling.market.rules import fill_amount
from gymbilling.models import ListingStatus, MarketListing, MarketOrder
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


def organization_order(*, organization: Organization, order_id: int) -> MarketOrder | None:
    return (
        MarketOrder.objects.filter(pk=order_id, buyer=organization)
        .prefetch_related("fills")
        .first()
    )
