"""`stripe_sync_catalog`: plans and packs become Stripe products and prices.

Idempotent: products use our own ids (`gym_plan_<code>`, `gym_pack_<code>`);
each price has a lookup key (`gym_plan_<code>`, `gym_plan_<code>_overage`,
`gym_pack_<code>`) and is created only when no current price with that key
has the right amount, currency and credits. Stripe prices are immutable, so a
changed amount makes a new price that takes over the lookup key; the old one is
deactivated but stays in StripePrice, because subscriptions on it still name
their plan through it. A price also fixes the credits it buys
(StripePrice.credits, and the price's `credits` metadata at Stripe): changed
credits make a new price too, so members still on the old price (a subscription
renewing at it, a checkout opened before the change) get what it was sold for,
and new purchases what the plan or pack says now. An overage price also fixes the
meter it reads (StripePrice.meter, `recurring.meter` at Stripe): a change of the
overage meter (another STRIPE_OVERAGE_EVENT_NAME) makes new overage prices reading
it, and the renewals move subscriptions in their currency onto them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from dataclasses import dataclass, field
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q

from gymbilling import stripe_client
from gymbilling.models import CreditPack, Plan, PriceKind, StripePrice, Subscription
from metering.models import MICRO

logger = logging.getLogger(__name__)


@dataclass
class SyncReport:
    products: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deactivated: list[str] = field(default_factory=list)


def _same_amount(price: dict, amount: dict) -> bool:
    if "unit_amount" in amount:
        return price.get("unit_amount") == amount["unit_amount"]
    return Decimal(str(price.get("unit_amount_decimal") or "NaN")) == Decimal(
        amount["unit_amount_decimal"]
    )


def _price_ensure(
    *,
    report: SyncReport,
    lookup_key: str,
    kind: str,
    owner: dict,
    unit_amount: int,
    currency: str,
    product: str,
    params: dict,
    credits: int | None = None,
    meter: str = "",
) -> StripePrice:
    """The current price of `lookup_key`: kept when it has this amount, currency, credits
    (None: an overage price, which buys none) and meter (blank: a licensed price), else a
    new one that takes over. Never the price it returns archived: Stripe's replay of the
    request that made the current one names that one again."""
    current = StripePrice.objects.filter(lookup_key=lookup_key, current=True).first()
    if current and meter and not current.meter:
        current = stripe_price_meter_read(price=current)
    if (
        current
        and current.unit_amount == unit_amount
        and current.currency == currency
        and current.credits == credits
        and current.meter == meter
    ):
        report.unchanged.append(lookup_key)
        return current
    metadata = {"kind": kind, **{k: str(v.pk) for k, v in owner.items()}}
    if credits is not None:
        metadata["credits"] = str(credits)
    # Metered overage is priced per credit in fractions of a minor unit
    # (Stripe keeps up to 12 decimals); everything else in whole minor units.
    per_credit = params.pop("per_1k_credits", False)
    amount = (
        {"unit_amount_decimal": str(Decimal(unit_amount) / 1000)}
        if per_credit
        else {"unit_amount": unit_amount}
    )
    # Another run may have created it at Stripe and crashed before our row.
    for price in stripe_client.prices_by_lookup_key([lookup_key]):
        if (
            _same_amount(price, amount)
            and price.get("currency") == currency
            and (price.get("metadata") or {}).get("credits") == metadata.get("credits")
            and price_meter(price) == meter
        ):
            created = price
            break
    else:
        request = {
            "product": product,
            "currency": currency,
            **amount,
            "lookup_key": lookup_key,
            "transfer_lookup_key": True,
            "metadata": metadata,
            **params,
        }
        # The key names this exact request: a retry replays it, a changed
        # price (or another database's rows) is a new request.
        digest = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:24]
        created = stripe_client.price_create(key=f"price:{lookup_key}:{digest}", **request)
        if (
            not created.get("active", True)
            or StripePrice.objects.filter(stripe_price_id=created["id"], current=False).exists()
        ):
            # A replay of a price made earlier today and retired since (the amount went
            # back and forth): archived at Stripe, and without its lookup key, make a new
            # one. Known by our row: a replay is the first answer byte for byte, "active".
            created = stripe_client.price_create(
                key=f"price:{lookup_key}:{digest}:{uuid.uuid4()}", **request
            )
    if current and created["id"] == current.stripe_price_id:
        # Stripe's replay of the request that made the current price (the key names the
        # request, its meter too), sent because what Stripe lists under the lookup key did
        # not show it as recorded here (its meter unread: archived by hand, its lookup key
        # moved, no `recurring.meter` listed). It is the price just ensured, made as asked:
        # it stays current, reading `meter`, never archived by its own sync.
        logger.warning(
            "price %s (%s): not found at Stripe under its lookup key as recorded, but "
            "Stripe's replay of the request that made it returned it: kept as the current "
            "price, reading meter %s; check it is active at Stripe",
            current.stripe_price_id,
            lookup_key,
            meter or "none",
        )
        report.unchanged.append(lookup_key)
        return stripe_price_meter_record(price=current, meter=meter)
    with transaction.atomic():
        if current:
            StripePrice.objects.filter(pk=current.pk).update(current=False)
            report.deactivated.append(current.stripe_price_id)
        row, _ = StripePrice.objects.update_or_create(
            stripe_price_id=created["id"],
            defaults={
                "kind": kind,
                "unit_amount": unit_amount,
                "currency": currency,
                "credits": credits,
                "meter": meter,
                "lookup_key": lookup_key,
                "current": True,
                **owner,
            },
        )
    if current:
        stripe_client.price_deactivate(current.stripe_price_id)
    report.created.append(lookup_key)
    return row


def price_meter(stripe_price: dict) -> str:
    """The meter a Stripe price object reads; blank for a licensed price."""
    return str((stripe_price.get("recurring") or {}).get("meter") or "")


def stripe_price_meter_record(*, price: StripePrice, meter: str) -> StripePrice:
    """Record the meter `price` reads, as Stripe's object of it says, where it is not
    recorded yet (a price made before StripePrice.meter): fixed at Stripe, so written once."""
    if meter and not price.meter:
        StripePrice.objects.filter(pk=price.pk, meter="").update(meter=meter)
        price.meter = meter
    return price


def stripe_price_meter_read(*, price: StripePrice) -> StripePrice:
    """`price` with its meter read from Stripe and recorded, where it is listed under its
    lookup key (active there: a current price); as it was otherwise. One Stripe call:
    the catalog's sync, and a renewal whose grant compares meters
    (invoices.overage_meter_known)."""
    for found in stripe_client.prices_by_lookup_key([price.lookup_key]):
        if found.get("id") == price.stripe_price_id:
            return stripe_price_meter_record(price=price, meter=price_meter(found))
    return price


def _plan_sync(plan: Plan, report: SyncReport, meter_id: str | None) -> None:
    product_id = f"gym_plan_{plan.code}"
    stripe_client.product_upsert(
        product_id=product_id,
        name=f"{plan.name} membership",
        description=plan.description,
        metadata={"plan": plan.code},
    )
    Plan.objects.filter(pk=plan.pk).update(stripe_product_id=product_id)
    report.products.append(product_id)
    _price_ensure(
        report=report,
        lookup_key=f"gym_plan_{plan.code}",
        kind=PriceKind.PLAN,
        owner={"plan": plan},
        unit_amount=plan.monthly_price,
        currency=plan.currency,
        product=product_id,
        params={"recurring": {"interval": "month", "usage_type": "licensed"}},
        credits=plan.monthly_credits,
    )
    if plan.overage_allowed and meter_id:
        # The meter counts whole credits; the plan's price is per 1,000 of them.
        _price_ensure(
            report=report,
            lookup_key=f"gym_plan_{plan.code}_overage",
            kind=PriceKind.OVERAGE,
            owner={"plan": plan},
            unit_amount=plan.overage_price_per_1k,
            currency=plan.currency,
            product=product_id,
            params={
                "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
                "per_1k_credits": True,
            },
            meter=meter_id,
        )


def _pack_sync(pack: CreditPack, report: SyncReport) -> None:
    product_id = f"gym_pack_{pack.code}"
    stripe_client.product_upsert(
        product_id=product_id,
        name=f"{pack.name} credit pack",
        description=f"Credits valid for {pack.validity_days} days.",
        metadata={"pack": pack.code},
    )
    CreditPack.objects.filter(pk=pack.pk).update(stripe_product_id=product_id)
    report.products.append(product_id)
    _price_ensure(
        report=report,
        lookup_key=f"gym_pack_{pack.code}",
        kind=PriceKind.PACK,
        owner={"pack": pack},
        unit_amount=pack.price,
        currency=pack.currency,
        product=product_id,
        params={},
        credits=pack.credits,
    )


def catalog_sync() -> SyncReport:
    """Create or update the Stripe products and prices of every plan and pack."""
    report = SyncReport()
    meter_id = None
    if Plan.objects.filter(overage_allowed=True).exists():
        meter_id = stripe_client.meter_ensure(
            event_name=settings.STRIPE_OVERAGE_EVENT_NAME, display_name="Overage credits"
        )["id"]
    for plan in Plan.objects.order_by("pk"):
        _plan_sync(plan, report, meter_id)
    for pack in CreditPack.objects.order_by("pk"):
        _pack_sync(pack, report)
    return report


# Subscriptions that may still come back to their item's price: every one not ended (an
# unpaid or paused one is paid, or resumed, on the item it has).
_ENDED = (Subscription.Status.CANCELED, Subscription.Status.INCOMPLETE_EXPIRED)


def _prices_needed() -> set[int]:
    """The retired prices a subscription of ours may still put an item on: the one it pays
    (a change on its plan moves the item back to it: checkout.plan_change_price), its
    overage price, and, for a downgrade scheduled on Stripe's item (whose price no row
    names) or a lifted one to be put back, every retired price of that plan, or of any
    plan (checkout._lift_undo)."""
    live = Subscription.objects.exclude(status__in=_ENDED)
    retired = StripePrice.objects.filter(current=False)
    needed = set(
        retired.filter(
            Q(pk__in=live.values("price_id"))
            | Q(pk__in=live.values("overage_price_id"))
            | Q(plan_id__in=live.filter(scheduled_plan__isnull=False).values("scheduled_plan_id"))
        ).values_list("pk", flat=True)
    )
    if live.filter(downgrade_restore_due_at__isnull=False).exists():
        needed |= set(retired.filter(kind=PriceKind.PLAN).values_list("pk", flat=True))
    return needed


def stripe_prices_retired_archive() -> list[str]:
    """Archive at Stripe every retired price (StripePrice.current false) that is active
    there and that no subscription of ours may still need; returns their ids.

    A member left on a retired price who changes seats, or takes back a downgrade, has it
    made active again at Stripe (checkout._price_usable), which refuses to put an item on
    an archived price; left so, Stripe's own Checkout, payment links and dashboard could
    sell a price the catalog retired. Archiving changes nothing for the subscriptions on
    it (Stripe keeps billing them at it), and a later change that needs it makes it active
    again. Run daily by beat; safe to run twice (archiving twice is the same update).

    No transaction is open across the Stripe calls. What is needed is read again just
    before each price is archived: a change that began since reactivates it at most
    between that read and the archive, and is then refused by Stripe (nothing changed),
    and succeeds when asked again."""
    retired = {
        p.stripe_price_id: p.pk
        for p in StripePrice.objects.filter(current=False).exclude(pk__in=_prices_needed())
    }
    if not retired:
        return []
    # Read whole before any is archived: a page's cursor may be one archived meanwhile.
    active = [price["id"] for price in stripe_client.prices_active() if price["id"] in retired]
    archived = []
    for price_id in active:
        if retired[price_id] in _prices_needed():
            continue
        stripe_client.price_deactivate(price_id)
        logger.info("retired price %s was active at Stripe: archived again", price_id)
        archived.append(price_id)
    return archived


# The demo's and the tests' catalog: prices in US cents, credits in micro-credits.
DEFAULT_PLANS = [
    {
        "code": "basic",
        "name": "Basic",
        "sort_order": 10,
        "description": "For one member getting started: the basic models, standard priority.",
        "monthly_price": 2_000,
        "monthly_credits": 2_000 * MICRO,
        "rollover_percent": 0,
        "model_tiers": ["basic"],
        "max_priority": "standard",
        "requests_per_minute": 60,
        "tokens_per_minute": 100_000,
        "concurrent_jobs": 4,
    },
    {
        "code": "pro",
        "name": "Pro",
        "sort_order": 20,
        "description": "Every model, priority queue, a quarter of the month rolls over, overage billed.",
        "monthly_price": 9_900,
        "monthly_credits": 12_000 * MICRO,
        "rollover_percent": 25,
        "model_tiers": ["basic", "pro"],
        "max_priority": "priority",
        "requests_per_minute": 600,
        "tokens_per_minute": 1_000_000,
        "concurrent_jobs": 16,
        "overage_allowed": True,
        "overage_price_per_1k": 900,
        "fair_use_ceiling": 20_000 * MICRO,
    },
    {
        "code": "team",
        "name": "Team",
        "sort_order": 30,
        "description": "Per seat: pro models for a whole team, half a month rolls over.",
        "monthly_price": 4_900,
        "monthly_credits": 5_000 * MICRO,
        "rollover_percent": 50,
        "seat_based": True,
        "min_seats": 2,
        "max_seats": 200,
        "model_tiers": ["basic", "pro"],
        "max_priority": "priority",
        "requests_per_minute": 1_200,
        "tokens_per_minute": 2_000_000,
        "concurrent_jobs": 32,
        "overage_allowed": True,
        "overage_price_per_1k": 800,
        "fair_use_ceiling": 10_000 * MICRO,
    },
    {
        "code": "enterprise",
        "name": "Enterprise",
        "sort_order": 40,
        "description": "Dedicated capacity tiers, a full month rolls over, high limits.",
        "monthly_price": 99_900,
        "monthly_credits": 150_000 * MICRO,
        "rollover_percent": 100,
        "model_tiers": ["basic", "pro", "enterprise"],
        "max_priority": "priority",
        "requests_per_minute": 6_000,
        "tokens_per_minute": 10_000_000,
        "concurrent_jobs": 128,
        "overage_allowed": True,
        "overage_price_per_1k": 600,
        "fair_use_ceiling": 500_000 * MICRO,
    },
]
DEFAULT_PACKS = [
    {"code": "boost-1k", "name": "Boost 1k", "credits": 1_000 * MICRO, "price": 1_200},
    {"code": "boost-10k", "name": "Boost 10k", "credits": 10_000 * MICRO, "price": 10_000},
]


def catalog_seed_defaults() -> tuple[int, int]:
    """Create the default plans and packs where their codes are missing (never overwrites)."""
    plans = sum(
        Plan.objects.get_or_create(
            code=p["code"], defaults={k: v for k, v in p.items() if k != "code"}
        )[1]
        for p in DEFAULT_PLANS
    )
    packs = sum(
        CreditPack.objects.get_or_create(
            code=p["code"], defaults={k: v for k, v in p.items() if k != "code"}
        )[1]
        for p in DEFAULT_PACKS
    )
    return plans, packs
