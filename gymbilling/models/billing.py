"""Billing: what is sold (plans, credit packs), to whom (Stripe customers), and
what Stripe told us (subscriptions, invoices, events).

Money is an integer in the currency's minor unit with the ISO currency beside
it; credits are integers of micro-credits (metering.models.MICRO). Stripe is
the system of record for subscriptions and invoices: the rows here are a
mirror, refreshed from Stripe's current object whenever an event names it.
"""

from __future__ import annotations

import re

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models import Q

from accounts.models import Priority, model_tiers_problem

# Stripe's form of an ISO 4217 code; prices and payments compare it as a string.
_CURRENCY = re.compile(r"^[a-z]{3}$")
# Longest a credit pack may last: a grant's expiry must stay a datetime, and ten
# years is past any pack sold (a year is the default).
PACK_VALIDITY_DAYS_MAX = 3650


def _currency_problems(currency) -> dict[str, str]:
    if isinstance(currency, str) and _CURRENCY.match(currency):
        return {}
    return {"currency": 'The lower-case ISO 4217 code Stripe uses, e.g. "usd" or "eur".'}


class Plan(models.Model):
    """A membership tier, editable by staff in the admin.

    A change of price creates a new Stripe price on the next
    `stripe_sync_catalog`; subscriptions on the old price keep it (StripePrice
    remembers every price a plan ever had). Seat-based (team) plans charge
    `monthly_price` and grant `monthly_credits` per seat.
    """

    code = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=100)
    description = models.CharField(max_length=500, blank=True)
    active = models.BooleanField(default=True, help_text="Offered to new subscribers.")
    sort_order = models.PositiveSmallIntegerField(default=0)

    currency = models.CharField(max_length=3, default="usd")
    monthly_price = models.PositiveBigIntegerField(
        help_text="Minor units per month (per seat for seat-based plans)."
    )
    monthly_credits = models.PositiveBigIntegerField(
        help_text="Micro-credits granted per paid month (per seat for seat-based plans)."
    )
    rollover_percent = models.PositiveSmallIntegerField(
        default=0,
        help_text="Unspent credits carried into the next month, as % of a month's credits (0 = none).",
    )

    seat_based = models.BooleanField(default=False)
    min_seats = models.PositiveIntegerField(default=1)
    max_seats = models.PositiveIntegerField(default=1)

    # Entitlements written onto the organization (accounts.Organization).
    model_tiers = models.JSONField(default=list, help_text='Access tiers, e.g. ["basic", "pro"].')
    max_priority = models.CharField(max_length=16, default="standard")
    requests_per_minute = models.PositiveIntegerField(default=60)
    tokens_per_minute = models.PositiveIntegerField(default=100_000)
    concurrent_jobs = models.PositiveIntegerField(default=4)

    overage_allowed = models.BooleanField(default=False)
    overage_price_per_1k = models.PositiveBigIntegerField(
        default=0, help_text="Minor units per 1,000 credits used beyond the month's credits."
    )
    fair_use_ceiling = models.PositiveBigIntegerField(
        default=0,
        help_text="Most micro-credits of overage per month (per seat for seat-based plans).",
    )

    stripe_product_id = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["sort_order", "monthly_price"]
        constraints = [
            models.CheckConstraint(
                condition=Q(rollover_percent__lte=100), name="plan_rollover_percent_max_100"
            ),
            # Written onto the organization, whose column refuses any other.
            models.CheckConstraint(
                condition=Q(max_priority__in=Priority.values), name="plan_max_priority_known"
            ),
            models.CheckConstraint(
                condition=Q(min_seats__gte=1) & Q(max_seats__gte=models.F("min_seats")),
                name="plan_seat_range",
            ),
            models.CheckConstraint(
                condition=Q(overage_allowed=False)
                | (Q(overage_price_per_1k__gt=0) & Q(fair_use_ceiling__gt=0)),
                name="plan_overage_priced",
            ),
        ]

    def __str__(self) -> str:
        return self.code

    def clean(self) -> None:
        # What a purchase later relies on: refused here, in the admin's form, rather
        # than when a customer subscribes.
        errors = _currency_problems(self.currency)
        if problem := model_tiers_problem(self.model_tiers):
            errors["model_tiers"] = problem
        if self.max_priority not in Priority.values:
            errors["max_priority"] = f"One of the job priorities: {', '.join(Priority.values)}."
        if errors:
            raise ValidationError(errors)

    def amount_for(self, seats: int) -> int:
        """Minor units per month for this many seats."""
        return self.monthly_price * (seats if self.seat_based else 1)

    def credits_for(self, seats: int) -> int:
        """Micro-credits per month for this many seats."""
        return self.monthly_credits * (seats if self.seat_based else 1)

    def rollover_cap_of(self, period_credits: int) -> int:
        """What rolls over of a period that granted `period_credits` (Subscription.
        period_credits: its price's, not this plan's now). The percent is the plan's now:
        a price fixes its amount and credits, not the rollover."""
        # Floor: a cap never rounds in the customer's favour past the percent.
        return period_credits * self.rollover_percent // 100

    def overage_ceiling_for(self, seats: int) -> int:
        return self.fair_use_ceiling * (seats if self.seat_based else 1)


class CreditPack(models.Model):
    """A one-time purchase of credits that last `validity_days` (12 months)."""

    code = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=100)
    active = models.BooleanField(default=True)
    credits = models.PositiveBigIntegerField(help_text="Micro-credits.")
    price = models.PositiveBigIntegerField(help_text="Minor units.")
    currency = models.CharField(max_length=3, default="usd")
    validity_days = models.PositiveIntegerField(default=365)
    stripe_product_id = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["price"]
        constraints = [
            models.CheckConstraint(condition=Q(credits__gt=0), name="pack_credits_positive"),
            models.CheckConstraint(condition=Q(price__gt=0), name="pack_price_positive"),
        ]

    def __str__(self) -> str:
        return self.code

    def clean(self) -> None:
        # The grant after payment dates its lot validity_days ahead: 0 grants credits
        # already expired, and a huge value overflows the date, after the customer paid.
        errors = _currency_problems(self.currency)
        if self.validity_days is not None and not (
            1 <= self.validity_days <= PACK_VALIDITY_DAYS_MAX
        ):
            errors["validity_days"] = f"From 1 to {PACK_VALIDITY_DAYS_MAX} days."
        if errors:
            raise ValidationError(errors)


class PriceKind(models.TextChoices):
    PLAN = "plan", "Plan, per month"
    OVERAGE = "overage", "Plan overage, metered"
    PACK = "pack", "Credit pack, one time"


class StripePrice(models.Model):
    """Every Stripe price we ever created, so an old subscription's price still
    names its plan after the plan's price changed."""

    stripe_price_id = models.CharField(max_length=255, unique=True)
    kind = models.CharField(max_length=16, choices=PriceKind.choices)
    plan = models.ForeignKey(
        Plan, on_delete=models.PROTECT, null=True, blank=True, related_name="prices"
    )
    pack = models.ForeignKey(
        CreditPack, on_delete=models.PROTECT, null=True, blank=True, related_name="prices"
    )
    unit_amount = models.PositiveBigIntegerField()
    currency = models.CharField(max_length=3)
    # Micro-credits one unit of this price buys (a month of a plan, per seat where the plan
    # is seat-based; a pack), fixed when the price was made: a plan or pack whose credits
    # change gets a new price, so what was bought at this one stays what it buys. Null: an
    # overage price (it buys none), or a row made by hand without them (the plan's or
    # pack's credits now are read instead).
    credits = models.BigIntegerField(null=True, blank=True)
    # The Stripe billing meter a metered (overage) price reads, fixed when it was made: only
    # events reported to that meter are billed at it. A change of the overage meter (another
    # STRIPE_OVERAGE_EVENT_NAME) makes new overage prices that read the new one, and a
    # retired price still reads the old. Blank: a licensed price, or one made before this
    # was recorded and not read from Stripe since (services.catalog.stripe_price_meter_record).
    meter = models.CharField(max_length=255, blank=True, default="", db_default="")
    lookup_key = models.CharField(max_length=200)
    current = models.BooleanField(default=True, help_text="The price new purchases use.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(Q(kind="pack", pack__isnull=False, plan__isnull=True))
                | (Q(kind__in=["plan", "overage"], plan__isnull=False, pack__isnull=True)),
                name="stripe_price_owner_matches_kind",
            ),
            models.UniqueConstraint(
                fields=["lookup_key"], condition=Q(current=True), name="stripe_price_one_current"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.lookup_key} ({self.stripe_price_id})"

    def plan_credits_for(self, quantity: int) -> int:
        """Micro-credits a month a plan price buys for `quantity` (seats, where the plan is
        seat-based): what the price was made for, whatever the plan says now."""
        per_unit = self.plan.monthly_credits if self.credits is None else self.credits
        return per_unit * (quantity if self.plan.seat_based else 1)

    def plan_amount_for(self, quantity: int) -> int:
        """Minor units a month a plan price charges for `quantity` (as plan_credits_for)."""
        return self.unit_amount * (quantity if self.plan.seat_based else 1)


class BillingCustomer(models.Model):
    """The organization's Stripe customer, and whether it may resell credits."""

    organization = models.OneToOneField(
        "accounts.Organization", on_delete=models.PROTECT, related_name="billing_customer"
    )
    stripe_customer_id = models.CharField(max_length=255, unique=True)
    email = models.EmailField(blank=True)
    # Set by a refund or dispute: the marketplace refuses this organization's listings.
    # Each further cause while frozen is added to the reason and moves the time to it
    # (resale_freeze): finance lift the freeze they were shown, by this time
    # (resale_unfreeze). Neither is edited in the admin.
    resale_frozen_at = models.DateTimeField(null=True, blank=True)
    resale_frozen_reason = models.CharField(max_length=200, blank=True)
    # Stripe Connect account for marketplace payouts, when the seller has one.
    stripe_connect_account_id = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.organization_id}:{self.stripe_customer_id}"


class FormerStripeCustomer(models.Model):
    """A Stripe customer the organization had before: deleted at Stripe, and replaced by a
    new one (services.customers.billing_customer_replace).

    Kept so that what Stripe still sends about it (its subscriptions' deletion, their
    invoices, late) is still known as the organization's, and reconcile still checks it.
    """

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="former_stripe_customers"
    )
    stripe_customer_id = models.CharField(max_length=255, unique=True)
    replaced_by = models.CharField(max_length=255)
    replaced_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.stripe_customer_id} -> {self.replaced_by}"


class Subscription(models.Model):
    """Our mirror of one Stripe subscription.

    `plan`/`seats` are what the organization is entitled to now; they follow
    Stripe's items at once on an upgrade and at period end on a downgrade
    (`scheduled_plan`/`scheduled_seats` hold the change until then).
    """

    class Status(models.TextChoices):
        INCOMPLETE = "incomplete", "Incomplete"
        INCOMPLETE_EXPIRED = "incomplete_expired", "Incomplete, expired"
        TRIALING = "trialing", "Trialing"
        ACTIVE = "active", "Active"
        PAST_DUE = "past_due", "Past due"
        UNPAID = "unpaid", "Unpaid"
        CANCELED = "canceled", "Canceled"
        PAUSED = "paused", "Paused"

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="subscriptions"
    )
    stripe_subscription_id = models.CharField(max_length=255, unique=True)
    # The Stripe customer it belongs to, as last read there: the organization's customer
    # may since have been replaced (deleted at Stripe), and this subscription's overage is
    # invoiced to this one or to none.
    stripe_customer_id = models.CharField(max_length=255, blank=True, db_default="")
    plan = models.ForeignKey(Plan, on_delete=models.PROTECT, related_name="subscriptions")
    seats = models.PositiveIntegerField(default=1)
    scheduled_plan = models.ForeignKey(
        Plan, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    scheduled_seats = models.PositiveIntegerField(null=True, blank=True)
    # The plan price the current period is paid at, which its grant read its credits from
    # (StripePrice.credits): it follows `plan` (a scheduled downgrade's cheaper price is on
    # Stripe's item at once, and in force from the next period). Null: synced before this
    # was recorded, and not yet known (period_credits reads the plan's credits now); a
    # price of another plan is read as null (known_price).
    price = models.ForeignKey(
        StripePrice, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # The metered overage price Stripe's subscription carries, as last read there (null:
    # none of ours). Only a price on the subscription reads the meter: a period's overage
    # allowance is granted only while this is an overage price of its plan, current or
    # retired, reading the meter overage is reported to (services.invoices.
    # overage_price_billed), or the overage used would never be invoiced.
    overage_price = models.ForeignKey(
        StripePrice, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    status = models.CharField(max_length=24, choices=Status.choices)
    current_period_start = models.DateTimeField()
    current_period_end = models.DateTimeField()
    cancel_at_period_end = models.BooleanField(default=False)
    canceled_at = models.DateTimeField(null=True, blank=True)
    # A failed payment starts the grace period; past it, inference is suspended.
    grace_until = models.DateTimeField(null=True, blank=True)
    # When the rollover cap was applied to the last period of this subscription,
    # once it ended (canceled) and that period was over: no renewal comes to apply
    # it (subscriptions.subscription_last_period_cap). Null while live or not yet due.
    last_period_capped_at = models.DateTimeField(null=True, blank=True)
    # When a scheduled downgrade that an interrupted upgrade lifted at Stripe is to be put
    # back (services.checkout._lift_undo_later); null when none is. Kept here, not only
    # in a task's retries, so the sweep puts it back however long Stripe was down. Set
    # after any plan change (or an upgrade's lift) Stripe did not answer: until it is due,
    # the lost request may still land there, and every plan change is refused
    # (change_pending).
    downgrade_restore_due_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    synced_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            # The minute's sweep of ended subscriptions whose last period's cap is due.
            models.Index(
                fields=["current_period_end"],
                condition=Q(status="canceled", last_period_capped_at__isnull=True),
                name="subscription_last_cap_due",
            ),
            # The sweep of lifted downgrades still to put back: almost always none.
            models.Index(
                fields=["downgrade_restore_due_at"],
                condition=Q(downgrade_restore_due_at__isnull=False),
                name="subscription_restore_due",
            ),
        ]
        constraints = [
            # One live subscription per organization; canceled ones stay as history.
            models.UniqueConstraint(
                fields=["organization"],
                condition=~Q(status__in=["canceled", "incomplete_expired"]),
                name="subscription_one_live_per_org",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.stripe_subscription_id} {self.plan_id}x{self.seats} {self.status}"

    @property
    def live(self) -> bool:
        return self.status not in (self.Status.CANCELED, self.Status.INCOMPLETE_EXPIRED)

    def known_price(self) -> StripePrice | None:
        """`price` when it is a price of `plan`; None when it is unknown or stale.

        Stale: a price of another plan, left by whatever moved `plan` without it (a worker
        of the release before the column, whose save() does not write it, during a
        deploy). Its credits and amount are another plan's, per seat or not as that plan
        is: the plan's own now are nearer what this period was paid for. The next sync
        repairs the row from Stripe's item where it can (subscription_sync).
        """
        price = self.price
        if price is None or price.kind != PriceKind.PLAN or price.plan_id != self.plan_id:
            return None
        return price

    def period_credits(self) -> int:
        """Micro-credits a period of this subscription grants: what its price was made to
        sell for its seats, as the invoice grant reads them (invoices.invoice_credits), not
        what the plan gives now. The rollover cap is a share of these."""
        price = self.known_price()
        if price is None:
            return self.plan.credits_for(self.seats)
        return price.plan_credits_for(self.seats)

    def period_amount(self) -> tuple[int, str]:
        """What a period of this subscription costs at its price, in minor units of the
        price's currency: what its renewal charges, not what the plan sells for now."""
        price = self.known_price()
        if price is None:
            return self.plan.amount_for(self.seats), self.plan.currency
        return price.plan_amount_for(self.seats), price.currency


class Invoice(models.Model):
    """Our mirror of a Stripe invoice, for the API and for `stripe_reconcile`."""

    stripe_invoice_id = models.CharField(max_length=255, unique=True)
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="invoices"
    )
    subscription = models.ForeignKey(
        Subscription, on_delete=models.PROTECT, null=True, blank=True, related_name="invoices"
    )
    billing_reason = models.CharField(max_length=40, blank=True)
    status = models.CharField(max_length=24)
    currency = models.CharField(max_length=3)
    amount_due = models.BigIntegerField()
    amount_paid = models.BigIntegerField()
    # What the invoice came to (its lines less discounts, plus tax) before the customer
    # balance or credit notes paid part of it: with amount_paid, what else paid it, which
    # a refund's clawback needs (payments.reversal_credits). Null: mirrored before it was
    # recorded (nothing else is then known to have paid it).
    total = models.BigIntegerField(null=True, blank=True)
    period_start = models.DateTimeField(null=True, blank=True)
    period_end = models.DateTimeField(null=True, blank=True)
    hosted_invoice_url = models.URLField(max_length=1000, blank=True)
    stripe_payment_intent_id = models.CharField(max_length=255, blank=True, db_index=True)
    # Micro-credits this invoice granted (0 until paid; the ledger holds the lot).
    credits_granted = models.BigIntegerField(default=0)
    created_at = models.DateTimeField()
    paid_at = models.DateTimeField(null=True, blank=True)
    synced_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at", "-pk"]

    def __str__(self) -> str:
        return f"{self.stripe_invoice_id} {self.status}"


class CheckoutKind(models.TextChoices):
    SUBSCRIPTION = "subscription", "Subscription"
    PACK = "pack", "Credit pack"
    MARKET_ORDER = "market_order", "Marketplace order"


class CheckoutStatus(models.TextChoices):
    OPEN = "open", "Open"
    COMPLETE = "complete", "Complete"
    EXPIRED = "expired", "Expired"


class CheckoutSession(models.Model):
    """A Stripe Checkout session we created, and what it was for."""

    stripe_session_id = models.CharField(max_length=255, unique=True)
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="checkout_sessions"
    )
    kind = models.CharField(max_length=16, choices=CheckoutKind.choices)
    plan = models.ForeignKey(
        Plan, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    pack = models.ForeignKey(
        CreditPack, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    seats = models.PositiveIntegerField(default=1)
    status = models.CharField(max_length=16, choices=CheckoutStatus.choices, default="open")
    url = models.URLField(max_length=2000)
    stripe_payment_intent_id = models.CharField(max_length=255, blank=True)
    amount_total = models.BigIntegerField(default=0)
    currency = models.CharField(max_length=3, default="usd")
    # The price it was opened at (a market order's: none, it is priced inline).
    price = models.ForeignKey(
        StripePrice, on_delete=models.PROTECT, null=True, blank=True, related_name="+"
    )
    # A pack's: the micro-credits its price buys (StripePrice.credits), recorded when the
    # checkout is opened and granted when it is paid, however often its events come and
    # whatever the pack or price says by then. Null on a pack checkout opened before
    # gymbilling/0033 (old code, during a deploy too) until its grant records them from
    # Stripe's line item (payments._pack_checkout_credits); null on other kinds.
    credits = models.BigIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    completed_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.stripe_session_id} {self.kind} {self.status}"


class EventStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    PROCESSING = "processing", "Processing"
    PROCESSED = "processed", "Processed"
    IGNORED = "ignored", "Ignored (type not handled)"
    FAILED = "failed", "Failed"


class StripeEvent(models.Model):
    """A webhook event, stored once by its Stripe id before anything else happens."""

    stripe_event_id = models.CharField(max_length=255, unique=True)
    type = models.CharField(max_length=100)
    object_type = models.CharField(max_length=64, blank=True)
    object_id = models.CharField(max_length=255, blank=True)
    livemode = models.BooleanField(default=False)
    api_version = models.CharField(max_length=64, blank=True)
    stripe_created_at = models.DateTimeField()
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=EventStatus.choices, default="pending")
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    received_at = models.DateTimeField(auto_now_add=True)
    processing_started_at = models.DateTimeField(null=True, blank=True)
    processed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-received_at"]
        indexes = [models.Index(fields=["status", "received_at"], name="stripe_event_status")]

    def __str__(self) -> str:
        return f"{self.stripe_event_id} {self.type} {self.status}"


class MeterError(models.TextChoices):
    """What Stripe's asynchronous meter error reports said of an overage batch."""

    NONE = "", "None reported"
    # Stripe named the batch's meter event as failed: it was never counted, so the batch
    # was re-queued under a new identifier, or failed when no re-send can bill it.
    DROPPED = "dropped", "Dropped by Stripe"
    # For finance to check at Stripe, never re-sent automatically (that could bill it
    # twice): Stripe reported more failures than it named, in a window the batch was sent
    # in; or it named an attempt of the batch without Stripe's answers saying whether
    # another attempt counted; or it kept dropping the batch past the re-send cap
    # (BILLING_OVERAGE_MAX_RESENDS), or kept refusing it at once past that cap
    # (OverageReport.refusals); or an attempt of it got no answer and it could not be sent
    # again before Stripe may have forgotten its identifier (first_unknown_attempt_at).
    # `error` says which.
    IN_DOUBT = "in_doubt", "Maybe dropped"
    # Maybe dropped, and finance found it counted among the meter's events at Stripe: the
    # flag cleared, for good (a report flags it no more; overage_report_counted).
    COUNTED = "counted", "Counted at Stripe (checked by finance)"


class OverageReport(models.Model):
    """One batch of overage sent to the Stripe billing meter.

    Written before the call, so a crash between the two resends the same
    `identifier`, which Stripe refuses as a duplicate: invoiced once. Stripe
    validates a meter event after accepting it; one it then drops is reported by
    a `v1.billing.meter.error_report_triggered` event (`meter_error`,
    `stripe_error_code`; services/overage.py says what is re-sent and why).
    """

    identifier = models.CharField(max_length=100, unique=True)
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="overage_reports"
    )
    subscription = models.ForeignKey(
        Subscription, on_delete=models.PROTECT, related_name="overage_reports"
    )
    lot_id = models.BigIntegerField(help_text="The overage allowance lot this usage burned.")
    credits = models.PositiveBigIntegerField(help_text="Whole credits in this batch.")
    used_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="When the batch's last credit was used, within the allowance's period: "
        "the meter event's timestamp, so Stripe bills it in that period.",
    )
    sent_at = models.DateTimeField(null=True, blank=True)
    # The batch's last attempt Stripe may have taken (its idempotency key names it): written
    # before the call, put back when Stripe refused it. Equal to `sent_at` when Stripe
    # answered that attempt 200. Only a report naming this attempt re-sends the batch
    # (services/overage.py says why). Null: none yet, or sent by an older release.
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    # The first attempt under its identifier whose outcome is unknown (no answer, a 5xx,
    # a run that died): Stripe may have taken it, and refuses its identifier again only
    # for 24 hours, so the batch is not sent again by itself once this is 23 hours old
    # (services/overage.py, RESEND_UNKNOWN_WITHIN). Written before the call where none
    # is, put back when Stripe refused the attempt, cleared once Stripe answers one 200 or
    # the batch is re-queued under a new identifier. Null on a batch not sent with a
    # `last_attempt_at`: one the previous release tried (it wrote only its last attempt),
    # whose clock starts at its `created_at`, before its first attempt.
    first_unknown_attempt_at = models.DateTimeField(null=True, blank=True)
    # Set when it can never be sent (its Stripe customer was deleted): no longer tried;
    # `error` says why, for finance to invoice it another way or write it off.
    failed_at = models.DateTimeField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True, db_default="")
    # How often Stripe refused an attempt of it at once (a 4xx, its customer not gone):
    # each is a re-send toward BILLING_OVERAGE_MAX_RESENDS, as each `_r<n>` after Stripe
    # dropped it is; past the cap it is left to finance. Retries after no answer, a 429 or
    # a 5xx count toward nothing. db_default: the previous release writes batches too.
    refusals = models.PositiveIntegerField(default=0, db_default=0)
    # db_default: processes of the previous release still write batches during a deploy.
    meter_error = models.CharField(
        max_length=16, choices=MeterError.choices, blank=True, db_default=MeterError.NONE
    )
    stripe_error_code = models.CharField(
        max_length=64,
        blank=True,
        db_default="",
        help_text="Stripe's code from the last meter error report about this batch, "
        "e.g. meter_event_customer_not_found.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["pk"]
        constraints = [
            models.CheckConstraint(condition=Q(credits__gt=0), name="overage_report_positive"),
            # A batch is sent with `<identifier>:<attempt>` as its idempotency key, and
            # Stripe's meter error report names it by that key: the batch is what comes
            # before the first ':' (services/overage.py, meter_event_key).
            models.CheckConstraint(
                condition=~Q(identifier__contains=":"),
                name="overage_report_identifier_no_key_separator",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.identifier} {self.credits}"


class PaymentReversal(models.Model):
    """A refund or dispute of a payment that bought credits, and what it cost us.

    `credits_clawed_back` were still unspent and were taken back;
    `credits_lost` were already spent (or resold) and are recorded as a loss
    for finance, never silently dropped; `credits_pending` were unspent but
    held by running work: taken back as that work settles and gives them back,
    or lost if it spends them (payment_reversals_pending_settle).

    A dispute the gym wins is undone at `reinstated_at`: `credits_reinstated`
    (what was clawed back) are the customer's again, and nothing is lost or
    pending any more (the money came back); `credits_clawed_back` stays, the
    history of what the dispute took.
    """

    class Kind(models.TextChoices):
        REFUND = "refund", "Refund"
        DISPUTE = "dispute", "Dispute"

    # refund:<charge>:<cumulative amount refunded> or dispute:<dispute id>
    key = models.CharField(max_length=255, unique=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="payment_reversals"
    )
    stripe_charge_id = models.CharField(max_length=255)
    stripe_payment_intent_id = models.CharField(max_length=255, blank=True)
    amount = models.BigIntegerField(help_text="Minor units refunded or disputed by this event.")
    currency = models.CharField(max_length=3)
    credits_bought = models.BigIntegerField(help_text="Micro-credits the payment bought.")
    credits_clawed_back = models.BigIntegerField(default=0)
    credits_lost = models.BigIntegerField(default=0)
    credits_pending = models.BigIntegerField(
        default=0,
        help_text="Unspent but held by running work when the reversal came: taken back as "
        "the work settles, or lost if it spends them.",
    )
    reinstated_at = models.DateTimeField(
        null=True, blank=True, help_text="When a won dispute gave back what it took."
    )
    credits_reinstated = models.BigIntegerField(
        default=0, help_text="Micro-credits a won dispute gave back (what it clawed back)."
    )
    # A dispute Stripe closed as lost: final, its credits never come back (so no
    # rollover waits for them: gymbilling.market.rollover).
    lost_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        permissions = [
            # The admin's "Refund" (gymbilling.admin.RefundAdminMixin): money back at Stripe.
            ("refund_payment", "Can refund a customer's payment at Stripe"),
        ]
        indexes = [
            # The sweep's few rows among all reversals.
            models.Index(
                fields=["created_at"],
                condition=models.Q(credits_pending__gt=0),
                name="reversal_credits_pending",
            ),
        ]

    def __str__(self) -> str:
        return (
            f"{self.key} -{self.credits_clawed_back} lost {self.credits_lost}"
            f" pending {self.credits_pending}"
        )


class RolloverCarry(models.Model):
    """What a period rollover's cap left unused, for plan credits that were away when it counted.

    The cap counts the subscription credits the organization holds when the
    period changes (its wallet and its listings). Credits a buyer's pending
    order had reserved (`fills`) or a dispute had clawed back (`clawbacks`)
    were not there to count. When they come back (the order released, the
    dispute won) they fill `headroom`, the part of the cap the rollover left
    unused, and the rest expires as it arrives: whatever order they come back
    in, the organization keeps min(cap, counted + what came back), what it
    would have kept had they been home. Reserved credits that are paid for
    never come back, and use none of it. Credits over the cap that running
    jobs held (`held_over`) were home but left for the jobs to burn; what the
    jobs give back of them expires once they have settled, and until then they
    are claimed on the wallet (`held_claimed`): no later work may spend them.
    """

    # The rollover's trim key (rollover:<subscription>:<period start>): one per rollover.
    key = models.CharField(max_length=200, unique=True)
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.PROTECT, related_name="+"
    )
    headroom = models.PositiveBigIntegerField(
        help_text="Micro-credits that may still come back past this rollover untrimmed."
    )
    memo = models.CharField(max_length=500, blank=True)
    fills = models.ManyToManyField(
        "gymbilling.MarketFill", related_name="rollovers_missed", blank=True
    )
    clawbacks = models.ManyToManyField(
        "metering.JournalTransaction", related_name="rollovers_missed", blank=True
    )
    # Plan credits over the cap that the rollover's trim left because jobs running
    # then held them (their settlement must be able to burn them): what those
    # jobs give back of them expires when they have all settled
    # (rollover.rollover_holds_settle, each sweep), up to this; 0 once done.
    held_over = models.PositiveBigIntegerField(default=0)
    # The wallet lots they are in (ids), where they come back to.
    held_lots = models.JSONField(default=list, blank=True)
    # What the rollover claimed of them on the wallet (LedgerAccount.claimed), so that no
    # work started after it may hold them while the jobs run or before the sweep expires
    # what the jobs gave back; the sweep drops it as it settles. 0: nothing claimed
    # (none over the cap, or a carry opened before rollovers claimed).
    held_claimed = models.PositiveBigIntegerField(default=0, db_default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.key} headroom {self.headroom}"
