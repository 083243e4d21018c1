"""Refunds finance make (the admin's "Refund" on an invoice, a pack's or a market order's
checkout): at Stripe, then applied here at once.

The refund is Stripe's; what it does to credits is what any refund does
(payment_reversal_apply, or the marketplace's handler): the unspent share
clawed back, the spent share booked as a loss, reselling frozen. It is applied
as soon as Stripe answers, through the same path and under the same key as its
`charge.refunded` webhook, so whichever comes first applies it and the other
finds it done. Not a marketplace order's undelivered shortfall: a refund made here is
one of the delivered sale; the admin's Refund page sends the shortfall as the order's
own shortfall refund instead (market.services.order_shortfall_refund_request).
"""

from __future__ import annotations

import logging

from accounts.errors import ApplicationError
from accounts.models import AuditEvent, Organization
from accounts.services import audit_record
from gymbilling import stripe_client
from gymbilling.services.events import payment_reversals_refresh

logger = logging.getLogger(__name__)


def payment_refund(
    *,
    organization: Organization,
    payment_intent_id: str,
    amount: int | None,
    note: str,
    key: str,
    actor,
) -> dict:
    """Refund `amount` (minor units; None: all that is left) of a payment; returns Stripe's
    refund, with `gym_applied`: whether its clawback was applied here at once (else its
    webhook applies it; a failure to apply is logged, never raised, once Stripe refunded). `key` makes it once: the same key again (a form sent twice, a retry after
    Stripe did not answer) is the same refund at Stripe.

    Raises StripeRequestRefused (nothing left to refund, more than is left) or
    StripeUnavailable (nothing known to have happened: retry with the same key).
    """
    if not payment_intent_id:
        raise ApplicationError(code="no_payment", message="This row has no payment to refund.")
    if amount is not None and (isinstance(amount, bool) or amount <= 0):
        raise ApplicationError(
            code="invalid_amount", message="A refund is a positive amount.", param="amount"
        )
    if not note.strip():
        raise ApplicationError(
            code="reason_required", message="A refund needs a reason.", param="note"
        )
    params: dict = {
        "payment_intent": payment_intent_id,
        "reason": "requested_by_customer",
        "metadata": {"gym_actor": getattr(actor, "email", ""), "gym_note": note[:500]},
    }
    if amount is not None:
        params["amount"] = amount
    refund = stripe_client.refund_create(key=f"gym-refund:{key}", **params)
    recorded = AuditEvent.objects.filter(
        organization=organization, action="payment.refunded", data__refund=refund.get("id")
    )
    if not recorded.exists():  # the same key again is the same refund: recorded once
        audit_record(
            organization=organization,
            action="payment.refunded",
            target=payment_intent_id,
            actor_user=actor,
            data={"refund": refund.get("id"), "amount": refund.get("amount"), "note": note[:500]},
        )
    try:
        payment_reversals_refresh(payment_intent_id=payment_intent_id)
    except Exception:
        # The refund is made: it must not look failed (a retry with a new form
        # would refund again). Its webhook applies it (or the event's retry).
        logger.exception("refund %s made; applying it now failed", refund.get("id"))
        refund["gym_applied"] = False
    else:
        refund["gym_applied"] = True
    return refund
