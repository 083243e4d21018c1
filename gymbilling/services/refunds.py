"""Refunds finance make (the admin's "Refund" on an invoice, a pack's or a market order's
checkout): at Stripe, then applied here at once.

The refund is Stripe's; what it does to credits is what any refund does
(payment_reversal_apply, or the marketplace's handler): the unspent share
clawed back, the spent share booked as a loss, reselling frozen. It is applied
as soon as Stripe answers, through the same path and under the same key as its
`charge.refunded` webhook, so whichever comes first applies it and the other
finds it done. Not a marketplace order's undelivered shortfall: a refund made here is
one of the delivered sale; the admin's Refund page sends the shortfall as the order's
own shortfall refund instead (market.services.order_shortfall_refund_request), and a
refund made here never takes the money of a shortfall still owed (_market_sale_refund).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from accounts.errors import ApplicationError
from accounts.models import AuditEvent, Organization
from accounts.services import audit_record
from gymbilling import stripe_client
from gymbilling.locks import session_lock
from gymbilling.market.selectors import payment_market_order
from gymbilling.market.services import order_sale_refundable
from gymbilling.services.events import REFUND_UNDONE, payment_reversals_refresh

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
    webhook applies it; a failure to apply is logged, never raised, once Stripe refunded),
    and `gym_already_made`: whether it is the refund an earlier send of `key` made, nothing
    being refunded now. `key` makes it once: the same key again (a form sent twice, a retry
    after Stripe did not answer) is the same refund at Stripe.

    Of a marketplace order that had an undelivered shortfall, this refunds the delivered
    sale only (_market_sale_refund): None is all the sale has left, never the shortfall
    the buyer is still owed; more than the sale has left is 400 `refund_exceeds_sale`,
    None with nothing left 409 `sale_fully_refunded`; the same form again once its refund
    failed or was canceled at Stripe, 409 `refund_failed` (a fresh form refunds again).

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
        "metadata": {
            "gym_actor": getattr(actor, "email", ""),
            "gym_note": note[:500],
            # What _form_refund finds a send of this form by, once Stripe took it.
            "gym_refund": key,
        },
    }
    order = payment_market_order(payment_intent_id=payment_intent_id)
    if order is not None and order.shortfall_amount:
        refund = _form_refund(
            key=key,
            params=params,
            make=lambda refunds: _market_sale_refund(
                order_id=order.pk, amount=amount, key=key, params=params, refunds=refunds
            ),
        )
    else:
        if amount is not None:
            params["amount"] = amount
        refund = _form_refund(
            key=key,
            params=params,
            make=lambda refunds: stripe_client.refund_create(key=f"gym-refund:{key}", **params),
        )
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


def _form_refund(*, key: str, params: dict, make: Callable[[list[dict]], dict]) -> dict:
    """The refund a Refund page's form (`key`) made at Stripe, else the one `make` makes
    now, given the payment's refunds at Stripe; `gym_already_made` says which.

    Stripe forgets an idempotency key after 24 hours: an old form sent again (a back
    button, a retry the next day) would otherwise refund a second time. So a refund Stripe
    holds for this form (metadata `gym_refund`) is returned instead of making one; one
    that failed or was canceled since is 409 `refund_failed` (_form_refund_undone). Two
    refunds of one payment at once are one after the other (the lock), each reading what
    the other made.
    """
    payment_intent_id = params["payment_intent"]
    # The name the market sale refund's lock had before this lock covered every form
    # refund: during a rolling deploy an old process refunding a market sale and a new
    # one take the same lock, and so exclude each other. One name for every payment, so
    # that new processes never disagree on it whatever the payment turns out to be.
    with session_lock(f"market-sale-refund:{payment_intent_id}"):
        refunds = stripe_client.refunds_list(payment_intent=payment_intent_id)
        undone = None
        for made in refunds:
            if (made.get("metadata") or {}).get("gym_refund") != key:
                continue
            if made.get("status") not in REFUND_UNDONE:
                # Made by an earlier send: the caller must not say it refunded now.
                return {**made, "gym_already_made": True}
            undone = made
        if undone is not None:
            raise _form_refund_undone(undone)
        return {**make(refunds), "gym_already_made": False}


def _market_sale_refund(
    *, order_id: int, amount: int | None, key: str, params: dict, refunds: list[dict]
) -> dict:
    """A refund of a marketplace order's delivered sale, where the order had a shortfall;
    made under _form_refund, given the payment's `refunds` at Stripe.

    Stripe's "all that is left" of the charge would take the shortfall the buyer is still
    owed too: the webhook finds no sale of it to take back (`unapplied`), and the order's
    own shortfall refund is then refused, nothing being left to refund. So the amount is
    always given: blank is what the sale has left (order_sale_refundable), as finance
    choosing "the delivered sale" expect; more than that is refused before Stripe is
    called. The shortfall goes as the order's own refund, whenever it is sent.

    That amount is read from Stripe, so it changes once a send was taken: the same form
    sent again after Stripe did not answer would ask for another amount under the same
    key; _form_refund returns the refund Stripe made for it instead. Two refunds of the
    sale at once are one after the other (_form_refund's lock), each reading what the
    other left; one racing the shortfall's own refund takes no more than the sale's share.
    """
    payment_intent_id = params["payment_intent"]
    charge = stripe_client.payment_intent_charge(payment_intent_id)
    if charge is None:
        raise ApplicationError(code="no_payment", message="This payment has no charge.")
    left = order_sale_refundable(order_id=order_id, charge=charge, refunds=refunds)
    currency = charge.get("currency", "")
    if amount is None and left == 0:
        raise ApplicationError(
            code="sale_fully_refunded",
            message="Nothing of the delivered sale is left to refund. What is left of the "
            "payment, if anything, is the undelivered shortfall the buyer is owed: refund "
            "it as the shortfall.",
            status=409,
        )
    if amount is not None and amount > left:
        raise ApplicationError(
            code="refund_exceeds_sale",
            message=f"At most {left} {currency} of the delivered sale is left to refund; "
            "the rest of the payment is the undelivered shortfall the buyer is owed (or "
            "was refunded already). Refund at most that, and the shortfall as the "
            "shortfall.",
            param="amount",
            extra={"refundable": left},
        )
    return stripe_client.refund_create(
        key=f"gym-refund:{key}", **params, amount=left if amount is None else amount
    )


def _form_refund_undone(refund: dict) -> ApplicationError:
    """The refund a Refund page's form made failed or was canceled at Stripe since: the money
    is the gym's again, the buyer has not had it.

    Not reported as refunded, which is what returning it would say; nor sent again under
    the form's key: within Stripe's 24 hours the same key answers with that refund as it
    was made (not failed yet), so the page would say "refunded" once more, and past them
    an old form, sent again by a back button, would refund without finance meaning to.
    A new refund is a new decision: a fresh form, a key of its own.
    """
    reason = refund.get("failure_reason") or ""
    return ApplicationError(
        code="refund_failed",
        message=f"This form's refund {refund.get('id')} of {refund.get('amount')} "
        f"{refund.get('currency', '')} {refund.get('status')} at Stripe"
        + (f" ({reason})" if reason else "")
        + ": the money went back to the gym, not to the buyer, and nothing was refunded "
        "now. Sending this form again cannot refund it (Stripe answers its key with that "
        "refund); to refund the buyer, open the Refund page afresh and send a fresh form.",
        status=409,
    )
