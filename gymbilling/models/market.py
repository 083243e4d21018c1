"""The credit marketplace: listings, orders and their fills, and the money ledger
of sellers' proceeds.

Credits: a listing's credits sit in the seller's escrow account (metering) as
lots keeping their original expiry; `ListingLot` says which escrow lots are
whose. A buyer's order reserves credits by moving them from the seller's
escrow into the buyer's escrow (one journal transaction per fill), so two
buyers can never hold the same credit: the ledger itself refuses it. Payment
moves a fill's lots from the buyer's escrow to the buyer's wallet as new,
non-resellable marketplace lots; a failed or timed-out payment moves them back
(to the listing, or to the seller's wallet when the listing was canceled).

Money: integers in the currency's minor unit. `MoneyTransaction` /
`MoneyEntry` are a double-entry, append-only ledger (PostgreSQL triggers in
migration 0002_market refuse UPDATE and DELETE), same sign convention as the
credit ledger: a positive entry adds to the account; organization accounts
(a seller's pending and available proceeds) never go negative; system
accounts may (buyer payments clearing is the negative mirror of all money
taken in, losses the negative mirror of all money lost).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q


class ListingStatus(models.TextChoices):
    OPEN = "open", "Open"
    SOLD_OUT = "sold_out", "Sold out"
    CANCELED = "canceled", "Canceled"
    EXPIRED = "expired", "Expired"


class MarketListing(models.Model):
    """A seller's offer of escrowed credits at one price per 1,000 credits."""

    seller = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="market_listings"
    )
    currency = models.CharField(max_length=3)
    price_per_1k = models.PositiveBigIntegerField(help_text="Minor units per 1,000 credits.")
    quantity = models.PositiveBigIntegerField(help_text="Micro-credits listed.")
    # Micro-credits delivered to buyers (paid fills).
    sold = models.PositiveBigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=ListingStatus.choices, default="open")
    # The earliest expiry of the listed lots, when listed (the order book shows
    # the current one, from the lots).
    expires_at = models.DateTimeField(null=True, blank=True)
    list_transaction = models.OneToOneField(
        "metering.JournalTransaction", on_delete=models.PROTECT, related_name="market_listing"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["currency", "price_per_1k", "id"],
                condition=Q(status="open"),
                name="market_listing_book",
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(quantity__gt=0), name="market_listing_qty_positive"),
            models.CheckConstraint(
                condition=Q(sold__lte=models.F("quantity")), name="market_listing_sold_le_qty"
            ),
            models.CheckConstraint(
                condition=Q(status="open", closed_at__isnull=True)
                | (~Q(status="open") & Q(closed_at__isnull=False)),
                name="market_listing_closed_at",
            ),
        ]

    def __str__(self) -> str:
        return f"listing {self.pk} {self.quantity}@{self.price_per_1k}{self.currency} {self.status}"


class ListingLot(models.Model):
    """An escrow lot of the seller's that backs one listing."""

    listing = models.ForeignKey(MarketListing, on_delete=models.PROTECT, related_name="lots")
    lot = models.OneToOneField(
        "metering.CreditLot", on_delete=models.PROTECT, related_name="market_listing_lot"
    )

    def __str__(self) -> str:
        return f"listing {self.listing_id} lot {self.lot_id}"


class OrderStatus(models.TextChoices):
    PENDING = "pending", "Reserved, awaiting payment"
    PAID = "paid", "Paid and delivered"
    EXPIRED = "expired", "Reservation timed out"
    FAILED = "failed", "Payment failed or could not start"


class MarketOrder(models.Model):
    """A buyer's order: quantity up to a price, reserved across listings, paid by Checkout."""

    buyer = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="market_orders"
    )
    currency = models.CharField(max_length=3)
    quantity_requested = models.PositiveBigIntegerField()
    max_price_per_1k = models.PositiveBigIntegerField()
    quantity = models.PositiveBigIntegerField(help_text="Micro-credits reserved.")
    amount_total = models.PositiveBigIntegerField(help_text="Minor units charged.")
    status = models.CharField(max_length=16, choices=OrderStatus.choices, default="pending")
    failure_code = models.CharField(max_length=64, blank=True)
    expires_at = models.DateTimeField()
    checkout = models.OneToOneField(
        "gymbilling.CheckoutSession",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="market_order",
    )
    checkout_url = models.URLField(max_length=2000, blank=True)
    stripe_payment_intent_id = models.CharField(max_length=255, blank=True, db_index=True)
    # Paid for but not delivered (credits expired while reserved, or paid after
    # the reservation was released): refunded to the buyer.
    shortfall_amount = models.PositiveBigIntegerField(default=0)
    shortfall_refunded_at = models.DateTimeField(null=True, blank=True)
    # Stripe refused that refund for good (the charge already refunded, by
    # finance in the dashboard; more than is left to refund...): no longer
    # retried by the sweep; finance looks, and retries from the admin once fixed
    # (or, having refunded the buyer by hand, marks it resolved: below).
    shortfall_refund_refused_at = models.DateTimeField(null=True, blank=True)
    shortfall_refund_error = models.CharField(max_length=500, blank=True)
    # Stripe's id of the last shortfall refund Stripe took: a refund that fails later
    # (refund.failed) puts the order back with finance only if it is this one, so an
    # old one failing after finance's retry went through undoes nothing. Empty for
    # refunds taken before it was kept (each order had at most one then).
    shortfall_refund_id = models.CharField(max_length=255, blank=True)
    # Finance refunded a refused shortfall by hand (Stripe's dashboard, a bank transfer)
    # and said so in the admin: off their refused list, and never sent from here again
    # (order_shortfall_refund_resolve). Who, when and why; the buyer's audit log has it too.
    shortfall_refund_resolved_at = models.DateTimeField(null=True, blank=True)
    shortfall_refund_resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        # Never looked up by; no index to build over every order when it is added.
        db_index=False,
    )
    shortfall_refund_resolved_note = models.CharField(max_length=500, blank=True)
    # A send of the shortfall refund (the sweep's, finance's retry) is talking to Stripe
    # since then: claimed before the call, cleared after it, whatever Stripe said. Finance
    # cannot mark the order resolved meanwhile (Stripe may yet take the refund, and the
    # buyer would have it twice). Left set by a process that died mid-call: the next
    # send, which finds a refund Stripe took rather than making another, clears it.
    shortfall_refund_sending_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["expires_at"], condition=Q(status="pending"), name="market_order_due"
            ),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(quantity__gt=0) & Q(quantity__lte=models.F("quantity_requested")),
                name="market_order_qty_range",
            ),
            models.CheckConstraint(
                condition=Q(shortfall_amount__lte=models.F("amount_total")),
                name="market_order_shortfall_le_total",
            ),
            # A resolution always says why.
            models.CheckConstraint(
                condition=Q(shortfall_refund_resolved_at__isnull=True)
                | ~Q(shortfall_refund_resolved_note=""),
                name="market_order_shortfall_resolved_note",
            ),
        ]

    def __str__(self) -> str:
        return f"order {self.pk} {self.quantity} {self.status}"


class FillStatus(models.TextChoices):
    RESERVED = "reserved", "Reserved"
    DELIVERED = "delivered", "Delivered"
    RELEASED = "released", "Released"


class ProceedsState(models.TextChoices):
    NONE = "none", "No proceeds (not delivered)"
    PENDING = "pending", "In the holding period"
    AVAILABLE = "available", "Available for payout"
    PAID_OUT = "paid_out", "Paid out"


class MarketFill(models.Model):
    """One listing's part of an order."""

    order = models.ForeignKey(MarketOrder, on_delete=models.PROTECT, related_name="fills")
    listing = models.ForeignKey(MarketListing, on_delete=models.PROTECT, related_name="fills")
    seller = models.ForeignKey("accounts.Organization", on_delete=models.PROTECT, related_name="+")
    currency = models.CharField(max_length=3)
    price_per_1k = models.PositiveBigIntegerField()
    quantity = models.PositiveBigIntegerField(help_text="Micro-credits reserved.")
    amount = models.PositiveBigIntegerField(help_text="Minor units for the reserved quantity.")
    status = models.CharField(max_length=16, choices=FillStatus.choices, default="reserved")
    delivered_quantity = models.PositiveBigIntegerField(default=0)
    # What the buyer paid for the delivered quantity, the platform's fee on it,
    # and what of the seller's share a refund or dispute took back.
    gross = models.PositiveBigIntegerField(default=0)
    fee = models.PositiveBigIntegerField(default=0)
    refunded = models.PositiveBigIntegerField(default=0)
    seller_reversed = models.PositiveBigIntegerField(default=0)
    # Of the seller's share, what payouts sent before a won dispute gave a
    # reversed part back, reopening the paid-out fill: the next payout pays
    # only gross - fee - seller_reversed - earlier_payouts.
    earlier_payouts = models.PositiveBigIntegerField(default=0)
    proceeds = models.CharField(max_length=16, choices=ProceedsState.choices, default="none")
    available_at = models.DateTimeField(null=True, blank=True)
    payout = models.ForeignKey(
        "gymbilling.MarketPayout",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="fills",
    )
    # The payout that last paid it and that was undone (Stripe refused it, its customer
    # was deleted, its seller frozen before it was sent; its proceeds back to available,
    # `payout` cleared): what finance marks paid after all, should an earlier
    # send of it have reached the seller (payout_mark_paid). History; nothing else reads it.
    refused_payout = models.ForeignKey(
        "gymbilling.MarketPayout",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="refused_fills",
    )
    reserve_transaction = models.OneToOneField(
        "metering.JournalTransaction", on_delete=models.PROTECT, related_name="market_fill_reserved"
    )
    settle_transaction = models.OneToOneField(
        "metering.JournalTransaction",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="market_fill_settled",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(
                fields=["available_at"], condition=Q(proceeds="pending"), name="market_fill_matures"
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(quantity__gt=0), name="market_fill_qty_positive"),
            models.CheckConstraint(
                condition=Q(delivered_quantity__lte=models.F("quantity")),
                name="market_fill_delivered_le_qty",
            ),
            models.CheckConstraint(
                condition=Q(fee__lte=models.F("gross")) & Q(refunded__lte=models.F("gross")),
                name="market_fill_money_range",
            ),
            models.CheckConstraint(
                condition=Q(
                    seller_reversed__lte=models.F("gross")
                    - models.F("fee")
                    - models.F("earlier_payouts")
                ),
                name="market_fill_seller_reversed_le_net",
            ),
        ]

    def __str__(self) -> str:
        return f"fill {self.pk} order {self.order_id} listing {self.listing_id} {self.status}"

    @property
    def net(self) -> int:
        """The seller's share of what the buyer paid."""
        return self.gross - self.fee


class PayoutMethod(models.TextChoices):
    TRANSFER = "transfer", "Stripe Connect transfer"
    INVOICE_CREDIT = "invoice_credit", "Credit on the next invoice"


class PayoutStatus(models.TextChoices):
    PENDING = "pending", "Recorded, not yet sent to Stripe"
    SENT = "sent", "Sent"
    FAILED = "failed", "Refused by Stripe, proceeds returned to available"
    # (and, until finance retries, the seller's later payouts there held)
    CUSTOMER_DELETED = (
        "customer_deleted",
        "Not sent: the Stripe customer was deleted; proceeds wait for its replacement",
    )
    # A balance credit Stripe refused because the seller's customer was deleted there,
    # with no replacement yet (payout_send): nothing was paid, the proceeds are back to
    # available, and the seller's payouts wait, not for finance (nothing they can retry
    # fixes a deleted customer) but for the organization's new customer (made on its
    # next checkout, portal link or marketplace order) or a Connect account: the next
    # payout run pays there.
    SELLER_FROZEN = (
        "seller_frozen",
        "Not sent: the seller's reselling is frozen; proceeds returned to available",
    )
    # A payout no send had called Stripe for, whose seller a refund or dispute froze since
    # it was recorded (payout_send): closed unpaid, the proceeds back to available, where
    # the refunds and disputes of its sales come out of the seller's share (left in flight
    # for the weeks a freeze lasts, they would be the platform's losses, and the payout
    # would still pay it all). The first payout run once finance lifts the freeze records
    # a new payout of what is still available. Holds nothing.


class MarketPayout(models.Model):
    """One payment of a seller's available proceeds, recorded before Stripe is called.

    The Stripe call's idempotency key is derived from this row, so a crash or
    an outage between the two resends the same request: paid once. Stripe
    forgets a key after about 24 hours, so every send first looks for the
    transfer (its `transfer_group` is market-payout-<id>) or balance credit
    (metadata `market_payout`) an earlier send made, and records that one.
    """

    seller = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="market_payouts"
    )
    currency = models.CharField(max_length=3)
    amount = models.PositiveBigIntegerField()
    method = models.CharField(max_length=16, choices=PayoutMethod.choices)
    destination = models.CharField(max_length=255, help_text="Connect account or customer id.")
    # The seller's Stripe customer a balance credit was first for, deleted at Stripe by the
    # time it was sent: the payout went to the organization's new customer (`destination`)
    # instead (payout_send). Empty for every other payout.
    deleted_destination = models.CharField(max_length=255, blank=True, db_default="")
    status = models.CharField(max_length=16, choices=PayoutStatus.choices, default="pending")
    stripe_object_id = models.CharField(max_length=255, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    # A failed payout holds the seller's payouts in its currency to its
    # destination (Stripe would refuse them for the same cause: a currency the
    # account does not take, an account that cannot receive transfers) until
    # finance marks the cause fixed (the admin's retry, `payouts_retry`). A new
    # destination (a new Connect account) is not held.
    retry_allowed_at = models.DateTimeField(null=True, blank=True)
    # Sends that called Stripe for it (payout_send counts one before its first call): a
    # later send knows an earlier one may have reached Stripe with its answer lost.
    send_attempts = models.PositiveIntegerField(default=0, db_default=0)
    # Failed for finance because an earlier send may have paid it: a balance credit to a
    # customer deleted at Stripe since, whose balance Stripe no longer shows
    # (_payout_customer_deleted). Until finance retries it, it holds the seller's payouts
    # in its currency wherever they would go (_payouts_held), not only to its destination.
    may_have_paid = models.BooleanField(default=False, db_default=False)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="market_payout_positive"),
        ]
        indexes = [
            # The payout run's look for holds, among all payouts.
            models.Index(
                fields=["seller", "currency", "destination"],
                condition=Q(status="failed", retry_allowed_at__isnull=True),
                name="market_payout_holding",
            ),
        ]

    def __str__(self) -> str:
        return f"payout {self.pk} {self.amount}{self.currency} {self.status}"


class MarketReversal(models.Model):
    """A refund or dispute of a marketplace payment, and how it was absorbed.

    `amount` is what it took back of the sale, as the money ledger has it
    (reversal:<key>:<fill>). Of it: `fee_reversed` came back from platform fees,
    `seller_reversed` from the sellers' proceeds not yet paid out, and `loss`
    (sellers' shares already paid out) is a loss, posted to the losses account.
    `unapplied` is what the refund or dispute returned beyond what the order's
    fills had left to give back (the order's shortfall refunded by hand, a
    dispute of money already refunded): no sale of it to take back, so it is
    in no account, and finance's to look into. Of the
    credits: `credits_clawed_back` were unspent and taken back from the buyer,
    `credits_lost` were already spent, `credits_pending` were unspent but held
    by the buyer's running work: claimed on the buyer's wallet, taken back as
    that work settles, or lost if it spends them
    (market_reversals_pending_settle).

    A dispute the gym wins, or a refund Stripe fails later (the money came
    back to the gym), is undone at `reinstated_at`: the money postings
    are reversed (reinstatement:<key>:<fill>), `credits_reinstated` went back
    to the buyer, and nothing is a loss or pending any more (`loss`,
    `credits_lost`, `credits_pending` 0);
    `fee_reversed`, `seller_reversed`, `credits_clawed_back` stay, the history
    of what the dispute or refund took.
    """

    # refund:<charge>:<total of the charge's refunds made up to this one, failed ones
    # too> or dispute:<dispute id> (events.py).
    key = models.CharField(max_length=255, unique=True)
    kind = models.CharField(max_length=16)
    order = models.ForeignKey(MarketOrder, on_delete=models.PROTECT, related_name="reversals")
    stripe_charge_id = models.CharField(max_length=255)
    currency = models.CharField(max_length=3)
    amount = models.PositiveBigIntegerField()
    unapplied = models.PositiveBigIntegerField(default=0)
    fee_reversed = models.PositiveBigIntegerField(default=0)
    seller_reversed = models.PositiveBigIntegerField(default=0)
    loss = models.PositiveBigIntegerField(default=0)
    credits_clawed_back = models.PositiveBigIntegerField(default=0)
    credits_lost = models.PositiveBigIntegerField(default=0)
    credits_pending = models.PositiveBigIntegerField(default=0)
    # credits_pending by fill ({fill id: micro-credits}): each fill's pending
    # credits are taken back from that fill's lots only. Counted over the
    # order's every fill, a partial refund's pending would take credits of a
    # fill it never refunded once running work spent the refunded fill's.
    pending_by_fill = models.JSONField(default=dict, blank=True)
    # Of the loss booked against a payout Stripe then refused, what that refusal
    # recovered from the seller's share instead, by fill ({fill id: minor units};
    # _payout_fail): undoing the reversal gives that back to the seller's proceeds
    # and the rest to the losses. Not all of it where the fill had been reopened: the
    # refused payout paid only what was left, an earlier one the rest, and that
    # stayed lost (gymbilling/0028 filled it in for rows recovered before). Finance
    # marking that payout paid after all books it lost again (payout_mark_paid), which
    # drops the fill's entry; a reversal made after the payout was refused took from the
    # seller's available proceeds instead, and marking the payout paid books that share
    # lost too: its entry is then negative, minus that share. What the seller bore of a
    # fill is the reversal's seller postings plus this entry (_reversed_part).
    recovered_by_fill = models.JSONField(default=dict, blank=True, db_default={})
    reinstated_at = models.DateTimeField(null=True, blank=True)
    credits_reinstated = models.PositiveBigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            # The pending sweep's few rows among all reversals.
            models.Index(
                fields=["created_at"],
                condition=Q(credits_pending__gt=0),
                name="market_reversal_pending",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.key} {self.amount}{self.currency} loss {self.loss}"


# --- the money ledger ------------------------------------------------------------


class MoneyAccountKind(models.TextChoices):
    # Per seller organization and currency: never negative.
    SELLER_PENDING = "seller_pending", "Seller proceeds in the holding period"
    SELLER_AVAILABLE = "seller_available", "Seller proceeds available for payout"
    # System accounts, one per currency.
    BUYER_CLEARING = "buyer_clearing", "Buyer payments clearing"
    PLATFORM_FEES = "platform_fees", "Platform fees"
    PAYOUTS = "payouts", "Payouts sent"
    LOSSES = "losses", "Losses (refunds and disputes after payout)"


SELLER_KINDS = (MoneyAccountKind.SELLER_PENDING, MoneyAccountKind.SELLER_AVAILABLE)


class MoneyAccount(models.Model):
    kind = models.CharField(max_length=32, choices=MoneyAccountKind.choices)
    organization = models.ForeignKey(
        "accounts.Organization",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="market_money_accounts",
    )
    currency = models.CharField(max_length=3)
    # Cached sum of the entries; seller accounts only (system accounts are hot rows).
    balance = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "kind", "currency"],
                condition=Q(organization__isnull=False),
                name="money_account_one_per_org_kind_currency",
            ),
            models.UniqueConstraint(
                fields=["kind", "currency"],
                condition=Q(organization__isnull=True),
                name="money_account_one_system_per_kind_currency",
            ),
            models.CheckConstraint(
                condition=(
                    Q(kind__in=[k.value for k in SELLER_KINDS], organization__isnull=False)
                    & Q(balance__gte=0)
                )
                | (~Q(kind__in=[k.value for k in SELLER_KINDS]) & Q(organization__isnull=True)),
                name="money_account_seller_kinds_non_negative",
            ),
        ]

    def __str__(self) -> str:
        owner = self.organization_id or "system"
        return f"{owner}:{self.kind}:{self.currency}"


class MoneyTransactionKind(models.TextChoices):
    SALE = "sale", "Sale (buyer paid for a fill)"
    FEE = "fee", "Platform fee on a fill"
    RELEASE = "release", "Holding period over"
    PAYOUT = "payout", "Payout"
    PAYOUT_FAILED = "payout_failed", "Payout refused, returned"
    REVERSAL = "reversal", "Refund or dispute"
    REINSTATEMENT = "reinstatement", "Dispute won, its reversal undone"


class MoneyTransaction(models.Model):
    kind = models.CharField(max_length=32, choices=MoneyTransactionKind.choices)
    # One per business event: sale:<fill>, fee:<fill>, release:<fill>,
    # payout:<payout>, payout_failed:<payout>, payout_marked_paid:<payout> (finance found
    # a refused one paid at Stripe after all), reversal:<reversal key>:<fill>,
    # reinstatement:<reversal key>:<fill>.
    idempotency_key = models.CharField(max_length=255, unique=True)
    currency = models.CharField(max_length=3)
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="+"
    )
    fill = models.ForeignKey(
        MarketFill, on_delete=models.PROTECT, null=True, blank=True, related_name="money"
    )
    payout = models.ForeignKey(
        MarketPayout, on_delete=models.PROTECT, null=True, blank=True, related_name="money"
    )
    memo = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.kind} {self.idempotency_key}"


class MoneyEntry(models.Model):
    transaction = models.ForeignKey(
        MoneyTransaction, on_delete=models.PROTECT, related_name="entries"
    )
    account = models.ForeignKey(MoneyAccount, on_delete=models.PROTECT, related_name="entries")
    amount = models.BigIntegerField(help_text="Minor units; positive adds to the account.")
    balance_after = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(amount=0), name="money_entry_nonzero"),
        ]
        indexes = [models.Index(fields=["account", "id"], name="money_entry_by_account")]

    def __str__(self) -> str:
        return f"{self.amount:+d} on {self.account_id}"
