"""Cards, charges, refunds and disputes on top of localstripe's objects.

Test card numbers follow Stripe's: 4242424242424242 succeeds,
4000000000000002 is declined when attached (so in Checkout), and
4000000000000341 attaches but every off-session charge fails (renewals,
`invoices.pay`, `always_invoice` upgrades). On-session payments (the Checkout
page) succeed with it, so a demo can subscribe with it and watch the renewal fail.
"""

from __future__ import annotations

from typing import Any

from localstripe.resources import (
    Charge,
    Customer,
    PaymentIntent,
    PaymentMethod,
    Refund,
    StripeObject,
)

from gymbilling.stripe_standin.common import (
    api,
    list_of,
    newest_first,
    now,
    objects_of,
    stored,
    stripe_error,
    to_int,
)
from gymbilling.stripe_standin.webhooks import emit

CARD_SUCCEEDS = "4242424242424242"
CARD_DECLINED = "4000000000000002"
CARD_FAILS_OFF_SESSION = "4000000000000341"


def card_create(number: str) -> PaymentMethod:
    number = "".join(ch for ch in str(number) if ch.isdigit())
    if len(number) != 16:
        raise stripe_error(
            402, "Your card number is incorrect.", code="incorrect_number", param="card[number]"
        )
    return PaymentMethod(
        type="card", card={"number": number, "exp_month": 12, "exp_year": 2034, "cvc": "123"}
    )


def customer_card_replace(*, customer: Customer, method: PaymentMethod) -> PaymentMethod:
    """Attach a card and make it the default for invoices (raises 402 if declined)."""
    PaymentMethod._api_attach(method.id, customer=customer.id)
    emit("payment_method.attached", method)
    customer.invoice_settings["default_payment_method"] = method.id
    emit("customer.updated", customer)
    return method


def customer_default_method(customer_id: str) -> str | None:
    customer = Customer._api_retrieve(customer_id)
    method = customer._get_default_payment_method_or_source()
    return method.id if method is not None else None


def payment_collect(
    *,
    customer_id: str | None,
    amount: int,
    currency: str,
    payment_method_id: str,
    off_session: bool,
    metadata: dict[str, str] | None = None,
    transfer_group: str | None = None,
    description: str | None = None,
) -> PaymentIntent:
    """Create and confirm a PaymentIntent with one charge; never raises on decline.

    localstripe's own confirm path calls back into its Invoice class; ours has
    its own invoices, so the charge is driven here and the events sent here
    (localstripe sends no charge events at all).
    """
    intent = PaymentIntent(
        amount=amount,
        currency=currency,
        customer=customer_id,
        payment_method=payment_method_id,
        metadata=dict(metadata or {}),
        capture_method="automatic",
    )
    intent.transfer_group = transfer_group
    intent.description = description
    charge = Charge(
        amount=amount,
        currency=currency,
        customer=customer_id,
        source=payment_method_id,
        description=description,
    )
    charge.payment_intent = intent.id
    charge.metadata = dict(metadata or {})
    charge.transfer_group = transfer_group
    charge.disputed = False
    if not off_session:
        # The customer is present: see the module docstring about 4000000000000341.
        charge._authorized = True
    intent.latest_charge = charge
    charge._initialize_charge()
    if charge.status == "succeeded":
        emit("charge.succeeded", charge)
        emit("payment_intent.succeeded", intent)
    else:
        emit("charge.failed", charge)
        emit("payment_intent.payment_failed", intent)
    return intent


def declined_error(intent: PaymentIntent) -> Exception:
    charge = intent.latest_charge
    return stripe_error(
        402,
        charge.failure_message or "Your card was declined.",
        code=charge.failure_code or "card_declined",
        decline_code="generic_decline",
        charge=charge.id,
        payment_intent={"id": intent.id, "status": intent.status},
    )


def _charge_for(charge: Any, payment_intent: Any) -> Charge:
    if charge:
        return Charge._api_retrieve(charge)
    if payment_intent:
        intent = PaymentIntent._api_retrieve(payment_intent)
        if intent.latest_charge is None:
            raise stripe_error(
                400, "This PaymentIntent has no charge to refund.", param="payment_intent"
            )
        return intent.latest_charge
    raise stripe_error(
        400, "Provide a charge or a payment_intent.", code="parameter_missing", param="charge"
    )


# While set (`refunds_refuse`): every new refund is refused with this code, as Stripe
# refuses them while the platform's balance cannot cover them (`balance_insufficient`).
_refunds_refused: str | None = None


def refunds_refuse(code: str | None) -> None:
    """Refuse every refund with `code` from now on; None: take them again."""
    global _refunds_refused
    _refunds_refused = code or None


def refund_create(
    *,
    charge: str | None = None,
    payment_intent: str | None = None,
    amount: Any = None,
    metadata: Any = None,
    reason: str | None = None,
    **_ignored: Any,
) -> Refund:
    charge_obj = _charge_for(charge, payment_intent)
    if _refunds_refused:
        raise stripe_error(
            400, "Refunds are refused for now; fix the cause and try again.", code=_refunds_refused
        )
    refundable = charge_obj.amount - charge_obj.amount_refunded
    amount_int = refundable if amount is None else to_int(amount, "amount", minimum=1)
    if amount_int > refundable:
        raise stripe_error(
            400,
            f"Refund amount ({amount_int}) is greater than unrefunded amount on charge ({refundable})",
            code="charge_already_refunded" if refundable == 0 else "amount_too_large",
            param="amount",
        )
    refund = Refund(charge=charge_obj.id, amount=amount_int, metadata=metadata)
    refund.payment_intent = charge_obj.payment_intent
    refund.reason = reason
    emit("charge.refunded", charge_obj)
    emit("refund.created", refund)
    return refund


# A refund that failed (the card was closed, the bank refused it) or was canceled gives
# the money back to the merchant: Stripe no longer counts it in the charge's refunded
# total, and the charge may be refunded again. localstripe counts every refund.
REFUND_UNDONE = ("failed", "canceled")


def _amount_refunded(charge: Charge) -> int:
    return sum(
        refund.amount
        for refund in charge.refunds._list
        if getattr(refund, "status", "succeeded") not in REFUND_UNDONE
    )


Charge.amount_refunded = property(_amount_refunded)


def refund_fail(*, refund_id: str, reason: str = "expired_or_canceled_card") -> Refund:
    """A refund that went through fails later, with the events Stripe sends: the money
    is back in the merchant's balance (`charge.refund.updated`, `refund.updated`,
    `refund.failed`)."""
    refund = stored("refund", refund_id)
    if refund.status not in ("succeeded", "pending"):
        raise stripe_error(
            400, f"A refund with status {refund.status!r} cannot fail.", param="status"
        )
    refund.status = "failed"
    refund.failure_reason = reason
    for event_type in ("charge.refund.updated", "refund.updated", "refund.failed"):
        emit(event_type, refund)
    return refund


def _refund_get(*, id: str, **_ignored: Any) -> Refund:
    return stored("refund", id)


def _of_a_payment(object_name: str):
    """`GET /v1/<object_name>s`: newest first, of a charge or a PaymentIntent."""

    def listed(
        *,
        charge: str | None = None,
        payment_intent: str | None = None,
        limit: Any = None,
        starting_after: Any = None,
        **_ignored: Any,
    ):
        found = newest_first(objects_of(object_name))
        if charge:
            found = [o for o in found if o.charge == charge]
        if payment_intent:
            found = [o for o in found if o.payment_intent == payment_intent]
        return list_of(f"/v1/{object_name}s", found, limit=limit, starting_after=starting_after)

    listed.__name__ = f"_{object_name}_list"
    return listed


class Dispute(StripeObject):
    object = "dispute"
    _id_prefix = "du_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)


DISPUTE_STATUSES = {
    "warning_needs_response",
    "warning_under_review",
    "warning_closed",
    "needs_response",
    "under_review",
    "won",
    "lost",
}


def dispute_open(
    *,
    charge_id: str,
    amount: Any = None,
    reason: str = "fraudulent",
    status: str = "needs_response",
) -> Dispute:
    if status not in DISPUTE_STATUSES:
        raise stripe_error(400, f"Unknown dispute status {status!r}.", param="status")
    charge = Charge._api_retrieve(charge_id)
    dispute = Dispute(
        amount=charge.amount if amount is None else to_int(amount, "amount", minimum=1),
        currency=charge.currency,
        charge=charge.id,
        payment_intent=charge.payment_intent,
        reason=reason,
        status=status,
        is_charge_refundable=False,
        evidence_details={
            "due_by": now() + 7 * 86400,
            "has_evidence": False,
            "past_due": False,
            "submission_count": 0,
        },
        metadata={},
    )
    charge.disputed = True
    emit("charge.dispute.created", dispute)
    return dispute


# How a dispute can end: a dispute whose funds were withdrawn is won (Stripe
# reinstates the funds) or lost; an inquiry (warning_*) only closes.
DISPUTE_ENDINGS = {
    "needs_response": {"won", "lost"},
    "under_review": {"won", "lost"},
    "warning_needs_response": {"warning_closed"},
    "warning_under_review": {"warning_closed"},
}


def dispute_close(*, dispute_id: str, status: str = "won") -> Dispute:
    """End a dispute as the card network decides it, with Stripe's events.

    Won: `charge.dispute.funds_reinstated`, then `charge.dispute.closed`, as
    Stripe sends them; lost or an inquiry closed: `charge.dispute.closed`.
    """
    dispute = stored("dispute", dispute_id)
    if status not in DISPUTE_ENDINGS.get(dispute.status, set()):
        raise stripe_error(
            400,
            f"A dispute with status {dispute.status!r} cannot end as {status!r}.",
            param="status",
        )
    dispute.status = status
    if status == "won":
        emit("charge.dispute.funds_reinstated", dispute)
    emit("charge.dispute.closed", dispute)
    return dispute


def _dispute_get(*, id: str, **_ignored: Any) -> Dispute:
    return stored("dispute", id)


routes = [
    ("POST", "/v1/refunds", api(refund_create)),
    ("GET", "/v1/refunds", api(_of_a_payment("refund"))),
    ("GET", "/v1/refunds/{id}", api(_refund_get)),
    ("GET", "/v1/disputes", api(_of_a_payment("dispute"))),
    ("GET", "/v1/disputes/{id}", api(_dispute_get)),
]
