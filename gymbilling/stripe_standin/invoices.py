"""Invoices in the new API shape, created by our subscriptions.

localstripe's Invoice derives its status from a PaymentIntent and its period from
the subscription's start date; ours keeps an explicit status
(draft → open → paid | void | uncollectible) and explicit lines, so that renewals,
prorations and retries can be emulated. Only subscriptions create invoices here
(`POST /v1/invoices` for one-off invoices is not emulated).
"""

from __future__ import annotations

from typing import Any

from localstripe.resources import Customer, StripeObject

from gymbilling.stripe_standin.common import (
    api,
    list_of,
    merge_metadata,
    newest_first,
    now,
    objects_of,
    stored,
    stripe_error,
)
from gymbilling.stripe_standin.payments import customer_default_method, payment_collect
from gymbilling.stripe_standin.webhooks import emit


class InvoiceLine(StripeObject):
    object = "line_item"
    _id_prefix = "il_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)


class Invoice(StripeObject):
    object = "invoice"
    _id_prefix = "in_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)
        self.lines = list_of(f"/v1/invoices/{self.id}/lines", [], limit=100)

    @property
    def subtotal(self) -> int:
        return sum(line.amount for line in self.lines._list)

    @property
    def total(self) -> int:
        return self.subtotal

    @property
    def amount_due(self) -> int:
        # A negative total (a downgrade's credit) is not charged; Stripe would
        # move it to the customer balance, which is not emulated. What the customer
        # balance paid at finalization (`_balance_apply`) is not due; a debit is.
        return max(0, self.total) + self.starting_balance - self.ending_balance

    @property
    def amount_remaining(self) -> int:
        return 0 if self.status in ("paid", "void") else self.amount_due - self.amount_paid

    @property
    def payments(self) -> dict[str, Any]:
        payments = []
        if self.payment_intent:
            payments.append(
                {
                    "object": "invoice_payment",
                    "invoice": self.id,
                    "amount_paid": self.amount_paid,
                    "currency": self.currency,
                    "status": "paid" if self.status == "paid" else "open",
                    "payment": {"type": "payment_intent", "payment_intent": self.payment_intent},
                }
            )
        return {
            "object": "list",
            "data": payments,
            "has_more": False,
            "url": f"/v1/invoice_payments?invoice={self.id}",
        }


def line_build(
    *,
    price: Any,
    quantity: int,
    amount: int,
    period_start: int,
    period_end: int,
    proration: bool = False,
    subscription_id: str | None = None,
    subscription_item_id: str | None = None,
    description: str | None = None,
    metadata: dict[str, str] | None = None,
) -> InvoiceLine:
    return InvoiceLine(
        amount=amount,
        currency=price.currency,
        description=description or f"{quantity} x {price.nickname or price.product}",
        quantity=quantity,
        period={"start": period_start, "end": period_end},
        proration=proration,
        pricing={
            "type": "price_details",
            "price_details": {"price": price.id, "product": price.product},
            "unit_amount_decimal": price.unit_amount_decimal,
        },
        # Old shape, kept for readers written against API versions before 2025.
        price=price._export(),
        metadata=dict(metadata or {}),
        subscription=subscription_id,
        subscription_item=subscription_item_id,
        parent={
            "type": "subscription_item_details",
            "subscription_item_details": {
                "subscription": subscription_id,
                "subscription_item": subscription_item_id,
                "proration": proration,
                "invoice_item": None,
            },
        }
        if subscription_id
        else None,
        type="subscription",
        invoice=None,
    )


def invoice_create(
    *,
    customer_id: str,
    subscription: Any,
    billing_reason: str,
    lines: list[InvoiceLine],
    period_start: int,
    period_end: int,
    currency: str,
) -> Invoice:
    customer = Customer._api_retrieve(customer_id)
    invoice = Invoice(
        customer=customer_id,
        customer_email=customer.email,
        # Old shape (top-level `subscription`) kept next to the new `parent`.
        subscription=subscription.id if subscription else None,
        parent={
            "type": "subscription_details",
            "subscription_details": {
                "subscription": subscription.id,
                "metadata": dict(subscription.metadata),
            },
            "quote_details": None,
        }
        if subscription
        else None,
        billing_reason=billing_reason,
        status="draft",
        currency=currency,
        period_start=period_start,
        period_end=period_end,
        metadata={},
        payment_intent=None,
        charge=None,
        amount_paid=0,
        # The customer balance before and after finalization applied it (negative = credit).
        starting_balance=0,
        ending_balance=0,
        attempt_count=0,
        attempted=False,
        auto_advance=True,
        collection_method="charge_automatically",
        number=None,
        hosted_invoice_url=None,
        invoice_pdf=None,
        last_finalization_error=None,
        status_transitions={
            "finalized_at": None,
            "paid_at": None,
            "voided_at": None,
            "marked_uncollectible_at": None,
        },
    )
    for line in lines:
        line.invoice = invoice.id
        invoice.lines._list.append(line)
    emit("invoice.created", invoice)
    return invoice


def _balance_apply(invoice: Invoice) -> None:
    """Apply the customer's balance as Stripe does when it finalizes an invoice: a credit
    (negative balance: marketplace proceeds paid as a credit, say) pays what it covers of
    the total, a debit is added to what is due. Recorded as Stripe records it: the
    invoice's `starting_balance` and `ending_balance`, and an `applied_to_invoice` balance
    transaction. (A voided invoice does not give the balance back here, as Stripe would.)"""
    from gymbilling.stripe_standin.connect import CustomerBalanceTransaction

    customer = Customer._api_retrieve(invoice.customer)
    starting = getattr(customer, "balance", 0)
    applied = starting if starting > 0 else -min(-starting, max(0, invoice.total))
    if not applied:
        return
    customer.balance = starting - applied
    invoice.starting_balance, invoice.ending_balance = starting, customer.balance
    CustomerBalanceTransaction(
        amount=-applied,
        currency=invoice.currency,
        customer=customer.id,
        description=None,
        metadata={},
        ending_balance=customer.balance,
        type="applied_to_invoice",
        invoice=invoice.id,
        credit_note=None,
    )
    emit("customer.updated", customer)


def invoice_finalize(invoice: Invoice) -> None:
    _balance_apply(invoice)
    invoice.status = "open"
    invoice.number = f"STANDIN-{len(objects_of('invoice')):05d}"
    invoice.status_transitions["finalized_at"] = now()
    emit("invoice.finalized", invoice)


def invoice_mark_paid(invoice: Invoice) -> None:
    invoice.status = "paid"
    invoice.amount_paid = invoice.amount_due
    invoice.status_transitions["paid_at"] = now()
    emit("invoice.paid", invoice)
    emit("invoice.payment_succeeded", invoice)


def invoice_collect(
    invoice: Invoice, *, off_session: bool = True, payment_method_id: str | None = None
) -> bool:
    """Try to charge an open invoice; True when it ends paid. Never raises on decline."""
    invoice.attempted = True
    invoice.attempt_count += 1
    if invoice.amount_due == 0:
        invoice_mark_paid(invoice)
        return True
    method = payment_method_id or customer_default_method(invoice.customer)
    if method is None:
        emit("invoice.payment_failed", invoice)
        return False
    intent = payment_collect(
        customer_id=invoice.customer,
        amount=invoice.amount_due,
        currency=invoice.currency,
        payment_method_id=method,
        off_session=off_session,
        description=f"Invoice {invoice.number}",
    )
    intent.invoice = invoice.id
    invoice.payment_intent = intent.id
    invoice.charge = intent.latest_charge.id
    if intent.status == "succeeded":
        invoice_mark_paid(invoice)
        return True
    emit("invoice.payment_failed", invoice)
    return False


def invoice_retrieve(invoice_id: str) -> Invoice:
    return stored("invoice", invoice_id)


def _invoice_get(*, id: str, **_ignored: Any) -> Invoice:
    return invoice_retrieve(id)


def _invoice_update(*, id: str, metadata: Any = None, **_ignored: Any) -> Invoice:
    invoice = invoice_retrieve(id)
    invoice.metadata = merge_metadata(invoice.metadata, metadata)
    emit("invoice.updated", invoice)
    return invoice


def _invoice_list(
    *,
    customer: str | None = None,
    subscription: str | None = None,
    status: str | None = None,
    limit: Any = None,
    starting_after: Any = None,
    **_ignored: Any,
):
    invoices = newest_first(objects_of("invoice"))
    if customer:
        invoices = [i for i in invoices if i.customer == customer]
    if subscription:
        invoices = [i for i in invoices if i.subscription == subscription]
    if status:
        invoices = [i for i in invoices if i.status == status]
    return list_of("/v1/invoices", invoices, limit=limit, starting_after=starting_after)


def _invoice_lines(*, id: str, limit: Any = None, starting_after: Any = None, **_ignored: Any):
    invoice = invoice_retrieve(id)
    return list_of(
        f"/v1/invoices/{id}/lines", invoice.lines._list, limit=limit, starting_after=starting_after
    )


def invoice_void(invoice: Invoice) -> None:
    invoice.status = "void"
    invoice.status_transitions["voided_at"] = now()
    emit("invoice.voided", invoice)


def _invoice_void(*, id: str, **_ignored: Any) -> Invoice:
    invoice = invoice_retrieve(id)
    if invoice.status not in ("draft", "open"):
        raise stripe_error(
            400,
            f"You can only void a draft or open invoice; this one is {invoice.status}.",
            code="invoice_not_editable",
        )
    invoice_void(invoice)
    return invoice


def _invoice_mark_uncollectible(*, id: str, **_ignored: Any) -> Invoice:
    invoice = invoice_retrieve(id)
    if invoice.status != "open":
        raise stripe_error(
            400, "Only an open invoice can be marked uncollectible.", code="invoice_not_editable"
        )
    invoice.status = "uncollectible"
    invoice.status_transitions["marked_uncollectible_at"] = now()
    emit("invoice.marked_uncollectible", invoice)
    return invoice


# `POST /v1/invoices/{id}/pay` lives in subscriptions.py: paying moves the subscription too.
routes = [
    ("GET", "/v1/invoices", api(_invoice_list)),
    ("GET", "/v1/invoices/{id}", api(_invoice_get)),
    ("POST", "/v1/invoices/{id}", api(_invoice_update)),
    ("GET", "/v1/invoices/{id}/lines", api(_invoice_lines)),
    ("POST", "/v1/invoices/{id}/void", api(_invoice_void)),
    ("POST", "/v1/invoices/{id}/mark_uncollectible", api(_invoice_mark_uncollectible)),
]
