"""Subscriptions in the new API shape, with renewals, prorations and recovery.

Time: there is no real test clock. A subscription's "now" is the later of the
wall clock and its `current_period_start`, so after
`/_config/subscriptions/<id>/advance` (which moves the period one interval
forward) the subscription behaves as if the clock stood at the new period's start.

Lifecycle emulated:
- create (API or Checkout): status `incomplete`, first invoice
  (`subscription_create`) charged at once; paid → `active`.
- update: items (price, quantity), metadata, `cancel_at_period_end`, with
  `proration_behavior` `create_prorations` (lines wait for the next invoice),
  `always_invoice` (a `subscription_update` invoice, charged now) or `none`;
  with `payment_behavior=error_if_incomplete` a declined invoice is voided and
  the update is not applied (402), as Stripe does.
- advance: period end → cancel if `cancel_at_period_end`, else a
  `subscription_cycle` invoice (items for the new period, metered usage for the
  period that ended, pending prorations), charged off-session: paid → `active`,
  declined → `past_due`.
- `invoices.pay` retries with the current default card; paid → `active` again.
- delete: cancel now.

Currency, as Stripe keeps it (docs.stripe.com/invoicing/multi-currency-customers): a
subscription is in one currency, its first price's, for life (its prices cannot change
it), and a customer's live subscriptions are all in one. A price in another currency is
refused, 400 `invalid_request_error` in Stripe's words, before anything changes: mixed in
one create, put on an item of a subscription (update, `POST /v1/subscription_items`), or
a new subscription (or Checkout in subscription mode) for a customer with a live one in
another currency. A customer whose subscriptions all ended may subscribe in another.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from dateutil.relativedelta import relativedelta
from localstripe.errors import UserError
from localstripe.resources import Customer, StripeObject

from gymbilling.stripe_standin.common import (
    api,
    list_of,
    merge_metadata,
    newest_first,
    now,
    objects_of,
    round_minor,
    stored,
    stripe_error,
    to_bool,
    to_int,
)
from gymbilling.stripe_standin.invoices import (
    Invoice,
    InvoiceLine,
    invoice_collect,
    invoice_create,
    invoice_finalize,
    invoice_retrieve,
    invoice_void,
    line_build,
)
from gymbilling.stripe_standin.meters import meter_usage_take
from gymbilling.stripe_standin.payments import declined_error
from gymbilling.stripe_standin.prices import Price, price_retrieve
from gymbilling.stripe_standin.webhooks import emit

PRORATION_BEHAVIORS = ("create_prorations", "always_invoice", "none")
ENDED = ("canceled", "incomplete_expired")


class SubscriptionItem(StripeObject):
    object = "subscription_item"
    _id_prefix = "si_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)

    @property
    def plan(self) -> None:
        # Legacy Plans are not emulated; `price` is the full object instead.
        return None


class Subscription(StripeObject):
    object = "subscription"
    _id_prefix = "sub_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)
        self.items = list_of(f"/v1/subscription_items?subscription={self.id}", [], limit=100)
        # Proration lines waiting for the next invoice (`create_prorations`).
        self._pending_lines: list[InvoiceLine] = []

    @property
    def quantity(self) -> int | None:
        items = self.items._list
        return items[0].quantity if len(items) == 1 else None


# --- periods and amounts ---------------------------------------------------


def period_after(start: int, recurring: dict[str, Any]) -> int:
    moment = datetime.fromtimestamp(start, tz=UTC)
    count = recurring["interval_count"]
    step = {
        "day": relativedelta(days=count),
        "week": relativedelta(weeks=count),
        "month": relativedelta(months=count),
        "year": relativedelta(years=count),
    }[recurring["interval"]]
    return int((moment + step).timestamp())


def subscription_now(subscription: Subscription) -> int:
    return max(now(), subscription.current_period_start)


def is_metered(price: Price) -> bool:
    return price.recurring["usage_type"] == "metered"


def licensed_amount(price: Price, quantity: int) -> int:
    return 0 if is_metered(price) else round_minor(price._unit_amount_exact * quantity)


def prorated(amount: int, *, remaining_s: int, period_s: int) -> int:
    """`amount` x remaining / period, by seconds, rounded half up to the minor unit."""
    if period_s <= 0:
        return 0
    sign = -1 if amount < 0 else 1
    return sign * ((abs(amount) * remaining_s * 2 + period_s) // (2 * period_s))


# --- parsing -----------------------------------------------------------------


def _recurring_price(price_id: Any, param: str) -> Price:
    price = price_retrieve(price_id)
    if not price.recurring:
        raise stripe_error(
            400,
            f"The price {price.id} is not recurring; a subscription needs a recurring price.",
            param=param,
        )
    if not price.active:
        raise stripe_error(400, f"The price {price.id} is not active.", param=param)
    return price


def _currency_refuse(price: Price, *, expected: str, param: str) -> None:
    """Stripe's refusal of a price in another currency than the subscription's."""
    if price.currency != expected:
        raise stripe_error(
            400,
            f"The price specified only supports `{price.currency}`. This doesn't match the "
            f"expected currency: `{expected}`.",
            param=param,
        )


def prices_currency_refuse(prices: list[Price], *, param: str) -> None:
    """Stripe's refusal of one subscription (or subscription Checkout) priced in several
    currencies."""
    if len({price.currency for price in prices}) > 1:
        raise stripe_error(
            400,
            "Currency and interval fields must match across all plans on this subscription. "
            "Found mismatch in currency field.",
            param=param,
        )


def customer_currency_refuse(customer_id: str | None, currency: str) -> None:
    """Stripe's refusal of a new subscription in `currency` while the customer has a live
    one (not canceled, not incomplete_expired) in another."""
    for other in objects_of("subscription"):
        live = other.customer == customer_id and other.status not in ENDED
        if live and other.currency != currency:
            raise stripe_error(
                400,
                "You cannot combine currencies on a single customer. This customer has an "
                "active subscription, subscription schedule, discount, quote, or invoice "
                f"item with currency {other.currency}.",
            )


def _item_params(items: Any) -> list[dict[str, Any]]:
    if not items:
        return []
    if isinstance(items, dict):  # a single item sent without an index
        items = [items]
    parsed = []
    for index, raw in enumerate(items):
        entry = dict(raw)
        entry["price"] = entry.get("price") or entry.get("plan")
        if "quantity" in entry and entry["quantity"] not in (None, ""):
            entry["quantity"] = to_int(entry["quantity"], f"items[{index}][quantity]", minimum=0)
        entry["deleted"] = to_bool(entry.get("deleted", False))
        parsed.append(entry)
    return parsed


# --- create --------------------------------------------------------------------


def _item_add(
    subscription: Subscription, *, price: Price, quantity: int, metadata: Any
) -> SubscriptionItem:
    item = SubscriptionItem(
        subscription=subscription.id,
        price=price,
        quantity=quantity,
        metadata=merge_metadata({}, metadata),
        current_period_start=subscription.current_period_start,
        current_period_end=subscription.current_period_end,
        tax_rates=[],
        discounts=[],
    )
    subscription.items._list.append(item)
    return item


def _period_lines(subscription: Subscription) -> list[InvoiceLine]:
    """One line per item for the current period (metered items bill in arrears: 0 now)."""
    return [
        line_build(
            price=item.price,
            quantity=0 if is_metered(item.price) else item.quantity,
            amount=licensed_amount(item.price, item.quantity),
            period_start=subscription.current_period_start,
            period_end=subscription.current_period_end,
            subscription_id=subscription.id,
            subscription_item_id=item.id,
        )
        for item in subscription.items._list
    ]


def subscription_start(
    *,
    customer_id: str,
    items: list[dict[str, Any]],
    metadata: Any = None,
    payment_method_id: str | None = None,
    default_payment_method: str | None = None,
    off_session: bool = True,
    payment_behavior: str = "allow_incomplete",
) -> Subscription:
    """Create a subscription and charge its first invoice at once.

    `payment_method_id` pays the first invoice only (Checkout's card); renewals use
    `default_payment_method` when the API set one, else the customer's default,
    so `/_config/customers/<id>/card` changes what the next renewal charges.
    """
    Customer._api_retrieve(customer_id)
    if not items:
        raise stripe_error(
            400, "Missing required param: items.", code="parameter_missing", param="items"
        )
    prices = [
        _recurring_price(entry["price"], f"items[{i}][price]") for i, entry in enumerate(items)
    ]
    prices_currency_refuse(prices, param="items")
    customer_currency_refuse(customer_id, prices[0].currency)
    start = now()
    end = period_after(start, prices[0].recurring)
    subscription = Subscription(
        customer=customer_id,
        metadata=merge_metadata({}, metadata),
        status="incomplete",
        currency=prices[0].currency,
        cancel_at_period_end=False,
        cancel_at=None,
        canceled_at=None,
        cancellation_details={"comment": None, "feedback": None, "reason": None},
        ended_at=None,
        start_date=start,
        billing_cycle_anchor=start,
        collection_method="charge_automatically",
        default_payment_method=default_payment_method,
        latest_invoice=None,
        trial_start=None,
        trial_end=None,
        # Old shape: the period on the subscription; new shape: on each item.
        current_period_start=start,
        current_period_end=end,
    )
    for entry, price in zip(items, prices, strict=True):
        _item_add(
            subscription,
            price=price,
            quantity=entry.get("quantity", 1) or 1,
            metadata=entry.get("metadata"),
        )
    emit("customer.subscription.created", subscription)
    invoice = _invoice_issue(subscription, "subscription_create", _period_lines(subscription))
    paid = invoice_collect(
        invoice,
        off_session=off_session,
        payment_method_id=payment_method_id or default_payment_method,
    )
    if paid:
        _status_set(subscription, "active")
    elif payment_behavior == "error_if_incomplete":
        _status_set(subscription, "incomplete_expired", notify=False)
        raise declined_error(_intent_of(invoice))
    return subscription


def _invoice_issue(
    subscription: Subscription,
    billing_reason: str,
    lines: list[InvoiceLine],
    *,
    period: tuple[int, int] | None = None,
) -> Invoice:
    start, end = period or (subscription.current_period_start, subscription.current_period_end)
    invoice = invoice_create(
        customer_id=subscription.customer,
        subscription=subscription,
        billing_reason=billing_reason,
        lines=lines,
        period_start=start,
        period_end=end,
        currency=subscription.currency,
    )
    subscription.latest_invoice = invoice.id
    invoice_finalize(invoice)
    return invoice


def _intent_of(invoice: Invoice):
    from localstripe.resources import PaymentIntent

    return PaymentIntent._api_retrieve(invoice.payment_intent)


def _status_set(subscription: Subscription, status: str, *, notify: bool = True) -> None:
    if subscription.status == status:
        return
    previous = subscription.status
    subscription.status = status
    if notify:
        event = emit("customer.subscription.updated", subscription)
        event.data["previous_attributes"] = {"status": previous}


# --- update --------------------------------------------------------------------


def _proration_lines(
    subscription: Subscription, item: SubscriptionItem, *, old_price: Price, old_quantity: int
) -> list[InvoiceLine]:
    """Credit the unused time of the old price x quantity, charge the rest of the period at the new one."""
    start = subscription_now(subscription)
    end = subscription.current_period_end
    remaining_s = max(0, end - start)
    period_s = end - subscription.current_period_start
    lines = []
    old_amount = licensed_amount(old_price, old_quantity)
    if old_amount:
        lines.append(
            line_build(
                price=old_price,
                quantity=old_quantity,
                amount=-prorated(old_amount, remaining_s=remaining_s, period_s=period_s),
                period_start=start,
                period_end=end,
                proration=True,
                subscription_id=subscription.id,
                subscription_item_id=item.id,
                description=f"Unused time on {old_quantity} x {old_price.nickname or old_price.id}",
            )
        )
    new_amount = licensed_amount(item.price, item.quantity)
    if new_amount:
        lines.append(
            line_build(
                price=item.price,
                quantity=item.quantity,
                amount=prorated(new_amount, remaining_s=remaining_s, period_s=period_s),
                period_start=start,
                period_end=end,
                proration=True,
                subscription_id=subscription.id,
                subscription_item_id=item.id,
                description=f"Remaining time on {item.quantity} x {item.price.nickname or item.price.id}",
            )
        )
    return lines


def _items_apply(subscription: Subscription, items: list[dict[str, Any]]) -> list[InvoiceLine]:
    """Apply item changes; return the proration lines they imply."""
    lines: list[InvoiceLine] = []
    by_id = {item.id: item for item in subscription.items._list}
    for index, entry in enumerate(items):
        item = by_id.get(entry.get("id")) if entry.get("id") else None
        if entry.get("id") and item is None:
            raise stripe_error(
                404,
                f"No such subscription item: '{entry['id']}'",
                code="resource_missing",
                param=f"items[{index}][id]",
            )
        if item is not None and entry["deleted"]:
            lines += _proration_lines_for_removal(subscription, item)
            subscription.items._list.remove(item)
            continue
        if item is None:
            price = _recurring_price(entry["price"], f"items[{index}][price]")
            _currency_refuse(price, expected=subscription.currency, param=f"items[{index}][price]")
            item = _item_add(
                subscription,
                price=price,
                quantity=entry.get("quantity", 1) or 1,
                metadata=entry.get("metadata"),
            )
            lines += _proration_lines(subscription, item, old_price=price, old_quantity=0)
            continue
        old_price, old_quantity = item.price, item.quantity
        if entry.get("price"):
            price = _recurring_price(entry["price"], f"items[{index}][price]")
            _currency_refuse(price, expected=subscription.currency, param=f"items[{index}][price]")
            item.price = price
        if entry.get("quantity") is not None:
            item.quantity = entry["quantity"]
        if entry.get("metadata") is not None:
            item.metadata = merge_metadata(item.metadata, entry["metadata"])
        if (old_price.id, old_quantity) != (item.price.id, item.quantity):
            lines += _proration_lines(
                subscription, item, old_price=old_price, old_quantity=old_quantity
            )
    return lines


def _proration_lines_for_removal(
    subscription: Subscription, item: SubscriptionItem
) -> list[InvoiceLine]:
    removed_quantity = item.quantity
    item.quantity = 0
    lines = _proration_lines(
        subscription, item, old_price=item.price, old_quantity=removed_quantity
    )
    item.quantity = removed_quantity
    return lines


def _state_of(subscription: Subscription) -> dict[str, Any]:
    """What an update may change, to put back when Stripe refuses it."""
    return {
        "fields": {
            name: getattr(subscription, name)
            for name in (
                "metadata",
                "cancel_at_period_end",
                "cancel_at",
                "default_payment_method",
                "status",
                "latest_invoice",
            )
        },
        "items": list(subscription.items._list),
        "item_fields": [
            (item, item.price, item.quantity, item.metadata) for item in subscription.items._list
        ],
    }


def _state_restore(subscription: Subscription, state: dict[str, Any]) -> None:
    for name, value in state["fields"].items():
        setattr(subscription, name, value)
    subscription.items._list[:] = state["items"]
    for item, price, quantity, metadata in state["item_fields"]:
        item.price, item.quantity, item.metadata = price, quantity, metadata


def subscription_update(
    *,
    id: str,
    items: Any = None,
    metadata: Any = None,
    cancel_at_period_end: Any = None,
    proration_behavior: str = "create_prorations",
    payment_behavior: str | None = None,
    default_payment_method: str | None = None,
    **_ignored: Any,
) -> Subscription:
    subscription = subscription_retrieve(id)
    if subscription.status in ENDED:
        raise stripe_error(
            400, f"A {subscription.status} subscription cannot be updated.", param="id"
        )
    if proration_behavior not in PRORATION_BEHAVIORS:
        raise stripe_error(
            400,
            f"proration_behavior must be one of {', '.join(PRORATION_BEHAVIORS)}",
            param="proration_behavior",
        )
    previous = {
        "status": subscription.status,
        "cancel_at_period_end": subscription.cancel_at_period_end,
    }
    before = _state_of(subscription)
    if metadata is not None:
        subscription.metadata = merge_metadata(subscription.metadata, metadata)
    if cancel_at_period_end is not None:
        subscription.cancel_at_period_end = to_bool(cancel_at_period_end)
        subscription.cancel_at = (
            subscription.current_period_end if subscription.cancel_at_period_end else None
        )
    if default_payment_method:
        subscription.default_payment_method = default_payment_method
    try:
        lines = _items_apply(subscription, _item_params(items))
    except UserError:
        # Refused (an item or price it cannot take: a price in another currency, one
        # archived, an item not its own): Stripe applies none of the update.
        _state_restore(subscription, before)
        raise
    invoice = None
    if lines and proration_behavior == "always_invoice":
        invoice = _invoice_issue(
            subscription,
            "subscription_update",
            lines,
            period=(lines[0].period["start"], lines[0].period["end"]),
        )
        paid = invoice_collect(invoice, payment_method_id=subscription.default_payment_method)
        if not paid and payment_behavior == "error_if_incomplete":
            # Stripe applies none of an update whose invoice cannot be paid
            # (its 402 says so): the subscription stays as it was.
            _state_restore(subscription, before)
            invoice_void(invoice)
            raise declined_error(_intent_of(invoice))
    updated = emit("customer.subscription.updated", subscription)
    updated.data["previous_attributes"] = previous
    if invoice is not None:
        _status_set(subscription, "active" if paid else "past_due")
    elif lines and proration_behavior == "create_prorations":
        subscription._pending_lines.extend(lines)
    # `none`: the new price simply applies from the next period's invoice.
    return subscription


# --- period end, cancel, pay -------------------------------------------------------


def subscription_cancel(
    subscription: Subscription, *, at: int | None = None, reason: str = "cancellation_requested"
) -> Subscription:
    moment = at or subscription_now(subscription)
    subscription.status = "canceled"
    subscription.canceled_at = subscription.canceled_at or moment
    subscription.ended_at = moment
    subscription.cancellation_details = {"comment": None, "feedback": None, "reason": reason}
    emit("customer.subscription.deleted", subscription)
    return subscription


def _usage_lines(
    subscription: Subscription, invoice: Invoice, *, period: tuple[int, int]
) -> list[InvoiceLine]:
    lines = []
    for item in subscription.items._list:
        if not is_metered(item.price):
            continue
        usage = meter_usage_take(
            customer_id=subscription.customer,
            meter_id=item.price.recurring["meter"],
            invoice_id=invoice.id,
        )
        lines.append(
            line_build(
                price=item.price,
                quantity=int(usage) if usage == usage.to_integral_value() else 1,
                amount=round_minor(usage * item.price._unit_amount_exact),
                period_start=period[0],
                period_end=period[1],
                subscription_id=subscription.id,
                subscription_item_id=item.id,
                description=f"Usage: {usage} x {item.price.nickname or item.price.id}",
                metadata={"usage": str(usage)},
            )
        )
    return lines


def subscription_advance(subscription_id: str) -> Subscription:
    """End the current period now: cancel, or renew with a cycle invoice."""
    subscription = subscription_retrieve(subscription_id)
    if subscription.status in ENDED:
        raise stripe_error(
            400, f"The subscription is {subscription.status}; it has no period to end.", param="id"
        )
    ended = (subscription.current_period_start, subscription.current_period_end)
    if subscription.cancel_at_period_end:
        return subscription_cancel(subscription, at=ended[1])
    recurring = subscription.items._list[0].price.recurring
    subscription.current_period_start = ended[1]
    subscription.current_period_end = period_after(ended[1], recurring)
    for item in subscription.items._list:
        item.current_period_start = subscription.current_period_start
        item.current_period_end = subscription.current_period_end
    invoice = invoice_create(
        customer_id=subscription.customer,
        subscription=subscription,
        billing_reason="subscription_cycle",
        lines=[],
        period_start=ended[0],
        period_end=ended[1],
        currency=subscription.currency,
    )
    # Lines are added after creation: usage is tagged with the invoice that bills it.
    lines = (
        subscription._pending_lines
        + _period_lines(subscription)
        + _usage_lines(subscription, invoice, period=ended)
    )
    subscription._pending_lines = []
    for line in lines:
        line.invoice = invoice.id
        invoice.lines._list.append(line)
    subscription.latest_invoice = invoice.id
    invoice_finalize(invoice)
    paid = invoice_collect(invoice, payment_method_id=subscription.default_payment_method)
    subscription.status = "active" if paid else "past_due"
    emit("customer.subscription.updated", subscription).data["previous_attributes"] = {
        "current_period_start": ended[0],
        "current_period_end": ended[1],
    }
    return subscription


def invoice_pay(
    *, id: str, payment_method: str | None = None, off_session: Any = True, **_ignored: Any
) -> Invoice:
    """`POST /v1/invoices/{id}/pay`: retry now; 402 card_error if declined, like Stripe."""
    invoice = invoice_retrieve(id)
    if invoice.status == "paid":
        raise stripe_error(400, "Invoice is already paid", code="invoice_not_editable")
    if invoice.status not in ("draft", "open"):
        raise stripe_error(
            400,
            f"This invoice is {invoice.status} and cannot be paid.",
            code="invoice_not_editable",
        )
    if invoice.status == "draft":
        invoice_finalize(invoice)
    paid = invoice_collect(invoice, payment_method_id=payment_method)
    subscription = stored("subscription", invoice.subscription) if invoice.subscription else None
    if (
        paid
        and subscription is not None
        and subscription.status in ("past_due", "incomplete", "unpaid")
    ):
        _status_set(subscription, "active")
    if not paid:
        if invoice.payment_intent is None:
            raise stripe_error(
                400,
                "The customer has no default payment method.",
                code="invoice_no_customer_payment_method",
            )
        raise declined_error(_intent_of(invoice))
    return invoice


def subscription_retrieve(subscription_id: str) -> Subscription:
    return stored("subscription", subscription_id)


# --- HTTP ----------------------------------------------------------------------------


def _subscription_create(
    *,
    customer: str | None = None,
    items: Any = None,
    metadata: Any = None,
    default_payment_method: str | None = None,
    payment_behavior: str = "allow_incomplete",
    **_ignored: Any,
) -> Subscription:
    if not customer:
        raise stripe_error(
            400, "Missing required param: customer.", code="parameter_missing", param="customer"
        )
    return subscription_start(
        customer_id=customer,
        items=_item_params(items),
        metadata=metadata,
        default_payment_method=default_payment_method,
        payment_behavior=payment_behavior,
    )


def _subscription_get(*, id: str, **_ignored: Any) -> Subscription:
    return subscription_retrieve(id)


def _subscription_delete(*, id: str, **_ignored: Any) -> Subscription:
    subscription = subscription_retrieve(id)
    if subscription.status in ENDED:
        raise stripe_error(400, "The subscription is already canceled.", param="id")
    return subscription_cancel(subscription)


def _subscription_list(
    *,
    customer: str | None = None,
    status: str | None = None,
    price: str | None = None,
    limit: Any = None,
    starting_after: Any = None,
    **_ignored: Any,
):
    subscriptions = newest_first(objects_of("subscription"))
    if customer:
        subscriptions = [s for s in subscriptions if s.customer == customer]
    if status is None:
        subscriptions = [s for s in subscriptions if s.status not in ENDED]
    elif status != "all":
        subscriptions = [s for s in subscriptions if s.status == status]
    if price:
        subscriptions = [
            s for s in subscriptions if any(i.price.id == price for i in s.items._list)
        ]
    return list_of("/v1/subscriptions", subscriptions, limit=limit, starting_after=starting_after)


def _subscription_item_get(*, id: str, **_ignored: Any) -> SubscriptionItem:
    return stored("subscription_item", id)


def _subscription_item_create(
    *,
    subscription: str | None = None,
    price: str | None = None,
    quantity: Any = None,
    metadata: Any = None,
    proration_behavior: str = "create_prorations",
    payment_behavior: str | None = None,
    **_ignored: Any,
) -> SubscriptionItem:
    """`POST /v1/subscription_items`: one item added, as an update adding it would (its
    prorations, its refusals), Stripe's params named as this endpoint names them."""
    for name, value in (("subscription", subscription), ("price", price)):
        if not value:
            raise stripe_error(
                400, f"Missing required param: {name}.", code="parameter_missing", param=name
            )
    target = stored("subscription", subscription, param="subscription")
    _currency_refuse(_recurring_price(price, "price"), expected=target.currency, param="price")
    entry: dict[str, Any] = {"price": price, "metadata": metadata}
    if quantity not in (None, ""):
        entry["quantity"] = to_int(quantity, "quantity", minimum=0)
    updated = subscription_update(
        id=subscription,
        items=[entry],
        proration_behavior=proration_behavior,
        payment_behavior=payment_behavior,
    )
    return updated.items._list[-1]


routes = [
    ("POST", "/v1/subscriptions", api(_subscription_create)),
    ("GET", "/v1/subscriptions", api(_subscription_list)),
    ("GET", "/v1/subscriptions/{id}", api(_subscription_get)),
    ("POST", "/v1/subscriptions/{id}", api(subscription_update)),
    ("DELETE", "/v1/subscriptions/{id}", api(_subscription_delete)),
    ("POST", "/v1/subscription_items", api(_subscription_item_create)),
    ("GET", "/v1/subscription_items/{id}", api(_subscription_item_get)),
    ("POST", "/v1/invoices/{id}/pay", api(invoice_pay)),
]
