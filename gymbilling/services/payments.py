"""One-time payments (credit packs) and the reversal of any payment that bought credits.

A refund or dispute claws back the credits the money it returned paid for
(`reversal_credits`) that are still unspent in the buyer's wallet, and records
what was already spent as a loss. Either also freezes reselling for
the organization until finance lifts it. A dispute the gym then wins gives
back what it took (`payment_reversal_reinstate`); the freeze stays.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from functools import partial
from typing import NamedTuple

from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.services import audit_record
from gymbilling import stripe_client
from gymbilling.locks import transaction_lock
from gymbilling.models import (
    BillingCustomer,
    CheckoutKind,
    CheckoutSession,
    CheckoutStatus,
    Invoice,
    PaymentReversal,
    PriceKind,
    StripePrice,
)
from gymbilling.sweeps import each_isolated
from metering.models import CreditLot, JournalTransaction, LotMovement, LotSource
from metering.selectors import lot_family_ids
from metering.services import (
    LotSale,
    claim_drop,
    claim_settle,
    clawbacks_reverse,
    clawbacks_under,
    credits_claim,
    credits_grant,
    lot_clawback,
    transaction_reverse,
)

logger = logging.getLogger(__name__)


def checkout_session_mirror(*, session: dict) -> CheckoutSession | None:
    """Record Stripe's view of a Checkout session we created; None if not ours."""
    row = CheckoutSession.objects.filter(stripe_session_id=session["id"]).first()
    if row is None:
        return None
    status = str(session.get("status") or "")
    updates: dict = {}
    if status in CheckoutStatus.values and status != row.status:
        updates["status"] = status
    intent = session.get("payment_intent")
    if isinstance(intent, dict):
        intent = intent.get("id")
    if intent and intent != row.stripe_payment_intent_id:
        updates["stripe_payment_intent_id"] = intent
    if session.get("amount_total") is not None:
        updates["amount_total"] = int(session["amount_total"])
    if status == CheckoutStatus.COMPLETE and row.completed_at is None:
        updates["completed_at"] = timezone.now()
    completed_at = updates.pop("completed_at", None)
    if updates:
        CheckoutSession.objects.filter(pk=row.pk).update(**updates)
    if completed_at:
        # Set once (the pack's validity counts from it): the first writer wins.
        CheckoutSession.objects.filter(pk=row.pk, completed_at__isnull=True).update(
            completed_at=completed_at
        )
    if updates or completed_at:
        row.refresh_from_db()
    return row


# The origin of every pack's credits (CreditLot.origin): finance's report lists packs as one.
PACK_ORIGIN = "pack"


def _pack_checkout_credits(checkout: CheckoutSession) -> int:
    """The micro-credits a pack checkout bought: those of the price it was opened at,
    recorded on the row when it was opened (CheckoutSession.credits).

    Not the pack's or price's credits now: a checkout opened before finance changed them
    is paid at the old price, and buys what that price was sold for. A row opened before
    they were recorded at opening (gymbilling/0033; old processes still open some during
    the deploy) reads its price from Stripe's line item once, here, and records it, first
    writer wins: every delivery of its events grants the same. The pack's credits now only
    where that price is none of ours, or was made before prices recorded their credits.
    """
    if checkout.credits is not None:
        return checkout.credits
    price = None
    for item in stripe_client.checkout_session_line_items(checkout.stripe_session_id):
        price_id = (item.get("price") or {}).get("id")
        price = StripePrice.objects.filter(stripe_price_id=price_id, kind=PriceKind.PACK).first()
        break  # a pack checkout sells one line: the pack
    credits = checkout.pack.credits if price is None or price.credits is None else price.credits
    CheckoutSession.objects.filter(pk=checkout.pk, credits__isnull=True).update(
        credits=credits, price=price
    )
    checkout.refresh_from_db(fields=["credits", "price"])
    return checkout.credits


def pack_purchase_grant(*, checkout: CheckoutSession) -> CreditLot | None:
    """A paid pack checkout grants the credits its price bought (`_pack_checkout_credits`),
    valid the pack's `validity_days`, once, sold for what the checkout charged (its total:
    discounts off; no tax is collected here)."""
    if checkout.kind != CheckoutKind.PACK or checkout.completed_at is None:
        return None
    pack = checkout.pack
    return credits_grant(
        organization=checkout.organization,
        amount=_pack_checkout_credits(checkout),
        source=LotSource.PACK,
        paid=True,
        resellable=False,
        key=f"pack:{checkout.stripe_session_id}",
        expires_at=checkout.completed_at + timedelta(days=pack.validity_days),
        memo=f"credit pack {pack.code}",
        sale=LotSale(revenue=checkout.amount_total, currency=checkout.currency, origin=PACK_ORIGIN),
    )


class _PaymentGrant(NamedTuple):
    """The grant a payment bought, whose organization, what the invoice or pack checkout
    came to in all (`total`: None where not recorded) and what the payment paid of it."""

    grant: JournalTransaction | None
    organization: object
    total: int | None
    charged: int = 0


def _grant_for_payment(payment_intent_id: str) -> _PaymentGrant:
    """The grant a payment bought: a subscription invoice's or a pack's."""
    if not payment_intent_id:
        return _PaymentGrant(None, None, None)
    invoice = Invoice.objects.filter(stripe_payment_intent_id=payment_intent_id).first()
    if invoice is not None:
        key = f"grant:invoice:{invoice.stripe_invoice_id}"
        return _PaymentGrant(
            JournalTransaction.objects.filter(idempotency_key=key).first(),
            invoice.organization,
            invoice.total,
            invoice.amount_paid,
        )
    checkout = CheckoutSession.objects.filter(
        stripe_payment_intent_id=payment_intent_id, kind=CheckoutKind.PACK
    ).first()
    if checkout is not None:
        key = f"grant:pack:{checkout.stripe_session_id}"
        return _PaymentGrant(
            JournalTransaction.objects.filter(idempotency_key=key).first(),
            checkout.organization,
            checkout.amount_total,
            checkout.amount_total,
        )
    return _PaymentGrant(None, None, None)


def _credits_paid_by(*, lot: CreditLot, total: int | None, charge: int) -> Callable[..., int]:
    """`reversal_credits` of the lot a payment bought, for the money returned (`returned=`).

    Lots granted before revenue was recorded, or a total mirrored before it was: as
    then, the credits are read as all the charge paid for, and nothing else paid it."""
    return partial(
        reversal_credits,
        credits=lot.amount,
        price=charge if lot.revenue is None else lot.revenue,
        charge=charge,
        total=charge if total is None else total,
    )


def reversal_credits(*, credits: int, price: int, charge: int, total: int, returned: int) -> int:
    """The micro-credits that `returned` minor units, refunded or disputed of a charge in
    all, paid for: what a payment's refunds and disputes take back together.

    `credits` were bought for `price` (the lot's revenue: the invoice's lines that buy
    credits, less their discounts; a pack's total), on an invoice or checkout of `total`
    of which the charge paid `charge`. The rule, in the README's one sentence: what else
    paid the invoice (the customer balance, marketplace proceeds paid as a credit among
    it, and credit notes: `total - charge`) is counted as paying the credits first, and
    the money returned as returning first what the charge paid for anything else (metered
    overage, tax, a debt carried in); only the rest takes credits, in proportion to their
    price. So a reversal never takes more credits than the money it returned can have
    paid for, however the charge is read: a refund of an invoice's overage takes none,
    a dispute of a charge the balance helped pay leaves what the balance paid for, and
    a full refund of a payment nothing else paid takes them all, exactly.

    Rounded down (to the micro-credit): never more than that money paid for. Applied to
    the running total returned, never event by event, so that the order and the split
    of the refunds and disputes change nothing (a refund of the overage first, then of
    the rest, takes what a refund of the whole takes).
    """
    other = max(0, total - charge)  # what paid the invoice besides the charge
    paid = min(charge, max(0, price - other))  # the charge's money that paid the credits
    back = min(returned, charge) - (charge - paid)  # beyond what it paid for anything else
    if back <= 0 or paid <= 0:
        return 0
    return credits * back // price


def _listings_withdraw(*, organization) -> None:
    """End the organization's open marketplace listings (their unsold credits go home)."""
    from gymbilling.market.services import listings_withdraw_all

    listings_withdraw_all(seller=organization)


# BillingCustomer.resale_frozen_reason's length.
_FREEZE_REASON_MAX = 200


def resale_freeze(*, organization, reason: str) -> None:
    """Stop the organization reselling for a refund or dispute (`reason`: "dispute of ch_1").

    Already frozen, the new cause is added to the reason and `resale_frozen_at` becomes
    now: finance lift a freeze only as they were shown it (resale_unfreeze compares
    `resale_frozen_at`), so lifting it for the refund they looked into cannot also lift a
    dispute that came after they looked.
    """
    with transaction.atomic():
        # The row lock an UPDATE of the row takes anyway, taken here to read the reason.
        customer = (
            BillingCustomer.objects.select_for_update().filter(organization=organization).first()
        )
        if customer is None:
            return
        causes = customer.resale_frozen_reason if customer.resale_frozen_at else ""
        if reason not in causes.split("; "):
            causes = f"{causes}; {reason}" if causes else reason
        if len(causes) > _FREEZE_REASON_MAX:
            # Every refund and dispute is listed in full in Payment reversals (and the
            # marketplace's reversals); this says there are more than fit.
            causes = causes[: _FREEZE_REASON_MAX - 1] + "…"
        BillingCustomer.objects.filter(pk=customer.pk).update(
            resale_frozen_at=timezone.now(), resale_frozen_reason=causes
        )


@transaction.atomic
def resale_unfreeze(*, customer_id: int, frozen_at: datetime, note: str, actor) -> BillingCustomer:
    """Finance allow the customer's organization to resell again, having looked into the
    freeze they were shown: the one set at `frozen_at`. Recorded in its audit log.

    Refused (409 `resale_freeze_changed`) when the freeze is not that one any more: a
    refund or dispute froze it again since (resale_freeze moves `resale_frozen_at`), or
    it was lifted meanwhile. Finance look at it again and lift what they then see.
    """
    note = note.strip()
    if not note:
        raise ApplicationError(
            code="reason_required",
            message="Say why reselling may start again (for the audit log).",
            param="note",
        )
    customer = (
        BillingCustomer.objects.select_for_update()
        .select_related("organization")
        .get(pk=customer_id)
    )
    if customer.resale_frozen_at != frozen_at:
        now = (
            f"frozen since {customer.resale_frozen_at.isoformat()} "
            f"({customer.resale_frozen_reason})"
            if customer.resale_frozen_at
            else "not frozen any more"
        )
        raise ApplicationError(
            code="resale_freeze_changed",
            message=f"The freeze changed since you looked: it is {now}. Nothing was lifted; "
            "look at it again.",
            status=409,
        )
    BillingCustomer.objects.filter(pk=customer.pk).update(
        resale_frozen_at=None, resale_frozen_reason=""
    )
    audit_record(
        organization=customer.organization,
        action="billing.resale_unfrozen",
        target=customer.stripe_customer_id,
        actor_user=actor,
        data={
            "frozen_at": frozen_at.isoformat(),
            "reason": customer.resale_frozen_reason,
            "note": note[:500],
        },
    )
    customer.resale_frozen_at, customer.resale_frozen_reason = None, ""
    return customer


def payment_reversal_apply(
    *, kind: str, key: str, charge: dict, amount: int, cumulative: bool
) -> PaymentReversal | None:
    """Claw back the credits a refunded or disputed charge bought; record the loss.

    `amount` is the money refunded or disputed; with `cumulative` it is the
    charge's total refunded so far (Stripe's `amount_refunded`), and only the
    part not yet reversed by an earlier event is applied now.
    """
    from gymbilling.market.rollover import rollover_carries_claiming, rollover_claims_fit
    from gymbilling.market.services import seller_lock

    intent = charge.get("payment_intent")
    if isinstance(intent, dict):
        intent = intent.get("id")
    grant, organization, total, _ = _grant_for_payment(str(intent or ""))
    if grant is None:
        return None  # not a payment that bought credits here (or the marketplace's)
    lot = grant.created_lots.order_by("pk").first()
    credits_paid_by = _credits_paid_by(lot=lot, total=total, charge=int(charge.get("amount") or 0))
    reason = f"{kind} of {charge['id']}"
    applied = PaymentReversal.objects.filter(key=key).first()
    if applied is not None:
        # A replay (the same event again, or a later event of the same key):
        # nothing to do, and above all no new freeze of a resale that finance
        # may have lifted since.
        return applied
    # First: no more reselling, and what is listed comes back to the wallet,
    # where the clawback can reach it (listed credits are lots of the escrow).
    resale_freeze(organization=organization, reason=reason)
    _listings_withdraw(organization=organization)
    try:
        with transaction.atomic():
            # The lock order of everything that touches reversals and the ledger
            # (gymbilling.market.services): the seller's market lock, then the charge's,
            # then the reversals' rows (primary-key order), then ledger accounts.
            # The seller's lock first, as order_release takes it: a release then either
            # committed the reserved credits home before this counts them (the clawback
            # takes them) or sees this reversal, committed, among those that counted
            # them lost (it takes them back as they come home).
            seller_lock(organization)
            # One reversal of a charge at a time: a refund and a dispute of the
            # same charge may arrive together, under different locks upstream.
            transaction_lock(f"stripe-charge:{charge['id']}")
            earlier = PaymentReversal.objects.filter(stripe_charge_id=charge["id"])
            # Every earlier reversal of the charge locked now, before any ledger
            # account: settling one below takes the wallet's lock, and locking the next
            # one only then would wait, holding the wallet, for an order_release or a
            # pending sweep that holds that row and waits for the wallet (a deadlock).
            list(earlier.select_for_update().order_by("pk").values_list("pk", flat=True))
            # The rollovers still waiting for plan credits running work holds, locked
            # before the ledger's accounts too: what this reversal claims of those
            # credits is claimed once, its own (rollover_claims_fit, below).
            carries = rollover_carries_claiming(organization=organization)
            if cumulative:
                # Each row records the money its own event returned (finance's report
                # adds them up): the running total less what earlier rows recorded.
                amount = max(
                    0,
                    amount
                    - PaymentReversal.objects.filter(
                        # A refund that failed since returned nothing.
                        stripe_charge_id=charge["id"],
                        kind=kind,
                        reinstated_at__isnull=True,
                    ).aggregate(total=Sum("amount", default=0))["total"],
                )
            reversal = PaymentReversal.objects.create(
                key=key,
                kind=kind,
                organization=organization,
                stripe_charge_id=charge["id"],
                stripe_payment_intent_id=str(intent or ""),
                amount=amount,
                currency=str(charge.get("currency") or ""),
                credits_bought=lot.amount,
            )
            earlier = earlier.exclude(pk=reversal.pk)
            # An earlier reversal still waiting for running work first takes back
            # what that work gave back since (as its sweep would): the credits it
            # claimed are its own, not this one's to take, and what it still has
            # pending is then only what the work holds.
            for pk in (
                earlier.filter(credits_pending__gt=0).order_by("pk").values_list("pk", flat=True)
            ):
                _reversal_pending_settle(reversal_id=pk, now=timezone.now())
            done = sum(_credits_reversed(r) for r in earlier)
            # What the charge's refunds and disputes still standing (a won dispute, a
            # failed refund gave its money back) returned in all, this one's with them:
            # its credits less what the earlier ones took is this one's due. Not this
            # event's money alone: the first money returned takes no credits (it returned
            # what the charge paid for anything else), so each event's own share would
            # leave a payment refunded in parts with credits a refund of the whole takes.
            returned = amount + sum(r.amount for r in earlier if r.reinstated_at is None)
            # Never more than the payment bought, whatever mix of events.
            due = max(0, min(credits_paid_by(returned=returned), lot.amount) - done)
            clawed = (
                lot_clawback(lot=lot, amount=due, key=key, memo=reason, family=True) if due else 0
            )
            # What is still unspent now is held by running work (a clawback
            # takes all it may otherwise): it waits for that work to settle,
            # claimed on the wallet so that no new work takes it meanwhile.
            pending = _held_claim(reversal, lot=lot, amount=due - clawed)
            PaymentReversal.objects.filter(pk=reversal.pk).update(
                credits_clawed_back=clawed,
                credits_pending=pending,
                credits_lost=due - clawed - pending,
            )
            # A rollover that claimed the same held credits over its cap lets them go: what
            # this reversal waits for of them is its own, and what it took back (or what the
            # earlier ones settled above took) is no longer there to claim. Claiming them
            # twice, or claiming what is gone, would refuse work the member's other credits
            # pay for until the rollover's sweep.
            rollover_claims_fit(organization=organization, carries=carries)
    except IntegrityError:
        return PaymentReversal.objects.filter(key=key).first()
    reversal.refresh_from_db()
    return reversal


def payment_reversals_pending_locked(*, organization) -> list[PaymentReversal]:
    """The organization's refunds and disputes still waiting for credits running work held,
    locked in primary-key order, for `payment_reversals_pending_take`: before the ledger's
    accounts, as the pending sweep locks them."""
    return list(
        PaymentReversal.objects.select_for_update()
        .filter(organization=organization, credits_pending__gt=0)
        .order_by("pk")
    )


def payment_reversals_pending_take(*, reversals: list[PaymentReversal], now: datetime) -> int:
    """Take back now what these reversals wait for that running work gave back since, as
    their sweep (`payment_reversals_pending_settle`) will: for a period's rollover cap,
    which counts the credits left after it. Their money bought those credits, so they come
    first; trimmed before the sweep, the cap would expire them as the member's and the
    reversal would find only the cap left to take (a loss, and the member without it).

    The caller holds the reversals' rows (`payment_reversals_pending_locked`) and runs
    inside its transaction. A reversal whose payment bought nothing here is left to the
    sweep, which reports it. So is one whose take fails (logged at ERROR with its id):
    each is taken in a savepoint of its own and the others still go, as in the sweep.
    Raised, it would fail the period change, a subscription's sync, at every later event
    of the subscription too: its period, plan and entitlements would stay as they were.
    The cap then counts what that one waits for as the member's; its sweep takes what the
    cap leaves. Returns the micro-credits taken back.
    """
    by_pk = {reversal.pk: reversal for reversal in reversals}
    return each_isolated(
        list(by_pk),
        lambda pk: _reversal_pending_take(by_pk[pk], now=now),
        what="the period change's take of payment reversal",
        then="its sweep tries again",
    )


def _reversal_pending_take(reversal: PaymentReversal, *, now: datetime) -> int:
    # A savepoint: a take that fails leaves nothing of it behind, and the caller's
    # transaction usable for the rest.
    with transaction.atomic():
        if reversal_lots(reversal) is None:
            return 0
        return _reversal_pending_settle(reversal_id=reversal.pk, now=now)


def payment_reversals_lost_locked(*, organizations: list[int]) -> list[PaymentReversal]:
    """The organizations' refunds and disputes that recorded credits as lost (and are not
    undone), locked in primary-key order, for `payment_reversals_reclaim`: before the
    ledger's accounts, as the pending sweep locks them."""
    return list(
        PaymentReversal.objects.select_for_update()
        .filter(organization_id__in=organizations, credits_lost__gt=0, reinstated_at__isnull=True)
        .order_by("pk")
    )


def payment_reversals_reclaim(
    *, reversals: list[PaymentReversal], lots: list[CreditLot], key: str
) -> int:
    """Take back credits a refund or dispute could not reach, now that they are home.

    Credits a buyer's pending marketplace order reserved are neither in the seller's
    wallet nor spent: a refund of the payment that bought them counts them lost. When
    that order is released, they come back to the wallet (`lots`, new lots of the
    refunded lot's family); each reversal takes back what it counted lost of its own
    family, as its clawback would have had they been there, under its key (a won
    dispute gives them back with the rest). The caller holds the reversals' rows
    (`payment_reversals_lost_locked`) and runs inside its transaction. Returns the
    micro-credits taken back.
    """
    taken_all = 0
    for reversal in reversals:
        family = reversal_lots(reversal)
        if family is None or reversal.credits_lost <= 0:
            continue
        ours = set(
            CreditLot.objects.filter(family, pk__in=[lot.pk for lot in lots]).values_list(
                "pk", flat=True
            )
        )
        taken = 0
        for lot in lots:
            left = reversal.credits_lost - taken
            if left <= 0:
                break
            if lot.pk not in ours:
                continue
            taken += lot_clawback(
                lot=lot,
                amount=min(left, lot.amount),
                key=f"{reversal.key}:released:{key}:{lot.pk}",
                memo=f"{reversal.kind} of {reversal.stripe_charge_id}: reserved credits came back",
            )
        if taken:
            PaymentReversal.objects.filter(pk=reversal.pk).update(
                credits_clawed_back=F("credits_clawed_back") + taken,
                credits_lost=F("credits_lost") - taken,
            )
            reversal.credits_lost -= taken
            reversal.credits_clawed_back += taken
            taken_all += taken
    return taken_all


def reversal_lots(reversal: PaymentReversal) -> Q | None:
    """The lots a reversal takes back from: the family of the lot its payment bought (None
    when it bought nothing here: a broken row, which the sweep reports)."""
    grant = _grant_for_payment(reversal.stripe_payment_intent_id).grant
    if grant is None:
        return None
    return _lot_family(grant.created_lots.order_by("pk").first())


def payment_reversals_claimed(*, organization) -> list[tuple[Q, datetime]]:
    """What the organization's pending refunds and disputes claimed: the lots each waits on,
    with its time (for claims_repair to mark them as the claim did)."""
    claimed = []
    for reversal in PaymentReversal.objects.filter(
        organization=organization, credits_pending__gt=0
    ).order_by("pk"):
        lots = reversal_lots(reversal)
        if lots is not None:
            claimed.append((lots, reversal.created_at))
    return claimed


def _lot_family(lot: CreditLot) -> Q:
    """The lot a payment bought and those split from it (what went to escrow and came back)."""
    return Q(pk__in=lot_family_ids(lot))


def _pending_besides(reversal: PaymentReversal) -> Callable[[], int]:
    """What the payment's other reversals still wait for: of the same lots (one payment, one
    grant). For metering to read under the wallet's row lock (credits_claim, claim_settle)."""

    def pending() -> int:
        others = (
            PaymentReversal.objects.filter(
                stripe_payment_intent_id=reversal.stripe_payment_intent_id, credits_pending__gt=0
            )
            .exclude(pk=reversal.pk)
            .aggregate(total=Sum("credits_pending"))
        )
        return others["total"] or 0

    return pending


def _held_claim(reversal: PaymentReversal, *, lot: CreditLot, amount: int) -> int:
    """Claim up to `amount` of what running work holds of the family of `lot` (the payment's)
    for the reversal to wait for, beside what its other reversals wait for; returns what it
    claimed (what it records pending). Nothing for nothing."""
    if amount <= 0:
        return 0
    return credits_claim(
        organization=reversal.organization,
        lots=_lot_family(lot),
        amount=amount,
        at=reversal.created_at,
        claimed_by_others=_pending_besides(reversal),
    )


def _credits_reversed(reversal: PaymentReversal) -> int:
    if reversal.reinstated_at is not None:
        return 0  # a won dispute gave it all back: a later refund may take its share
    return reversal.credits_clawed_back + reversal.credits_lost + reversal.credits_pending


def payment_reversal_reinstate(*, key: str) -> PaymentReversal | None:
    """Undo a reversal: Stripe gave the money back (the dispute was won, or the refund
    failed and its money came back to our balance).

    The credits it took back return to the lots they were taken from (its
    clawbacks are reversed: same source, paid and resellable flags, expiry);
    what it left pending stops being pending (still in the wallet, the
    customer's again, and no longer claimed); what it recorded as lost was
    spent and stays spent, but is no loss any more: the money came back. The
    resale freeze stays until finance lifts it. Once per reversal: a replay
    returns the reinstated row; None when no reversal has this key (the
    dispute was never applied here).

    Plan credits that were clawed back when the period rolled over missed its
    rollover cap: what the cap would have taken of them expires as they come
    back (gymbilling.market.rollover), so a won dispute never carries more
    plan credits over than the cap. Pack credits have no cap.
    """
    from gymbilling.market.rollover import (
        rollover_carries_claiming,
        rollover_carries_for_clawbacks,
        rollover_claims_fit,
        rollover_reinstate_trim,
    )
    from gymbilling.market.services import seller_lock

    reversal = PaymentReversal.objects.filter(key=key).first()
    if reversal is None:
        return None
    with transaction.atomic():
        # The rollover's lock first (it takes it before all else): a rollover
        # either counted these credits back home, or recorded that it missed them.
        seller_lock(reversal.organization)
        # payment_reversal_apply's lock, then the row the pending sweep locks.
        transaction_lock(f"stripe-charge:{reversal.stripe_charge_id}")
        # Every reversal of the charge, in primary-key order, before any ledger account
        # (as payment_reversal_apply locks them): those still standing may give back what
        # they took counting this one's money (_standing_refit).
        rows = {
            row.pk: row
            for row in PaymentReversal.objects.select_for_update()
            .filter(stripe_charge_id=reversal.stripe_charge_id)
            .order_by("pk")
        }
        reversal = rows[reversal.pk]
        if reversal.reinstated_at is not None:
            return reversal
        # What its clawbacks still hold (a refit may have given some back already): what
        # the customer gets back now.
        still_taken = -(
            LotMovement.objects.filter(
                transaction__in=JournalTransaction.objects.filter(
                    organization=reversal.organization, reversed_by__isnull=True
                ).filter(clawbacks_under(key))
            ).aggregate(total=Sum("amount", default=0))["total"]
        )
        # Those it gives back now: a refit's give-back of some (reversed already) was
        # capped then, and counting it again would expire what the cap let through.
        clawback_ids = list(
            JournalTransaction.objects.filter(
                organization=reversal.organization, reversed_by__isnull=True
            )
            .filter(clawbacks_under(key))
            .values_list("pk", flat=True)
        )
        # Before the ledger's accounts, as the market's lock order has them.
        carries = rollover_carries_for_clawbacks(clawback_ids)
        # And those waiting for held plan credits (every carry is locked under the seller's
        # lock, held here, so the two lists' order cannot deadlock with another).
        claiming = rollover_carries_claiming(organization=reversal.organization)
        clawbacks_reverse(
            key=key,
            reason=f"{reversal.kind} of {reversal.stripe_charge_id} "
            + (
                "failed: the money came back"
                if reversal.kind == PaymentReversal.Kind.REFUND
                else "won: funds reinstated"
            ),
            organization=reversal.organization,
        )
        if reversal.credits_pending:
            claim_drop(organization=reversal.organization, amount=reversal.credits_pending)
        rollover_reinstate_trim(
            organization=reversal.organization,
            carries=carries,
            clawback_ids=clawback_ids,
            key=key,
            now=timezone.now(),
        )
        PaymentReversal.objects.filter(pk=reversal.pk).update(
            reinstated_at=timezone.now(),
            credits_reinstated=still_taken,
            credits_pending=0,
            credits_lost=0,
        )
        _standing_refit(
            reinstated=reversal,
            standing=[
                row for pk, row in rows.items() if pk != reversal.pk and row.reinstated_at is None
            ],
        )
        # What it, or a refit, waited for of held plan credits a rollover left over the cap
        # is the rollover's to claim again: the member keeps the cap of them, no more.
        rollover_claims_fit(organization=reversal.organization, carries=claiming)
    reversal.refresh_from_db()
    return reversal


def _standing_refit(*, reinstated: PaymentReversal, standing: list[PaymentReversal]) -> None:
    """Give back what the charge's standing reversals took beyond what their money paid for.

    Each reversal takes the credits of the money the charge's reversals returned so far,
    less what the earlier ones took (`reversal_credits` on the running total), and the
    first money returned takes none. So when an earlier one is given back (a refund that
    failed) after a later one was applied, the later one took its credits counting the
    earlier one's money as returned. The latest give back first, each as if it had been
    applied for less: first what it booked lost (spent: nothing moves), then what it
    waits for (unclaimed), then what it took back (its clawbacks reversed to the very
    lots, and what it keeps taken again under `<key>:refit:<pk>`, which a won dispute
    gives back as its own; what running work placed before it holds of that it waits
    for, as at its clawback). Clawbacks made before a period change come back past that
    rollover's cap (`_clawbacks_refit`). In the reinstatement's transaction, with the
    rows locked.
    """
    payment = _grant_for_payment(reinstated.stripe_payment_intent_id)
    if payment.grant is None:
        return  # not a payment that bought credits here: nothing to compare
    if payment.charged <= 0:
        # Apply reads what was paid from the Stripe charge, which is not at hand here
        # (no Stripe call under these locks); the invoice's mirror says nothing was paid
        # for a payment refunded or disputed, so it is wrong or missing: the standing
        # reversals keep what they took, which finance must look into.
        logger.error(
            "refit of payment %s skipped: no amount paid recorded (reinstated reversal %s)",
            reinstated.stripe_payment_intent_id,
            reinstated.pk,
        )
        return
    lot = payment.grant.created_lots.order_by("pk").first()
    paid_for = _credits_paid_by(lot=lot, total=payment.total, charge=payment.charged)(
        returned=sum(r.amount for r in standing)
    )
    excess = sum(_credits_reversed(r) for r in standing) - paid_for
    for reversal in sorted(standing, key=lambda r: r.pk, reverse=True):
        if excess <= 0:
            return
        lost = min(excess, reversal.credits_lost)
        pending = min(excess - lost, reversal.credits_pending)
        if pending:
            claim_drop(organization=reversal.organization, amount=pending)
        back = min(excess - lost - pending, reversal.credits_clawed_back)
        keep = reversal.credits_clawed_back - back
        retaken = (
            _clawbacks_refit(
                reversal=reversal, lot=lot, keep=keep, key=f"{reversal.key}:refit:{reinstated.pk}"
            )
            if back
            else keep
        )
        # What could not be taken again is, as at its clawback, held by work placed before
        # it (the lots' burn order changed since: other credits it would have burned are
        # spent), waiting for that work, claimed as apply claims it; the rest (expired
        # since) is lost.
        waits = _held_claim(reversal, lot=lot, amount=keep - retaken)
        PaymentReversal.objects.filter(pk=reversal.pk).update(
            credits_lost=reversal.credits_lost - lost + (keep - retaken - waits),
            credits_pending=reversal.credits_pending - pending + waits,
            credits_clawed_back=retaken,
        )
        excess -= lost + pending + back


def _clawbacks_refit(*, reversal: PaymentReversal, lot: CreditLot, keep: int, key: str) -> int:
    """Reverse what the reversal's clawbacks took and take `keep` of it again (family of
    `lot`, as its clawback took it); returns what it holds taken now.

    Plan credits a clawback took before a period change were away from that rollover's
    cap (it recorded them on its carry): what comes back of them beyond what the reversal
    keeps fills the cap the rollover left unused and the rest expires, as when a dispute
    is won (`rollover_refit_trim`). The carries are locked after the wallet here, which
    cannot deadlock: everything that locks carries holds the seller's lock first, as the
    reinstatement does."""
    from gymbilling.market.rollover import rollover_carries_for_clawbacks, rollover_refit_trim

    taken = list(
        JournalTransaction.objects.filter(
            organization=reversal.organization, reversed_by__isnull=True
        )
        .filter(clawbacks_under(reversal.key))
        .order_by("pk")
    )
    carries = rollover_carries_for_clawbacks([t.pk for t in taken])
    for original in taken:
        transaction_reverse(
            original=original,
            reason=f"{reversal.kind} of {reversal.stripe_charge_id}: took more than its money "
            "paid for once an earlier reversal of the charge was given back",
        )
    # Work placed since the reversal shelters none of it (its claim kept it off them).
    retaken = (
        lot_clawback(
            lot=lot,
            amount=keep,
            key=key,
            memo=f"{reversal.kind} of {reversal.stripe_charge_id}: what its money paid for",
            family=True,
            holds_placed_before=reversal.created_at,
        )
        if keep
        else 0
    )
    rollover_refit_trim(
        organization=reversal.organization,
        carries=carries,
        clawback_ids=[t.pk for t in taken],
        retake=JournalTransaction.objects.filter(idempotency_key=f"clawback:{key}").first(),
        key=key,
        now=timezone.now(),
    )
    return retaken


def payment_reversals_pending_settle(*, now: datetime | None = None) -> int:
    """Take back what refunds and disputes found held by running work, as it settles.

    A reversal that came while jobs held the payment's credits could not take
    them from under the jobs (their captures burn them). Every 10 seconds, each
    such reversal takes back what has come back to the wallet since (work
    started after the reversal shelters nothing, and the reversal's claim on
    the wallet kept it from holding them: metering's `claim_settle`); what the
    work spent, or what expired meanwhile, is a loss. Every hold ends within
    the hold TTL (the sweep's), so each reversal is done within about that.
    Returns the micro-credits taken back.
    """
    now = now or timezone.now()
    return each_isolated(
        PaymentReversal.objects.filter(credits_pending__gt=0).values_list("pk", flat=True),
        lambda pk: _reversal_pending_settle(reversal_id=pk, now=now),
        what="the pending settle of payment reversal",
    )


def _reversal_pending_settle(*, reversal_id: int, now: datetime) -> int:
    with transaction.atomic():
        reversal = PaymentReversal.objects.select_for_update().get(pk=reversal_id)
        if reversal.credits_pending <= 0:
            return 0
        lots = reversal_lots(reversal)
        if lots is None:
            raise LookupError(
                f"payment {reversal.stripe_payment_intent_id!r} bought no credits here"
            )
        pending = reversal.credits_pending
        # Keyed by what is pending: a take that moved credits changes it, and
        # one that moved nothing wrote nothing, so its key is free again. Pending only
        # goes down, except that a refit (another reversal of the charge given back,
        # `_standing_refit`) may raise it to a value an earlier take was keyed by: that
        # replay would take nothing and leave it pending for good. So the key also counts
        # the charge's reversals given back, which only grows, once per refit.
        refits = (
            PaymentReversal.objects.filter(
                stripe_charge_id=reversal.stripe_charge_id, reinstated_at__isnull=False
            )
            .exclude(pk=reversal.pk)
            .count()
        )
        taken, still = claim_settle(
            organization=reversal.organization,
            lots=lots,
            pending=pending,
            key=f"{reversal.key}:pending:{pending}" + (f":refits:{refits}" if refits else ""),
            memo=f"{reversal.kind} of {reversal.stripe_charge_id}, once running work settled",
            # Work started since cannot shelter them: it burns other lots.
            placed_before=reversal.created_at,
            now=now,
            claimed_by_others=_pending_besides(reversal),
        )
        PaymentReversal.objects.filter(pk=reversal.pk).update(
            credits_clawed_back=F("credits_clawed_back") + taken,
            credits_lost=F("credits_lost") + (pending - taken - still),
            credits_pending=still,
        )
        return taken
