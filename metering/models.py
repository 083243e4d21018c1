"""The credit ledger.

Units: every amount is an integer of micro-credits (1 credit = 1,000,000).

Double entry: a `JournalTransaction` owns `LedgerEntry` rows whose amounts sum
to zero. An account's `balance` is a cache of the sum of its entries, updated
in the same database transaction as the entries (reconcile recomputes it).
Entries, transactions and lot movements are append-only: PostgreSQL triggers
(migration 0002) refuse UPDATE and DELETE on them; a mistake is corrected by a
reversing transaction.

Sign convention: a positive entry adds to the account. Organization accounts
(wallet, holds, escrow) never go negative; system accounts may (issuance is
the negative mirror of every credit ever granted).

Lots: every inflow to a wallet or escrow account is a `CreditLot`. The
remaining credits of an account's lots equal the account's balance, plus the
organization's pending holds for a wallet (holds are burned from wallet lots
only when captured).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from accounts.models import Priority

MICRO = 1_000_000  # micro-credits per credit


def unique_not_like_indexed(field: str, name: str) -> models.UniqueConstraint:
    """UNIQUE_NOT_LIKE_INDEXED: a text column unique through a constraint.

    `unique=True` on a CharField also gives it, on PostgreSQL, a second
    index (varchar_pattern_ops) for LIKE 'prefix%' queries, which every
    insert and every non-HOT update pays for: the keys of holds,
    transactions, usage records and jobs are written on every inference
    request. A column that is searched by prefix declares that index itself
    (JournalTransaction); the admin's search is a contains, which no index
    serves.
    """
    return models.UniqueConstraint(fields=[field], name=name)


class AccountKind(models.TextChoices):
    # Organization accounts: never negative.
    WALLET = "wallet", "Wallet"
    HOLDS = "holds", "Holds"
    ESCROW = "escrow", "Marketplace escrow"
    # System accounts: one each, no organization.
    ISSUANCE = "issuance", "Issuance"
    CONSUMPTION = "consumption", "Consumption"
    EXPIRY = "expiry", "Expiry"
    ADJUSTMENTS = "adjustments", "Adjustments"
    MARKETPLACE_CLEARING = "marketplace_clearing", "Marketplace clearing"


ORGANIZATION_KINDS = (AccountKind.WALLET, AccountKind.HOLDS, AccountKind.ESCROW)


class LedgerAccount(models.Model):
    kind = models.CharField(max_length=32, choices=AccountKind.choices)
    organization = models.ForeignKey(
        "accounts.Organization",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="ledger_accounts",
    )
    # Cached sum of this account's entries, in micro-credits. Organization
    # accounts only: system accounts are touched by every settlement of every
    # organization, so a cached balance there would be one hot row that
    # serializes them all; their balance is SUM(entries) (selectors).
    balance = models.BigIntegerField(default=0)
    # True for organization accounts: the database refuses a negative balance.
    non_negative = models.BooleanField(default=True)
    # Wallets only: the earliest expiry among this wallet's unexpired lots.
    # Never later than the truth (every new lot lowers it), so a hold placed
    # after it sweeps expired credits first and can never spend them.
    next_expiry_at = models.DateTimeField(null=True, blank=True)
    # Wallets only: micro-credits that refunds and disputes still waiting on
    # running work have set aside (metering.services.ledger, "claims"), and
    # rollovers, of what running jobs held over the cap. Nothing the
    # member starts may take them: a hold, a listing, a transfer needs
    # `balance - claimed` (the hot path's placement checks it in the update
    # it makes anyway). Equal to what those reversals have pending and those
    # rollovers claimed (reconcile); never negative. It may exceed the balance while the work
    # still holds what it claims.
    claimed = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        permissions = [
            # The admin's "Adjust credits" (metering.admin): finance corrections.
            ("adjust_credits", "Can add or remove an organization's credits, with a reason"),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "kind"],
                condition=Q(organization__isnull=False),
                name="ledger_account_one_per_org_kind",
            ),
            models.UniqueConstraint(
                fields=["kind"],
                condition=Q(organization__isnull=True),
                name="ledger_account_one_system_per_kind",
            ),
            models.CheckConstraint(
                condition=Q(non_negative=False) | Q(balance__gte=0),
                name="ledger_account_non_negative_balance",
            ),
            models.CheckConstraint(
                condition=Q(claimed=0) | Q(kind=AccountKind.WALLET, claimed__gt=0),
                name="ledger_account_claim_on_wallets",
            ),
            models.CheckConstraint(
                condition=(
                    Q(kind__in=[k.value for k in ORGANIZATION_KINDS], organization__isnull=False)
                    | (
                        ~Q(kind__in=[k.value for k in ORGANIZATION_KINDS])
                        & Q(organization__isnull=True)
                    )
                ),
                name="ledger_account_org_kinds_have_org",
            ),
        ]
        indexes = [
            # The minute's sweep finds accounts due with nothing left to expire by it
            # (metering.services.lots.credits_expire). Only the sweep and new lots
            # write the column: a settlement's update of the balance stays HOT.
            models.Index(
                fields=["next_expiry_at"],
                condition=Q(next_expiry_at__isnull=False),
                name="ledger_account_next_expiry",
            ),
        ]

    def __str__(self) -> str:
        owner = self.organization.slug if self.organization_id else "system"
        return f"{owner}:{self.kind}"

    @property
    def is_system(self) -> bool:
        return self.organization_id is None


class TransactionKind(models.TextChoices):
    GRANT = "grant", "Grant"
    ADJUSTMENT = "adjustment", "Adjustment"
    HOLD_PLACE = "hold_place", "Hold placed"
    HOLD_CAPTURE = "hold_capture", "Hold captured"
    HOLD_RELEASE = "hold_release", "Hold released"
    HOLD_EXPIRE = "hold_expire", "Hold expired"
    TRANSFER = "transfer", "Transfer"
    EXPIRY = "expiry", "Expiry"
    REVERSAL = "reversal", "Reversal"


class JournalTransaction(models.Model):
    """One business event. Its idempotency key makes it happen at most once."""

    kind = models.CharField(max_length=32, choices=TransactionKind.choices)
    # Unique per business event: "hold:<job id>", "grant:invoice:<id>", ...
    # (UNIQUE_NOT_LIKE_INDEXED below).
    idempotency_key = models.CharField(max_length=255)
    # Hash of the request that created it; a repeat with another request under
    # the same key is a conflict, not a replay.
    fingerprint = models.CharField(max_length=64)
    organization = models.ForeignKey(
        "accounts.Organization",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="journal_transactions",
        db_index=False,  # the (organization, -created_at) index leads with it
    )
    memo = models.CharField(max_length=500, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
    )
    reverses = models.OneToOneField(
        "self",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="reversed_by",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        indexes = [
            models.Index(fields=["organization", "-created_at"]),
            # Prefix queries by kind of event ("grant:invoice:...": the Stripe
            # reconciliation), which the unique index cannot serve under a
            # non-C collation.
            models.Index(
                fields=["idempotency_key"],
                name="journal_key_prefix",
                opclasses=["varchar_pattern_ops"],
            ),
        ]
        constraints = [unique_not_like_indexed("idempotency_key", "journal_transaction_key_unique")]

    def __str__(self) -> str:
        return f"{self.kind} {self.idempotency_key}"


class LedgerEntry(models.Model):
    transaction = models.ForeignKey(
        JournalTransaction, on_delete=models.PROTECT, related_name="entries"
    )
    account = models.ForeignKey(
        LedgerAccount,
        on_delete=models.PROTECT,
        related_name="entries",
        db_index=False,  # the (account, id) index leads with it
    )
    amount = models.BigIntegerField()  # micro-credits; positive adds to the account
    # The account's cached balance after this entry; null for system accounts.
    balance_after = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(amount=0), name="ledger_entry_nonzero"),
        ]
        indexes = [models.Index(fields=["account", "id"])]

    def __str__(self) -> str:
        return f"{self.amount:+d} on account {self.account_id}"


class LotSource(models.TextChoices):
    SUBSCRIPTION = "subscription", "Subscription period"
    PACK = "pack", "Credit pack"
    MARKETPLACE = "marketplace", "Marketplace purchase"
    PROMOTION = "promotion", "Promotion"
    ADJUSTMENT = "adjustment", "Adjustment"
    # A plan's overage allowance: unpaid until the usage meter invoices it.
    OVERAGE = "overage", "Overage allowance"


class CreditLot(models.Model):
    """A parcel of credits with one origin, one expiry and one set of rights.

    Burn order (metering.services.lots.BURN_ORDER): lots already past expiry
    that still back a pending hold first, then lower `priority` first, then
    the soonest expiry (never-expiring last), then free before paid, then
    oldest first.
    """

    account = models.ForeignKey(LedgerAccount, on_delete=models.PROTECT, related_name="lots")
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="credit_lots"
    )
    source = models.CharField(max_length=32, choices=LotSource.choices)
    paid = models.BooleanField()
    resellable = models.BooleanField()
    priority = models.SmallIntegerField(default=100)
    expires_at = models.DateTimeField(null=True, blank=True)
    amount = models.BigIntegerField()  # micro-credits the lot was created with
    remaining = models.BigIntegerField()  # cache of the sum of its movements
    # When a pending refund or dispute claimed this lot's credits (its reversal's
    # time; credits_claim): a hold placed after it burns the lot last, so new work
    # spends the member's other credits, not the refunded ones the claim waits for.
    # Cleared when the wallet's claim is all settled.
    claimed_at = models.DateTimeField(null=True, blank=True)
    # The lot this one was split from (a transfer or a move into escrow).
    parent = models.ForeignKey(
        "self", on_delete=models.PROTECT, null=True, blank=True, related_name="children"
    )
    # The granted lot at the top of this one's parents (null: this lot is one), whose
    # payment is what its credits were sold for, however many times they moved since
    # (marketplace, escrow, transfers). Not indexed: only finance's report looks lots up
    # by it, with one scan, while an index would be written on every burn of a split lot.
    root = models.ForeignKey(
        "self", models.PROTECT, null=True, blank=True, related_name="+", db_index=False
    )
    # What was paid for this granted lot's `amount` credits, in minor units of
    # `revenue_currency` (before tax): finance's revenue as the credits are burned
    # (metering.selectors.usage_margin_report). 0 for free credits; null where nobody
    # said (a split lot, whose root's counts; a paid grant without a known price).
    # Written once at the grant, by whoever sold them; never read by the hot path.
    revenue = models.BigIntegerField(null=True, blank=True)
    revenue_currency = models.CharField(max_length=3, blank=True, default="", db_default="")
    # What sold the credits, as the seller labels it (gymbilling: the plan's code,
    # "pack"); opaque here. Blank: free credits, or not said.
    origin = models.CharField(max_length=64, blank=True, default="", db_default="")
    created_by = models.ForeignKey(
        JournalTransaction, on_delete=models.PROTECT, related_name="created_lots"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(amount__gt=0), name="credit_lot_amount_positive"),
            models.CheckConstraint(
                condition=Q(remaining__gte=0) & Q(remaining__lte=models.F("amount")),
                name="credit_lot_remaining_in_range",
            ),
        ]
        indexes = [
            models.Index(
                fields=["account", "priority", "expires_at"],
                condition=Q(remaining__gt=0),
                name="credit_lot_open_by_account",
            ),
            models.Index(
                fields=["expires_at"], condition=Q(remaining__gt=0), name="credit_lot_open_expiry"
            ),
        ]

    def __str__(self) -> str:
        return f"lot {self.pk} {self.source} {self.remaining}/{self.amount}"


class LotMovement(models.Model):
    """A change of a lot's remaining credits, made by one journal transaction."""

    lot = models.ForeignKey(CreditLot, on_delete=models.PROTECT, related_name="movements")
    transaction = models.ForeignKey(
        JournalTransaction, on_delete=models.PROTECT, related_name="lot_movements"
    )
    amount = models.BigIntegerField()

    class Meta:
        constraints = [
            models.CheckConstraint(condition=~Q(amount=0), name="lot_movement_nonzero"),
        ]

    def __str__(self) -> str:
        return f"{self.amount:+d} on lot {self.lot_id}"


class HoldStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    CAPTURED = "captured", "Captured"
    RELEASED = "released", "Released"
    EXPIRED = "expired", "Expired"


class Hold(models.Model):
    """Credits reserved before work starts, captured (in part) or released after."""

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="holds"
    )
    # The business event it reserves for; for inference, the job id. Unique
    # (UNIQUE_NOT_LIKE_INDEXED below).
    key = models.CharField(max_length=255)
    amount = models.BigIntegerField()
    captured = models.BigIntegerField(default=0)
    status = models.CharField(max_length=16, choices=HoldStatus.choices, default=HoldStatus.PENDING)
    expires_at = models.DateTimeField()
    place_transaction = models.OneToOneField(
        JournalTransaction, on_delete=models.PROTECT, related_name="placed_hold"
    )
    settle_transaction = models.OneToOneField(
        JournalTransaction,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="settled_hold",
    )
    # When it was placed, as its placement saw the clock (hold_place passes its `now`): a
    # capture burns lots that expired after it, never those that had expired before.
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            unique_not_like_indexed("key", "hold_key_unique"),
            models.CheckConstraint(condition=Q(amount__gt=0), name="hold_amount_positive"),
            models.CheckConstraint(
                condition=Q(captured__gte=0) & Q(captured__lte=models.F("amount")),
                name="hold_captured_in_range",
            ),
            models.CheckConstraint(
                condition=Q(status="pending", settle_transaction__isnull=True)
                | (~Q(status="pending") & Q(settle_transaction__isnull=False)),
                name="hold_settled_once",
            ),
        ]
        indexes = [
            models.Index(
                fields=["expires_at"], condition=Q(status="pending"), name="hold_pending_expiry"
            ),
            # An organization's pending holds (metering.services.lots.holds_backing):
            # a handful among its millions of settled ones.
            models.Index(
                fields=["organization", "created_at"],
                condition=Q(status="pending"),
                name="hold_pending_org",
            ),
        ]

    def __str__(self) -> str:
        return f"hold {self.key} {self.status} {self.amount}"


class PriceBook(models.Model):
    """One immutable version of every model's rates.

    A new version is published rather than an old one edited, so each charge
    can always be explained by the rates it used (`ModelPrice.pk`).
    """

    version = models.PositiveIntegerField(unique=True)
    effective_at = models.DateTimeField(db_index=True)
    batch_multiplier = models.DecimalField(max_digits=8, decimal_places=4, default=1)
    standard_multiplier = models.DecimalField(max_digits=8, decimal_places=4, default=1)
    priority_multiplier = models.DecimalField(max_digits=8, decimal_places=4, default=1)
    notes = models.CharField(max_length=500, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-effective_at", "-version"]
        constraints = [
            models.CheckConstraint(
                condition=Q(batch_multiplier__gt=0)
                & Q(standard_multiplier__gt=0)
                & Q(priority_multiplier__gt=0),
                name="price_book_multipliers_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"price book v{self.version}"


class ModelPrice(models.Model):
    """Rates for one public model name in one price-book version.

    Rates are credits per million tokens, which is exactly micro-credits per
    token, so `tokens * rate` is already in micro-credits.
    """

    price_book = models.ForeignKey(PriceBook, on_delete=models.PROTECT, related_name="prices")
    model_name = models.CharField(max_length=128)
    input_rate = models.DecimalField(max_digits=18, decimal_places=6)
    cached_input_rate = models.DecimalField(max_digits=18, decimal_places=6)
    output_rate = models.DecimalField(max_digits=18, decimal_places=6)
    minimum_charge = models.BigIntegerField(default=0)  # micro-credits per request

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["price_book", "model_name"], name="model_price_one_per_book"
            ),
            models.CheckConstraint(
                condition=Q(input_rate__gte=0)
                & Q(cached_input_rate__gte=0)
                & Q(output_rate__gte=0)
                & Q(minimum_charge__gte=0),
                name="model_price_non_negative",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.model_name} @ v{self.price_book.version}"


class UsageRecord(models.Model):
    """What one job consumed, with everything finance needs and nothing from inference.

    Written once per job, in the transaction that captures its hold (the job
    id is unique), with the serving cost fixed at settlement.
    """

    organization = models.ForeignKey(
        "accounts.Organization",
        on_delete=models.PROTECT,
        related_name="usage_records",
        db_index=False,  # the (organization, created_at) index leads with it
    )
    api_key = models.ForeignKey(
        "accounts.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # Who spent it when no key did: the member signed in to the dashboard (its
    # playground); null for a key's. PROTECT, as ApiKey.created_by: people are
    # deactivated, never deleted. No index: every settlement's insert would pay
    # for it, and usage is read by organization and time, never by person alone.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,
    )
    job_id = models.CharField(max_length=64)  # unique (UNIQUE_NOT_LIKE_INDEXED below)
    hold = models.OneToOneField(
        Hold, on_delete=models.PROTECT, null=True, blank=True, related_name="usage_record"
    )
    model_name = models.CharField(max_length=128)
    priority = models.CharField(max_length=16, choices=Priority.choices)
    input_tokens = models.PositiveIntegerField()
    cached_input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField()
    engine_busy_ms = models.PositiveIntegerField(default=0)
    credits = models.BigIntegerField()  # micro-credits charged
    model_price = models.ForeignKey(
        ModelPrice, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    serving_cost = models.BigIntegerField(default=0)  # minor units of `currency`
    currency = models.CharField(max_length=3, default="usd")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["organization", "created_at"])]
        constraints = [
            unique_not_like_indexed("job_id", "usage_record_job_unique"),
            models.CheckConstraint(
                condition=Q(credits__gte=0) & Q(cached_input_tokens__lte=models.F("input_tokens")),
                name="usage_record_valid_counts",
            ),
        ]

    def __str__(self) -> str:
        return f"usage {self.job_id} {self.model_name}"
