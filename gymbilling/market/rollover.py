"""The rollover cap over plan credits that were away when a period ended.

`credits_trim_with_listings` caps what a seller holds at the period change:
their wallet's and their listings' subscription credits. Two kinds of
subscription credits are elsewhere then, and come back later:
- credits a buyer's pending order reserved (the buyer's escrow): if the
  order is released, they go back to the listing or the wallet;
- credits a refund or dispute clawed back (the adjustments account): if the
  dispute is won or the refund fails, they go back to the very lots they were
  taken from; and in part when an earlier refund or dispute of the same
  charge is given back (the later one's refit, gymbilling.services.payments).
Each rollover that missed some records a `RolloverCarry`: the part of the
cap it left unused, and what was away. What comes back fills that headroom
and the rest expires on its way in, so the cap stays exact whichever of them
come back, and in whatever order.

A third kind is home but out of the trim's reach: credits over the cap that
running jobs' holds will burn (the trim leaves them, so that each hold can
settle). The carry records that excess (`held_over`) and the lots it is in;
once the jobs have all settled, what they gave back of it expires
(`rollover_holds_settle`, in the market's pending sweep, not on the
settlement path), so the member ends with the cap, or less if the jobs
spent into it. Until then the excess is claimed on the wallet
(`held_claimed`, metering's credits_claim, as a refund claims what running
work holds of its credits): what the jobs give back lands in the wallet, and
without the claim work started since (a job that failed gives back, a new
one holds and captures before the sweep; or new work on a pack, whose
capture burns the plan lots first) would spend the old period's excess in
place of the expiry. With it, every spend the member starts needs the
wallet less the claim, on the fast path too, and work placed after the
rollover burns the claimed lots last, so the sweep finds the excess there.

A refund or dispute of the period's payment may wait for the same held
credits (its own claim, `PaymentReversal.credits_pending`), or take them back
at once once the jobs gave them back. Money first, and each credit claimed
once: what a reversal waits for or took of the lots is its own, and the cap
applies to what it leaves (`_carry_due`): the rollover claims, and its sweep
expires, only the excess over the cap of that (`_claim_fit`). So with a job
holding a Pro period's 12,000 and $50 of that payment refunded (6,060.606060
of them), the sweep expires 2,939.393940 and the member keeps the 3,000 cap,
whichever came first. A reversal applied after the rollover lowers the carry's
claim, one given back (a refund that failed, a dispute won) raises it again,
and the sweep leaves the lots alone while a reversal still waits for them.
What a reversal took is away from the cap's count once the sweep is done: the
carry records its clawbacks as missed (with the cap it left unused, if the
jobs and reversals took more than the excess), so a refund failing later
brings back no more than the cap, as for clawbacks standing at the rollover.

A job still running when a later period ends holds credits over both
rollovers' caps, and both carries wait for the same lots. They are counted
against each other as reversals are: the earlier carry claims first and the
later one only the excess beyond its claim (`_carries_claiming_on`), and what
one expires of the lots lowers what the other has due, so each credit is
claimed once and expired once, and the member ends with the later cap. The
later rollover's own trim may take some of those lots too (a second job gave
them back in between: they are free): the older carries' claims are fitted
again to what it left, at once, not when their jobs end, so the member's new
credits are never short of more than the excess still waiting.

A refund or dispute still waiting for credits the jobs have given back by the
period end (its sweep not run yet) takes them before the trim counts
(`credits_trim_with_listings`): the cap applies to what it leaves, as for
held credits.

Locks: the seller's market lock (`seller_lock`) serializes these with the
rollover, which holds it from before it counts until it has recorded what
was away; the carries' rows are locked (primary-key order) before ledger
accounts, as the market's lock order says.
"""

from __future__ import annotations

from datetime import datetime

from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from accounts.models import Organization
from gymbilling.market.escrow import credits_expire_early, lots_remaining
from gymbilling.models import FillStatus, MarketFill, PaymentReversal, RolloverCarry
from gymbilling.sweeps import each_isolated
from metering.models import (
    AccountKind,
    CreditLot,
    Hold,
    HoldStatus,
    JournalTransaction,
    LotMovement,
    LotSource,
)
from metering.services import claim_drop, clawbacks_under, credits_claim, lots_trim
from metering.services.ledger import organization_account
from metering.services.postings import accounts_lock


def _clawbacks_away(organization: Organization) -> list[JournalTransaction]:
    """Clawbacks of refunds and disputes still standing, not reversed yet, that took plan
    credits.

    A dispute's come back when it is won, a refund's when it fails (`clawbacks_reverse`
    reverses the clawbacks keyed `clawback:<key>` and `clawback:<key>:...`), and some of
    either's when an earlier reversal of the charge is given back (its refit).
    """
    keys = PaymentReversal.objects.filter(
        organization=organization,
        reinstated_at__isnull=True,
        lost_at__isnull=True,  # lost for good: nothing comes back
    ).values_list("key", flat=True)
    by_key = Q()
    for key in keys:
        by_key |= clawbacks_under(key)
    if not by_key:
        return []
    return list(
        JournalTransaction.objects.filter(organization=organization)
        .filter(by_key)
        .filter(reversed_by__isnull=True)
        .filter(lot_movements__lot__source=LotSource.SUBSCRIPTION)
        .distinct()
        .order_by("pk")
    )


def rollover_carry_open(
    *,
    organization: Organization,
    key: str,
    keep: int,
    memo: str,
    now: datetime,
    claiming: list[RolloverCarry],
) -> RolloverCarry | None:
    """Record what the rollover `key` left of its cap `keep`, if some plan credits were away,
    and fit what the older rollovers claim to what its trims left.

    The caller is the rollover, after its trims, in their transaction: it
    holds the seller's lock, the open listings and the wallet and escrow
    accounts, so what it counts here is what it left. Once per rollover: a
    repeat returns the first record (or None) and records nothing new.

    `claiming`: the carries still waiting for held credits, locked by the caller before
    the accounts (`rollover_carries_claiming`). The trims take what a job gave back since
    an older rollover (it is free), and that rollover's excess with it: what they expired
    of its lots it no longer has due (`_carry_due`). Its claim, fitted when it opened,
    would otherwise stay on the credits gone until its own jobs end, keeping as much of
    the member's other credits (the new period's) from them. So each is fitted again,
    oldest first, then this one, which claims only the excess beyond theirs.
    """
    carry = _carry_record(organization=organization, key=key, keep=keep, memo=memo, now=now)
    fitting = list(claiming)
    if carry is not None and carry.held_over and carry.pk not in {c.pk for c in claiming}:
        # The newest, so last in primary-key order. Claimed with the record: no work
        # started from now on may spend the excess the jobs give back before the sweep
        # expires it; what a pending refund of the period waits for of them is its own,
        # and what the older rollovers claim theirs, not claimed twice.
        fitting.append(carry)
    rollover_claims_fit(organization=organization, carries=fitting)
    return carry


def _carry_record(
    *, organization: Organization, key: str, keep: int, memo: str, now: datetime
) -> RolloverCarry | None:
    """The rollover's record of what was away (`rollover_carry_open`), or None."""
    reserved = [
        fill
        for fill in MarketFill.objects.filter(seller=organization, status=FillStatus.RESERVED)
        .select_related("order__buyer")
        .order_by("pk")
        if lots_remaining(lots=_reserved_lots(fill), now=now) > 0
    ]
    clawbacks = _clawbacks_away(organization)
    escrow_listed = Q(
        account__organization=organization,
        account__kind=AccountKind.ESCROW,
        market_listing_lot__listing__status="open",
    )
    wallet = Q(account__organization=organization, account__kind=AccountKind.WALLET)
    plan = Q(source=LotSource.SUBSCRIPTION)
    held = lots_remaining(lots=(wallet | escrow_listed) & plan, now=now)
    # What the trims left over the cap is what running jobs' holds will burn.
    held_over = max(0, held - keep)
    if not reserved and not clawbacks and not held_over:
        return None
    held_lots = (
        sorted(
            CreditLot.objects.filter(wallet & plan, remaining__gt=0)
            .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
            .values_list("pk", flat=True)
        )
        if held_over
        else []
    )
    try:
        with transaction.atomic():
            carry = RolloverCarry.objects.create(
                key=key,
                organization=organization,
                headroom=max(0, keep - held),
                memo=memo,
                held_over=held_over,
                held_lots=held_lots,
            )
    except IntegrityError:
        return RolloverCarry.objects.filter(key=key).first()
    carry.fills.add(*reserved)
    carry.clawbacks.add(*clawbacks)
    return carry


def _reserved_lots(fill: MarketFill) -> Q:
    """The plan credits the fill's reservation holds in the buyer's escrow."""
    return Q(
        created_by_id=fill.reserve_transaction_id,
        account__kind=AccountKind.ESCROW,
        account__organization_id=fill.order.buyer_id,
        source=LotSource.SUBSCRIPTION,
    )


def _through(carries: list[RolloverCarry], amount: int) -> int:
    """How much of `amount` coming back the rollovers that missed it let through, oldest
    first (what one lets through the next one counts); uses up their headroom."""
    kept = amount
    for carry in carries:
        take = min(kept, carry.headroom)
        if take:
            RolloverCarry.objects.filter(pk=carry.pk).update(headroom=F("headroom") - take)
            carry.headroom -= take
        kept = take
    return kept


def _carries_locked(**missed) -> list[RolloverCarry]:
    return list(RolloverCarry.objects.select_for_update().filter(**missed).order_by("pk"))


def rollover_carries_for_fills(fills: list[MarketFill]) -> list[RolloverCarry]:
    """Lock the carries of the rollovers that missed these fills' reservations: `order_release`
    takes them all before its first posting (carries before ledger accounts, across every
    fill), then `rollover_release_trim` finds them held."""
    if not fills:
        return []
    return _carries_locked(fills__in=fills)


def rollover_release_trim(*, fill: MarketFill, now: datetime) -> int:
    """A reservation comes back to the seller: expire what the rollovers it missed would have.

    Called by `order_release` under its locks (the seller's, the listing, the
    order and the fill), before it moves the rest back, with the fill still
    reserved: once per fill. Takes from the buyer's escrow, where the credits
    still are. Returns the micro-credits expired.
    """
    carries = _carries_locked(fills=fill)
    if not carries:
        return 0
    lots = _reserved_lots(fill)
    back = lots_remaining(lots=lots, now=now)
    over = back - _through(carries, back)
    if over <= 0:
        return 0
    return credits_expire_early(
        key=f"rollover-return:fill:{fill.pk}",
        organization=fill.seller,
        account=organization_account(fill.order.buyer, AccountKind.ESCROW),
        amount=over,
        lots=lots,
        now=now,
        memo=f"{carries[-1].memo}: reserved credits released after the rollover",
    )


def rollover_carries_for_clawbacks(clawback_ids: list[int]) -> list[RolloverCarry]:
    """Lock the carries of the rollovers that missed these clawbacks (before ledger accounts)."""
    if not clawback_ids:
        return []
    return _carries_locked(clawbacks__in=clawback_ids)


def rollover_reinstate_trim(
    *,
    organization: Organization,
    carries: list[RolloverCarry],
    clawback_ids: list[int],
    key: str,
    now: datetime,
) -> int:
    """A won dispute or a failed refund gave its clawbacks back: expire what the rollovers
    they missed would have.

    `carries` from `rollover_carries_for_clawbacks`, locked by the caller
    before it reversed the clawbacks; once per reversal (the caller's
    reinstated_at gate and the trim's key). Per clawback, what came back to
    unexpired plan-credit lots passes through its rollovers' headroom; the
    rest is taken from those lots, as the rollover's trim would have taken
    it (credits that running work's holds will burn stay, as there).
    Returns the micro-credits expired.
    """
    return _returned_trim(
        organization=organization,
        carries=carries,
        clawback_ids=clawback_ids,
        retaken=0,
        key=key,
        memo="disputed or refunded credits given back after the rollover",
        now=now,
    )


def rollover_refit_trim(
    *,
    organization: Organization,
    carries: list[RolloverCarry],
    clawback_ids: list[int],
    retake: JournalTransaction | None,
    key: str,
    now: datetime,
) -> int:
    """A refit reversed a reversal's clawbacks and took part again (`retake`, none when it
    keeps nothing): expire what the rollovers those clawbacks missed would have of the
    part that came back.

    `carries` from `rollover_carries_for_clawbacks`, locked by the caller before it
    reversed the clawbacks. The retake counts first against what came back of the
    clawbacks no rollover missed: what the member keeps of the give-back is the cap's to
    let through before it is theirs, so the cap holds however the two are read. The
    retake is away for those rollovers in turn: given back later (the reversal undone), it
    is capped too. Returns the micro-credits expired.
    """
    if retake is not None:
        missed = {c.pk: c for each in _missed_by(carries, clawback_ids).values() for c in each}
        for carry in missed.values():
            carry.clawbacks.add(retake)
    return _returned_trim(
        organization=organization,
        carries=carries,
        clawback_ids=clawback_ids,
        retaken=-(
            LotMovement.objects.filter(transaction=retake).aggregate(
                total=Sum("amount", default=0)
            )["total"]
            if retake is not None
            else 0
        ),
        key=key,
        memo="refunded credits given back by a refit after the rollover",
        now=now,
    )


def _missed_by(
    carries: list[RolloverCarry], clawback_ids: list[int]
) -> dict[int, list[RolloverCarry]]:
    """Which of `carries` missed each clawback (those missed by none left out): one query,
    not one per pair."""
    ids: dict[int, set[int]] = {}
    for carry_id, clawback_id in RolloverCarry.clawbacks.through.objects.filter(
        rollovercarry__in=carries, journaltransaction__in=clawback_ids
    ).values_list("rollovercarry_id", "journaltransaction_id"):
        ids.setdefault(clawback_id, set()).add(carry_id)
    return {
        clawback_id: [c for c in carries if c.pk in carry_ids]
        for clawback_id, carry_ids in ids.items()
    }


def _returned_trim(
    *,
    organization: Organization,
    carries: list[RolloverCarry],
    clawback_ids: list[int],
    retaken: int,
    key: str,
    memo: str,
    now: datetime,
) -> int:
    """Per clawback given back, what came back to unexpired plan-credit lots (less what
    `retaken` took again, counted against the clawbacks no rollover missed first) passes
    through its rollovers' headroom; the rest is taken from those lots, as the rollover's
    trim would have taken it (credits that running work's holds will burn stay, as
    there). Returns the micro-credits expired."""
    if not carries:
        return 0
    missed_by = _missed_by(carries, clawback_ids)
    over = 0
    lot_ids: set[int] = set()
    for clawback_id in sorted(clawback_ids, key=lambda pk: (pk in missed_by, pk)):
        returned = list(
            LotMovement.objects.filter(
                transaction__reverses_id=clawback_id,
                amount__gt=0,
                lot__source=LotSource.SUBSCRIPTION,
            )
            .filter(Q(lot__expires_at__isnull=True) | Q(lot__expires_at__gt=now))
            .values_list("lot_id", "amount")
        )
        back = sum(amount for _, amount in returned)
        kept = min(retaken, back)
        retaken -= kept
        back -= kept
        missed = missed_by.get(clawback_id)
        if not missed or back <= 0:
            continue
        over += back - _through(missed, back)
        lot_ids.update(lot_id for lot_id, _ in returned)
    if over <= 0:
        return 0
    return lots_trim(
        organization=organization,
        lot_ids=sorted(lot_ids),
        amount=over,
        key=f"rollover-return:{key}",
        memo=f"{carries[-1].memo}: {memo}",
    )


def rollover_holds_settle(*, now: datetime) -> int:
    """Expire what running jobs gave back of the plan credits they kept from a rollover's cap.

    The rollover's trim leaves what pending holds will burn (their settlement
    must find it), so the member held more than the cap while the jobs ran
    (`RolloverCarry.held_over`), claimed on the wallet so that no later work
    spends it. Once every hold placed by the rollover has settled, what they
    burned of those lots was spent; the rest of the excess came back, and
    expires now, as the rollover would have taken it had it been free, and the
    claim goes. Not on the settlement path: the market's periodic sweep calls
    it. Each carry in its own transaction; returns the micro-credits expired.
    """
    return each_isolated(
        RolloverCarry.objects.filter(Q(held_over__gt=0) | Q(held_claimed__gt=0))
        .order_by("pk")
        .values_list("pk", flat=True),
        lambda pk: _carry_holds_settle(carry_id=pk, now=now),
        what="the held-credits trim of rollover carry",
    )


def rollover_carries_claimed(*, organization: Organization) -> list[tuple[Q, datetime]]:
    """What the organization's rollovers claimed of the credits running jobs held over their
    cap: the lots each waits on, with its time (for claims_repair to mark them as the claim
    did)."""
    return [
        (Q(pk__in=held_lots), created_at)
        for held_lots, created_at in RolloverCarry.objects.filter(
            organization=organization, held_claimed__gt=0
        )
        .order_by("pk")
        .values_list("held_lots", "created_at")
    ]


def _carry_holds_settle(*, carry_id: int, now: datetime) -> int:
    from gymbilling.market.services import seller_lock

    with transaction.atomic():
        organization = RolloverCarry.objects.get(pk=carry_id).organization
        # The rollover's lock first, as everything that trims for a carry takes it.
        seller_lock(organization)
        carry = RolloverCarry.objects.select_for_update().get(pk=carry_id)
        if carry.held_over <= 0 and carry.held_claimed <= 0:
            return 0
        running_then = Hold.objects.filter(
            organization=organization, created_at__lte=carry.created_at
        )
        if running_then.filter(status=HoldStatus.PENDING).exists():
            return 0  # their captures may still burn these credits
        if _reversals_pending_on(organization, carry.held_lots):
            # A refund of the period waits for what the jobs gave back: its money bought
            # them, so it takes them first (its sweep, seconds away); the excess expired
            # here is what it leaves. Trimming first would expire what it is owed.
            return 0
        due, taken_by = _carry_due(organization=organization, carry=carry)
        expired = 0
        if due > 0:
            # Keyed by what is due: a trim that took less leaves the rest for a later key.
            # What is due goes up again when a refund that took some fails, so the key
            # counts this carry's trims before it too: an earlier one keyed by the same
            # amount would be replayed, taking nothing.
            trims = JournalTransaction.objects.filter(
                organization=organization,
                idempotency_key__startswith=f"trim:rollover-return:{carry.key}:held:",
            ).count()
            expired = lots_trim(
                organization=organization,
                lot_ids=carry.held_lots,
                amount=due,
                key=f"rollover-return:{carry.key}:held:{due}" + (f":{trims}" if trims else ""),
                memo=f"{carry.memo}: held credits given back after the rollover",
            )
        left = due - expired
        if left > 0 and lots_remaining(lots=Q(pk__in=carry.held_lots), now=now) > 0:
            # Later work holds the rest. The claim keeps later work to the cap's share of
            # these lots, and what refunds took counts against the excess, so only
            # something else taking part of the lots meanwhile (finance's adjustment)
            # leads here: what that work gives back is taken by a later run, the claim
            # kept till then.
            RolloverCarry.objects.filter(pk=carry.pk).update(held_over=F("held_over") - expired)
            return expired
        # Done: in the same transaction as the trim, the claim goes with what it waited for.
        if carry.held_claimed:
            claim_drop(organization=organization, amount=carry.held_claimed)
        # What refunds took of the lots since was away from the cap's count now: given back
        # later (a refund that fails), it fills what the cap left unused, if anything (the
        # jobs and the refunds took more than the excess), and the rest expires, as for
        # clawbacks the rollover missed.
        carry.clawbacks.add(*taken_by)
        RolloverCarry.objects.filter(pk=carry.pk).update(
            held_over=0, held_claimed=0, headroom=F("headroom") + max(0, -due)
        )
        return expired


def _carry_due(*, organization: Organization, carry: RolloverCarry) -> tuple[int, list[int]]:
    """What the carry still has to expire of its lots, and the clawbacks that lowered it.

    The excess it recorded (`held_over`, less what it expired already), less what the jobs
    running at the rollover burned of the lots since (spent, not given back: nothing else
    burns the excess, the claim keeps later work to the member's other credits), less
    what refunds and disputes took back of them since: their money first, so the cap
    applies to what they leave; and less what other rollovers expired of them since (a
    later period's, or an earlier one's sweep): what one expired of credits over both
    caps the other need not. A clawback the carry missed (standing at the rollover, or a
    refit's retake recorded as away) was not counted in the excess, and one reversed
    since (a refund that failed, a dispute won) took nothing. Below zero when they took
    more than the excess: the cap left that much unused. Read under the seller's lock
    (every rollover and every carry's trim holds it), with the wallet's row locked.
    """
    lots = LotMovement.objects.filter(lot_id__in=carry.held_lots)
    running_then = Hold.objects.filter(organization=organization, created_at__lte=carry.created_at)
    burned = -(
        lots.filter(
            transaction__in=running_then.filter(settled_at__gt=carry.created_at).values(
                "settle_transaction_id"
            )
        ).aggregate(total=Sum("amount", default=0))["total"]
    )
    clawed = list(
        lots.filter(
            transaction__organization=organization,
            transaction__created_at__gt=carry.created_at,
            transaction__reversed_by__isnull=True,
            transaction__idempotency_key__startswith="clawback:",
        )
        .exclude(transaction__in=carry.clawbacks.all())
        .values_list("transaction_id", "amount")
    )
    taken = -sum(amount for _, amount in clawed)
    # What other rollovers expired of the lots since: a job running over two period ends
    # holds credits both rollovers left over their caps, and each credit expires once.
    rollovers = Q(transaction__idempotency_key__startswith="trim:rollover:") | Q(
        transaction__idempotency_key__startswith="trim:rollover-return:",
        transaction__idempotency_key__contains=":held:",
    )
    ours = Q(transaction__idempotency_key=f"trim:{carry.key}") | Q(
        transaction__idempotency_key__startswith=f"trim:rollover-return:{carry.key}:held:"
    )
    expired = -(
        lots.filter(rollovers & ~ours)
        .filter(
            transaction__organization=organization,
            transaction__created_at__gt=carry.created_at,
        )
        .aggregate(total=Sum("amount", default=0))["total"]
    )
    return carry.held_over - burned - taken - expired, sorted({pk for pk, _ in clawed})


def _reversals_pending_on(organization: Organization, held_lots: list[int]) -> int:
    """What the organization's pending refunds and disputes wait for of the lots `held_lots`.

    A reversal's pending credits are somewhere in its payment's lots (its family); which of
    them the jobs hold is not recorded, so only what cannot be outside `held_lots` counts:
    its pending less what its other lots hold, and no more than its family holds of
    `held_lots`. Never more than is there, so the rollover never claims less than the
    excess no reversal will take.
    """
    from gymbilling.services.payments import reversal_lots

    if not held_lots:
        return 0
    now = timezone.now()
    total = 0
    for reversal in PaymentReversal.objects.filter(
        organization=organization, credits_pending__gt=0
    ).order_by("pk"):
        family = reversal_lots(reversal)
        if family is None:
            continue
        # Its own wallet's only: the family also holds the lots the marketplace delivered to
        # buyers (split from these), which no reversal of this organization waits for.
        # Its pending lags its lots by up to a sweep (captured or expired credits lower it
        # only when the pending sweep runs): what its other lots no longer hold is not in
        # `held_lots` unless its family has lots there, so a pack's refund counts none.
        total += _claimed_within(
            claimed=reversal.credits_pending,
            lots=family & _wallet_of(organization),
            held_lots=held_lots,
            now=now,
        )
    return total


def _carries_claiming_on(organization: Organization, carry: RolloverCarry) -> int:
    """What the organization's older rollovers still claim of the carry's lots: theirs
    first, as a reversal's is, so that a job holding credits over two periods' caps has
    each of them claimed once (a later rollover claims only the excess beyond the earlier
    one's). Only what cannot be outside the carry's lots counts, as for reversals. Read
    under the seller's lock, which every change of a carry's claim holds."""
    if not carry.held_lots:
        return 0
    now = timezone.now()
    return sum(
        _claimed_within(
            claimed=older.held_claimed,
            lots=Q(pk__in=older.held_lots) & _wallet_of(organization),
            held_lots=carry.held_lots,
            now=now,
        )
        for older in RolloverCarry.objects.filter(
            organization=organization, pk__lt=carry.pk, held_claimed__gt=0
        ).order_by("pk")
    )


def _wallet_of(organization: Organization) -> Q:
    return Q(account__organization=organization, account__kind=AccountKind.WALLET)


def _claimed_within(*, claimed: int, lots: Q, held_lots: list[int], now: datetime) -> int:
    """Of a claim on `lots`, what cannot be outside `held_lots`: the claim less what its
    other lots hold, and no more than it holds of `held_lots`. Never more than is there,
    so a carry never claims less than the excess no one else will take."""
    elsewhere = lots_remaining(lots=lots & ~Q(pk__in=held_lots), now=now)
    within = lots_remaining(lots=lots & Q(pk__in=held_lots), now=now)
    return min(max(0, claimed - elsewhere), within)


def rollover_carries_claiming(*, organization: Organization) -> list[RolloverCarry]:
    """Lock the organization's carries that still wait for held credits, in primary-key
    order: a refund or dispute takes them before the ledger's accounts (the market's lock
    order) and, once its own claim changed, fits theirs to it (`rollover_claims_fit`)."""
    return _carries_locked(organization=organization, held_over__gt=0)


def rollover_claims_fit(*, organization: Organization, carries: list[RolloverCarry]) -> None:
    """Fit what the carries claim to what the organization's reversals now wait for, and to
    what each still has due, in the order given (primary-key order: each counts the older
    ones' claims first).

    Called in the transaction of a reversal that changed its own claim (applied, or given
    back), or of a rollover whose trims took some of the carries' lots, under the seller's
    lock and with `carries` locked (`rollover_carries_claiming`).
    """
    for carry in carries:
        _claim_fit(organization=organization, carry=carry)


def _claim_fit(*, organization: Organization, carry: RolloverCarry) -> None:
    """Each credit claimed once: the carry claims the excess it still waits for, less what
    reversals wait for of its lots (theirs first), and never more than the lots hold.

    Read under the wallet's row lock (carries before the wallet, the market's order), taken
    before the first read: a pending settlement of another charge's reversal (which takes
    neither the seller's nor the charge's lock, only its row and the wallet) committing
    between what the reversals wait for and what the lots hold would count what it took
    twice, and the carry would let go of credits its sweep must expire."""
    accounts_lock(organization_account(organization, AccountKind.WALLET))
    lots = Q(pk__in=carry.held_lots)
    others = _reversals_pending_on(organization, carry.held_lots) + _carries_claiming_on(
        organization, carry
    )
    due, _ = _carry_due(organization=organization, carry=carry)
    # What pending reversals wait for of the lots they take before the sweep expires
    # anything, and what older carries claim of them the older ones expire first: the
    # excess this carry may still expire is at most what is due less both.
    target = max(
        0,
        min(
            due,
            lots_remaining(lots=lots & Q(account__kind=AccountKind.WALLET), now=timezone.now()),
        )
        - others,
    )
    claimed = carry.held_claimed
    if target < claimed:
        claim_drop(organization=organization, amount=claimed - target)
        claimed = target
    elif target > claimed:
        claimed += credits_claim(
            organization=organization,
            lots=lots,
            amount=target - claimed,
            at=carry.created_at,
            claimed_by_others=lambda: others + claimed,
        )
    if claimed != carry.held_claimed:
        RolloverCarry.objects.filter(pk=carry.pk).update(held_claimed=claimed)
        carry.held_claimed = claimed
