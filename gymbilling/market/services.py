"""Marketplace writes: listings, orders, payment, release, expiry, payouts, reversals.

Lock order, everywhere (STYLE.md 12): the seller's market lock (`seller_lock`,
taken by what opens listings, what must see all of a seller's listings, and
what gives reserved credits back to sellers; several sellers' in primary-key
order), then a charge's reversal lock (billing's `stripe-charge:<id>`), then
listing rows (primary-key order), then the order row, then
fills (primary-key order), then the order's marketplace reversals (primary-key
order), then the sellers' payment reversals (billing's
refunds and disputes, primary-key order), then rollover carries (primary-key order), then
ledger accounts (primary-key order), then credit lots (primary-key order), then money
accounts (primary-key order). Primary-key order across the whole transaction, not one
posting: metering's `post` and `money_post` order the accounts of the posting they make,
and a service that posts fill by fill (fills come in price or fill order, not in their
sellers' account order) would otherwise lock one order's sellers in the opposite order
of another's, and deadlock with it. So a service that posts more than once first locks
every ledger account it may post to in one statement (`accounts_lock`), and before its
first money posting every seller money account (`money_accounts_lock`); its money
postings come after all its credit work. Billing's refunds and disputes keep it
too (gymbilling.services.payments): `payment_reversal_apply` and
`payment_reversal_reinstate` take the seller's lock, then the charge's, then lock
every reversal row they will touch before any ledger account; the pending sweep
locks one reversal row, then ledger accounts. The marketplace's own refunds and
disputes likewise: `_reversal_apply` and `_reinstatement_apply` lock the order,
its fills, then every reversal of the order they will touch, before any ledger
account; their pending sweep (`_reversal_pending_settle`) locks one reversal
row, then ledger accounts. A payout Stripe refused (`_payout_fail`) locks the
payout, its fills, then the reversals whose losses it recovers, before the
seller's money account; finance marking one paid at Stripe after all
(`payout_mark_paid`) locks the payout, its fills, then the reversals whose seller
shares it books as losses again, before money accounts. A payout's
send lock (`payout_send`: a session lock held across its Stripe calls; finance's Retry
and mark-paid take the refused payout's) is taken with no transaction open, before any
row. A payout's record (`_payout_record`) locks the seller's available fills, then their
billing customer row (the row `resale_freeze` locks), then money accounts; finance's Retry
locks that row before the refused payouts it releases. `_reversal_apply` freezes the buyer
last, holding the order's fills and its sellers' money accounts: never the buyer's own
fills or money account (nobody buys their own listing), which are all a record of the
buyer's payout holds or waits for around that row. A reversal row is never locked
while a ledger or money account is held. No Stripe call is made inside a transaction:
an order is reserved and committed, then
Checkout is created, then recorded; if Stripe fails in between, the reservation
is released by compensating transfers.
Organization rows are never locked here (`select_for_update(of=("self",))`
where a query joins them): every row that references an organization takes a
KEY SHARE lock on it at COMMIT, so locking a buyer's or seller's row would
hold up, and deadlock with, their metering (holds, settlements, grants).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, F, OuterRef, Q, Sum
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import Organization, Standing
from accounts.services import audit_record
from gymbilling import stripe_client
from gymbilling.locks import session_lock, transaction_lock
from gymbilling.market.escrow import (
    credits_expire_early,
    credits_move,
    expired_sweep,
    lots_remaining,
    unexpired,
)
from gymbilling.market.money import (
    MoneyInsufficient,
    money_account,
    money_accounts_lock,
    money_post,
)
from gymbilling.market.rollover import (
    rollover_carries_claiming,
    rollover_carries_for_fills,
    rollover_carry_open,
    rollover_release_trim,
)
from gymbilling.market.rules import fill_amount, platform_fee, refund_split, share_ceil
from gymbilling.market.selectors import shortfall_refund_owed
from gymbilling.models import (
    SELLER_KINDS,
    BillingCustomer,
    CheckoutKind,
    CheckoutSession,
    FillStatus,
    ListingLot,
    ListingStatus,
    MarketFill,
    MarketListing,
    MarketOrder,
    MarketPayout,
    MarketReversal,
    MoneyAccount,
    MoneyAccountKind,
    MoneyEntry,
    MoneyTransaction,
    MoneyTransactionKind,
    OrderStatus,
    PayoutMethod,
    PayoutStatus,
    ProceedsState,
)
from gymbilling.sweeps import each_isolated
from metering.models import AccountKind, CreditLot, LotSource
from metering.services import (
    claim_drop,
    claim_settle,
    clawbacks_reverse,
    credits_claim,
    credits_trim,
    lot_clawback,
)
from metering.services.ledger import organization_account
from metering.services.postings import (
    MAX_MOVEMENT,
    accounts_lock,
    amount_display,
    retry_on_deadlock,
)

logger = logging.getLogger(__name__)

# Only these credits may be sold: paid for with a subscription (not packs,
# promotions, adjustments, overage, nor credits bought on the marketplace).
RESELLABLE = Q(resellable=True, paid=True, source=LotSource.SUBSCRIPTION)


# --- validation ---------------------------------------------------------------------


def _int(value, *, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ApplicationError(
            code="invalid_request", message=f"{param} must be an integer.", param=param
        )
    return value


def _require_quantity(quantity: int, *, minimum: int, param: str = "quantity") -> None:
    _int(quantity, param=param)
    if quantity <= 0:
        raise ApplicationError(
            code="invalid_quantity",
            message=f"{param} must be a positive number of micro-credits; got {quantity}.",
            param=param,
        )
    if quantity > MAX_MOVEMENT:  # the ledger's bound; past it a quantity outgrows BIGINT
        raise ApplicationError(
            code="invalid_quantity",
            message=f"{param} may be at most {MAX_MOVEMENT} micro-credits; got {quantity}.",
            param=param,
        )
    if quantity < minimum:
        raise ApplicationError(
            code="quantity_below_minimum",
            message=f"{param} must be at least {minimum} micro-credits ({amount_display(minimum)} credits).",
            param=param,
        )


def _require_price(price: int, *, param: str) -> None:
    _int(price, param=param)
    floor, ceiling = settings.MARKET_PRICE_FLOOR, settings.MARKET_PRICE_CEILING
    if not floor <= price <= ceiling:
        raise ApplicationError(
            code="price_out_of_bounds",
            message=f"{param} must be between {floor} and {ceiling} minor units per 1,000 credits.",
            param=param,
            extra={"floor": floor, "ceiling": ceiling},
        )


def _require_currency(currency: str) -> str:
    currency = str(currency or "").lower()
    if currency not in settings.MARKET_CURRENCIES:
        raise ApplicationError(
            code="unsupported_currency",
            message=f"The marketplace trades in {', '.join(settings.MARKET_CURRENCIES)}.",
            param="currency",
        )
    return currency


def seller_eligibility(organization: Organization) -> str | None:
    """Why the organization may not sell now, or None."""
    if organization.standing != Standing.ACTIVE:
        return f"the organization's standing is {organization.standing}"
    frozen = (
        BillingCustomer.objects.filter(organization=organization, resale_frozen_at__isnull=False)
        .values_list("resale_frozen_reason", flat=True)
        .first()
    )
    if frozen is not None:
        return f"reselling is frozen ({frozen or 'a refund or dispute'})"
    return None


def _listing_lots(listing: MarketListing) -> Q:
    return Q(market_listing_lot__listing=listing)


def seller_lock(seller: Organization) -> None:
    """Until the transaction ends, no other listing of this seller can be opened.

    Taken first by `listing_create` (which checks the resale freeze under
    it), and by whoever must see every listing of the seller (a freeze's
    withdrawal, the rollover cap): a listing is then either committed before
    they look, or created after them, from what they left. First: a listing's
    insert takes a key-share lock on the organization's row, so whoever locks
    that row (a subscription's sync, before its rollover) takes this before.
    """
    sellers_lock([seller.pk])


def sellers_lock(seller_ids) -> None:
    """`seller_lock` of several sellers, in primary-key order (one order's sellers)."""
    for pk in sorted(set(seller_ids)):
        transaction_lock(f"market-seller:{pk}")


def buyer_lock(buyer: Organization) -> None:
    """Until the transaction ends, no other order of this buyer can be reserved: taken first
    by `order_reserve`, so that its count of the buyer's pending orders stays exact (two
    orders racing for the last slot cannot both take it). Taken by nothing else."""
    transaction_lock(f"market-buyer:{buyer.pk}")


# --- listings -------------------------------------------------------------------------


@retry_on_deadlock
def listing_create(
    *, seller: Organization, quantity: int, price_per_1k: int, currency: str
) -> MarketListing:
    """Move `quantity` of the seller's resellable credits into escrow and offer them."""
    _require_quantity(quantity, minimum=settings.MARKET_MIN_LISTING_QUANTITY)
    _require_price(price_per_1k, param="price_per_1k")
    currency = _require_currency(currency)
    now = timezone.now()
    with transaction.atomic():
        # Serializes this seller's listings, so the daily limit below cannot
        # be raced past, and none is opened while the rollover counts them.
        seller_lock(seller)
        # Under the lock: a refund's freeze commits before it withdraws the
        # listings, and the withdrawal waits for this lock, so either this
        # sees the freeze or the withdrawal sees this listing.
        why = seller_eligibility(seller)
        if why:
            raise ApplicationError(
                code="resale_not_allowed",
                message=f"This organization cannot list credits: {why}.",
                status=403,
            )
        wallet = organization_account(seller, AccountKind.WALLET)
        escrow = organization_account(seller, AccountKind.ESCROW)
        # The resellable credits counted below stay there until they move.
        accounts_lock(wallet)
        since = now - timedelta(days=1)
        today = MarketListing.objects.filter(seller=seller, created_at__gte=since).count()
        if today >= settings.MARKET_LISTINGS_PER_DAY:
            raise ApplicationError(
                code="listing_limit_reached",
                message=f"At most {settings.MARKET_LISTINGS_PER_DAY} listings per 24 hours; try again later.",
                status=429,
            )
        resellable = lots_remaining(lots=Q(account=wallet) & RESELLABLE, now=now)
        if resellable < quantity:
            raise ApplicationError(
                code="insufficient_resellable_credits",
                message=(
                    f"Only {resellable} micro-credits are resellable (paid subscription credits); "
                    f"{quantity} were asked for."
                ),
                status=402,
                param="quantity",
                extra={"available": resellable},
            )
        txn, lots = credits_move(
            key=f"market:list:{uuid.uuid4()}",
            organization=seller,
            from_account=wallet,
            to_account=escrow,
            to_organization=seller,
            amount=quantity,
            lots=RESELLABLE,
            now=now,
            memo="marketplace listing",
        )
        listing = MarketListing.objects.create(
            seller=seller,
            currency=currency,
            price_per_1k=price_per_1k,
            quantity=quantity,
            expires_at=min((lot.expires_at for lot in lots if lot.expires_at), default=None),
            list_transaction=txn,
        )
        ListingLot.objects.bulk_create(ListingLot(listing=listing, lot=lot) for lot in lots)
    return listing


def _listing_close_if_done(listing: MarketListing, *, now: datetime) -> None:
    """An open listing with nothing left to sell and nothing reserved ends (caller holds its lock)."""
    if listing.status != ListingStatus.OPEN:
        return
    if listing.fills.filter(status=FillStatus.RESERVED).exists():
        return
    if lots_remaining(lots=_listing_lots(listing), now=now) > 0:
        return
    escrow = organization_account(listing.seller, AccountKind.ESCROW)
    expired_sweep(account=escrow, lots=_listing_lots(listing), now=now)
    listing.status = (
        ListingStatus.SOLD_OUT if listing.sold == listing.quantity else ListingStatus.EXPIRED
    )
    listing.closed_at = now
    MarketListing.objects.filter(pk=listing.pk).update(status=listing.status, closed_at=now)


@retry_on_deadlock
def listing_cancel(
    *, seller: Organization, listing_id: int, now: datetime | None = None
) -> MarketListing:
    """End the listing: its unsold, unreserved, unexpired credits go back to the wallet.

    Credits reserved by a buyer's order in flight stay with that order: paid,
    they are delivered; released, they go to the seller's wallet.
    """
    now = now or timezone.now()
    with transaction.atomic():
        listing = (
            MarketListing.objects.select_for_update(of=("self",))
            .filter(pk=listing_id, seller=seller)
            .select_related("seller")
            .first()
        )
        if listing is None:
            raise ApplicationError(
                code="not_found",
                message="No such listing among yours.",
                status=404,
                param="listing_id",
            )
        if listing.status != ListingStatus.OPEN:
            raise ApplicationError(
                code="listing_not_open",
                message=f"This listing is already {listing.status}.",
                status=409,
            )
        escrow = organization_account(seller, AccountKind.ESCROW)
        wallet = organization_account(seller, AccountKind.WALLET)
        # Both now, in primary-key order (the lock order above): the sweep would take
        # the escrow alone, before the move takes the wallet with it.
        accounts_lock(escrow, wallet)
        # Expired credits go to the expiry account, never back to the seller.
        expired_sweep(account=escrow, lots=_listing_lots(listing), now=now)
        back = lots_remaining(lots=_listing_lots(listing), now=now)
        if back:
            credits_move(
                key=f"market:cancel:{listing.pk}",
                organization=seller,
                from_account=escrow,
                to_account=wallet,
                to_organization=seller,
                amount=back,
                lots=_listing_lots(listing),
                now=now,
                memo=f"marketplace listing {listing.pk} canceled",
            )
        listing.status = ListingStatus.CANCELED
        listing.closed_at = now
        MarketListing.objects.filter(pk=listing.pk).update(status=listing.status, closed_at=now)
    return listing


def listings_withdraw_all(*, seller: Organization) -> int:
    """End every open listing of a seller whose reselling was frozen (a refund or dispute).

    Their unsold credits return to the wallet, where the clawback of the
    reversed payment can reach them; reserved credits stay with their orders.
    The freeze is committed before this runs.
    """
    with transaction.atomic():
        # A listing_create that passed the freeze check holds the seller's
        # lock until its listing is committed: waiting for it here lets the
        # query see that listing; one that comes after sees the freeze.
        seller_lock(seller)
        open_ids = list(
            MarketListing.objects.filter(seller=seller, status=ListingStatus.OPEN).values_list(
                "pk", flat=True
            )
        )
    ended = 0
    for listing_id in open_ids:
        try:
            listing_cancel(seller=seller, listing_id=listing_id)
            ended += 1
        except ApplicationError as exc:
            if exc.code != "listing_not_open":  # ended meanwhile: nothing to do
                raise
    return ended


def credits_trim_with_listings(
    *, seller: Organization, keep: int, key: str, memo: str, now: datetime | None = None
) -> int:
    """The rollover cap over the seller's subscription credits, in the wallet or listed.

    Listed credits are escrow lots, out of reach of metering's wallet trim:
    listed just before a period ends and taken back after it, they would all
    roll over. So the wallet is trimmed to what the open listings leave of
    `keep`; what the wallet cannot give (it holds less, or pending holds will
    burn it) comes out of the listings, in burn order, to the expiry account,
    and a listing left with nothing ends. A listing keeps its lots and its
    price: its available quantity is what its lots still hold. Credits a
    buyer's pending order reserved are in the buyer's escrow, neither counted
    nor taken here: paid, they are sold; released, they come back to the
    listing or the wallet, less what this cap would have taken of them had
    they been counted (rollover.py records what it left for them, and
    `order_release` trims them as they come back). So do credits a dispute
    clawed back, if it is won. Credits a pending refund or dispute waits for
    that running work gave back since are its own: it takes them first, as
    its sweep would, and the cap counts what it leaves. Returns the
    micro-credits expired.
    """
    from gymbilling.services.payments import (
        payment_reversals_pending_locked,
        payment_reversals_pending_take,
    )

    now = now or timezone.now()
    with transaction.atomic():
        seller_lock(seller)
        listings = list(
            MarketListing.objects.select_for_update()
            .filter(seller=seller, status=ListingStatus.OPEN)
            .order_by("pk")
        )
        # Before the ledger's accounts (the lock order above): the refunds and disputes
        # still waiting for credits, then the rollovers still claiming held ones, whose
        # claims rollover_carry_open fits again to what these trims leave.
        pending = payment_reversals_pending_locked(organization=seller)
        claiming = rollover_carries_claiming(organization=seller)
        wallet = organization_account(seller, AccountKind.WALLET)
        escrow = organization_account(seller, AccountKind.ESCROW)
        # Counted and trimmed under both accounts' locks, which the minute's
        # expiry sweep takes: a lot it expired between this count and the
        # trims would be expired by it and counted over the cap by these too,
        # and the seller would end below the cap by that lot.
        accounts_lock(wallet, escrow)
        # Money first: what a refund waits for that the jobs gave back since (its sweep,
        # every 10 seconds, may be late: beat down across the period end) is its own, not
        # the member's to keep a cap of. Trimmed first, the cap would expire it, and the
        # refund would take what the cap left (the member ends with none of it, and the
        # refund books the rest lost).
        payment_reversals_pending_take(reversals=pending, now=now)
        listed_lots = Q(market_listing_lot__listing__in=listings, source=LotSource.SUBSCRIPTION)
        listed = lots_remaining(lots=listed_lots, now=now)
        expired = credits_trim(
            organization=seller,
            source=LotSource.SUBSCRIPTION,
            keep=max(0, keep - listed),
            key=key,
            memo=memo,
        )
        in_wallet = lots_remaining(lots=Q(account=wallet, source=LotSource.SUBSCRIPTION), now=now)
        over = min(listed, in_wallet + listed - keep)
        if over > 0:
            expired += credits_expire_early(
                key=f"{key}:listed",
                organization=seller,
                account=escrow,
                amount=over,
                lots=listed_lots,
                now=now,
                memo=memo,
            )
            for listing in listings:
                _listing_close_if_done(listing, now=now)
        # Under the same locks: what it leaves of the cap for credits that
        # were away (reserved by buyers, clawed back by disputes) or held, and
        # what the older rollovers still claim of what these trims left.
        rollover_carry_open(
            organization=seller, key=key, keep=keep, memo=memo, now=now, claiming=claiming
        )
    return expired


def listings_expire(*, now: datetime | None = None) -> int:
    """Sweep listings whose credits have (partly) expired; end those with nothing left."""
    now = now or timezone.now()
    due = (
        MarketListing.objects.filter(status=ListingStatus.OPEN)
        .filter(
            Q(lots__lot__remaining__gt=0, lots__lot__expires_at__lte=now)
            | ~Q(pk__in=ListingLot.objects.filter(lot__remaining__gt=0).values("listing_id"))
        )
        .values_list("pk", flat=True)
        .distinct()
    )
    closed = 0
    for pk in sorted(set(due)):
        closed += _listing_expire_one(listing_id=pk, now=now)
    return closed


@retry_on_deadlock
def _listing_expire_one(*, listing_id: int, now: datetime) -> int:
    with transaction.atomic():
        listing = (
            MarketListing.objects.select_for_update(of=("self",))
            .select_related("seller")
            .get(pk=listing_id)
        )
        if listing.status != ListingStatus.OPEN:
            return 0
        expired_sweep(
            account=organization_account(listing.seller, AccountKind.ESCROW),
            lots=_listing_lots(listing),
            now=now,
        )
        _listing_close_if_done(listing, now=now)
        return int(listing.status != ListingStatus.OPEN)


# --- orders -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Take:
    listing: MarketListing
    quantity: int


def _insufficient(available: int, quantity: int) -> ApplicationError:
    return ApplicationError(
        code="insufficient_liquidity",
        message=(
            f"Only {available} micro-credits are offered at or below your maximum price; "
            f"{quantity} were asked for. Raise max_price_per_1k, order less, or try later."
        ),
        status=409,
        param="quantity",
        extra={"available": available},
    )


@retry_on_deadlock
def order_reserve(
    *,
    buyer: Organization,
    quantity: int,
    max_price_per_1k: int,
    currency: str,
    listing_id: int | None = None,
    allow_partial: bool = False,
    now: datetime | None = None,
) -> MarketOrder:
    """Reserve the cheapest offers up to `max_price_per_1k`, across listings.

    All or nothing unless `allow_partial`. Each fill moves its credits from
    the seller's escrow to the buyer's escrow in one journal transaction, so
    a credit reserved here can be neither reserved again nor canceled by the
    seller until this order is paid or released.
    """
    _require_quantity(quantity, minimum=1)
    _require_price(max_price_per_1k, param="max_price_per_1k")
    currency = _require_currency(currency)
    if buyer.standing == Standing.SUSPENDED:
        raise ApplicationError(
            code="organization_suspended",
            message="A suspended organization cannot buy on the marketplace.",
            status=403,
        )
    now = now or timezone.now()
    with transaction.atomic():
        # Each pending order keeps its credits off the market until paid or released
        # (MARKET_RESERVATION_TTL): without a cap, a buyer who never pays could hold the
        # whole book, order after order. Counted under the buyer's lock, first.
        buyer_lock(buyer)
        cap = settings.MARKET_PENDING_ORDERS_PER_BUYER
        if MarketOrder.objects.filter(buyer=buyer, status=OrderStatus.PENDING).count() >= cap:
            raise ApplicationError(
                code="pending_order_limit_reached",
                message=f"At most {cap} of your orders may await payment at once. Pay for one, or "
                "wait until one's reservation runs out, then order again.",
                status=429,
            )
        if listing_id is not None:
            listing = MarketListing.objects.filter(pk=listing_id, status=ListingStatus.OPEN).first()
            if listing is None:
                raise ApplicationError(
                    code="listing_not_found",
                    message="No such open listing.",
                    status=404,
                    param="listing",
                )
            if listing.seller_id == buyer.pk:
                raise ApplicationError(
                    code="own_listing",
                    message="You cannot buy your own listing; cancel it to get the credits back.",
                    param="listing",
                )
            if listing.currency != currency:
                raise ApplicationError(
                    code="currency_mismatch",
                    message=f"This listing is priced in {listing.currency}.",
                    param="currency",
                )
            candidate_ids = [listing.pk] if listing.price_per_1k <= max_price_per_1k else []
        else:
            # Only listings with credits on offer now: one reserved to its last credit
            # (or all expired) would take a place among the first few and hide
            # the offers behind it.
            on_offer = CreditLot.objects.filter(
                _listing_lots(OuterRef("pk")), remaining__gt=0
            ).filter(unexpired(now))
            candidate_ids = list(
                MarketListing.objects.filter(
                    status=ListingStatus.OPEN, currency=currency, price_per_1k__lte=max_price_per_1k
                )
                .filter(Exists(on_offer))
                .exclude(seller=buyer)
                .order_by("price_per_1k", "pk")
                .values_list("pk", flat=True)[: settings.MARKET_ORDER_MAX_LISTINGS]
            )
        locked = list(
            MarketListing.objects.select_for_update(of=("self",))
            .filter(pk__in=candidate_ids, status=ListingStatus.OPEN)
            .select_related("seller")
            .order_by("pk")
        )
        locked.sort(key=lambda each: (each.price_per_1k, each.pk))
        takes: list[_Take] = []
        need = quantity
        for listing in locked:
            if need == 0:
                break
            available = lots_remaining(lots=_listing_lots(listing), now=now)
            take = min(available, need)
            if take > 0:
                takes.append(_Take(listing=listing, quantity=take))
                need -= take
        reserved = quantity - need
        if reserved == 0 or (need and not allow_partial):
            raise _insufficient(reserved, quantity)
        amount_total = sum(
            fill_amount(quantity=t.quantity, price_per_1k=t.listing.price_per_1k) for t in takes
        )
        _require_chargeable(amount_total, currency)  # raised here, nothing is written
        order = MarketOrder.objects.create(
            buyer=buyer,
            currency=currency,
            quantity_requested=quantity,
            max_price_per_1k=max_price_per_1k,
            quantity=reserved,
            amount_total=amount_total,
            expires_at=now + settings.MARKET_RESERVATION_TTL,
        )
        buyer_escrow = organization_account(buyer, AccountKind.ESCROW)
        seller_escrows = {
            seller.pk: organization_account(seller, AccountKind.ESCROW)
            for seller in sorted({t.listing.seller for t in takes}, key=lambda org: org.pk)
        }
        # All of them now, in primary-key order (the lock order above): each transfer
        # orders only its own two accounts, and the takes come in price order, so fill
        # by fill two orders (or this and a release) of the same sellers would take
        # their escrow accounts in opposite orders, and deadlock.
        accounts_lock(buyer_escrow, *seller_escrows.values())
        for t in takes:
            txn, _ = credits_move(
                key=f"market:reserve:{order.pk}:{t.listing.pk}",
                organization=t.listing.seller,
                from_account=seller_escrows[t.listing.seller_id],
                to_account=buyer_escrow,
                to_organization=buyer,
                amount=t.quantity,
                lots=_listing_lots(t.listing),
                now=now,
                memo=f"marketplace order {order.pk} reserves listing {t.listing.pk}",
            )
            MarketFill.objects.create(
                order=order,
                listing=t.listing,
                seller=t.listing.seller,
                currency=currency,
                price_per_1k=t.listing.price_per_1k,
                quantity=t.quantity,
                amount=fill_amount(quantity=t.quantity, price_per_1k=t.listing.price_per_1k),
                reserve_transaction=txn,
            )
    return order


def _require_chargeable(amount: int, currency: str) -> None:
    """An order's total must be one Stripe can charge (MARKET_MIN_ORDER_AMOUNTS for its
    currency, MARKET_MAX_ORDER_AMOUNT): outside them the payment fails after the
    reservation, which no retry fixes. A traded currency always has a minimum: the system
    check gymbilling.E001 refuses to start without one."""
    low = settings.MARKET_MIN_ORDER_AMOUNTS.get(currency)
    if low is None:
        # Only a process started without `manage.py check` gets here (gunicorn
        # and Celery do not run the checks): refuse, and say what to set.
        logger.error("MARKET_MIN_ORDER_AMOUNTS has no minimum for %r (gymbilling.E001)", currency)
        raise ApplicationError(
            code="currency_not_configured",
            message=f"Orders in {currency} are not configured on this deployment.",
            status=503,
            param="currency",
        )
    high = settings.MARKET_MAX_ORDER_AMOUNT
    if low <= amount <= high:
        return
    side = "at least" if amount < low else "at most"
    bound = low if amount < low else high
    raise ApplicationError(
        code="amount_below_minimum" if amount < low else "amount_above_maximum",
        message=f"This order would cost {amount} {currency} minor units; a card payment is "
        f"{side} {bound}. Change the quantity.",
        param="quantity",
        extra={"amount": amount, "limit": bound},
    )


def _payments_unavailable() -> ApplicationError:
    return ApplicationError(
        code="payments_unavailable",
        message="The payment provider cannot be reached right now; nothing was reserved or charged. Try again in a minute.",
        status=503,
    )


def order_create(
    *,
    buyer: Organization,
    quantity: int,
    max_price_per_1k: int,
    currency: str,
    listing_id: int | None = None,
    allow_partial: bool = False,
) -> MarketOrder:
    """Reserve, then open a Stripe Checkout for the order's total.

    Stripe failing after the reservation releases it at once (compensating
    transfers back to the listings) and answers 503 `payments_unavailable`;
    anything else failing there releases it too, and its error goes on up.
    """
    if not stripe_client.configured():
        raise ApplicationError(
            code="billing_not_configured",
            message="Billing is not enabled on this deployment (STRIPE_SECRET_KEY is not set).",
            status=503,
        )
    from gymbilling.services import billing_customer_call
    from gymbilling.services.checkout import provider_refused

    order = order_reserve(
        buyer=buyer,
        quantity=quantity,
        max_price_per_1k=max_price_per_1k,
        currency=currency,
        listing_id=listing_id,
        allow_partial=allow_partial,
    )
    base = settings.SITE_URL.rstrip("/")
    metadata = {"market_order": str(order.pk), "organization_id": str(buyer.pk)}

    def checkout_open(customer) -> dict:
        return stripe_client.checkout_session_create(
            # The customer in the key: opened again for a customer that replaced one
            # deleted at Stripe (billing_customer_call), the first request's key would be
            # refused for its different parameters.
            key=f"market-order:{order.pk}:{customer.stripe_customer_id}",
            mode="payment",
            customer=customer.stripe_customer_id,
            line_items=[
                {
                    "price_data": {
                        "currency": order.currency,
                        "unit_amount": order.amount_total,
                        "product_data": {
                            "name": f"{amount_display(order.quantity)} credits (marketplace order {order.pk})"
                        },
                    },
                    "quantity": 1,
                }
            ],
            payment_intent_data={
                "metadata": metadata,
                "transfer_group": f"market-order-{order.pk}",
            },
            metadata=metadata,
            success_url=f"{base}/market/?order={order.pk}&checkout=success",
            cancel_url=f"{base}/market/?order={order.pk}&checkout=canceled",
        )

    try:
        session = billing_customer_call(organization=buyer, call=checkout_open)
        _order_checkout_record(order=order, buyer=buyer, session=session)
    except stripe_client.StripeUnavailable as exc:
        logger.warning("market order %s: checkout failed: %s", order.pk, exc)
        order_release(order_id=order.pk, status=OrderStatus.FAILED, code="payments_unavailable")
        raise _payments_unavailable() from exc
    except stripe_client.StripeRequestRefused as exc:
        # Stripe said no to this order's checkout: retrying will not change it.
        logger.warning("market order %s: checkout refused: %s", order.pk, exc)
        order_release(order_id=order.pk, status=OrderStatus.FAILED, code="payment_provider_refused")
        raise provider_refused(exc) from exc
    except Exception:
        # Anything else (a bug, a response we cannot read, the database): the
        # buyer gets an error and no checkout to pay, so the credits must not
        # stay reserved for them until orders_expire.
        logger.exception("market order %s: checkout failed", order.pk)
        order_release(order_id=order.pk, status=OrderStatus.FAILED, code="checkout_failed")
        raise
    order.refresh_from_db()
    return order


def _order_checkout_record(*, order: MarketOrder, buyer: Organization, session: dict) -> None:
    """Link the order to its Checkout session: the session's events find the order by it."""
    with transaction.atomic():
        checkout = CheckoutSession.objects.create(
            stripe_session_id=session["id"],
            organization=buyer,
            kind=CheckoutKind.MARKET_ORDER,
            url=session.get("url") or "",
            amount_total=order.amount_total,
            currency=order.currency,
        )
        MarketOrder.objects.filter(pk=order.pk).update(
            checkout=checkout, checkout_url=session.get("url") or ""
        )


def _order_locked(order_id: int) -> tuple[MarketOrder, list[MarketFill], dict[int, MarketListing]]:
    """Lock the order's listings (pk order), then the order, then its fills."""
    listing_ids = sorted(
        set(MarketFill.objects.filter(order_id=order_id).values_list("listing_id", flat=True))
    )
    listings = {
        each.pk: each
        for each in MarketListing.objects.select_for_update(of=("self",))
        .filter(pk__in=listing_ids)
        .select_related("seller")
        .order_by("pk")
    }
    order = (
        MarketOrder.objects.select_for_update(of=("self",)).select_related("buyer").get(pk=order_id)
    )
    fills = list(MarketFill.objects.select_for_update().filter(order=order).order_by("pk"))
    for fill in fills:
        fill.listing = listings[fill.listing_id]
    return order, fills, listings


@retry_on_deadlock
def order_release(*, order_id: int, status: str, code: str, now: datetime | None = None) -> bool:
    """Give a pending order's reserved credits back; False when it was no longer pending.

    To the listing while it is open, else (canceled, ended) to the seller's
    wallet. Reserved credits that expired meanwhile go to the expiry account,
    and so does what a rollover the reservation missed would have trimmed
    (rollover.py).
    """
    from gymbilling.services.payments import (
        payment_reversals_lost_locked,
        payment_reversals_reclaim,
    )

    now = now or timezone.now()
    with transaction.atomic():
        # First, as the rollover does: it either counted these credits as
        # the seller's (released before), or left a carry that this sees.
        sellers_lock(
            MarketFill.objects.filter(order_id=order_id).values_list("seller_id", flat=True)
        )
        order, fills, listings = _order_locked(order_id)
        if order.status != OrderStatus.PENDING:
            return False
        # Refunds of the sellers' payments that counted these reserved credits
        # lost: they take back what comes home to a wallet (before its lock).
        lost = payment_reversals_lost_locked(organizations=[fill.seller_id for fill in fills])
        reserved = [fill for fill in fills if fill.status == FillStatus.RESERVED]
        rollover_carries_for_fills(reserved)
        buyer_escrow = organization_account(order.buyer, AccountKind.ESCROW)
        # Where each listing's credits go back to: the listing while it is open, else the
        # seller's wallet. With the buyer's escrow, every account the releases below post
        # to, locked now in primary-key order (the lock order above): fill by fill, this
        # and an order reserving from the same sellers in another order would take their
        # accounts in opposite orders, and deadlock.
        homes = {
            listing.pk: organization_account(
                listing.seller,
                AccountKind.ESCROW if listing.status == ListingStatus.OPEN else AccountKind.WALLET,
            )
            for listing in listings.values()
        }
        accounts_lock(buyer_escrow, *homes.values())
        for fill in reserved:
            reserved_lots = Q(created_by_id=fill.reserve_transaction_id)
            expired_sweep(account=buyer_escrow, lots=reserved_lots, now=now)
            fill.order = order
            rollover_release_trim(fill=fill, now=now)
            back = lots_remaining(lots=Q(account=buyer_escrow) & reserved_lots, now=now)
            txn = None
            if back:
                listing = fill.listing
                to_listing = listing.status == ListingStatus.OPEN
                txn, lots = credits_move(
                    key=f"market:release:{fill.pk}",
                    organization=order.buyer,
                    from_account=buyer_escrow,
                    to_account=homes[listing.pk],
                    to_organization=listing.seller,
                    amount=back,
                    lots=reserved_lots,
                    now=now,
                    memo=f"marketplace order {order.pk} released ({code})",
                )
                if to_listing:
                    ListingLot.objects.bulk_create(
                        ListingLot(listing=listing, lot=lot) for lot in lots
                    )
                elif lost:
                    payment_reversals_reclaim(reversals=lost, lots=lots, key=f"fill:{fill.pk}")
            MarketFill.objects.filter(pk=fill.pk).update(
                status=FillStatus.RELEASED, settle_transaction=txn, settled_at=now
            )
        MarketOrder.objects.filter(pk=order.pk).update(
            status=status, failure_code=code, closed_at=now
        )
        for listing in listings.values():
            _listing_close_if_done(listing, now=now)
    return True


@retry_on_deadlock
def order_pay(*, order_id: int, payment_intent_id: str, now: datetime | None = None) -> MarketOrder:
    """Deliver a paid order's reserved credits and book the sale, once.

    Credits that expired while reserved are not delivered; neither is
    anything of an order already released (paid after its reservation timed
    out). What was paid for and not delivered is refunded (`shortfall_amount`).
    """
    now = now or timezone.now()
    with transaction.atomic():
        order, fills, listings = _order_locked(order_id)
        if order.stripe_payment_intent_id:
            return order  # already applied
        buyer = order.buyer
        buyer_escrow = organization_account(buyer, AccountKind.ESCROW)
        buyer_wallet = organization_account(buyer, AccountKind.WALLET)
        holding = settings.MARKET_PAYOUT_HOLDING
        reserved = [fill for fill in fills if fill.status == FillStatus.RESERVED]
        if reserved:
            # Every ledger account this may post to, before the first posting, in
            # primary-key order (the lock order above): the buyer's escrow (an expiry
            # sweep of it comes first) and wallet, and the escrow of each open listing's
            # seller, which closing a listing sweeps.
            accounts_lock(
                buyer_escrow,
                buyer_wallet,
                *(
                    organization_account(listing.seller, AccountKind.ESCROW)
                    for listing in listings.values()
                    if listing.status == ListingStatus.OPEN
                ),
            )
        delivered_total = 0
        sales: list[tuple[MarketFill, int, int]] = []
        for fill in reserved:
            reserved_lots = Q(created_by_id=fill.reserve_transaction_id)
            expired_sweep(account=buyer_escrow, lots=reserved_lots, now=now)
            deliver = lots_remaining(lots=Q(account=buyer_escrow) & reserved_lots, now=now)
            txn = None
            gross = fee = 0
            if deliver:
                txn, _ = credits_move(
                    key=f"market:deliver:{fill.pk}",
                    organization=buyer,
                    from_account=buyer_escrow,
                    to_account=buyer_wallet,
                    to_organization=buyer,
                    amount=deliver,
                    lots=reserved_lots,
                    now=now,
                    lot_source=LotSource.MARKETPLACE,
                    resellable=False,
                    memo=f"marketplace order {order.pk}: listing {fill.listing_id}",
                )
                gross = min(
                    fill.amount, fill_amount(quantity=deliver, price_per_1k=fill.price_per_1k)
                )
                fee = platform_fee(gross=gross, fee_bps=settings.MARKET_FEE_BPS)
                sales.append((fill, gross, fee))
                MarketListing.objects.filter(pk=fill.listing_id).update(
                    sold=fill.listing.sold + deliver
                )
                fill.listing.sold += deliver
            delivered_total += gross
            MarketFill.objects.filter(pk=fill.pk).update(
                status=FillStatus.DELIVERED,
                delivered_quantity=deliver,
                gross=gross,
                fee=fee,
                proceeds=ProceedsState.PENDING if gross else ProceedsState.NONE,
                available_at=now + holding if gross else None,
                settle_transaction=txn,
                settled_at=now,
            )
        for listing in listings.values():
            _listing_close_if_done(listing, now=now)
        _sales_book(sales, currency=order.currency)
        updates = {
            "stripe_payment_intent_id": payment_intent_id,
            "shortfall_amount": order.amount_total - delivered_total,
        }
        if order.status == OrderStatus.PENDING:
            updates |= {"status": OrderStatus.PAID, "closed_at": now}
        MarketOrder.objects.filter(pk=order.pk).update(**updates)
        if updates["shortfall_amount"]:
            transaction.on_commit(lambda: order_shortfall_refund(order_id=order.pk))
    order.refresh_from_db()
    return order


def _system_accounts(currency: str) -> dict[str, MoneyAccount]:
    """The platform's money accounts in a currency, read once for a loop over fills."""
    return {
        kind: money_account(kind=kind, currency=currency)
        for kind in (
            MoneyAccountKind.BUYER_CLEARING,
            MoneyAccountKind.PLATFORM_FEES,
            MoneyAccountKind.LOSSES,
        )
    }


def _sales_book(sales: list[tuple[MarketFill, int, int]], *, currency: str) -> None:
    """Book each (fill, gross, fee) of an order once its credits are delivered: money after
    the credit ledger (the lock order above), every seller's pending proceeds account locked
    first, in primary-key order (the fills' order is the price's, so fill by fill two orders
    of the same sellers would lock them in opposite orders, and deadlock)."""
    if not sales:
        return
    system = _system_accounts(currency)  # a fill's currency is its order's
    # Opened (on a first sale) in the sellers' order too: two orders opening the same
    # accounts wait for each other's inserts in that order.
    pending = {
        fill.seller_id: money_account(
            kind=MoneyAccountKind.SELLER_PENDING, currency=currency, organization=fill.seller
        )
        for fill, _, _ in sorted(sales, key=lambda sale: sale[0].seller_id)
    }
    money_accounts_lock(pending.values())
    for fill, gross, fee in sales:
        _book_sale(fill=fill, gross=gross, fee=fee, pending=pending[fill.seller_id], system=system)


def _book_sale(
    *,
    fill: MarketFill,
    gross: int,
    fee: int,
    pending: MoneyAccount,
    system: dict[str, MoneyAccount],
) -> None:
    """The buyer's money for one fill into the seller's pending proceeds, less the fee."""
    cur = fill.currency
    money_post(
        kind=MoneyTransactionKind.SALE,
        key=f"sale:{fill.pk}",
        currency=cur,
        organization=fill.seller,
        fill=fill,
        postings=[
            (system[MoneyAccountKind.BUYER_CLEARING], -gross),
            (pending, gross),
        ],
        memo=f"order {fill.order_id} listing {fill.listing_id}",
    )
    if fee:
        money_post(
            kind=MoneyTransactionKind.FEE,
            key=f"fee:{fill.pk}",
            currency=cur,
            organization=fill.seller,
            fill=fill,
            postings=[
                (pending, -fee),
                (system[MoneyAccountKind.PLATFORM_FEES], fee),
            ],
            memo=f"{settings.MARKET_FEE_BPS} bps of {gross}",
        )


def stripe_refusal_is_final(exc: stripe_client.StripeRequestRefused) -> bool:
    """Whether Stripe will refuse the same request again, whenever it is sent.

    A refusal of the request itself (400, 402, 404: `charge_already_refunded`,
    `amount_too_large`, a currency or destination Stripe will not take) is
    final until someone changes something: sending it again every run only
    hides it. 401 and 403 are our credentials or the account's permissions,
    not the request: fixed once for every request, so they are retried.
    """
    return exc.status not in (401, 403)


# The metadata `reason` of an order's shortfall refund: how a refund of the order's charge
# is told apart from one of what was delivered (market_reversal_handle).
SHORTFALL_REASON = "not_delivered"


def _is_shortfall_refund(refund: dict, order_id: int) -> bool:
    metadata = refund.get("metadata") or {}
    return (
        str(metadata.get("market_order") or "") == str(order_id)
        and metadata.get("reason") == SHORTFALL_REASON
    )


def _shortfall_refund_made_at_stripe(order: MarketOrder) -> dict | None:
    """The oldest refund of the order's payment that Stripe holds for its shortfall and has
    not failed or canceled, or None. A failed one (_shortfall_refund_failed) gave the money
    back to us: the buyer is owed it again, and a retry makes a new refund."""
    from gymbilling.services.events import REFUND_UNDONE

    for refund in stripe_client.refunds_list(payment_intent=order.stripe_payment_intent_id):
        if _is_shortfall_refund(refund, order.pk) and refund.get("status") not in REFUND_UNDONE:
            return refund
    return None


def order_shortfall_refund(*, order_id: int, retrying: bool = False) -> bool:
    """Refund what an order paid for and did not get; retried by `orders_expire` until done.

    Stripe unreachable: retried. Stripe refusing it for good (the charge
    already refunded by hand, less left to refund than asked): recorded on
    the order (`shortfall_refund_refused_at`, `_error`) and logged, for
    finance, and no longer retried; `order_shortfall_refund_retry` (the
    admin's action, `retrying`) sends it again once the cause is fixed; so
    does a refund Stripe holds for the shortfall but of another amount. A
    refund Stripe took and fails later (the buyer's card closed) goes back to
    finance the same way (_shortfall_refund_failed): Stripe's id of the refund
    taken is kept on the order for that.
    """
    order = MarketOrder.objects.get(pk=order_id)
    refused_at = order.shortfall_refund_refused_at
    if (
        not order.shortfall_amount
        or order.shortfall_refunded_at
        # Finance refunded it by hand (order_shortfall_refund_resolve): sent again, the
        # buyer would have it twice. Every send, the sweep's and the admin's, comes here.
        or order.shortfall_refund_resolved_at
        or (refused_at is not None) != retrying
        or not order.stripe_payment_intent_id
    ):
        return False
    claimed = _shortfall_refund_claim(order)
    if claimed is None:
        return False
    try:
        return _shortfall_refund_send(order, retrying=retrying)
    finally:
        _shortfall_refund_unclaim(order, claimed)


# Longer than any one send lasts: its calls to Stripe (the payment's refunds listed, then
# the refund) each end within STRIPE_TIMEOUT_SECONDS a try, tried 1 +
# STRIPE_MAX_NETWORK_RETRIES times (30 s by default). A claim this old was left by a
# process that died.
SHORTFALL_SEND_CLAIM_LASTS = timedelta(minutes=10)


def _shortfall_refund_claim(order: MarketOrder) -> datetime | None:
    """Mark the order's refund as being sent, if it is still as read (not refunded, not
    resolved by hand, refused or not as it was): the time of the claim, or None.

    A conditional UPDATE, committed before Stripe is called (no lock is held over the
    call): finance's resolution (order_shortfall_refund_resolve) is refused while it
    stands, so a send Stripe takes cannot land on an order finance has just refunded by
    hand. Another send's claim is not taken over while that send may still be at Stripe
    (two Retries at once: the second, taking over, would clear the claim when done and
    let a resolution in while the first was still at Stripe); one older than any send
    lasts (its process died mid-call) is: the send below asks Stripe first, and its key
    is the one the dead send used."""
    claimed_at = timezone.now()
    claimed = MarketOrder.objects.filter(
        Q(shortfall_refund_sending_at__isnull=True)
        | Q(shortfall_refund_sending_at__lt=claimed_at - SHORTFALL_SEND_CLAIM_LASTS),
        pk=order.pk,
        shortfall_refunded_at__isnull=True,
        shortfall_refund_resolved_at__isnull=True,
        shortfall_refund_refused_at=order.shortfall_refund_refused_at,
    ).update(shortfall_refund_sending_at=claimed_at)
    return claimed_at if claimed else None


def _shortfall_refund_unclaim(order: MarketOrder, claimed_at: datetime) -> None:
    # Only this send's claim: another send that took it over is still talking to Stripe.
    MarketOrder.objects.filter(pk=order.pk, shortfall_refund_sending_at=claimed_at).update(
        shortfall_refund_sending_at=None
    )


def _shortfall_refund_send(order: MarketOrder, *, retrying: bool) -> bool:
    """order_shortfall_refund's call to Stripe, and what its answer leaves on the order."""
    refused_at = order.shortfall_refund_refused_at
    key = f"market-shortfall:{order.pk}"
    if refused_at is not None:
        # Stripe keeps a refused request's answer under its key for about a day: the
        # same key would only replay the refusal. A refusal refunded nothing, so the
        # retry is a new request, keyed by the refusal it follows; until Stripe answers
        # it the order stays refused, and a retry after a timeout sends the same key.
        key = f"{key}:after:{refused_at.isoformat()}"
    try:
        # An earlier send may have reached Stripe with its answer lost (a timeout): its
        # key protects a resend only while Stripe keeps it (about a day), and a retry
        # can come later than that (Stripe down for long, finance's retry next week). So
        # Stripe is asked first, as payouts are (_payout_made_at_stripe), and a refund it
        # holds for this shortfall is recorded instead of a second one made.
        made = _shortfall_refund_made_at_stripe(order) or stripe_client.refund_create(
            key=key,
            payment_intent=order.stripe_payment_intent_id,
            amount=order.shortfall_amount,
            metadata={"market_order": str(order.pk), "reason": SHORTFALL_REASON},
        )
    except (stripe_client.StripeUnavailable, stripe_client.StripeNotConfigured) as exc:
        logger.warning("market order %s: shortfall refund later: %s", order.pk, exc)
        if retrying:
            MarketOrder.objects.filter(pk=order.pk, shortfall_refunded_at__isnull=True).update(
                # The request may have reached Stripe with its answer lost: a retry asks
                # Stripe first, and so does marking it resolved by hand.
                shortfall_refund_error=f"no answer from Stripe (it may have taken it), "
                f"retry it: {exc}"[:500]
            )
        return False
    except stripe_client.StripeRequestRefused as exc:
        final = stripe_refusal_is_final(exc) or retrying
        logger.error(
            "market order %s: shortfall refund of %s %s refused by Stripe (%s, request %s)%s: %s",
            order.pk,
            order.shortfall_amount,
            order.currency,
            exc.code or exc.status,
            exc.request_id,
            "; not retried until finance does" if final else "; retried next run",
            exc,
        )
        if final:
            _shortfall_refund_to_finance(order, error=f"{exc.code or exc.status}: {exc}")
        return False
    if int(made.get("amount") or 0) != order.shortfall_amount:
        # Marked as this order's shortfall refund, but not of its shortfall: made by hand
        # with our metadata, or by another deployment whose orders share our ids. Taken as
        # the order's, it would leave the buyer owed what it did not refund, or say the
        # shortfall came back when something else did; nor is another refund made while it
        # stands, for it may be this order's after all.
        error = (
            f"refund {made.get('id')} at Stripe is marked as this shortfall's refund, but of "
            f"{made.get('amount')} {order.currency}, not the shortfall's "
            f"{order.shortfall_amount}: not recorded. Refund by hand what the buyer is "
            "still owed, if anything; if that refund is not this order's, clear its "
            "metadata at Stripe and retry"
        )
        logger.error("market order %s: shortfall refund not recorded: %s", order.pk, error)
        _shortfall_refund_to_finance(order, error=error)
        return False
    MarketOrder.objects.filter(pk=order.pk, shortfall_refunded_at__isnull=True).update(
        shortfall_refunded_at=timezone.now(),
        shortfall_refund_refused_at=None,
        shortfall_refund_error="",
        shortfall_refund_id=str(made.get("id") or ""),
    )
    _shortfall_refunded_twice_report(order.pk)
    return True


# Orders whose shortfall Stripe refunded and finance also refunded by hand: the buyer has
# it twice (the admin's "refunded twice" list). The claim of a send
# (_shortfall_refund_claim) keeps it from happening but for two sends of one order at
# once, one of which finishes while the other is still at Stripe.
SHORTFALL_REFUNDED_TWICE = Q(
    shortfall_amount__gt=0,
    shortfall_refunded_at__isnull=False,
    shortfall_refund_resolved_at__isnull=False,
)


def _shortfall_refunded_twice_report(order_id: int) -> None:
    order = (
        MarketOrder.objects.filter(SHORTFALL_REFUNDED_TWICE, pk=order_id)
        .select_related("shortfall_refund_resolved_by")
        .first()
    )
    if order is not None:
        logger.error(
            "market order %s: shortfall of %s %s refunded twice: by Stripe (refund %s) and %s",
            order.pk,
            order.shortfall_amount,
            order.currency,
            order.shortfall_refund_id,
            shortfall_refund_resolution(order),
        )


def _shortfall_refund_to_finance(order: MarketOrder, *, error: str) -> None:
    """Into finance's list of refused shortfall refunds, with why; no longer retried."""
    MarketOrder.objects.filter(pk=order.pk, shortfall_refunded_at__isnull=True).update(
        shortfall_refund_refused_at=timezone.now(), shortfall_refund_error=error[:500]
    )


def order_shortfall_refund_retry(*, order_id: int) -> bool:
    """Finance fixed what made Stripe refuse an order's shortfall refund: send it again now.

    True when Stripe took it; refused again, it is recorded again (and the next retry is
    a new request again); Stripe unreachable, it stays finance's, to retry again.
    """
    return order_shortfall_refund(order_id=order_id, retrying=True)


def order_shortfall_refund_request(
    *, order_id: int, amount: int | None, note: str, actor
) -> MarketOrder:
    """Finance refund an order's undelivered shortfall from its payment's Refund page.

    A plain refund of the payment carries none of the shortfall refund's metadata: its
    webhook reads it as a refund of the delivered sale (the delivered credits clawed back,
    the sellers' shares and the fee taken back, reselling frozen), though the money was
    for credits never delivered. So this sends the order's own shortfall refund
    (order_shortfall_refund: the sweep's request while waiting, Retry's once Stripe
    refused it), with its metadata and key: its webhook takes nothing back, and the order
    records its shortfall refunded. Through the same claim as every send, asking Stripe
    first: never a second refund of the shortfall, whoever else sends it meanwhile.

    The whole shortfall, `amount` None or exactly it (400 `shortfall_amount_mismatch`);
    `note` required. Who and why go to the buyer's audit log
    (`market.shortfall_refunded`). Nothing sent: 409 `shortfall_refund_not_owed`
    (refunded already, resolved by hand, none) or `shortfall_refund_sending` (another
    send is at Stripe); 502 `shortfall_refund_refused` (Stripe's refusal, left on the
    order for finance as a refused sweep's is); 503 `payments_unavailable` (no answer:
    it may have been made; sending again records it rather than making another).
    """
    note = note.strip()
    if not note:
        raise ApplicationError(
            code="reason_required", message="A refund needs a reason.", param="note"
        )
    order = MarketOrder.objects.get(pk=order_id)
    if not shortfall_refund_owed(order):
        raise _shortfall_not_owed(order)
    if amount is not None and amount != order.shortfall_amount:
        raise ApplicationError(
            code="shortfall_amount_mismatch",
            message=f"The shortfall is refunded whole: {order.shortfall_amount} "
            f"{order.currency}. Leave the amount blank or give exactly that; to refund part "
            "of what was delivered, refund the delivered sale instead.",
            param="amount",
        )
    refused_at = order.shortfall_refund_refused_at
    if order_shortfall_refund(order_id=order_id, retrying=refused_at is not None):
        order = MarketOrder.objects.get(pk=order_id)
        _shortfall_audit(
            order,
            action="market.shortfall_refunded",
            actor=actor,
            refund=order.shortfall_refund_id,
            note=note[:500],
        )
        return order
    raise _shortfall_not_sent(MarketOrder.objects.get(pk=order_id), refused_at=refused_at)


def order_sale_refundable(*, order_id: int, charge: dict, refunds: list[dict]) -> int:
    """What a refund of the order's delivered sale may take of its payment now (minor units,
    0 or more), from Stripe's `charge` and `refunds` of it, read just before.

    What Stripe has left to refund of the charge, less the undelivered shortfall the buyer
    is still owed: refunded as the sale, that money would be `unapplied` (no sale of it
    to take back), and the order's own shortfall refund then refused, nothing being left
    to refund. A shortfall refund Stripe already holds (a send whose answer was lost) is
    in the charge's refunded amount already: not taken off twice. And never more than
    the delivered sale has left to give back: past it a refund returns money of no sale
    (a shortfall finance refunded by bank transfer and marked resolved, say).

    What the sale has left is read twice, and the smaller taken: from the fills here
    (`refunded`), and from Stripe's `refunds` (the delivered gross less every refund that
    is not the shortfall's own and has not failed: each is applied to the sale, as
    market_reversal_handle will). The fills move only once a refund is applied (its
    webhook, payment_reversals_refresh after the refund page's send): a refund made in
    Stripe's dashboard, or another of finance's not applied yet, is in Stripe's list
    alone. Read from the fills only, a blank refund would then take the money Stripe has
    left, which is the shortfall's, once it is no longer counted owed (resolved by hand,
    its refund failed): the buyer would have it twice.
    """
    from gymbilling.services.events import REFUND_UNDONE

    order = MarketOrder.objects.get(pk=order_id)
    owed = order.shortfall_amount if shortfall_refund_owed(order) else 0
    if any(
        _is_shortfall_refund(refund, order.pk) and refund.get("status") not in REFUND_UNDONE
        for refund in refunds
    ):
        owed = 0
    left = int(charge.get("amount") or 0) - int(charge.get("amount_refunded") or 0)
    sale = MarketFill.objects.filter(
        order=order, status=FillStatus.DELIVERED, gross__gt=0
    ).aggregate(delivered=Sum("gross"), left=Sum(F("gross") - F("refunded")))
    refunded_at_stripe = sum(
        int(refund.get("amount") or 0)
        for refund in refunds
        if not _is_shortfall_refund(refund, order.pk) and refund.get("status") not in REFUND_UNDONE
    )
    sale_left = min(sale["left"] or 0, (sale["delivered"] or 0) - refunded_at_stripe)
    return max(0, min(left - owed, sale_left))


def _shortfall_audit(order: MarketOrder, *, action: str, actor, **data) -> None:
    """What finance did about the order's shortfall, in the buyer's audit log."""
    audit_record(
        organization=order.buyer,
        action=action,
        target=f"market order {order.pk}",
        actor_user=actor,
        data={
            "order": order.pk,
            "amount": order.shortfall_amount,
            "currency": order.currency,
            **data,
        },
    )


def _shortfall_not_owed(order: MarketOrder) -> ApplicationError:
    state = (
        "has no shortfall"
        if not order.shortfall_amount
        else f"had its shortfall refunded by Stripe (refund {order.shortfall_refund_id})"
        if order.shortfall_refunded_at
        else f"is {shortfall_refund_resolution(order)}"
    )
    return ApplicationError(
        code="shortfall_refund_not_owed",
        message=f"Nothing of this order's shortfall is owed: it {state}.",
        status=409,
    )


def _shortfall_not_sent(order: MarketOrder, *, refused_at: datetime | None) -> ApplicationError:
    """Why order_shortfall_refund_request's send refunded nothing, read from the order."""
    if order.shortfall_refunded_at or order.shortfall_refund_resolved_at:
        return _shortfall_not_owed(order)  # another send, or finance, came first
    if order.shortfall_refund_sending_at is not None:
        # This send's own claim is cleared when it is done: one left is another's.
        return _not_resolvable(order)
    if order.shortfall_refund_refused_at not in (None, refused_at):
        return ApplicationError(
            code="shortfall_refund_refused",
            message=f"Stripe refused the shortfall refund: {order.shortfall_refund_error}. "
            "It is in the market orders' list of refused shortfall refunds; retry it there "
            "once the cause is fixed.",
            status=502,
        )
    return ApplicationError(
        code="payments_unavailable",
        message="Stripe did not answer: the shortfall refund may or may not have been made. "
        "Send this form again: it records a refund Stripe made rather than making another.",
        status=503,
    )


# Which of finance's refused shortfall refunds may be marked resolved: owed, not refunded
# by Stripe, refused by it, not resolved yet (the admin's "refused" list).
SHORTFALL_REFUND_REFUSED = Q(
    shortfall_amount__gt=0,
    shortfall_refunded_at__isnull=True,
    shortfall_refund_refused_at__isnull=False,
    shortfall_refund_resolved_at__isnull=True,
)


def order_shortfall_refund_resolve(*, order_id: int, note: str, actor) -> MarketOrder:
    """Finance refunded a refused shortfall by hand (in Stripe's dashboard, by bank
    transfer): the order leaves their list of refused shortfall refunds, and nothing sends
    that refund from here again (order_shortfall_refund refuses it, whoever asks).

    Who, when and `note` (required: what was refunded, how) are kept on the order and in
    the buyer's audit log (`market.shortfall_refund_resolved`), as finance's refunds are.
    Only a refund Stripe refused: one waiting is sent by the sweep, one refunded is done.
    Nor one Stripe holds after all: a retry whose answer was lost (a timeout) may have
    made it, and the buyer would have it twice; 409 `shortfall_refund_at_stripe`, and
    finance's Retry records it (it asks Stripe first). Stripe is asked before any row is
    written, outside a transaction; unreachable, nothing is resolved (503).
    """
    note = note.strip()
    if not note:
        raise ApplicationError(
            code="reason_required",
            message="Say how the shortfall was refunded (a Stripe refund's id, a transfer).",
            param="note",
        )
    order = MarketOrder.objects.filter(
        SHORTFALL_REFUND_REFUSED, pk=order_id, shortfall_refund_sending_at__isnull=True
    ).first()
    if order is not None and order.stripe_payment_intent_id:
        _refuse_if_refunded_at_stripe(order)
    return _shortfall_refund_resolved(order_id=order_id, note=note, actor=actor)


def _refuse_if_refunded_at_stripe(order: MarketOrder) -> None:
    try:
        made = _shortfall_refund_made_at_stripe(order)
    except (stripe_client.StripeUnavailable, stripe_client.StripeNotConfigured) as exc:
        raise ApplicationError(
            code="payments_unavailable",
            message="Stripe could not be asked whether it holds this shortfall's refund "
            f"(a retry's answer may have been lost): nothing was resolved; try again. {exc}",
            status=503,
        ) from None
    if made is not None:
        raise ApplicationError(
            code="shortfall_refund_at_stripe",
            message=f"Stripe holds refund {made.get('id')} of {made.get('amount')} "
            f"{order.currency} for this shortfall (a send whose answer was lost made it): "
            "nothing was resolved. Retry the shortfall refund to record it; if you also "
            "refunded the buyer by hand, the buyer has it twice.",
            status=409,
        )


@transaction.atomic
def _shortfall_refund_resolved(*, order_id: int, note: str, actor) -> MarketOrder:
    # One conditional UPDATE: of two finance resolving at once, or a resolution racing
    # the retry that refunds it, one wins and the other is told why below.
    # Not while a send is at Stripe (_shortfall_refund_claim): it may yet refund the buyer.
    resolved = MarketOrder.objects.filter(
        SHORTFALL_REFUND_REFUSED, pk=order_id, shortfall_refund_sending_at__isnull=True
    ).update(
        shortfall_refund_resolved_at=timezone.now(),
        shortfall_refund_resolved_by=actor,
        shortfall_refund_resolved_note=note[:500],
    )
    order = MarketOrder.objects.select_related("shortfall_refund_resolved_by").get(pk=order_id)
    if not resolved:
        raise _not_resolvable(order)
    _shortfall_audit(
        order,
        action="market.shortfall_refund_resolved",
        actor=actor,
        note=order.shortfall_refund_resolved_note,
    )
    logger.info(
        "market order %s: shortfall refund of %s %s resolved by hand by %s: %s",
        order.pk,
        order.shortfall_amount,
        order.currency,
        getattr(actor, "email", actor),
        order.shortfall_refund_resolved_note,
    )
    return order


def shortfall_refund_resolution(order: MarketOrder) -> str:
    """Who resolved the order's refused shortfall refund by hand, when, and why; "" if
    nobody did. The order's `shortfall_refund_resolved_by` selected with it."""
    if order.shortfall_refund_resolved_at is None:
        return ""
    who = order.shortfall_refund_resolved_by
    return (
        f"resolved by hand by {who.email if who else 'a deleted user'} at "
        f"{order.shortfall_refund_resolved_at.isoformat(timespec='seconds')}: "
        f"{order.shortfall_refund_resolved_note}"
    )


def _not_resolvable(order: MarketOrder) -> ApplicationError:
    if order.shortfall_refund_resolved_at is not None:
        return ApplicationError(
            code="shortfall_refund_resolved",
            message=f"Already {shortfall_refund_resolution(order)}.",
            status=409,
        )
    if order.shortfall_refund_sending_at is not None and not order.shortfall_refunded_at:
        claim_lapses = order.shortfall_refund_sending_at + SHORTFALL_SEND_CLAIM_LASTS
        return ApplicationError(
            code="shortfall_refund_sending",
            message="A retry has been sending this shortfall refund to Stripe since "
            f"{order.shortfall_refund_sending_at.isoformat(timespec='seconds')}: Stripe may "
            "yet refund the buyer. Look again once it is done; if its process stopped, "
            "retry it from "
            f"{claim_lapses.isoformat(timespec='seconds')}: it records a refund Stripe "
            "took rather than making another.",
            status=409,
        )
    state = (
        "has no shortfall"
        if not order.shortfall_amount
        else "is refunded by Stripe"
        if order.shortfall_refunded_at
        else "is waiting to be sent, not refused"
    )
    return ApplicationError(
        code="shortfall_refund_not_refused",
        message=f"Only a shortfall refund Stripe refused can be resolved by hand: this order "
        f"{state}.",
        status=409,
    )


def market_checkout_handle(checkout: CheckoutSession, session: dict) -> None:
    """gymbilling.services.events calls this with Stripe's current Checkout session."""
    order = MarketOrder.objects.filter(checkout=checkout).first()
    if order is None:
        return
    status = session.get("status")
    intent = session.get("payment_intent")
    if isinstance(intent, dict):
        intent = intent.get("id")
    if status == "complete" and session.get("payment_status") == "paid":
        from gymbilling.services.events import payment_reversals_refresh

        order_pay(order_id=order.pk, payment_intent_id=str(intent or session["id"]))
        # A refund or dispute processed before this could not find the order.
        payment_reversals_refresh(payment_intent_id=str(intent or ""))
    elif status == "expired":
        order_release(order_id=order.pk, status=OrderStatus.EXPIRED, code="checkout_expired")


def orders_expire(*, now: datetime | None = None) -> int:
    """Release reservations past their hold time, expiring their Checkout first.

    Stripe unreachable: the order stays reserved and the next run tries
    again (releasing first could sell credits a buyer is paying for this
    second). A session that turns out to be paid is delivered instead.
    Also retries shortfall refunds Stripe could not be asked for (not those
    it refused for good: finance's, see order_shortfall_refund).
    """
    now = now or timezone.now()
    due = MarketOrder.objects.filter(status=OrderStatus.PENDING, expires_at__lte=now)
    # Each order on its own: one that fails (Stripe refusing to read its checkout,
    # a bug) is logged and tried again next run, and never holds back the others'
    # releases, nor the shortfall refunds below.
    released = each_isolated(
        due.order_by("expires_at").values_list("pk", flat=True)[:500],
        lambda pk: _order_expire(order_id=pk, now=now),
        what="the expiry of market order",
    )
    for pk in MarketOrder.objects.filter(
        shortfall_amount__gt=0,
        shortfall_refunded_at__isnull=True,
        shortfall_refund_refused_at__isnull=True,  # finance's, until they retry it
    ).values_list("pk", flat=True)[:100]:
        order_shortfall_refund(order_id=pk)
    return released


def _order_expire(*, order_id: int, now: datetime) -> int:
    """One due order: its checkout expired at Stripe, then released (1), or delivered if
    it turns out paid, or left for the next run while Stripe cannot be reached (0).
    Released too when Stripe has no such checkout (1)."""
    from gymbilling.services.payments import checkout_session_mirror

    order = MarketOrder.objects.select_related("checkout").get(pk=order_id)
    if order.checkout is None:
        return order_release(
            order_id=order.pk, status=OrderStatus.EXPIRED, code="reservation_timeout", now=now
        )
    session_id = order.checkout.stripe_session_id
    try:
        try:
            session = stripe_client.checkout_session_expire(session_id)
        except stripe_client.StripeRequestRefused:
            # Not open any more: completed (paid) or already expired.
            session = stripe_client.checkout_session_retrieve(session_id)
    except (stripe_client.StripeUnavailable, stripe_client.StripeNotConfigured) as exc:
        logger.warning("market order %s: cannot expire its checkout yet: %s", order.pk, exc)
        return 0
    except stripe_client.StripeRequestRefused as exc:
        if exc.code != "resource_missing":
            raise  # our credentials, say: logged, and tried again next run
        # Stripe answers that the session does not exist (a 404, not an outage: the
        # Stripe account or its key changed since the order was made). Nobody can
        # pay it, so the reservation is released as an unpaid one is; held, the
        # seller's credits would be unsellable until they expired in the buyer's
        # escrow, and the order would come first in every sweep. Should it be paid
        # after all (the old key back), order_pay delivers nothing of a released
        # order and refunds the payment, as it does of any paid too late.
        logger.warning(
            "market order %s: Stripe has no checkout session %s (%s): released unpaid",
            order.pk,
            session_id,
            exc,
        )
        return order_release(
            order_id=order.pk, status=OrderStatus.EXPIRED, code="checkout_not_found", now=now
        )
    checkout_session_mirror(session=session)
    if session.get("status") == "complete" and session.get("payment_status") == "paid":
        market_checkout_handle(order.checkout, session)
        return 0
    if session.get("status") in ("expired", None) or session.get("status") != "complete":
        return order_release(
            order_id=order.pk, status=OrderStatus.EXPIRED, code="reservation_timeout", now=now
        )
    return 0


# --- payouts -----------------------------------------------------------------------------


def _proceeds_account(fill: MarketFill, proceeds: str) -> MoneyAccount:
    """The seller's account that holds a fill's unpaid share while it is `proceeds`
    (pending or available)."""
    return money_account(
        kind=MoneyAccountKind.SELLER_PENDING
        if proceeds == ProceedsState.PENDING
        else MoneyAccountKind.SELLER_AVAILABLE,
        currency=fill.currency,
        organization=fill.seller,
    )


def _seller_share_left(fill: MarketFill) -> int:
    return fill.gross - fill.fee - fill.seller_reversed - fill.earlier_payouts


@retry_on_deadlock
def _fill_mature(*, fill_id: int, now: datetime) -> bool:
    with transaction.atomic():
        fill = (
            MarketFill.objects.select_for_update(of=("self",))
            .select_related("seller")
            .get(pk=fill_id)
        )
        if fill.proceeds != ProceedsState.PENDING or fill.available_at > now:
            return False
        amount = _seller_share_left(fill)
        cur = fill.currency
        money_post(
            kind=MoneyTransactionKind.RELEASE,
            key=f"release:{fill.pk}",
            currency=cur,
            organization=fill.seller,
            fill=fill,
            postings=[
                (
                    money_account(
                        kind=MoneyAccountKind.SELLER_PENDING, currency=cur, organization=fill.seller
                    ),
                    -amount,
                ),
                (
                    money_account(
                        kind=MoneyAccountKind.SELLER_AVAILABLE,
                        currency=cur,
                        organization=fill.seller,
                    ),
                    amount,
                ),
            ],
        )
        MarketFill.objects.filter(pk=fill.pk).update(proceeds=ProceedsState.AVAILABLE)
        return True


def _payouts_held(*, seller_id: int, currency: str, destination: str) -> MarketPayout | None:
    """The refused payout that holds the seller's payouts in `currency` to `destination`.

    Stripe refused it for good (its `last_error` says why: a currency the
    account does not take, an account that cannot receive transfers): every
    payout there would be refused for the same cause, so none is recorded
    until finance marks it fixed (`payouts_retry`). Another destination (the
    seller connected a new account) is another cause: not held. But one that may
    have paid the seller already (`may_have_paid`: _payout_customer_deleted) holds
    them wherever they would go: paid anywhere before finance has looked, the seller
    could have the same proceeds twice.
    """
    return (
        _holding(seller_id=seller_id, currency=currency)
        .filter(Q(destination=destination) | Q(may_have_paid=True))
        .first()
    )


def _holding(*, seller_id: int, currency: str):
    """The seller's refused payouts in `currency` that finance has not retried, oldest
    first."""
    return MarketPayout.objects.filter(
        seller_id=seller_id,
        currency=currency,
        status=PayoutStatus.FAILED,
        retry_allowed_at__isnull=True,
    ).order_by("pk")


@retry_on_deadlock
def _payout_record(*, seller_id: int, currency: str) -> MarketPayout | None:
    """One payout of everything available to the seller in `currency`, in the ledger."""
    with transaction.atomic():
        fills = list(
            MarketFill.objects.select_for_update()
            .filter(seller_id=seller_id, currency=currency, proceeds=ProceedsState.AVAILABLE)
            .order_by("pk")
        )
        amount = sum(_seller_share_left(fill) for fill in fills)
        if not fills:
            return None
        if amount <= 0:
            # Refunds and disputes took all of them: paid out, by no payout.
            MarketFill.objects.filter(pk__in=[f.pk for f in fills]).update(
                proceeds=ProceedsState.PAID_OUT, payout=None
            )
            return None
        seller = Organization.objects.get(pk=seller_id)
        customer = _seller_customer_locked(seller_id)
        if customer is None:
            logger.warning("seller %s has proceeds but no Stripe customer", seller_id)
            return None
        if customer.resale_frozen_at is not None:
            # Frozen by a refund or dispute: not paid until finance lifts it. The proceeds
            # stay available, where a reversal can still reach them. Read under the row
            # lock resale_freeze takes: a freeze is committed before this reads it, or waits
            # for this payout, which its send then closes unsent (_payout_frozen).
            return None
        if customer.stripe_connect_account_id:
            method, destination = PayoutMethod.TRANSFER, customer.stripe_connect_account_id
        else:
            method, destination = PayoutMethod.INVOICE_CREDIT, customer.stripe_customer_id
        if _payouts_held(seller_id=seller_id, currency=currency, destination=destination):
            return None  # the proceeds stay available: finance retries once fixed
        if MarketPayout.objects.filter(
            seller_id=seller_id, destination=destination, status=PayoutStatus.CUSTOMER_DELETED
        ).exists():
            # Deleted at Stripe, for good: the proceeds stay available until the
            # organization has a new customer (or a Connect account), paid there.
            return None
        payout = MarketPayout.objects.create(
            seller=seller,
            currency=currency,
            amount=amount,
            method=method,
            destination=destination,
        )
        _payout_book(payout, fills=fills, key=f"payout:{payout.pk}")
        return payout


def _seller_customer_locked(seller_id: int) -> BillingCustomer | None:
    """The seller's billing customer, its row locked until the transaction ends against
    `resale_freeze` (FOR UPDATE of that row) and every other writer of it: whether the
    seller is frozen, and where they are paid, stay as read until then."""
    return (
        BillingCustomer.objects.select_for_update(no_key=True)
        .filter(organization_id=seller_id)
        .first()
    )


# A pending payout not sent because its seller is frozen says so in its `last_error`, which
# starts with this (a send reads any other error as a sign that an earlier send may have
# reached Stripe; this one says no send was made: _payout_sent_before).
_FROZEN_HOLD = "held: the seller's reselling is frozen"


def _payout_frozen(payout: MarketPayout) -> str | None:
    """What became of a payout whose seller a refund or dispute froze since it was
    recorded: not paid. None when the seller is not frozen (send it). Read under the
    payout's send lock, before any Stripe call.

    Never sent (`_payout_sent_before`: no Stripe call can have paid it), it is closed
    `seller_frozen`, undone as a refused payout is (_payout_fail): its amount back to the
    seller's available proceeds, its fills available again, and what refunds and disputes
    of its sales booked as lost against it meanwhile taken from the seller's share instead.
    Left pending for the weeks a freeze can last, every refund and dispute of its sales
    would be the platform's loss (its fills paid out), and the payout would still pay the
    seller all of it once the freeze is lifted: the seller finance froze as a risk would
    be the one who does not bear them. Closed, they come out of the seller's proceeds as
    for any unpaid sale, no payout is recorded while the freeze lasts (_payout_record),
    and the first payout run once finance lifts it records a new payout of what is left
    (a freeze lifted while this closes it only delays the seller's pay to that run).

    One an earlier send may have reached Stripe with, its answer lost (a timeout, a crash,
    Stripe down), cannot be undone so: Stripe may have paid it, or may still, under its
    key, and its proceeds paid again by a new payout would pay the seller twice. It is
    left pending, not sent, with why in its `last_error` (the admin's market payouts list
    it under "holding the seller's payouts: Frozen seller"); the first send once finance lifts
    the freeze looks at Stripe first, as every send does, and pays it once. Refunds and
    disputes of its sales meanwhile stay the platform's losses, as for any payout in
    flight: none is charged against it. Its amount cannot shrink (Stripe may have paid it
    whole; a resend under its key with another amount is refused for a day, and the
    look-up then finds a transfer that does not match: _PayoutUnsure), and it cannot be
    undone to let them come out of the seller's proceeds on a look at Stripe that finds
    nothing: that look proves nothing of a request whose answer was lost and that may
    land later, and its proceeds paid again by a new payout, under a key of its own,
    would pay the seller twice; sent, under its own key, it pays once. Finance see such
    payouts, and what refunds and disputes lost on them (admin market payouts, "holding
    the seller's payouts: Frozen seller, pending and maybe sent before", column lost)."""
    frozen = (
        BillingCustomer.objects.filter(
            organization_id=payout.seller_id, resale_frozen_at__isnull=False
        )
        .values_list("resale_frozen_at", "resale_frozen_reason")
        .first()
    )
    if frozen is None:
        return None
    frozen_at, reason = frozen
    why = f"({reason or 'a refund or dispute'}) since {frozen_at.isoformat()}"
    lift = 'finance lifts the freeze (Billing customers, "Allow reselling again")'
    if not _payout_sent_before(payout):
        note = (
            f"not sent: the seller's reselling is frozen {why}. Proceeds back to available, "
            "where refunds and disputes of its sales come out of the seller's share; the "
            f"first payout run once {lift} pays what is left."
        )
        logger.warning("market payout %s of seller %s: %s", payout.pk, payout.seller_id, note)
        return _payout_fail(
            payout_id=payout.pk,
            destination=payout.destination,
            error=note,
            status=PayoutStatus.SELLER_FROZEN,
        )
    note = (
        f"{_FROZEN_HOLD} {why}: not sent, and not undone: an earlier send may have reached "
        f"Stripe. Sent by the first payout run once {lift}."
    )
    # An earlier send's error this note replaces is kept as a counted send.
    MarketPayout.objects.filter(pk=payout.pk).update(
        last_error=note[:500], send_attempts=max(payout.send_attempts, 1)
    )
    logger.warning("market payout %s of seller %s: %s", payout.pk, payout.seller_id, note)
    return PayoutStatus.PENDING


def _payout_sent_before(payout: MarketPayout) -> bool:
    """Whether an earlier send of the payout may have reached Stripe with its answer lost:
    it counted itself before calling Stripe (a send that died mid-call did too), or left
    its error (payouts recorded before sends were counted; those still pending at the
    deploy count as sent once: gymbilling/0039). A freeze's hold is no send."""
    error = payout.last_error
    return payout.send_attempts > 0 or bool(error and not error.startswith(_FROZEN_HOLD))


def _payout_book(payout: MarketPayout, *, fills: list[MarketFill], key: str, lost: int = 0) -> None:
    """What a payout does to the ledger, in the caller's transaction with `fills` locked:
    its amount from the seller's available proceeds to payouts, and its fills paid out
    by it. When it is recorded (before Stripe is called; a refusal undoes it,
    _payout_fail), and when finance finds one Stripe refused paid after all
    (payout_mark_paid): each under a key of its own.

    `lost` (payout_mark_paid): of its amount, what refunds and disputes took back from its
    sales after it was recorded. Paid to the seller and given back to the buyer, it is a
    loss, as for any sale refunded after its payout; the seller's proceeds no longer hold
    it."""
    cur = payout.currency
    postings = [
        (
            money_account(
                kind=MoneyAccountKind.SELLER_AVAILABLE, currency=cur, organization=payout.seller
            ),
            lost - payout.amount,
        ),
        (money_account(kind=MoneyAccountKind.PAYOUTS, currency=cur), payout.amount),
    ]
    if lost:
        postings.append((money_account(kind=MoneyAccountKind.LOSSES, currency=cur), -lost))
    money_post(
        kind=MoneyTransactionKind.PAYOUT,
        key=key,
        currency=cur,
        organization=payout.seller,
        payout=payout,
        postings=postings,
        memo=f"{payout.method} to {payout.destination}",
    )
    MarketFill.objects.filter(pk__in=[f.pk for f in fills]).update(
        proceeds=ProceedsState.PAID_OUT, payout=payout
    )


def _payout_sent(payout_id: int, *, stripe_object_id: str, was: str = PayoutStatus.PENDING) -> bool:
    """Stripe took the payout (made `stripe_object_id`): sent. Only while it is still `was`
    (pending, for a send; refused, for finance's payout_mark_paid)."""
    return bool(
        MarketPayout.objects.filter(pk=payout_id, status=was).update(
            status=PayoutStatus.SENT, stripe_object_id=stripe_object_id, sent_at=timezone.now()
        )
    )


# Stripe keeps an idempotency key about 24 hours: a payout still pending after
# that (a long outage, a worker down) would be sent again under a key Stripe no
# longer knows, and paid again. So every send first looks for what an earlier
# send made of it (always: a payout run is not latency-critical, and a pending
# payout's age says nothing of whether its first send reached Stripe).
# Balance transactions are looked for from this long before the payout was
# recorded (the clocks of Stripe and ours may differ).
_PAYOUT_CLOCK_SKEW = timedelta(hours=1)


def _payout_transfer_group(payout: MarketPayout) -> str:
    return f"market-payout-{payout.pk}"


def _payout_create_at_stripe(payout: MarketPayout) -> dict:
    """The Stripe call that pays a recorded payout: a transfer in a group of its own, or a
    balance credit, both with the payout's id in their metadata (what `_payout_made_at_stripe`
    finds them by)."""
    key = f"market-payout:{payout.pk}"
    if payout.deleted_destination:
        # Moved to the organization's new customer: a request of its own. Under the first
        # key Stripe would answer, for a day, the deleted customer's refusal (or refuse
        # other parameters under it).
        key = f"{key}:to:{payout.destination}"
    metadata = {"market_payout": str(payout.pk), "organization_id": str(payout.seller_id)}
    if payout.method == PayoutMethod.TRANSFER:
        return stripe_client.transfer_create(
            key=key,
            amount=payout.amount,
            currency=payout.currency,
            destination=payout.destination,
            transfer_group=_payout_transfer_group(payout),
            metadata=metadata,
        )
    return stripe_client.customer_balance_credit(
        key=key,
        customer=payout.destination,
        amount=-payout.amount,
        currency=payout.currency,
        description=f"Marketplace proceeds (payout {payout.pk})",
        metadata=metadata,
    )


class _PayoutUnsure(Exception):
    """Sending the payout could pay it twice: Stripe holds an object made for it that does
    not pay what it says, or would not say what it holds."""


def _payout_made_at_stripe(payout: MarketPayout) -> dict | None:
    """The transfer or balance credit an earlier send of this payout made, or None.

    Raises `_PayoutUnsure` when what Stripe holds for the payout is not
    what it pays (another amount, currency or destination): never resent,
    finance must look.
    """
    if payout.method == PayoutMethod.TRANSFER:
        found = stripe_client.transfers_list(
            transfer_group=_payout_transfer_group(payout), destination=payout.destination
        )
        expected = {
            "amount": payout.amount,
            "currency": payout.currency,
            "destination": payout.destination,
        }
    else:
        found = stripe_client.customer_balance_transactions_since(
            payout.destination,
            created_gte=int((payout.created_at - _PAYOUT_CLOCK_SKEW).timestamp()),
        )
        expected = {
            "amount": -payout.amount,
            "currency": payout.currency,
            "customer": payout.destination,
        }
    mine = [
        obj
        for obj in found
        if str((obj.get("metadata") or {}).get("market_payout") or "") == str(payout.pk)
    ]
    if not mine:
        return None
    made = mine[-1]  # the oldest: Stripe lists newest first
    got = {field: made.get(field) for field in expected}
    if len(mine) > 1 or got != expected:
        raise _PayoutUnsure(
            f"Stripe holds {', '.join(str(obj.get('id')) for obj in mine)} for payout "
            f"{payout.pk} ({got}); it pays {expected}"
        )
    return made


def payout_send(*, payout_id: int) -> str:
    """Call Stripe for a recorded payout, once, however long it has been pending.

    Its key makes a resend within Stripe's 24 hours pay once; past them, only
    looking first does: a transfer or credit found for the payout is recorded
    instead of making another.

    One send of a payout at a time, in every process: a session lock named after it,
    taken before Stripe is called and held across the calls with no transaction open
    (as the sale refund's, gymbilling.services.refunds). Two sends at once (finance's
    Retry overlapping a payout run, a run that overran into the next) would each decide
    from the same pending payout: around a customer's replacement one could give the
    proceeds back to available (customer_deleted) while the other credited the new
    customer, whose "sent" then matched nothing: paid at Stripe, unpaid in the ledger,
    and paid again by a later run. The later send waits, then finds what the first left.
    A lock rather than a claim with a takeover (the shortfall refund's): nothing else
    needs to see that a send is under way, and a process that dies lets it go with its
    connection, at once.
    """
    with session_lock(f"market-payout:{payout_id}"):
        return _payout_send(payout_id=payout_id)


def _payout_send(*, payout_id: int) -> str:
    """payout_send's calls to Stripe and what their answers leave, under its lock."""
    payout = MarketPayout.objects.get(pk=payout_id)
    if payout.status != PayoutStatus.PENDING:
        return payout.status
    # A seller frozen since the payout was recorded (an earlier run's, Stripe down then; or
    # this run's, the freeze landing during its Stripe calls) is not paid: looked at
    # under this lock, right before Stripe is called. A freeze committed while Stripe is
    # being called meets money already leaving; the next send of any payout sees it.
    frozen = _payout_frozen(payout)
    if frozen is not None:
        return frozen
    sent_before = _payout_sent_before(payout)
    # Counted before any call; a freeze's hold, over now, is no error any more.
    MarketPayout.objects.filter(pk=payout.pk).update(
        send_attempts=F("send_attempts") + 1,
        **({"last_error": ""} if payout.last_error.startswith(_FROZEN_HOLD) else {}),
    )
    try:
        try:
            result = _payout_made_at_stripe(payout)
        except stripe_client.StripeRequestRefused as exc:
            if exc.code != "resource_missing":
                raise _PayoutUnsure(
                    f"Stripe refused the look-up of payout {payout.pk}: {exc}"
                ) from exc
            # The destination is gone, so nothing reached it: the send below is
            # refused for the same reason, and the payout fails as it should.
            result = None
        if result is None:
            result = _payout_create_at_stripe(payout)
    except (stripe_client.StripeUnavailable, stripe_client.StripeNotConfigured) as exc:
        MarketPayout.objects.filter(pk=payout.pk).update(last_error=str(exc)[:500])
        return PayoutStatus.PENDING
    except _PayoutUnsure as exc:
        # Left pending, never sent again: resending could pay twice.
        logger.error("market payout %s: not sent: %s", payout.pk, exc)
        MarketPayout.objects.filter(pk=payout.pk).update(last_error=str(exc)[:500])
        return PayoutStatus.PENDING
    except stripe_client.StripeRequestRefused as exc:
        error = f"{exc.code or exc.status}: {exc}"
        if exc.code == "resource_missing" and payout.method == PayoutMethod.INVOICE_CREDIT:
            outcome = _payout_customer_deleted(payout, error=error, sent_before=sent_before)
            if outcome is not None:
                return outcome
        if not stripe_refusal_is_final(exc):  # our credentials: sent again next run
            logger.error("market payout %s: Stripe refused our request: %s", payout.pk, error)
            MarketPayout.objects.filter(pk=payout.pk).update(last_error=error[:500])
            return PayoutStatus.PENDING
        logger.error(
            "market payout %s of %s %s to %s refused by Stripe (request %s); the seller's "
            "payouts there wait until finance retries it: %s",
            payout.pk,
            payout.amount,
            payout.currency,
            payout.destination,
            exc.request_id,
            error,
        )
        return _payout_fail(payout_id=payout.pk, destination=payout.destination, error=error)
    _payout_sent(payout.pk, stripe_object_id=str(result.get("id") or ""))
    return PayoutStatus.SENT


def _payout_customer_deleted(payout: MarketPayout, *, error: str, sent_before: bool) -> str | None:
    """A balance credit Stripe refused as `resource_missing`: where its customer was deleted
    at Stripe, the payout's status; None when it was not (refused as any refusal is).

    Deleted is what the customer's replacement reads it as (stripe_client.customer_gone:
    retrieving it answers `deleted: true`); a 404, an id Stripe never knew, is a key of
    another account or mode, not a deleted customer, and stays finance's. A deleted
    customer is deleted for good: retrying the credit never pays. So the payout goes to
    the organization's new customer (billing_customer_replace made it), recorded as the
    same payout and said in the seller's audit log (`market.payout_redirected`); with
    none yet, nothing is paid and the payout is `customer_deleted`: its proceeds back to
    available, where refunds still reach them (a payout left in flight for months would
    hold up every won dispute of its fills), and paid to the new customer by the first
    payout run once there is one.

    Only a payout no earlier send may have reached Stripe with (`sent_before`): one whose
    answer was lost may have credited the customer before it was deleted, and the
    seller may have spent that credit; Stripe answers the look-up of a deleted
    customer's balance with `resource_missing`, so nothing here can tell. Paid to the new
    customer, at once or by a later run, the seller could have it twice. It fails for
    finance instead (`may_have_paid`), holding the seller's payouts in its currency
    wherever they would go (_payouts_held) until finance has looked and retries it.
    """
    try:
        gone = stripe_client.customer_gone(payout.destination)
    except (stripe_client.StripeUnavailable, stripe_client.StripeNotConfigured) as exc:
        # Not known either way: left pending, sent (and asked) again next run.
        MarketPayout.objects.filter(pk=payout.pk).update(
            last_error=f"{error}; whether the customer was deleted: no answer: {exc}"[:500]
        )
        return PayoutStatus.PENDING
    except stripe_client.StripeRequestRefused:
        return None  # not known to be deleted: the credit's own refusal is what counts
    if not gone:
        return None
    if sent_before:
        reason = (
            f"customer {payout.destination} was deleted at Stripe ({error[:80]}), and an "
            "earlier send of this payout, its answer lost, may have credited it first (Stripe "
            "no longer shows a deleted customer's balance): not paid elsewhere, the seller "
            "may have used that credit. Proceeds back to available; the seller's payouts "
            "in this currency wait until finance has looked (the customer's balance "
            f"transactions in Stripe's dashboard, metadata market_payout={payout.pk}). Not "
            "credited: Retry pays the organization's customer or Connect account now."
        )
        logger.error("market payout %s of seller %s: %s", payout.pk, payout.seller_id, reason)
        return _payout_fail(
            payout_id=payout.pk, destination=payout.destination, error=reason, may_have_paid=True
        )
    current = (
        BillingCustomer.objects.filter(organization_id=payout.seller_id)
        .values_list("stripe_customer_id", flat=True)
        .first()
    )
    if current and current != payout.destination:
        # Only while the payout is still for the customer that refused it.
        moved = MarketPayout.objects.filter(
            pk=payout.pk, status=PayoutStatus.PENDING, destination=payout.destination
        ).update(destination=current, deleted_destination=payout.destination)
        if moved:
            audit_record(
                organization=payout.seller,
                action="market.payout_redirected",
                target=f"market payout {payout.pk}",
                data={
                    "payout": payout.pk,
                    "from": payout.destination,
                    "to": current,
                    "why": "deleted at Stripe",
                },
            )
            logger.warning(
                "market payout %s: customer %s deleted at Stripe; sent to the organization's "
                "new customer %s",
                payout.pk,
                payout.destination,
                current,
            )
        # Sent there now, asking Stripe first as every send does (still under this send's
        # lock), or, not moved, the state the payout is in.
        return _payout_send(payout_id=payout.pk)
    reason = (
        f"customer {payout.destination} was deleted at Stripe ({error[:200]}): nothing paid. "
        "The proceeds are back to available and are paid to the organization's new "
        "customer (made on its next checkout, portal link or marketplace order) or "
        "Connect account by the first payout run once it has one."
    )
    logger.warning("market payout %s of seller %s: %s", payout.pk, payout.seller_id, reason)
    return _payout_fail(
        payout_id=payout.pk,
        destination=payout.destination,
        error=reason,
        status=PayoutStatus.CUSTOMER_DELETED,
    )


def _losses_while_paying(
    payout: MarketPayout, fills: list[MarketFill]
) -> dict[tuple[int, int], int]:
    """Seller shares that refunds and disputes booked as losses against this payout's
    fills while it was being paid, by (fill, reversal transaction).

    At most what this payout was paying for each fill: of a fill a won
    dispute reopened, an earlier payout paid the rest, and that stays lost.
    """
    # What each fill was owed when the payout was recorded: nothing changes a
    # paid-out fill's shares while its payout is in flight.
    paying = {fill.pk: _seller_share_left(fill) for fill in fills}
    entries = (
        MoneyEntry.objects.filter(
            transaction__payout=payout,
            transaction__kind=MoneyTransactionKind.REVERSAL,
            account__kind=MoneyAccountKind.LOSSES,
        )
        .order_by("transaction_id")
        .values_list("transaction__fill_id", "transaction_id", "amount")
    )
    losses = {}
    for fill_id, txn_id, amount in entries:
        recovered = min(-amount, paying.get(fill_id, 0))
        paying[fill_id] = paying.get(fill_id, 0) - recovered
        if recovered:
            losses[(fill_id, txn_id)] = recovered
    return losses


def _losses_recover(losses: dict[tuple[int, int], int]) -> None:
    """What was booked as lost comes back from the seller's share instead: on the
    fills (so what is left to pay excludes it) and on their reversals' records.

    By (fill, reversal transaction). A negative amount goes the other way: a share the
    seller bore becomes a loss (payout_mark_paid: the payout paid it after all). Undoing
    the reversal reads the sum from `recovered_by_fill` (_reversed_part).

    Called with the fills locked and before any money account is (the lock order
    above): it locks the reversals it updates first, in primary-key order.
    """
    # The transaction is reversal:<reversal key>:<fill>.
    reversal_keys = {
        pk: key.removeprefix("reversal:").rpartition(":")[0]
        for pk, key in MoneyTransaction.objects.filter(
            pk__in=[txn for _, txn in losses]
        ).values_list("pk", "idempotency_key")
    }
    recovered = dict(
        MarketReversal.objects.select_for_update()
        .filter(key__in=set(reversal_keys.values()))
        .order_by("pk")
        .values_list("key", "recovered_by_fill")
    )
    for (fill_id, txn_id), amount in losses.items():
        key = reversal_keys[txn_id]
        # A loss booked against a payout is recovered once (a payout fails once), and
        # booked again at most once (finance marks a failed payout paid once).
        moved = recovered[key].get(str(fill_id), 0) + amount
        if moved:
            recovered[key][str(fill_id)] = moved
        else:
            recovered[key].pop(str(fill_id), None)
        MarketFill.objects.filter(pk=fill_id).update(seller_reversed=F("seller_reversed") + amount)
        MarketReversal.objects.filter(key=key).update(
            loss=F("loss") - amount,
            seller_reversed=F("seller_reversed") + amount,
            recovered_by_fill=recovered[key],
        )


@retry_on_deadlock
def _payout_fail(
    *,
    payout_id: int,
    destination: str,
    error: str,
    status: str = PayoutStatus.FAILED,
    may_have_paid: bool = False,
) -> str:
    """Stripe refused the payout to `destination`: its proceeds go back to available,
    where they wait until finance retries (`_payouts_held`; `may_have_paid`: wherever they
    would go) or the seller's destination changes (`status` customer_deleted: until it
    changes; _payout_customer_deleted). Also what closes a payout never sent whose seller
    was frozen since it was recorded (`status` seller_frozen: nothing held, paid by a new
    payout once the freeze is lifted; _payout_frozen). Returns the payout's status after.

    Only while it is pending to `destination`, the one that refused it: sent elsewhere
    meanwhile (a redirect to a new customer), the refusal says nothing of it.

    Not all of them: a refund or dispute that came while the payout was
    pending found its fills paid out and booked their seller share as a loss.
    Nothing was paid after all, so that share is recovered from the loss and
    taken from the seller's proceeds, as it would have been before the payout.
    """
    with transaction.atomic():
        payout = (
            MarketPayout.objects.select_for_update(of=("self",))
            .select_related("seller")
            .get(pk=payout_id)
        )
        if payout.status != PayoutStatus.PENDING or payout.destination != destination:
            return payout.status
        fills = list(MarketFill.objects.select_for_update().filter(payout=payout).order_by("pk"))
        losses = _losses_while_paying(payout, fills)
        recovered = sum(losses.values())
        # Before the money posting: its seller account is locked after the reversals.
        _losses_recover(losses)
        money_post(
            kind=MoneyTransactionKind.PAYOUT_FAILED,
            key=f"payout_failed:{payout.pk}",
            currency=payout.currency,
            organization=payout.seller,
            payout=payout,
            postings=[
                (
                    money_account(kind=MoneyAccountKind.PAYOUTS, currency=payout.currency),
                    -payout.amount,
                ),
                (
                    money_account(
                        kind=MoneyAccountKind.SELLER_AVAILABLE,
                        currency=payout.currency,
                        organization=payout.seller,
                    ),
                    payout.amount - recovered,
                ),
                (
                    money_account(kind=MoneyAccountKind.LOSSES, currency=payout.currency),
                    recovered,
                ),
            ],
            memo=error,
        )
        MarketFill.objects.filter(pk__in=[f.pk for f in fills]).update(
            proceeds=ProceedsState.AVAILABLE, payout=None, refused_payout=payout
        )
        MarketPayout.objects.filter(pk=payout.pk).update(
            status=status, last_error=error[:500], may_have_paid=may_have_paid
        )
        return status


def payouts_run(*, now: datetime | None = None) -> int:
    """Make proceeds past the holding period available, record payouts, send them."""
    now = now or timezone.now()
    for pk in MarketFill.objects.filter(
        proceeds=ProceedsState.PENDING, available_at__lte=now
    ).values_list("pk", flat=True)[:1000]:
        _fill_mature(fill_id=pk, now=now)
    sellers = (
        MarketFill.objects.filter(proceeds=ProceedsState.AVAILABLE)
        .values_list("seller_id", "currency")
        .distinct()
    )
    # A seller frozen by a refund or dispute is not paid until finance lifts it: no
    # payout is recorded for them (_payout_record), and one recorded before the freeze
    # is not sent (_payout_send: closed, its proceeds back to available, or held if an
    # earlier send may have reached Stripe; _payout_frozen), each read under its lock.
    for seller_id, currency in sorted(set(sellers)):
        _payout_record(seller_id=seller_id, currency=currency)
    sent = 0
    for pk in MarketPayout.objects.filter(status=PayoutStatus.PENDING).values_list("pk", flat=True):
        sent += payout_send(payout_id=pk) == PayoutStatus.SENT
    return sent


def payouts_retry(*, payout_ids: list[int], note: str = "", actor=None) -> dict[int, str]:
    """Finance fixed what made Stripe refuse these payouts: their sellers are paid again.

    The refused payout stops holding, and with it every other refused payout to the same
    seller, currency and destination but one that may have paid the seller
    (`may_have_paid`): finance looks at each of those at Stripe, and retries it or marks
    it paid on its own (payout_mark_paid), under its own lock. Released with another, it
    could no longer be marked paid, and its sales would be paid again. Then what the
    seller has available is recorded and sent at once. Returns, by refused payout, what
    became of it: the new payout's status, "nothing available", "held by payout <id>"
    (another that may have paid the seller still holds their payouts: nothing is paid
    until it is retried or marked paid too; the payout run pays them then), "frozen"
    (a seller frozen by a refund or dispute: nothing changed; retry it once finance
    lifts the freeze), or "released; the seller is frozen: ..." (frozen once released:
    nothing recorded, or the new payout closed unsent, seller_frozen; the payout run pays
    them once the freeze is lifted). Refused again, the new payout holds them again.

    A payout that may have paid the seller pays them again once retried, so finance say
    what they found at Stripe: retried only with a `note`, which goes with who
    (`actor`) to the seller's audit log (`market.payout_retried`); without one, "not
    retried: ..." and nothing changed.
    """
    held = list(
        MarketPayout.objects.filter(
            pk__in=payout_ids, status=PayoutStatus.FAILED, retry_allowed_at__isnull=True
        )
        .order_by("pk")
        .values_list("pk", "seller_id", "currency", "destination", "may_have_paid")
    )
    results: dict[int, str] = {}
    released: dict[tuple[int, str, str], int] = {}
    for pk, seller_id, currency, destination, may_have_paid in held:
        group = (seller_id, currency, destination)
        if not may_have_paid and group in released:
            # Released by an earlier one's retry (one that may have paid never is: it is
            # retried on its own).
            results[pk] = results[released[group]]
            continue
        # Under the refused payout's send lock, as finance's payout_mark_paid: of the two
        # at once, the later finds what the first did to this payout (marked paid: not
        # retried, which would pay the seller again; retried: not marked paid).
        with session_lock(f"market-payout:{pk}"):
            results[pk], was_released = _payout_retry(
                payout_id=pk,
                seller_id=seller_id,
                currency=currency,
                destination=destination,
                note=note.strip(),
                actor=actor,
            )
        if was_released:
            released.setdefault(group, pk)
    return results


def _payout_retry(
    *, payout_id: int, seller_id: int, currency: str, destination: str, note: str, actor
) -> tuple[str, bool]:
    """payouts_retry of one refused payout, under its lock: what became of it, and whether
    it and the others it releases were released."""
    holding = _holding(seller_id=seller_id, currency=currency)
    if not holding.filter(pk=payout_id).exists():  # under the lock: it stays so
        status = MarketPayout.objects.values_list("status", flat=True).get(pk=payout_id)
        return f"not retried: it is {status} now", False
    with transaction.atomic():
        # Before anything is released, under the row lock resale_freeze takes (a freeze is
        # committed before this reads it, or waits until the release is): a frozen
        # seller's payout left as it was can still be marked paid, and is not paid again
        # by the first run after the freeze is lifted.
        customer = _seller_customer_locked(seller_id)
        if customer is not None and customer.resale_frozen_at is not None:
            return "frozen", False
        payout = MarketPayout.objects.select_related("seller").get(pk=payout_id)
        if payout.may_have_paid and not note:
            return (
                "not retried: an earlier send may have paid the seller; say what you found "
                "at Stripe (a note)"
            ), False
        # Not the others that may have paid: this payout's lock does not cover them (a
        # payout_mark_paid of one may be running), and finance has looked at this one only.
        holding.filter(destination=destination).filter(
            Q(pk=payout_id) | Q(may_have_paid=False)
        ).update(retry_allowed_at=timezone.now())
        if payout.may_have_paid:
            _payout_audit(payout, "market.payout_retried", actor=actor, note=note)
    still = holding.filter(may_have_paid=True).values_list("pk", flat=True).first()
    if still is not None:
        return f"held by payout {still}", True
    # A freeze since the release: nothing is recorded (_payout_record), or what is, is
    # closed unsent (payout_send: seller_frozen); the payout run pays the seller once it
    # is lifted.
    new = _payout_record(seller_id=seller_id, currency=currency)
    if new is not None:
        status = payout_send(payout_id=new.pk)
        if status != PayoutStatus.SELLER_FROZEN:
            return status, True
    elif not BillingCustomer.objects.filter(
        organization_id=seller_id, resale_frozen_at__isnull=False
    ).exists():
        return "nothing available", True
    return "released; the seller is frozen: paid once it is lifted", True


def _payout_audit(payout: MarketPayout, action: str, *, actor, note: str, **data) -> None:
    """What finance did to a refused payout that may have paid the seller (retried it,
    marked it paid), in the seller's audit log: who, the payout, their note."""
    audit_record(
        organization=payout.seller,
        action=action,
        target=f"market payout {payout.pk}",
        actor_user=actor,
        data={
            "payout": payout.pk,
            "amount": payout.amount,
            "currency": payout.currency,
            "destination": payout.destination,
            **data,
            "note": note[:500],
        },
    )


# Which payouts finance may mark paid at Stripe (payout_mark_paid): refused, an earlier
# send of which may have paid the seller, not retried (the admin's action offers these).
PAYOUT_MARKABLE = Q(status=PayoutStatus.FAILED, may_have_paid=True, retry_allowed_at__isnull=True)
# The shape of a Stripe customer balance transaction's id: finance's evidence that a
# payout's balance credit was made (payout_mark_paid).
BALANCE_TRANSACTION_ID = r"^cbtxn_[A-Za-z0-9]+$"


def payout_mark_paid(*, payout_id: int, note: str, evidence: str, actor) -> MarketPayout:
    """Finance found at Stripe that a payout failed with `may_have_paid` did pay the seller:
    an earlier send, its answer lost, credited the customer before it was deleted (the
    balance transaction `evidence`, in the deleted customer's balance in Stripe's
    dashboard). Retrying it would pay the seller again.

    Recorded as the send that made it would have been, had its answer come: the payout's
    amount paid out of the seller's proceeds and its fills paid out by it (_payout_book, as
    when it was recorded, before its refusal gave them back), and the payout sent to the
    destination it was sent to (_payout_sent), `evidence` as Stripe's object. Refunds and
    disputes that took from its sales after it was recorded are then booked as they are for
    a sale refunded after its payout: the seller's share a loss (_reversal_apply), not
    taken from the seller's proceeds. Taken while it was being sent, they were a loss, which
    its refusal recovered from the seller; taken since it was refused, they came out of the
    seller's available proceeds: either way that share goes back to the losses
    (_shares_taken_since_paid), and the rest of the payout's amount out of the proceeds. A
    dispute won later then gives the loss back to the platform, not to the seller, whom
    the payout paid. No longer failed, it holds the seller's payouts no more: the next run
    pays what else they have available. Who, `note`, `evidence` and what was booked as
    lost go to the seller's audit log (`market.payout_marked_paid`).

    Only such a payout, not retried: 409 `payout_not_markable` otherwise. Under its send
    lock, as payouts_retry takes it. 409, nothing recorded, where the ledger cannot say
    exactly what the payout paid: `payout_sales_unrecorded` for one refused before
    gymbilling/0040 (which sales it paid was not kept), `payout_sales_changed` where a
    refund or dispute from before it was recorded was undone since (paid, the payout would
    have left its sale reopened for that share, which is not booked here); both messages
    tell finance what to do.
    """
    note = note.strip()
    evidence = evidence.strip()
    if not note:
        raise ApplicationError(
            code="reason_required",
            message="Say what you found at Stripe (where the credit was, who checked).",
            param="note",
        )
    if not re.fullmatch(BALANCE_TRANSACTION_ID, evidence):
        raise ApplicationError(
            code="invalid_evidence",
            message="Give the id of the customer balance transaction that credited the "
            "seller (cbtxn_..., in the deleted customer's balance in Stripe's dashboard).",
            param="evidence",
        )
    with session_lock(f"market-payout:{payout_id}"):
        return _payout_marked_paid(payout_id=payout_id, note=note, evidence=evidence, actor=actor)


@retry_on_deadlock
def _payout_marked_paid(*, payout_id: int, note: str, evidence: str, actor) -> MarketPayout:
    with transaction.atomic():
        # _payout_fail's lock order: the payout, its fills, the reversals whose shares move
        # (_shares_taken_since_paid, _losses_recover), then money accounts.
        payout = (
            MarketPayout.objects.select_for_update(of=("self",))
            .select_related("seller")
            .get(pk=payout_id)
        )
        if not MarketPayout.objects.filter(PAYOUT_MARKABLE, pk=payout.pk).exists():
            raise payout_not_markable(payout)
        fills = list(
            MarketFill.objects.select_for_update().filter(refused_payout=payout).order_by("pk")
        )
        taken = _shares_taken_since_paid(payout, fills, evidence=evidence)
        lost = sum(taken.values())
        # Before the money posting: its seller account is locked after the reversals.
        _losses_recover({part: -amount for part, amount in taken.items()})
        _payout_book(payout, fills=fills, key=f"payout_marked_paid:{payout.pk}", lost=lost)
        _payout_sent(payout.pk, stripe_object_id=evidence, was=PayoutStatus.FAILED)
        _payout_audit(
            payout,
            "market.payout_marked_paid",
            actor=actor,
            note=note,
            evidence=evidence,
            lost=lost,
        )
    logger.warning(
        "market payout %s of %s %s to %s marked paid at Stripe (%s) by %s, %s of it lost to "
        "refunds and disputes since: %s",
        payout.pk,
        payout.amount,
        payout.currency,
        payout.destination,
        evidence,
        getattr(actor, "email", actor),
        lost,
        note,
    )
    payout.refresh_from_db()
    return payout


def payout_not_markable(payout: MarketPayout) -> ApplicationError:
    """Why payout_mark_paid refuses a payout that is not PAYOUT_MARKABLE."""
    state = (
        f"was retried by finance at {payout.retry_allowed_at.isoformat(timespec='seconds')}: "
        "its proceeds were paid (or are paid) again since"
        if payout.status == PayoutStatus.FAILED and payout.retry_allowed_at is not None
        else "was refused by Stripe before it reached the seller: nothing was paid; Retry it "
        "once the cause is fixed"
        if payout.status == PayoutStatus.FAILED
        else f"is {payout.get_status_display().lower()}"
    )
    return ApplicationError(
        code="payout_not_markable",
        message="Only a refused payout that an earlier send may have paid (may have paid: "
        f"yes), not retried, can be marked paid at Stripe: payout {payout.pk} {state}.",
        status=409,
    )


def _shares_taken_since_paid(
    payout: MarketPayout, fills: list[MarketFill], *, evidence: str
) -> dict[tuple[int, int], int]:
    """payout_mark_paid's reading of the ledger (fills locked; the reversals it reads are
    locked here, before any money account): what refunds and disputes took from the seller's
    share of the payout's sales after it was recorded, by (fill, reversal transaction).

    Taken while it was being sent, the share was booked a loss against the payout, and
    recovered from the seller by its refusal (recovered_by_fill); taken since, it came out
    of the seller's available proceeds. Either way it is what the reversal's part of the
    fill says the seller bore (_reversed_part). A refund or dispute undone since (a dispute
    won, a refund failed) bears nothing in the end, whichever way it took: left as it is.
    What the payout paid is then what its sales still owe the seller plus what was taken:
    checked against its amount.

    Raises 409 where that cannot be booked exactly (nothing recorded; the message says what
    to do): `payout_sales_unrecorded` when the refusal did not record the payout's sales
    (before gymbilling/0040: the payout was booked as one amount, with no posting per sale,
    so nothing says which of the seller's available sales it paid); `payout_sales_changed`
    when a refund or dispute from before the payout was recorded was undone since, giving
    the seller's share back to their proceeds (paid, the payout would have left that sale
    reopened for the share, earlier payouts set, and later refunds of it taken from it as
    available: not booked here), or when the ledger is out of step with the sales.
    """
    recorded = MoneyTransaction.objects.filter(idempotency_key=f"payout:{payout.pk}").first()
    refused = MoneyTransaction.objects.filter(idempotency_key=f"payout_failed:{payout.pk}")
    if not fills or recorded is None or not refused.exists():
        raise _not_booked_here(
            payout,
            evidence,
            code="payout_sales_unrecorded",
            why="Stripe refused it before gymbilling/0040, when a refused payout's sales were "
            f"not recorded; its {payout.amount} {payout.currency} were booked as one amount, "
            "so the ledger cannot say which of the seller's available sales it paid",
        )
    for fill in fills:
        # Paid out by no payout: a refund or dispute took all it had left (_payout_record).
        swept = fill.proceeds == ProceedsState.PAID_OUT and not _seller_share_left(fill)
        if fill.payout_id is not None or not (fill.proceeds == ProceedsState.AVAILABLE or swept):
            raise _not_booked_here(
                payout,
                evidence,
                code="payout_sales_changed",
                why=f"its sale {fill.pk} is no longer as its refusal left it ({fill.proceeds}, "
                f"payout {fill.payout_id})",
            )
    # Every posting on a fill is made with the fill locked, as the payout's recording was:
    # one made after it has a later id. A released fill is touched by nothing but refunds,
    # disputes and their undoing.
    reversed_since: dict[tuple[str, int], int] = {}  # (reversal key, fill): its transaction
    undone_since: list[tuple[str, int, int]] = []  # (reversal key, fill, transaction)
    for pk, kind, key, fill_id in (
        MoneyTransaction.objects.filter(fill__in=fills, pk__gt=recorded.pk)
        .order_by("pk")
        .values_list("pk", "kind", "idempotency_key", "fill_id")
    ):
        if kind == MoneyTransactionKind.REVERSAL:
            reversed_since[(key.removeprefix("reversal:").rpartition(":")[0], fill_id)] = pk
        elif kind == MoneyTransactionKind.REINSTATEMENT:
            undone_since.append(
                (key.removeprefix("reinstatement:").rpartition(":")[0], fill_id, pk)
            )
        else:
            raise _not_booked_here(
                payout,
                evidence,
                code="payout_sales_changed",
                why=f"its sale {fill_id} has a {kind} ({key}) since it was recorded",
            )
    gave_back = set(
        MoneyEntry.objects.filter(
            transaction_id__in=[pk for _, _, pk in undone_since], account__kind__in=SELLER_KINDS
        ).values_list("transaction_id", flat=True)
    )
    for key, fill_id, pk in undone_since:
        if pk in gave_back and (key, fill_id) not in reversed_since:
            raise _not_booked_here(
                payout,
                evidence,
                code="payout_sales_changed",
                why=f"{key}, which took from its sale {fill_id} before it was recorded, was "
                "undone since Stripe refused it (a dispute won, a refund failed), giving that "
                "share back to the seller's proceeds; paid, the payout would have left the "
                "sale reopened for it, which cannot be booked here",
            )
    reversals = {
        reversal.key: reversal
        for reversal in MarketReversal.objects.select_for_update()
        .filter(key__in={key for key, _ in reversed_since})
        .order_by("pk")
    }
    by_pk = {fill.pk: fill for fill in fills}
    taken: dict[tuple[int, int], int] = {}
    for (key, fill_id), txn in reversed_since.items():
        if reversals[key].reinstated_at is not None:
            continue
        part = _reversed_part(reversal=reversals[key], fill=by_pk[fill_id])
        if part is not None and part.seller:
            taken[(fill_id, txn)] = part.seller
    owed = sum(_seller_share_left(fill) for fill in fills)
    if owed + sum(taken.values()) != payout.amount:
        raise _not_booked_here(
            payout,
            evidence,
            code="payout_sales_changed",
            why=f"its sales owe the seller {owed} and refunds and disputes took "
            f"{sum(taken.values())} of them since it was recorded, not its "
            f"{payout.amount} {payout.currency}: the ledger is out of step",
        )
    return taken


def _not_booked_here(
    payout: MarketPayout, evidence: str, *, code: str, why: str
) -> ApplicationError:
    """payout_mark_paid's refusal of a payout it cannot book exactly, and what finance do."""
    return ApplicationError(
        code=code,
        message=f"Payout {payout.pk} cannot be marked paid here: {why}. Nothing was recorded. "
        f"Do not Retry it: that would pay the seller its {payout.amount} {payout.currency} "
        f"again. It stays held, and with it the seller's payouts in {payout.currency}: send "
        f"engineering the payout's id and the balance transaction {evidence}, to record it "
        "by hand.",
        status=409,
    )


# --- refunds and disputes ---------------------------------------------------------------


def market_reversal_handle(
    *,
    kind: str,
    key: str,
    charge: dict,
    amount: int,
    cumulative: bool,
    refund: dict | None = None,
) -> bool:
    """A refund or dispute of a charge; True when the charge paid a marketplace order.

    A refund comes one at a time (`refund`: Stripe's, `amount` its own): the
    order's shortfall refund (what it paid for and did not get, refunded by
    order_shortfall_refund) takes nothing back. `amount` with `cumulative` is
    a running total of refunds instead: only the part not yet applied (and
    not our own shortfall refund) is applied now.
    It is split over the order's fills pro rata to their gross (rules.refund_split),
    so each seller of a multi-seller order bears their share of a partial
    refund; more than they have left to give back is recorded as `unapplied`,
    for finance, and moves nothing. Per fill: the platform's fee share comes
    back from fees, the seller's share from their proceeds while not yet paid
    out, and what was already paid out is posted as a loss. The buyer's unspent credits of
    that share are clawed back; spent ones are recorded as lost credits;
    those the buyer's running work holds are pending, claimed on the
    buyer's wallet until that work settles (market_reversals_pending_settle).
    """
    intent = charge.get("payment_intent")
    if isinstance(intent, dict):
        intent = intent.get("id")
    if not intent:
        return False
    order = MarketOrder.objects.filter(stripe_payment_intent_id=str(intent)).first()
    if order is None:
        return False
    if refund is not None and _is_shortfall_refund(refund, order.pk):
        return True  # money for credits never delivered: nothing of the sale to take back
    froze = _reversal_apply(
        order_id=order.pk, kind=kind, key=key, charge=charge, amount=amount, cumulative=cumulative
    )
    frozen = BillingCustomer.objects.filter(
        organization=order.buyer, resale_frozen_at__isnull=False
    ).exists()
    if froze or frozen:
        # As for a refunded subscription payment: a frozen organization's open
        # listings end too (outside the order's transaction: listings are
        # locked before orders). Also on a replay while the buyer is still
        # frozen: the delivery that froze them may have died before this.
        listings_withdraw_all(seller=order.buyer)
    return True


@retry_on_deadlock
def _reversal_apply(
    *, order_id: int, kind: str, key: str, charge: dict, amount: int, cumulative: bool
) -> bool:
    """Apply the reversal once; True when it froze the buyer's reselling."""
    from gymbilling.services import resale_freeze

    with transaction.atomic():
        order = (
            MarketOrder.objects.select_for_update(of=("self",))
            .select_related("buyer")
            .get(pk=order_id)
        )
        if MarketReversal.objects.filter(key=key).exists():
            return False
        # The lock order (above): the order, its fills, then its reversals, then
        # ledger accounts; _reinstatement_apply takes the same.
        fills = list(
            MarketFill.objects.select_for_update(of=("self",))
            .filter(order=order, status=FillStatus.DELIVERED, gross__gt=0)
            .select_related("seller")
            .order_by("pk")
        )
        # Every earlier reversal still waiting is locked now, in primary-key order,
        # before any ledger account: settling one below takes the buyer's wallet,
        # and locking the next one only then would wait, holding the wallet, for the
        # pending sweep, which holds that row and waits for the wallet (a deadlock).
        # No reversal of the order becomes pending meanwhile (they are made under
        # the order's lock, held here); one the sweep settles first settles to 0.
        waiting = list(
            MarketReversal.objects.filter(order=order, credits_pending__gt=0)
            .select_for_update()
            .order_by("pk")
            .values_list("pk", flat=True)
        )
        # An earlier reversal of the order still waiting for the buyer's running
        # work first takes back what that work gave back since (as its sweep
        # would): the credits it claimed are its own, not this one's to take, and
        # what it still has pending is then only what the work holds.
        for pk in waiting:
            _reversal_pending_settle(reversal_id=pk, now=timezone.now())
        if cumulative:
            earlier = (
                MarketReversal.objects.filter(
                    # A refund that failed since returned nothing.
                    order=order,
                    kind=kind,
                    reinstated_at__isnull=True,
                ).aggregate(s=Sum(F("amount") + F("unapplied")))["s"]
                or 0
            )
            new = max(0, amount - order.shortfall_amount - earlier)
        else:
            new = max(0, amount)
        reversal = MarketReversal.objects.create(
            key=key,
            kind=kind,
            order=order,
            stripe_charge_id=str(charge.get("id") or ""),
            currency=order.currency,
            amount=new,
        )
        totals = {
            "fee_reversed": 0,
            "seller_reversed": 0,
            "loss": 0,
            "credits_clawed_back": 0,
            "credits_lost": 0,
            "credits_pending": 0,
        }
        pending_by_fill: dict[str, int] = {}
        cur = order.currency
        system = _system_accounts(cur)
        # Pro rata to the fills' gross, not fill by fill: taken in order, a partial
        # refund of a multi-seller order would come all out of the first seller.
        parts = refund_split(amount=new, fills=[(fill.gross, fill.refunded) for fill in fills])
        # More than the fills have left to refund: no sale of it to take back (a refund
        # made by hand of the order's shortfall too, its own refund then refused; a
        # dispute of money refunded already). Recorded beside what was applied, not in it.
        unapplied = new - sum(parts)
        # Posted once the credits are done: money accounts after the credit ledger's
        # (the lock order above).
        money_postings: list[tuple[MarketFill, list[tuple[MoneyAccount, int]]]] = []
        for fill, r in zip(fills, parts, strict=True):
            if r <= 0:
                continue
            before, after = fill.refunded, fill.refunded + r
            # The fee comes back in proportion, rounded down (the platform keeps
            # a fraction of a cent until the last refund returns all of it).
            fee_back = fill.fee * after // fill.gross - fill.fee * before // fill.gross
            seller_part = r - fee_back
            reversible = 0
            seller_account = None
            if fill.proceeds in (ProceedsState.PENDING, ProceedsState.AVAILABLE):
                reversible = min(seller_part, _seller_share_left(fill))
                seller_account = _proceeds_account(fill, fill.proceeds)
            loss = seller_part - reversible
            postings = [
                (system[MoneyAccountKind.BUYER_CLEARING], r),
                (system[MoneyAccountKind.PLATFORM_FEES], -fee_back),
                (system[MoneyAccountKind.LOSSES], -loss),
            ]
            if seller_account is not None:
                postings.append((seller_account, -reversible))
            money_postings.append((fill, postings))
            # Credits: the refunded share of what was delivered, from what is unspent.
            credit_target = share_ceil(fill.delivered_quantity, after, fill.gross) - share_ceil(
                fill.delivered_quantity, before, fill.gross
            )
            clawed = 0
            for lot in CreditLot.objects.filter(created_by_id=fill.settle_transaction_id).order_by(
                "pk"
            ):
                if clawed == credit_target:
                    break
                clawed += lot_clawback(
                    lot=lot,
                    amount=credit_target - clawed,
                    key=f"market:{key}:{fill.pk}:{lot.pk}",
                    memo=f"{kind} of marketplace order {order.pk}",
                )
            # What is still unspent of them now, running work holds (a
            # clawback takes all it may otherwise): it waits for that work,
            # claimed on the wallet so that no new work takes it meanwhile.
            pending = (
                credits_claim(
                    organization=order.buyer,
                    lots=_fill_lots([fill.settle_transaction_id]),
                    amount=credit_target - clawed,
                    at=reversal.created_at,
                    claimed_by_others=_fill_pending_besides(reversal, fill.pk),
                )
                if credit_target > clawed
                else 0
            )
            MarketFill.objects.filter(pk=fill.pk).update(
                refunded=after, seller_reversed=fill.seller_reversed + reversible
            )
            totals["fee_reversed"] += fee_back
            totals["seller_reversed"] += reversible
            totals["loss"] += loss
            totals["credits_clawed_back"] += clawed
            totals["credits_pending"] += pending
            totals["credits_lost"] += credit_target - clawed - pending
            if pending:
                pending_by_fill[str(fill.pk)] = pending
        # Every seller's account first, in primary-key order: fill by fill, two reversals
        # (or a reversal and a payment) of the same sellers would lock them in opposite
        # orders, and deadlock.
        money_accounts_lock(account for _, entries in money_postings for account, _ in entries)
        for fill, postings in money_postings:
            try:
                money_post(
                    kind=MoneyTransactionKind.REVERSAL,
                    key=f"reversal:{key}:{fill.pk}",
                    currency=cur,
                    organization=fill.seller,
                    fill=fill,
                    # A loss while the fill's payout is in flight: should Stripe
                    # refuse that payout, the loss is recovered (_payout_fail).
                    payout=fill.payout if fill.proceeds == ProceedsState.PAID_OUT else None,
                    postings=postings,
                    memo=f"{kind} of {charge.get('id')}",
                )
            except MoneyInsufficient as exc:  # reconcile guarantees it cannot happen
                raise AssertionError(f"proceeds of fill {fill.pk} out of step: {exc}") from exc
        applied = new - unapplied
        if unapplied:
            logger.error(
                "market order %s: %s %s of %s %s returned %s more than its fills had left to "
                "give back; not applied to the sale, recorded on the reversal for finance",
                order.pk,
                kind,
                key,
                new,
                cur,
                unapplied,
            )
        MarketReversal.objects.filter(pk=reversal.pk).update(
            **totals, amount=applied, unapplied=unapplied, pending_by_fill=pending_by_fill
        )
        # A refund freezes for what it took of the sale only: a refund of an undelivered
        # part is ours, the buyer did nothing. A dispute is the buyer's, whatever it took.
        freezes = (applied if kind == "refund" else new) > 0
        if freezes:
            resale_freeze(organization=order.buyer, reason=f"{kind} of {charge.get('id')}")
        return freezes


def _fill_pending_besides(reversal: MarketReversal, fill_pk: int) -> Callable[[], int]:
    """What the order's other reversals still wait for of the fill's lots. For metering to read
    under the buyer's wallet row lock (credits_claim, claim_settle)."""

    def pending() -> int:
        return sum(
            int(by_fill.get(str(fill_pk), 0))
            for by_fill in MarketReversal.objects.filter(
                order_id=reversal.order_id, credits_pending__gt=0
            )
            .exclude(pk=reversal.pk)
            .values_list("pending_by_fill", flat=True)
        )

    return pending


def _pending_fill_lots(reversal: MarketReversal) -> dict[str, Q]:
    """The lots of each fill the reversal still waits on (its pending_by_fill's keys)."""
    settled_by = MarketFill.objects.filter(
        pk__in=[int(pk) for pk in reversal.pending_by_fill]
    ).values_list("pk", "settle_transaction_id")
    return {str(pk): _fill_lots([settled]) for pk, settled in settled_by}


def market_reversals_claimed(*, organization: Organization) -> list[tuple[Q, datetime]]:
    """What the buyer's pending marketplace refunds and disputes claimed: each fill's lots
    a reversal waits on, with its time (for claims_repair to mark them as the claim did)."""
    return [
        (lots, reversal.created_at)
        for reversal in MarketReversal.objects.filter(
            order__buyer=organization, credits_pending__gt=0
        ).order_by("pk")
        for lots in _pending_fill_lots(reversal).values()
    ]


def _fill_lots(settle_transaction_ids: list[int]) -> Q:
    """The buyer's lots that fills delivered (by the transactions that delivered them)."""
    return Q(created_by_id__in=settle_transaction_ids)


def market_reversals_pending_settle(*, now: datetime | None = None) -> int:
    """Take back what marketplace refunds and disputes found held by the buyer's running work.

    As payment_reversals_pending_settle does for packs and subscriptions
    (metering's `claim_settle`): every 10 seconds, each such reversal takes
    back what that work has given back since, and what it spent is a loss.
    Returns the micro-credits taken back.
    """
    now = now or timezone.now()
    return each_isolated(
        MarketReversal.objects.filter(credits_pending__gt=0).values_list("pk", flat=True),
        lambda pk: _reversal_pending_settle(reversal_id=pk, now=now),
        what="the pending settle of marketplace reversal",
    )


@retry_on_deadlock
def _reversal_pending_settle(*, reversal_id: int, now: datetime) -> int:
    with transaction.atomic():
        # The row a won dispute locks before it drops what is pending. First here,
        # though the lock order puts the order and its fills before it: this sweep
        # locks neither, only the buyer's wallet and lots after it, as the won
        # dispute does after the reversal.
        reversal = MarketReversal.objects.select_for_update().get(pk=reversal_id)
        pending = reversal.credits_pending
        if pending <= 0:
            return 0
        order = MarketOrder.objects.select_related("buyer").get(pk=reversal.order_id)
        lots_of = _pending_fill_lots(reversal)
        taken_all = lost_all = 0
        still_by_fill: dict[str, int] = {}
        # Fill by fill, from that fill's lots only: the refund claimed each
        # fill's share of what running work held of it, and nothing of others.
        for fill_pk, fill_pending in sorted(reversal.pending_by_fill.items()):
            # Keyed by what is pending, as a pack's: a take that moved credits
            # changes it; one that moved nothing wrote nothing.
            taken, still = claim_settle(
                organization=order.buyer,
                lots=lots_of[fill_pk],
                pending=fill_pending,
                key=f"market:{reversal.key}:{fill_pk}:pending:{fill_pending}",
                memo=f"{reversal.kind} of marketplace order {order.pk}, once running work settled",
                # Work started since cannot shelter them.
                placed_before=reversal.created_at,
                now=now,
                claimed_by_others=_fill_pending_besides(reversal, int(fill_pk)),
            )
            taken_all += taken
            lost_all += fill_pending - taken - still
            if still:
                still_by_fill[fill_pk] = still
        MarketReversal.objects.filter(pk=reversal.pk).update(
            credits_clawed_back=F("credits_clawed_back") + taken_all,
            credits_lost=F("credits_lost") + lost_all,
            credits_pending=sum(still_by_fill.values()),
            pending_by_fill=still_by_fill,
        )
        return taken_all


# --- a dispute won ------------------------------------------------------------------------


def market_reinstatement_handle(*, key: str, refund: dict | None = None) -> bool:
    """A won dispute, or a refund that failed (`refund`); True when `key` names a reversal
    of a marketplace payment.

    Stripe gave the money back (a refund that failed returned nothing to the
    buyer), so the reversal is undone, once (a replay finds it reinstated):
    per fill, the fee share back to the platform's fees, the seller's share
    back to their proceeds, a loss booked for a share already paid out
    recovered; the buyer's credits taken back return to their lots, and those
    still pending are no longer claimed. The buyer's resale freeze stays:
    finance lifts it.

    An order's shortfall refund that failed took nothing back here, and the
    buyer is owed that money still: the order goes back to finance
    (_shortfall_refund_failed).
    """
    reversal = MarketReversal.objects.filter(key=key).first()
    if refund is not None:
        order_id = str((refund.get("metadata") or {}).get("market_order") or "")
        if order_id.isdigit() and _is_shortfall_refund(refund, int(order_id)):
            _shortfall_refund_failed(order_id=int(order_id), refund=refund)
            return True
    if reversal is None:
        return False
    _reinstatement_apply(reversal_id=reversal.pk)
    return True


def _shortfall_refund_failed(*, order_id: int, refund: dict) -> None:
    """Stripe failed an order's shortfall refund after taking it (the buyer's card closed):
    the money came back to us, and the buyer is still owed it.

    The order goes back to refused, once: out of "Refunded" into finance's
    "Refused by Stripe" list, with why, where the admin's retry sends a new refund
    (keyed by this refusal's time: not a replay of the failed one). Only for the
    refund the order records as taken: every later event of the charge reads this
    failed refund again, and a failure of an older one (finance's retry went
    through since) or a redelivery (the order refused already) changes nothing.
    """
    from gymbilling.services.events import EventWaits

    refund_id = str(refund.get("id") or "")
    why = refund.get("failure_reason") or refund.get("status")
    now = timezone.now()
    reopened = MarketOrder.objects.filter(
        # An empty id: taken before ids were kept, when an order had only the one.
        Q(shortfall_refund_id=refund_id) | Q(shortfall_refund_id=""),
        pk=order_id,
        shortfall_refunded_at__isnull=False,
    ).update(
        shortfall_refunded_at=None,
        shortfall_refund_refused_at=now,
        shortfall_refund_error=(
            f"refund {refund_id} failed at Stripe ({why}): the buyer has not had the money "
            "back; retry once the cause is fixed"
        )[:500],
        shortfall_refund_id=refund_id,
    )
    if reopened:
        logger.error(
            "market order %s: its shortfall refund %s failed (%s): the buyer has not had the "
            "money back; back with finance to refund again once the cause is fixed",
            order_id,
            refund_id,
            why,
        )
        return
    order = MarketOrder.objects.filter(pk=order_id).first()
    if order is not None and (order.shortfall_refunded_at or order.shortfall_refund_refused_at):
        # Another refund of the shortfall stands, or finance has it already.
        logger.info(
            "market order %s: its shortfall refund %s failed (%s): refunded again since, "
            "or with finance already",
            order_id,
            refund_id,
            why,
        )
        return
    if order is not None and order.shortfall_amount:
        # Taken by Stripe, but not recorded here yet (the answer lost: the sweep's next
        # request replays it under its key and records it): this waits for that.
        raise EventWaits(f"order {order_id}: its shortfall refund {refund_id} is not recorded yet")
    logger.error(
        "market order %s: its shortfall refund %s failed (%s): the buyer has not had the "
        "money back; refund it again once the cause is fixed",
        order_id,
        refund_id,
        why,
    )


@dataclass(frozen=True)
class _ReversedPart:
    """What one reversal took from one fill, as it stands now (minor units)."""

    refunded: int  # went back to the buyer
    fee: int  # out of the platform's fees
    seller: int  # out of the seller's proceeds
    loss: int  # a share already paid out, still booked as a loss


def _reversed_part(*, reversal: MarketReversal, fill: MarketFill) -> _ReversedPart | None:
    """Read from the reversal's money transaction of the fill; None if it took nothing."""
    txn = MoneyTransaction.objects.filter(
        idempotency_key=f"reversal:{reversal.key}:{fill.pk}"
    ).first()
    if txn is None:
        return None
    by_kind: dict[str, int] = {}
    for kind, amount in txn.entries.values_list("account__kind", "amount"):
        by_kind[kind] = by_kind.get(kind, 0) + amount
    seller = -by_kind.get(MoneyAccountKind.SELLER_PENDING, 0) - by_kind.get(
        MoneyAccountKind.SELLER_AVAILABLE, 0
    )
    # Stripe refused the payout the loss was booked against: _payout_fail
    # recovered from the seller's proceeds what that payout was paying of the
    # fill. Not always all the loss: of a fill reopened since an earlier payout
    # (a won dispute, a failed refund), that payout paid the rest, which stayed
    # lost. Counting it as the seller's would give the seller more than was
    # taken from them (the fill's seller_reversed below 0). Finance marking that payout
    # paid after all (payout_mark_paid) takes the recovery back, and books lost a share a
    # reversal made since its refusal took from the seller's proceeds (a negative entry):
    # the payout paid the fill, so the seller bore none of it.
    recovered = reversal.recovered_by_fill.get(str(fill.pk), 0)
    seller += recovered
    loss = -by_kind.get(MoneyAccountKind.LOSSES, 0) - recovered
    return _ReversedPart(
        refunded=by_kind.get(MoneyAccountKind.BUYER_CLEARING, 0),
        fee=-by_kind.get(MoneyAccountKind.PLATFORM_FEES, 0),
        seller=seller,
        loss=loss,
    )


@retry_on_deadlock
def _reinstatement_apply(*, reversal_id: int) -> None:
    from gymbilling.services.events import EventWaits

    with transaction.atomic():
        # _reversal_apply's locks, in its order: the order, its fills, then the reversal.
        order_id = MarketReversal.objects.values_list("order_id", flat=True).get(pk=reversal_id)
        order = MarketOrder.objects.select_for_update().get(pk=order_id)
        fills = list(
            MarketFill.objects.select_for_update(of=("self",))
            .filter(order=order)
            .select_related("seller")
            .order_by("pk")
        )
        reversal = MarketReversal.objects.select_for_update().get(pk=reversal_id)
        if reversal.reinstated_at is not None:
            return
        parts = {fill.pk: _reversed_part(reversal=reversal, fill=fill) for fill in fills}
        touched = [fill for fill in fills if parts[fill.pk] is not None]
        in_flight = MarketPayout.objects.filter(
            pk__in=[f.payout_id for f in touched if f.proceeds == ProceedsState.PAID_OUT],
            status=PayoutStatus.PENDING,
        )
        if in_flight.exists():
            # Sent or refused, a payout settles what its fills are owed (a
            # refusal recovers losses booked against it): undoing the reversal
            # before that would pay or recover the same share twice.
            raise EventWaits(f"order {order.pk}: a payout of its fills is still being sent")
        # The buyer's credits first: credit-ledger accounts are locked before
        # money accounts (the lock order above), as order_pay locks them.
        given_back = clawbacks_reverse(
            key=f"market:{reversal.key}",
            reason=f"{reversal.kind} of marketplace order {order.pk} {_undone(reversal.kind)}",
            organization=order.buyer,
        )
        if reversal.credits_pending:
            claim_drop(organization=order.buyer, amount=reversal.credits_pending)
        system = _system_accounts(order.currency)
        # Every seller's account the postings below go to, in primary-key order: fill by
        # fill, this and another order's reversal (or payment) of the same sellers would
        # lock them in opposite orders, and deadlock.
        money_accounts_lock(
            _proceeds_account(fill, _reinstated_proceeds(fill, parts[fill.pk]))
            for fill in touched
            if parts[fill.pk].seller
        )
        for fill in touched:
            _fill_reinstate(
                fill=fill, part=parts[fill.pk], key=reversal.key, kind=reversal.kind, system=system
            )
        MarketReversal.objects.filter(pk=reversal.pk).update(
            reinstated_at=timezone.now(),
            credits_reinstated=given_back,
            loss=0,
            credits_lost=0,
            credits_pending=0,
            pending_by_fill={},
        )


def _undone(kind: str) -> str:
    return "failed: the money came back" if kind == "refund" else "won: funds reinstated"


def _reinstated_proceeds(fill: MarketFill, part: _ReversedPart) -> str:
    """Where the fill's unpaid share is once the reversal is undone. Paid out since (its
    payout sent: final), without the share the dispute took: what was paid stays paid,
    the share comes back as available, and the next payout pays just that."""
    if part.seller and fill.proceeds == ProceedsState.PAID_OUT:
        return ProceedsState.AVAILABLE
    return fill.proceeds


def _fill_reinstate(
    *,
    fill: MarketFill,
    part: _ReversedPart,
    key: str,
    kind: str,
    system: dict[str, MoneyAccount],
) -> None:
    """Post the reversal of one fill back, and make the fill owe the seller their share again."""
    proceeds = _reinstated_proceeds(fill, part)
    updates: dict = {
        "refunded": fill.refunded - part.refunded,
        "seller_reversed": fill.seller_reversed - part.seller,
    }
    if proceeds != fill.proceeds:
        updates |= {
            "proceeds": proceeds,
            "earlier_payouts": fill.gross - fill.fee - fill.seller_reversed,
        }
    postings = [
        (system[MoneyAccountKind.BUYER_CLEARING], -part.refunded),
        (system[MoneyAccountKind.PLATFORM_FEES], part.fee),
        (system[MoneyAccountKind.LOSSES], part.loss),
    ]
    if part.seller:
        # Where the fill is now, not where the share was taken from: a fill
        # that matured meanwhile is owed from the available proceeds.
        postings.append((_proceeds_account(fill, proceeds), part.seller))
    money_post(
        kind=MoneyTransactionKind.REINSTATEMENT,
        key=f"reinstatement:{key}:{fill.pk}",
        currency=fill.currency,
        organization=fill.seller,
        fill=fill,
        postings=postings,
        memo=f"{key} {_undone(kind)}",
    )
    MarketFill.objects.filter(pk=fill.pk).update(**updates)
