"""Prices (`/v1/prices`), which localstripe lacks (it has only legacy Plans).

Subscriptions here are our own and read prices directly, so no Plan is created
under the hood. As in Stripe, a price's amount, currency and recurrence are fixed
once created; `active`, `metadata`, `nickname` and `lookup_key` may change.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from localstripe.resources import Product, StripeObject

from gymbilling.stripe_standin.common import (
    api,
    list_of,
    merge_metadata,
    newest_first,
    objects_of,
    stored,
    stripe_error,
    to_bool,
    to_decimal,
    to_int,
)
from gymbilling.stripe_standin.webhooks import emit

INTERVALS = ("day", "week", "month", "year")


class Price(StripeObject):
    object = "price"
    _id_prefix = "price_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)

    @property
    def type(self) -> str:
        return "recurring" if self.recurring else "one_time"

    @property
    def _unit_amount_exact(self) -> Decimal:
        """Per-unit amount in minor units; may be fractional (per-token prices)."""
        return Decimal(self.unit_amount_decimal)


def price_retrieve(price_id: str) -> Price:
    return stored("price", price_id, param="price")


def _recurring_from(params: Any) -> dict[str, Any] | None:
    if not params:
        return None
    interval = params.get("interval")
    if interval not in INTERVALS:
        raise stripe_error(
            400,
            f"Invalid interval: must be one of {', '.join(INTERVALS)}",
            param="recurring[interval]",
        )
    usage_type = params.get("usage_type", "licensed")
    if usage_type not in ("licensed", "metered"):
        raise stripe_error(
            400, "usage_type must be licensed or metered", param="recurring[usage_type]"
        )
    meter = params.get("meter")
    if usage_type == "metered" and not meter:
        raise stripe_error(400, "A metered price needs recurring[meter]", param="recurring[meter]")
    return {
        "interval": interval,
        "interval_count": to_int(
            params.get("interval_count", 1), "recurring[interval_count]", minimum=1
        ),
        "usage_type": usage_type,
        "meter": meter,
        "aggregate_usage": None,
        "trial_period_days": None,
    }


def _claim_lookup_key(
    lookup_key: str | None, *, transfer: bool, owner_id: str | None = None
) -> None:
    """Lookup keys are unique among prices; `transfer_lookup_key` moves one over."""
    if not lookup_key:
        return
    for price in objects_of("price"):
        if price.lookup_key == lookup_key and price.id != owner_id:
            if not transfer:
                raise stripe_error(
                    400,
                    f"A price ({price.id}) already uses that lookup key.",
                    code="resource_already_exists",
                    param="lookup_key",
                )
            price.lookup_key = None


def _product_for(product: Any, product_data: Any) -> str:
    if product:
        Product._api_retrieve(product)  # 404 if it does not exist
        return product
    if isinstance(product_data, dict) and product_data.get("name"):
        return Product(name=product_data["name"], metadata=product_data.get("metadata")).id
    raise stripe_error(
        400, "Missing required param: product.", code="parameter_missing", param="product"
    )


def price_create(
    *,
    currency: str | None = None,
    product: str | None = None,
    product_data: Any = None,
    unit_amount: Any = None,
    unit_amount_decimal: Any = None,
    recurring: Any = None,
    lookup_key: str | None = None,
    transfer_lookup_key: Any = False,
    metadata: Any = None,
    nickname: str | None = None,
    active: Any = True,
    billing_scheme: str = "per_unit",
    tax_behavior: str = "unspecified",
    **unknown: Any,
) -> Price:
    if unknown:
        raise stripe_error(
            400,
            f"Received unknown parameter: {next(iter(unknown))}",
            code="parameter_unknown",
            param=next(iter(unknown)),
        )
    if not currency:
        raise stripe_error(
            400, "Missing required param: currency.", code="parameter_missing", param="currency"
        )
    if unit_amount is None and unit_amount_decimal is None:
        raise stripe_error(
            400,
            "Missing required param: unit_amount.",
            code="parameter_missing",
            param="unit_amount",
        )
    exact = (
        to_decimal(unit_amount_decimal, "unit_amount_decimal")
        if unit_amount is None
        else Decimal(to_int(unit_amount, "unit_amount", minimum=0))
    )
    product_id = _product_for(product, product_data)
    recurring_fields = _recurring_from(recurring)
    _claim_lookup_key(lookup_key, transfer=to_bool(transfer_lookup_key))
    price = Price(
        product=product_id,
        currency=currency.lower(),
        # Stripe leaves unit_amount null when only a decimal amount was given.
        unit_amount=int(exact) if exact == exact.to_integral_value() else None,
        unit_amount_decimal=str(exact),
        recurring=recurring_fields,
        lookup_key=lookup_key or None,
        metadata=merge_metadata({}, metadata),
        nickname=nickname,
        active=to_bool(active),
        billing_scheme=billing_scheme,
        tax_behavior=tax_behavior,
        custom_unit_amount=None,
        tiers_mode=None,
        transform_quantity=None,
    )
    emit("price.created", price)
    return price


def price_update(
    *,
    id: str,
    active: Any = None,
    metadata: Any = None,
    lookup_key: str | None = None,
    nickname: str | None = None,
    transfer_lookup_key: Any = False,
    **immutable: Any,
) -> Price:
    price = price_retrieve(id)
    if immutable:
        field = next(iter(immutable))
        raise stripe_error(
            400,
            f"Received unknown parameter: {field} (a price's amount and recurrence cannot change; create a new price)",
            code="parameter_unknown",
            param=field,
        )
    if active is not None:
        price.active = to_bool(active)
    if metadata is not None:
        price.metadata = merge_metadata(price.metadata, metadata)
    if lookup_key is not None:
        _claim_lookup_key(lookup_key, transfer=to_bool(transfer_lookup_key), owner_id=price.id)
        price.lookup_key = lookup_key or None
    if nickname is not None:
        price.nickname = nickname or None
    emit("price.updated", price)
    return price


def price_list(
    *,
    product: str | None = None,
    active: Any = None,
    lookup_keys: Any = None,
    type: str | None = None,
    currency: str | None = None,
    limit: Any = None,
    starting_after: str | None = None,
    **_ignored: Any,
):
    prices = newest_first(objects_of("price"))
    if product:
        prices = [p for p in prices if p.product == product]
    if active is not None:
        prices = [p for p in prices if p.active == to_bool(active)]
    if lookup_keys:
        keys = [lookup_keys] if isinstance(lookup_keys, str) else list(lookup_keys)
        prices = [p for p in prices if p.lookup_key in keys]
    if type:
        prices = [p for p in prices if p.type == type]
    if currency:
        prices = [p for p in prices if p.currency == currency.lower()]
    return list_of("/v1/prices", prices, limit=limit, starting_after=starting_after)


def _price_get(*, id: str, **_ignored: Any) -> Price:
    return price_retrieve(id)


routes = [
    ("POST", "/v1/prices", api(price_create)),
    ("GET", "/v1/prices", api(price_list)),
    ("GET", "/v1/prices/{id}", api(_price_get)),
    ("POST", "/v1/prices/{id}", api(price_update)),
]
