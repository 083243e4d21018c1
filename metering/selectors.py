"""Reads of the credit ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import connection
from django.db.models import Count, QuerySet, Sum
from django.db.models import F as models_F
from django.db.models.functions import TruncDay
from django.utils import timezone

from accounts.cache import SharedCache
from accounts.errors import ApplicationError
from accounts.models import Organization
from metering.models import (
    AccountKind,
    CreditLot,
    LedgerAccount,
    LedgerEntry,
    LotSource,
    ModelPrice,
    UsageRecord,
)


@dataclass(frozen=True)
class Balance:
    """An organization's credits, in micro-credits.

    available = what a new hold may take: the wallet account, less what refunds
                and disputes set aside while running work holds their credits
                (the wallet's claim; never below 0);
    held      = reserved by pending holds (the holds account);
    escrowed  = listed on the marketplace (the escrow account);
    set_aside = the wallet's claim, usually 0;
    total     = the wallet account + held, which the wallet's lots add up to.
    """

    wallet: int
    held: int
    escrowed: int
    set_aside: int = 0

    @property
    def available(self) -> int:
        return max(0, self.wallet - self.set_aside)

    @property
    def total(self) -> int:
        return self.wallet + self.held


def organization_balance(*, organization: Organization) -> Balance:
    rows = {
        kind: (balance, claimed)
        for kind, balance, claimed in LedgerAccount.objects.filter(
            organization=organization
        ).values_list("kind", "balance", "claimed")
    }
    wallet, claimed = rows.get(AccountKind.WALLET, (0, 0))
    return Balance(
        wallet=wallet,
        held=rows.get(AccountKind.HOLDS, (0, 0))[0],
        escrowed=rows.get(AccountKind.ESCROW, (0, 0))[0],
        set_aside=claimed,
    )


def model_price_by_id(pk: int) -> ModelPrice:
    return PRICES.get(
        ("pk", pk), lambda: ModelPrice.objects.select_related("price_book").get(pk=pk)
    )


def account_balance(*, account: LedgerAccount) -> int:
    """The true balance: the cache for organization accounts, the sum for system ones."""
    if not account.is_system:
        return account.balance
    return LedgerEntry.objects.filter(account=account).aggregate(s=Sum("amount"))["s"] or 0


def overage_allowance_available(*, organization: Organization, available: int) -> int:
    """How much of the `available` credits is a plan's overage allowance: lent, not
    prepaid, invoiced as it is spent.

    Overage lots are burned after every other (their priority), so the credits that
    pending work holds come out of the others first, and the allowance is what is left
    of the overage lots up to `available`.
    """
    left = (
        CreditLot.objects.filter(
            organization=organization, account__kind=AccountKind.WALLET, source=LotSource.OVERAGE
        ).aggregate(left=Sum("remaining"))["left"]
        or 0
    )
    return min(left, available)


def organization_lots(*, organization: Organization, include_spent: bool = False) -> QuerySet:
    qs = CreditLot.objects.filter(organization=organization).select_related("account")
    if not include_spent:
        qs = qs.filter(remaining__gt=0)
    return qs.order_by("expires_at", "pk")


_LOT_FAMILY = """
WITH RECURSIVE family(id) AS (
    SELECT %s::bigint
    UNION
    SELECT l.id FROM metering_creditlot l JOIN family f ON l.parent_id = f.id
)
SELECT id FROM family
"""


def lot_family_ids(lot: CreditLot) -> list[int]:
    """The lot and every lot split from it, however many generations down: each move
    through escrow splits one (listed, reserved, released to the listing, withdrawn to the
    wallet is four), and credits may make that trip any number of times."""
    with connection.cursor() as cursor:
        cursor.execute(_LOT_FAMILY, [lot.pk])
        return [pk for (pk,) in cursor.fetchall()]


def organization_entries(*, organization: Organization) -> QuerySet:
    return (
        LedgerEntry.objects.filter(account__organization=organization)
        .select_related("account", "transaction")
        .order_by("-pk")
    )


# Price books, read by every inference request; dropped in every process when
# a book is published (MeteringConfig.ready). Books are never edited, so a
# cached price is the row itself. Shared between threads: never change them.
PRICES = SharedCache("metering-prices")


def _model_prices(model_name: str) -> list[ModelPrice]:
    """Every book's price of the model, the newest book (by effective time, then version) first."""
    return list(
        ModelPrice.objects.filter(model_name=model_name)
        .select_related("price_book")
        .order_by("-price_book__effective_at", "-price_book__version")
    )


def model_price(*, model_name: str, at: datetime | None = None) -> ModelPrice:
    """The rates in force for a model at a moment: the newest book effective by then."""
    at = at or timezone.now()
    prices = PRICES.get(("model", model_name), lambda: _model_prices(model_name))
    price = next((p for p in prices if p.price_book.effective_at <= at), None)
    if price is None:
        raise ApplicationError(
            code="model_not_priced",
            message=f"No price is set for the model {model_name!r}.",
            status=404,
            param="model",
        )
    return price


USAGE_GROUPINGS = {"day", "model", "key"}


def usage_aggregate(
    *, organization: Organization, start: datetime, end: datetime, group_by: str
) -> list[dict]:
    """Usage totals per day, model or API key over [start, end)."""
    if group_by not in USAGE_GROUPINGS:
        raise ApplicationError(
            code="invalid_request",
            message=f"group_by must be one of {', '.join(sorted(USAGE_GROUPINGS))}.",
            param="group_by",
        )
    qs = _organization_usage(organization=organization, start=start, end=end)
    if group_by == "day":
        qs = qs.annotate(group=TruncDay("created_at"))
    elif group_by == "model":
        qs = qs.annotate(group=models_F("model_name"))
    else:
        qs = qs.annotate(group=models_F("api_key__public_id"))
    return list(qs.values("group").annotate(**_usage_sums()).order_by("group"))


def usage_by_day_and_model(
    *, organization: Organization, start: datetime, end: datetime
) -> list[dict]:
    """Usage totals per day (midnight UTC, `day`) and model (`model_name`) over [start, end),
    days first, then models: the dashboard's chart stacks each day's models in one bar."""
    return list(
        _organization_usage(organization=organization, start=start, end=end)
        .annotate(day=TruncDay("created_at"))
        .values("day", "model_name")
        .annotate(**_usage_sums())
        .order_by("day", "model_name")
    )


def _organization_usage(*, organization: Organization, start: datetime, end: datetime) -> QuerySet:
    return UsageRecord.objects.filter(
        organization=organization, created_at__gte=start, created_at__lt=end
    )


def _usage_sums() -> dict:
    """What a usage aggregate sums per group: the partner API's and finance's alike."""
    return {
        "requests": Count("id"),
        "input_tokens": Sum("input_tokens"),
        "cached_input_tokens": Sum("cached_input_tokens"),
        "output_tokens": Sum("output_tokens"),
        "credits": Sum("credits"),
    }


SERVING_COST_GROUPINGS = {"model": "model_name", "organization": "organization__slug"}


def serving_cost_report(*, start: datetime, end: datetime, group_by: str) -> list[dict]:
    """Usage and what serving it cost over [start, end), per model or per organization
    and currency, largest cost first: finance's view of what each costs to serve (the
    serving cost is fixed at settlement from the catalog's GPU-hour price)."""
    column = SERVING_COST_GROUPINGS[group_by]
    return list(
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
        .values(column, "currency")
        .annotate(
            **_usage_sums(),
            engine_busy_ms=Sum("engine_busy_ms"),
            serving_cost=Sum("serving_cost"),
        )
        .order_by("-serving_cost", column, "currency")
    )
