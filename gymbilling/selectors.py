"""Billing reads."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Count, Q, QuerySet, Sum

from accounts.errors import ApplicationError
from accounts.models import Organization
from gymbilling.models import (
    CheckoutKind,
    CheckoutSession,
    CheckoutStatus,
    CreditPack,
    Invoice,
    MarketReversal,
    MoneyAccountKind,
    MoneyEntry,
    MoneyTransactionKind,
    PaymentReversal,
    Plan,
)
from metering.selectors import rows_summed


def plans_offered() -> QuerySet[Plan]:
    return Plan.objects.filter(active=True).order_by("sort_order", "monthly_price")


def packs_offered() -> QuerySet[CreditPack]:
    return CreditPack.objects.filter(active=True).order_by("price")


def catalog_items(
    *, plan: str | None = None, pack: str | None = None
) -> tuple[Plan | None, CreditPack | None]:
    """The plan and the pack these codes name (None where no code is given).

    A code that names nothing is a 404; one no longer offered is found, and
    `checkout_create` says it is not for sale.
    """
    found_plan = found_pack = None
    if plan is not None:
        found_plan = Plan.objects.filter(code=plan).first()
        if found_plan is None:
            raise ApplicationError(
                code="plan_not_found", message="No such plan.", status=404, param="plan"
            )
    if pack is not None:
        found_pack = CreditPack.objects.filter(code=pack).first()
        if found_pack is None:
            raise ApplicationError(
                code="pack_not_found", message="No such pack.", status=404, param="pack"
            )
    return found_plan, found_pack


def organization_invoices(*, organization: Organization) -> QuerySet[Invoice]:
    return Invoice.objects.filter(organization=organization)


def organization_pack_purchases(*, organization: Organization) -> QuerySet[CheckoutSession]:
    """The credit packs the organization paid for, newest first (their invoices are
    Stripe's receipts, not Invoice rows: a pack is a one-time Checkout payment)."""
    return (
        CheckoutSession.objects.filter(
            organization=organization, kind=CheckoutKind.PACK, status=CheckoutStatus.COMPLETE
        )
        .select_related("pack")
        .order_by("-completed_at", "-pk")
    )


def organization_payment_reversals(*, organization: Organization) -> QuerySet[PaymentReversal]:
    """Refunds and disputes of the organization's subscription and pack payments, newest first."""
    return PaymentReversal.objects.filter(organization=organization).order_by("-created_at", "-pk")


REVERSAL_SUMS = (
    "refunded",
    "disputed",
    "disputes_won",
    "credits_clawed_back",
    "credits_used",
    "market_reversed",
    "market_fees_reversed",
    "market_losses",
    "market_unapplied",
)


def reversals_by_customer(*, start: datetime, end: datetime) -> list[dict]:
    """Money refunded and disputed over [start, end), per organization and currency, in
    minor units (credits in micro-credits), for finance's revenue report.

    Payments that bought credits (PaymentReversal): refunded, disputed (of which the
    disputes since won: their money came back), the credits taken back unspent and
    those found already used (their revenue was recognized as they were burned).
    Marketplace payments of the customer as buyer (MarketReversal): what was returned
    of what was sold, of it the platform's fees (the gym's own marketplace income) and
    the losses (the sellers' shares already paid out), and what was returned beyond it
    (unapplied: the order's shortfall refunded by hand, money refunded twice). Refunds
    that failed since are left out of both.
    """

    def summed(field: str, **only) -> Sum:
        return Sum(field, filter=Q(**only) if only else None, default=0)

    in_days = {"created_at__gte": start, "created_at__lt": end}
    parts = []

    payments = (
        PaymentReversal.objects.filter(**in_days)
        # A refund that failed returned no money and took back no credits in the end.
        .exclude(kind=PaymentReversal.Kind.REFUND, reinstated_at__isnull=False)
        .values("organization__slug", "currency")
        .annotate(
            refunded=summed("amount", kind=PaymentReversal.Kind.REFUND),
            disputed=summed("amount", kind=PaymentReversal.Kind.DISPUTE),
            disputes_won=summed(
                "amount", kind=PaymentReversal.Kind.DISPUTE, reinstated_at__isnull=False
            ),
            credits_clawed_back=summed("credits_clawed_back"),
            credits_used=summed("credits_lost"),
        )
        .order_by()
    )
    parts += [{"customer": row.pop("organization__slug"), **row} for row in payments]
    market = (
        MarketReversal.objects.filter(**in_days)
        # A refund that failed returned no money: its fee and losses are undone too.
        .exclude(kind="refund", reinstated_at__isnull=False)
        .values("order__buyer__slug", "currency")
        .annotate(
            market_reversed=summed("amount"),
            market_fees_reversed=summed("fee_reversed"),
            market_losses=summed("loss"),
            market_unapplied=summed("unapplied"),
        )
        .order_by()
    )
    parts += [{"customer": row.pop("order__buyer__slug"), **row} for row in market]
    rows = rows_summed(
        [dict.fromkeys(REVERSAL_SUMS, 0) | part for part in parts],
        keys=("customer", "currency"),
        sums=REVERSAL_SUMS,
        label={},
    )
    return sorted(rows, key=lambda row: (row["customer"], row["currency"]))


def market_fee_income(*, start: datetime, end: datetime) -> list[dict]:
    """The gym's own marketplace income over [start, end), per currency, in minor units,
    for finance's revenue report (which recognizes resold credits at their original sale,
    so this is the only place the marketplace's fees appear).

    Read from the money ledger's postings in these days, not from the fills' figures, so it
    is what the books say (`ledger_reconcile` checks the fills against them):
    - `fills`, `volume`: fills delivered (each books one sale) and what their buyers paid;
    - `fees_earned`: the fees booked on them (`fee:<fill>`, into platform fees);
    - `fees_returned`: the fee share refunds and disputes in these days took out of
      platform fees, whenever the fill was sold (in proportion, rounded down: services);
    - `fees_reinstated`: the fee share disputes won, and refunds failed, in these days
      gave back (a refund that fails later returned nothing: its fee share is the
      platform's again, whenever the refund was made);
    - `fee_income`: every movement of the platform fees account in these days, which is
      earned - returned + reinstated (the only postings to it), and its balance at `end`
      less its balance at `start`.
    One row per currency with any of these; nothing is added across currencies.
    """
    fees = Q(account__kind=MoneyAccountKind.PLATFORM_FEES)
    sales = Q(
        account__kind=MoneyAccountKind.BUYER_CLEARING,
        transaction__kind=MoneyTransactionKind.SALE,
    )

    def summed(only: Q) -> Sum:
        return Sum("amount", filter=only, default=0)

    rows = (
        # System accounts only: platform fees and buyer clearing are one per currency.
        MoneyEntry.objects.filter(
            fees | sales,
            account__organization__isnull=True,
            transaction__created_at__gte=start,
            transaction__created_at__lt=end,
        )
        .values("transaction__currency")
        .annotate(
            fills=Count("transaction", filter=sales, distinct=True),
            # A sale posts -gross to buyer clearing (the buyer's money, on its way).
            volume=-summed(sales),
            fees_earned=summed(fees & Q(transaction__kind=MoneyTransactionKind.FEE)),
            fees_returned=-summed(fees & Q(transaction__kind=MoneyTransactionKind.REVERSAL)),
            fees_reinstated=summed(fees & Q(transaction__kind=MoneyTransactionKind.REINSTATEMENT)),
            fee_income=summed(fees),
        )
        .order_by("transaction__currency")
    )
    return [{"currency": row.pop("transaction__currency"), **row} for row in rows]
