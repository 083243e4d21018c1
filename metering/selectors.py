"""Reads of the credit ledger."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from django.db import connection
from django.db.models import (
    BigIntegerField,
    BooleanField,
    Case,
    CharField,
    Count,
    Q,
    QuerySet,
    Sum,
    Value,
    When,
)
from django.db.models import F as models_F
from django.db.models.functions import Cast, Coalesce, Concat, TruncDay
from django.utils import timezone

from accounts.cache import SharedCache
from accounts.errors import ApplicationError
from accounts.models import Organization
from metering.models import (
    AccountKind,
    CreditLot,
    LedgerAccount,
    LedgerEntry,
    LotSource,
    ModelPrice,
    UsageRecord,
)


@dataclass(frozen=True)
class Balance:
    """An organization's credits, in micro-credits.

    available = what a new hold may take: the wallet, less what refunds
                and disputes set aside while running work holds their credits,
                and rollovers of what running work held over the cap (the
                wallet's claim; never below 0);
    held      = reserved by pending holds (the holds account);
    escrowed  = listed on the marketplace, or bought and awaiting payment (the
                escrow account);
    set_aside = the wallet's claim, usually 0;
    total     = the wallet + held, which the wallet's lots add up to as the expiry
                sweep leaves them (`organization_lots`' `left`; their `remaining`
                adds up to the wallet account + held, expired credits included).

    `wallet` and `escrowed` are the accounts as the expiry sweep leaves them: credits
    of lots past their expiry that the sweep has not moved yet are not in them, as a
    new hold sweeps the wallet's first and can never take them, and a buyer can never
    be sold the escrow's (a listing ends when its credits expire). So none of these
    figures counts credits that are about to expire, before the sweep as after it.
    """

    wallet: int
    held: int
    escrowed: int
    set_aside: int = 0

    @property
    def available(self) -> int:
        return max(0, self.wallet - self.set_aside)

    @property
    def total(self) -> int:
        return self.wallet + self.held


def organization_balance(*, organization: Organization, now: datetime | None = None) -> Balance:
    now = now or timezone.now()
    accounts = {
        account.kind: account
        for account in LedgerAccount.objects.filter(organization=organization).only(
            "kind", "balance", "claimed", "next_expiry_at"
        )
    }
    wallet = accounts.get(AccountKind.WALLET)
    holds = accounts.get(AccountKind.HOLDS)
    escrow = accounts.get(AccountKind.ESCROW)
    return Balance(
        wallet=wallet.balance - _expirable(wallet, organization, now) if wallet else 0,
        held=holds.balance if holds else 0,
        escrowed=escrow.balance - _expirable(escrow, organization, now) if escrow else 0,
        set_aside=wallet.claimed if wallet else 0,
    )


def _expirable(account: LedgerAccount, organization: Organization, now: datetime) -> int:
    """What the account's expiry sweep would move now: the credits of its lots past their
    expiry, less, in a wallet, what pending holds back (the sweep's own reckoning,
    metering.services.lots); in escrow nothing backs them, and all of them go.

    Only for an account whose next expiry has come (`next_expiry_at` is never later than
    the truth): inference answers and every dashboard page read the balance, and this
    costs no query until a lot is due. Not locked: a read, as of its statements; never
    more than the account, which a settlement or fill committing in between might
    otherwise make it.
    """
    if account.next_expiry_at is None or account.next_expiry_at > now:
        return 0
    return min(account.balance, sum(_swept(account, organization, now).values()))


def _swept(account: LedgerAccount, organization: Organization, now: datetime) -> dict[int, int]:
    """What the account's expiry sweep would move now, by lot id (lots_expirable, not
    locked: as of its statements)."""
    # Here, not at the top: metering.services imports this module.
    from metering.services.lots import lots_expirable

    taken, _ = lots_expirable(account=account, organization=organization, now=now, lock=False)
    return {lot.pk: take for lot, take in taken}


def model_price_by_id(pk: int) -> ModelPrice:
    return PRICES.get(
        ("pk", pk), lambda: ModelPrice.objects.select_related("price_book").get(pk=pk)
    )


def account_balance(*, account: LedgerAccount) -> int:
    """The true balance: the cache for organization accounts, the sum for system ones."""
    if not account.is_system:
        return account.balance
    return LedgerEntry.objects.filter(account=account).aggregate(s=Sum("amount"))["s"] or 0


def overage_allowance_available(
    *, organization: Organization, available: int, now: datetime | None = None
) -> int:
    """How much of the `available` credits is a plan's overage allowance: lent, not
    prepaid, invoiced as it is spent.

    Overage lots are burned after every other (their priority), so the credits that
    pending work holds come out of the others first, and the allowance is what is left
    of the overage lots up to `available`. Not those past their expiry (an allowance
    whose period or subscription has ended): what is left of them backs running work
    or is the sweep's, never available.
    """
    now = now or timezone.now()
    left = (
        CreditLot.objects.filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now),
            organization=organization,
            account__kind=AccountKind.WALLET,
            source=LotSource.OVERAGE,
        ).aggregate(left=Sum("remaining"))["left"]
        or 0
    )
    return min(left, available)


def credits_removable(*, organization: Organization, now: datetime | None = None) -> int:
    """What a finance debit (credits_adjust) may take now: the wallet's credits less a plan's
    overage allowance, what running work holds and what pending refunds and rollovers set
    aside (metering.services.lots.debit_room, as the debit itself reckons it, not locked)."""
    # Here, not at the top: metering.services imports this module.
    from metering.services.lots import debit_room

    wallet = LedgerAccount.objects.filter(
        organization=organization, kind=AccountKind.WALLET
    ).first()
    if wallet is None:
        return 0
    return debit_room(organization=organization, wallet=wallet, now=now or timezone.now())[1]


def organization_lots(
    *, organization: Organization, now: datetime | None = None, limit: int | None = None
) -> list[CreditLot]:
    """The organization's lots with credits left (wallet and escrow), soonest expiry first,
    never-expiring last; `limit`: the first that many.

    As the expiry sweep leaves them, as `organization_balance` shows the accounts: each
    lot's `left` is its `remaining` less what the sweep would move now. So a lot past its
    expiry that the sweep has not moved yet keeps only what pending holds placed before
    it expired will burn (held by running work, which may still use it; a customer sees
    it as `past_expiry`), and one with nothing of that is not listed, as it will not be a
    minute later. The wallet's lots' `left` then add up to Balance.total and the escrow's
    to Balance.escrowed, before the sweep as after it.

    One query until a lot past its expiry is among the first listed (they sort first);
    then organization_lots_left's.
    """
    now = now or timezone.now()
    lots = _lots_with_credits(organization, now).annotate(left=models_F("remaining"))
    listed = list(_lots_by_expiry(lots)[:limit])
    if not listed or not listed[0].past_expiry:
        return listed
    return list(_lots_by_expiry(organization_lots_left(organization=organization, now=now))[:limit])


def organization_lots_left(
    *, organization: Organization, now: datetime | None = None
) -> QuerySet[CreditLot]:
    """organization_lots as a queryset, in no order, for a list to page through (the API's
    lots, by id): the lots a sweep would empty left out, and each lot's `left` as the
    sweep leaves it, annotated in SQL.

    Lots past their expiry keep credits only until the sweep runs, or while running work
    holds them: few. They are read and reckoned first (the sweep's reckoning for each
    account holding one), and what is left of each goes into the query.
    """
    now = now or timezone.now()
    lots = _lots_with_credits(organization, now)
    expired = list(lots.filter(expires_at__lte=now))
    swept: dict[int, int] = {}
    for account in {lot.account_id: lot.account for lot in expired}.values():
        swept |= _swept(account, organization, now)
    kept = {
        lot.pk: lot.remaining - swept.get(lot.pk, 0)
        for lot in expired
        if lot.remaining > swept.get(lot.pk, 0)
    }
    if len(kept) < len(expired):
        unexpired = Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        lots = lots.filter(unexpired | Q(pk__in=list(kept)))
    return lots.annotate(
        left=Case(
            *(When(pk=pk, then=Value(left)) for pk, left in kept.items()),
            default=models_F("remaining"),
            output_field=BigIntegerField(),
        )
    )


def _lots_with_credits(organization: Organization, now: datetime) -> QuerySet[CreditLot]:
    """The organization's lots with `remaining` credits, and whether each is `past_expiry`."""
    return (
        CreditLot.objects.filter(organization=organization, remaining__gt=0)
        .select_related("account")
        .annotate(
            past_expiry=Case(
                When(expires_at__lte=now, then=Value(True)),
                default=Value(False),
                output_field=BooleanField(),
            ),
        )
    )


def _lots_by_expiry(lots: QuerySet[CreditLot]) -> QuerySet[CreditLot]:
    return lots.order_by(models_F("expires_at").asc(nulls_last=True), "pk")


_LOT_FAMILY = """
WITH RECURSIVE family(id) AS (
    SELECT %s::bigint
    UNION
    SELECT l.id FROM metering_creditlot l JOIN family f ON l.parent_id = f.id
)
SELECT id FROM family
"""


def lot_family_ids(lot: CreditLot) -> list[int]:
    """The lot and every lot split from it, however many generations down: each move
    through escrow splits one (listed, reserved, released to the listing, withdrawn to the
    wallet is four), and credits may make that trip any number of times."""
    with connection.cursor() as cursor:
        cursor.execute(_LOT_FAMILY, [lot.pk])
        return [pk for (pk,) in cursor.fetchall()]


def organization_entries(*, organization: Organization) -> QuerySet:
    return (
        LedgerEntry.objects.filter(account__organization=organization)
        .select_related("account", "transaction")
        .order_by("-pk")
    )


# Price books, read by every inference request; dropped in every process when
# a book is published (MeteringConfig.ready). Books are never edited, so a
# cached price is the row itself. Shared between threads: never change them.
PRICES = SharedCache("metering-prices")


def _model_prices(model_name: str) -> list[ModelPrice]:
    """Every book's price of the model, the newest book (by effective time, then version) first."""
    return list(
        ModelPrice.objects.filter(model_name=model_name)
        .select_related("price_book")
        .order_by("-price_book__effective_at", "-price_book__version")
    )


def model_price(*, model_name: str, at: datetime | None = None) -> ModelPrice:
    """The rates in force for a model at a moment: the newest book effective by then."""
    at = at or timezone.now()
    prices = PRICES.get(("model", model_name), lambda: _model_prices(model_name))
    price = next((p for p in prices if p.price_book.effective_at <= at), None)
    if price is None:
        raise ApplicationError(
            code="model_not_priced",
            message=f"No price is set for the model {model_name!r}.",
            status=404,
            param="model",
        )
    return price


USAGE_GROUPINGS = {"day", "model", "key"}


def usage_aggregate(
    *, organization: Organization, start: datetime, end: datetime, group_by: str
) -> list[dict]:
    """Usage totals per day, model or API key over [start, end).

    By key, what a member sent with the dashboard's session (its playground),
    which no key sent, is grouped per member: "user:<their id>", the `user_id` GET
    /api/v1/orgs/{id}/members names them by (their address is not shown: a key
    reads addresses only with the admin scope).
    """
    if group_by not in USAGE_GROUPINGS:
        raise ApplicationError(
            code="invalid_request",
            message=f"group_by must be one of {', '.join(sorted(USAGE_GROUPINGS))}.",
            param="group_by",
        )
    qs = _organization_usage(organization=organization, start=start, end=end)
    if group_by == "day":
        qs = qs.annotate(group=TruncDay("created_at"))
    elif group_by == "model":
        qs = qs.annotate(group=models_F("model_name"))
    else:
        qs = qs.annotate(group=Coalesce(models_F("api_key__public_id"), _DASHBOARD_MEMBER))
    return list(qs.values("group").annotate(**_usage_sums()).order_by("group"))


# A usage record's member, for one sent with a dashboard session; null without one.
_DASHBOARD_MEMBER = Case(
    When(
        user__isnull=False,
        then=Concat(Value("user:"), Cast(models_F("user_id"), CharField())),
    ),
    output_field=CharField(),
)


def usage_by_day_and_model(
    *, organization: Organization, start: datetime, end: datetime
) -> list[dict]:
    """Usage totals per day (midnight UTC, `day`) and model (`model_name`) over [start, end),
    days first, then models: the dashboard's chart stacks each day's models in one bar."""
    return list(
        _organization_usage(organization=organization, start=start, end=end)
        .annotate(day=TruncDay("created_at"))
        .values("day", "model_name")
        .annotate(**_usage_sums())
        .order_by("day", "model_name")
    )


def _organization_usage(*, organization: Organization, start: datetime, end: datetime) -> QuerySet:
    return UsageRecord.objects.filter(
        organization=organization, created_at__gte=start, created_at__lt=end
    )


def _usage_sums() -> dict:
    """What a usage aggregate sums per group, for the partner API and the dashboard
    (finance's report sums the same columns per job in SQL: usage_margin_report)."""
    return {
        "requests": Count("id"),
        "input_tokens": Sum("input_tokens"),
        "cached_input_tokens": Sum("cached_input_tokens"),
        "output_tokens": Sum("output_tokens"),
        "credits": Sum("credits"),
    }


# What finance's report groups by: a column of the report's pieces (_usage_margin_sql).
# "lot" (the root lot's id) is not offered on the admin page: it is the grouping in which
# each lot's parts add up to its payment (revenue + breakage + taken_back), for checks.
REPORT_GROUPINGS = {
    "model": "COALESCE(u.model_name, piece.label)",
    "plan": "piece.plan",
    "organization": "o.slug",
    "lot": "piece.root_id",
}

# The report's plan of credits that no lot paid for: a job that charged nothing (its
# serving cost only), or usage recorded without a hold.
NO_LOT = "(no lot)"
# Of paid credits whose grant said nothing of what they were sold for (a root lot's
# revenue is null): counted as credits without a known price, at no revenue.
PRICE_UNKNOWN = "(price unknown)"
FREE = "free"
# The model grouping's rows for what left lots without a job: credits that expired
# (the sweep, a rollover cap's trim: breakage), and credits a refund, a dispute or a
# reversed grant took back (their share of the payment went back to the customer).
EXPIRED = "(expired)"
TAKEN_BACK = "(taken back)"

# Which movements of a lot's family count in its running total (what has left the
# family for good, or come back to it), as SQL over the movement m, its transaction t and
# the transaction t reverses, o (NULL if none). Each kind's share of the payment goes to
# one column: usage (captures, and captures reversed) to revenue; expiry (the sweep,
# credits_trim, lots_trim, the marketplace's credits_expire_early: every move into the
# expiry account is an 'expiry' transaction) to breakage; what went back to the customer
# (a clawback or a negative adjustment, a reversed grant or adjustment, a reversed
# clawback) to taken_back. Transfers (escrow, the marketplace, between teams) move
# credits inside the family and never count; nor does a lot's own creation (a grant's,
# an adjustment's: positive, so not a taking).
_USAGE_MOVE = "t.kind = 'hold_capture' OR (t.kind = 'reversal' AND o.kind = 'hold_capture')"
_EXPIRY_MOVE = "t.kind = 'expiry' OR (t.kind = 'reversal' AND o.kind = 'expiry')"
_TAKEN_BACK_MOVE = (
    "(t.kind = 'adjustment' AND m.amount < 0)"
    " OR (t.kind = 'reversal' AND o.kind IN ('adjustment', 'grant'))"
)


def _floor_share(whole: str, part: str, of: str, vendor: str) -> str:
    """SQL for floor(whole * part / of), exactly, for non-negative operands.

    The one rounding of the report. A share of a lot's payment (or of a job's serving
    cost) goes to each burn, expiry or taking-back as the difference between this share
    of everything consumed up to and including it and of everything before it: so the
    shares of any run of them add up to the floor of the run's share, each is within one
    minor unit of its exact share, and once all of a lot is consumed (by any mix of
    usage, expiry and refunds) they add up to all of its payment, never a minor unit more
    or less (the last takes the remainder). Rounded down, so no prefix of a lot's history
    is ever shown as having earned more than was paid for it. On PostgreSQL in numeric,
    as products of money and micro-credits pass bigint; elsewhere (SQLite, `make demo`)
    in its 64-bit integers.
    """
    if vendor == "postgresql":
        return f"CAST(div(CAST({whole} AS numeric) * ({part}), {of}) AS bigint)"
    return f"(({whole}) * ({part}) / ({of}))"


def _usage_margin_sql(group: str, vendor: str) -> str:
    """The report's query: the usage of [start, end) cut into pieces, one per lot each
    job's capture burned (and one per lot a reversed capture of these days gave credits
    back to), plus one for what no lot paid for, plus one per lot movement of these days
    that expired credits or gave them back to the customer (priced lots only: the others
    have no money to share); each piece with its share of the job's serving cost and of
    its root lot's payment (_floor_share); summed by `group` and by the currency of the
    revenue and that of the cost, which are never added together.

    A root lot's share is counted over every credit its family (the lots split from
    it) ever consumed (used, expired, taken back: _USAGE_MOVE, _EXPIRY_MOVE,
    _TAKEN_BACK_MOVE), in the ledger's order (the movements' ids), not only over these
    days': so a lot consumed across months earns exactly its payment in all.
    """

    def share(whole: str, part: str, of: str) -> str:
        return _floor_share(whole, part, of, vendor)

    # The families' movements first, then their transactions by key: never a scan of
    # the journal, the ledger's largest table, to find the few that are captures.
    materialized = "MATERIALIZED " if vendor == "postgresql" else ""

    return f"""
WITH usage AS (
    SELECT u.id, u.credits, u.serving_cost, u.currency, u.organization_id,
           h.settle_transaction_id AS capture_id
      FROM metering_usagerecord u
      LEFT JOIN metering_hold h ON h.id = u.hold_id
     WHERE u.created_at >= %(start)s AND u.created_at < %(end)s
),
burn AS (
    SELECT usage.id AS usage_id, m.id AS movement_id, m.lot_id, -m.amount AS credits,
           SUM(-m.amount) OVER (PARTITION BY usage.id ORDER BY m.id) AS job_through,
           ROW_NUMBER() OVER (PARTITION BY usage.id ORDER BY m.id) AS nth
      FROM usage
      JOIN metering_lotmovement m ON m.transaction_id = usage.capture_id
     WHERE m.amount < 0
),
returned AS (
    SELECT u.id AS usage_id, m.id AS movement_id, m.lot_id, -m.amount AS credits
      FROM metering_journaltransaction r
      JOIN metering_hold h ON h.settle_transaction_id = r.reverses_id
      JOIN metering_usagerecord u ON u.hold_id = h.id
      JOIN metering_lotmovement m ON m.transaction_id = r.id
     WHERE r.kind = 'reversal' AND m.amount > 0
       AND r.created_at >= %(start)s AND r.created_at < %(end)s
),
lapsed AS (
    SELECT m.id AS movement_id, m.lot_id, -m.amount AS credits,
           CASE WHEN {_EXPIRY_MOVE} THEN '{EXPIRED}' ELSE '{TAKEN_BACK}' END AS label
      FROM metering_journaltransaction t
      JOIN metering_lotmovement m ON m.transaction_id = t.id
      LEFT JOIN metering_journaltransaction o ON o.id = t.reverses_id
     WHERE t.kind IN ('expiry', 'adjustment', 'reversal')
       AND t.created_at >= %(start)s AND t.created_at < %(end)s
       AND ({_EXPIRY_MOVE} OR {_TAKEN_BACK_MOVE})
),
moved AS (
    SELECT usage_id, movement_id, lot_id, credits, job_through, nth, NULL AS label FROM burn
    UNION ALL
    SELECT usage_id, movement_id, lot_id, credits, NULL, NULL, NULL FROM returned
    UNION ALL
    SELECT NULL, movement_id, lot_id, credits, NULL, NULL, label FROM lapsed
),
rooted AS (
    SELECT moved.*, COALESCE(l.root_id, l.id) AS root_id, l.organization_id
      FROM moved JOIN metering_creditlot l ON l.id = moved.lot_id
),
family AS (
    SELECT l.id, COALESCE(l.root_id, l.id) AS root_id
      FROM metering_creditlot l
     WHERE COALESCE(l.root_id, l.id) IN (SELECT root_id FROM rooted)
),
family_moved AS {materialized}(
    SELECT m.id, m.amount, m.transaction_id, family.root_id
      FROM family JOIN metering_lotmovement m ON m.lot_id = family.id
),
consumed AS (
    SELECT m.id AS movement_id,
           SUM(-m.amount) OVER (PARTITION BY m.root_id ORDER BY m.id) AS root_through
      FROM family_moved m
      JOIN metering_journaltransaction t ON t.id = m.transaction_id
      LEFT JOIN metering_journaltransaction o ON o.id = t.reverses_id
     WHERE {_USAGE_MOVE} OR {_EXPIRY_MOVE} OR {_TAKEN_BACK_MOVE}
),
burned AS (
    SELECT usage_id, SUM(credits) AS total FROM burn GROUP BY usage_id
),
shared AS (
    SELECT rooted.*, root.origin, root.paid, root.revenue AS paid_for, root.amount AS lot_amount,
           root.revenue_currency,
           COALESCE({share("root.revenue", "consumed.root_through", "root.amount")}
                    - {share("root.revenue", "consumed.root_through - rooted.credits", "root.amount")},
                    0) AS earned
      FROM rooted
      JOIN consumed ON consumed.movement_id = rooted.movement_id
      JOIN metering_creditlot root ON root.id = rooted.root_id
),
piece AS (
    SELECT shared.usage_id, shared.root_id, u.organization_id, NULL AS label,
           CASE WHEN shared.origin <> '' THEN shared.origin
                WHEN shared.paid THEN '{PRICE_UNKNOWN}' ELSE '{FREE}' END AS plan,
           CASE WHEN shared.paid_for > 0 THEN shared.revenue_currency ELSE u.currency END
               AS currency,
           u.currency AS cost_currency,
           CASE WHEN shared.nth = 1 THEN 1 ELSE 0 END AS is_first,
           shared.credits,
           CASE WHEN shared.paid_for = 0 THEN shared.credits ELSE 0 END AS free_credits,
           CASE WHEN shared.paid_for IS NULL THEN shared.credits ELSE 0 END AS unpriced_credits,
           shared.earned AS revenue,
           0 AS breakage,
           0 AS taken_back,
           CASE WHEN shared.nth IS NULL THEN 0
                ELSE {share("u.serving_cost", "shared.job_through", "u.credits")}
                     - {share("u.serving_cost", "shared.job_through - shared.credits", "u.credits")}
           END AS cost
      FROM shared
      JOIN metering_usagerecord u ON u.id = shared.usage_id
    UNION ALL
    SELECT NULL, shared.root_id, shared.organization_id, shared.label,
           CASE WHEN shared.origin <> '' THEN shared.origin ELSE '{PRICE_UNKNOWN}' END,
           shared.revenue_currency, shared.revenue_currency,
           0, 0, 0, 0,
           0,
           CASE WHEN shared.label = '{EXPIRED}' THEN shared.earned ELSE 0 END,
           CASE WHEN shared.label = '{TAKEN_BACK}' THEN shared.earned ELSE 0 END,
           0
      FROM shared
     -- Only a paid lot's expiry is breakage: an unpaid one with a price (a plan's
     -- overage allowance) is lent, invoiced in arrears for what is used alone.
     WHERE shared.usage_id IS NULL AND shared.paid_for > 0 AND shared.paid
    UNION ALL
    SELECT usage.id, NULL, usage.organization_id, NULL, '{NO_LOT}', usage.currency,
           usage.currency,
           CASE WHEN burned.total IS NULL THEN 1 ELSE 0 END,
           usage.credits - COALESCE(burned.total, 0),
           0,
           usage.credits - COALESCE(burned.total, 0),
           0,
           0,
           0,
           usage.serving_cost
           - CASE WHEN burned.total IS NULL OR usage.credits = 0 THEN 0
                  ELSE {share("usage.serving_cost", "burned.total", "usage.credits")} END
      FROM usage LEFT JOIN burned ON burned.usage_id = usage.id
     WHERE burned.total IS NULL OR burned.total <> usage.credits
)
SELECT {group} AS grp, piece.currency, piece.cost_currency,
       SUM(piece.is_first) AS requests,
       SUM(piece.is_first * u.input_tokens) AS input_tokens,
       SUM(piece.is_first * u.cached_input_tokens) AS cached_input_tokens,
       SUM(piece.is_first * u.output_tokens) AS output_tokens,
       SUM(piece.is_first * u.engine_busy_ms) AS engine_busy_ms,
       SUM(piece.credits) AS credits,
       SUM(piece.free_credits) AS free_credits,
       SUM(piece.unpriced_credits) AS unpriced_credits,
       SUM(piece.revenue) AS revenue,
       SUM(piece.breakage) AS breakage,
       SUM(piece.taken_back) AS taken_back,
       SUM(piece.cost) AS serving_cost
  FROM piece
  LEFT JOIN metering_usagerecord u ON u.id = piece.usage_id
  JOIN accounts_organization o ON o.id = piece.organization_id
 GROUP BY {group}, piece.currency, piece.cost_currency
 ORDER BY serving_cost DESC, grp, piece.currency, piece.cost_currency
"""


REPORT_SUMS = (
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "engine_busy_ms",
    "credits",
    "free_credits",
    "unpriced_credits",
    "revenue",
    "breakage",
    "taken_back",
    "serving_cost",
)


def usage_margin_report(*, start: datetime, end: datetime, group_by: str) -> list[dict]:
    """Finance's usage, revenue, serving cost and margin over [start, end), per model,
    plan or organization (REPORT_GROUPINGS), the costliest first.

    Each row: `group`, `currency` (the revenue's) and `cost_currency` (the serving
    cost's: the catalog's GPU-hour price's), the sums of REPORT_SUMS, and `margin`
    (revenue - serving cost, in minor units; None when the two currencies differ, as
    nothing here converts one into the other). Money in minor units, credits in
    micro-credits, all integers: rows with the same currencies add up exactly, and to
    the same totals in every grouping.

    Credits are the usage's (a reversed capture's credits back, in the days it was
    reversed, at what they had earned); revenue is recognized as credits are burned,
    at what their root lot was sold for (CreditLot.revenue: a marketplace purchase
    earns what the seller's plan was paid, the gym's marketplace fee being money of
    its own); free credits earn 0 and are counted apart, as are paid credits with no
    known price. Credits of paid lots that expired in these days (sweep or rollover
    trim) earn their share as `breakage` (an unpaid lot with a price, a plan's overage
    allowance, earns what is used alone: nothing invoices what expires); the share of those a refund, dispute or reversed grant took back
    is `taken_back`, in neither (grouped by model, on the rows EXPIRED and TAKEN_BACK). So
    per root lot (group_by="lot"), revenue + breakage + taken_back over all time is its
    payment once it is consumed, and `margin` is revenue + breakage - serving cost. A job's plan is that of the lots it burned, so one job may count in
    two plans; its requests and tokens count once, with the first lot it burned.

    A lot's running count follows the ledger's order (movement ids), which is commit
    order but for settlements committing at the same moment: read while such a burn is
    still committing, the days' last burns may be shown a minor unit apart from a later
    reading, never their lot's total. Reads every lot once (the families of the lots
    burned in these days: CreditLot.root is not indexed, see there).
    """
    vendor = connection.vendor
    with connection.cursor() as cursor:
        cursor.execute(
            _usage_margin_sql(REPORT_GROUPINGS[group_by], vendor),
            {
                "start": connection.ops.adapt_datetimefield_value(start),
                "end": connection.ops.adapt_datetimefield_value(end),
            },
        )
        columns = [column[0] for column in cursor.description]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    report = []
    for row in rows:
        sums = report_sums({name: row[name] for name in REPORT_SUMS})
        same = row["currency"] == row["cost_currency"]
        report.append(
            {
                "group": row["grp"],
                "currency": row["currency"],
                "cost_currency": row["cost_currency"],
                **sums,
                "margin": margin(sums) if same else None,
            }
        )
    return report


def report_sums(sums: dict) -> dict[str, int]:
    """The report's figures as integers, or refused if any is not one.

    PostgreSQL computes them exactly (numeric). SQLite (`make demo`) has only 64-bit
    integers and turns a product that passes them (a payment of $1,000,000.00 times a
    lot of 100 million credits, in micro-credits) into a float without a word: such a
    figure would be shown rounded, so the report refuses it and names the fix."""
    if any(isinstance(value, float) for value in sums.values()):
        raise ApplicationError(
            code="report_needs_postgresql",
            message="These figures pass SQLite's 64-bit integers; run the report on "
            "PostgreSQL, which computes them exactly.",
            status=409,
        )
    return {name: int(value or 0) for name, value in sums.items()}


def margin(row: dict) -> int:
    """What the gym kept: usage revenue and breakage, less serving cost (what refunds
    took back was never the gym's)."""
    return row["revenue"] + row["breakage"] - row["serving_cost"]


def rows_summed(
    rows: list[dict], *, keys: tuple[str, ...], sums: tuple[str, ...], label: dict
) -> list[dict]:
    """The rows' `sums` added up per value of their `keys` (a currency, or a pair of them:
    amounts are never added across currencies), in the order the rows first show each;
    each total also carries `label` (what its group column says)."""
    totals: dict[tuple, dict] = {}
    for row in rows:
        key = tuple(row[name] for name in keys)
        total = totals.setdefault(
            key, label | dict(zip(keys, key, strict=True)) | dict.fromkeys(sums, 0)
        )
        for name in sums:
            total[name] += row[name]
    return list(totals.values())


def report_totals(rows: list[dict]) -> list[dict]:
    """usage_margin_report's rows summed per pair of currencies, with their margins."""
    totals = rows_summed(
        rows, keys=("currency", "cost_currency"), sums=REPORT_SUMS, label={"group": "total"}
    )
    for total in totals:
        same = total["currency"] == total["cost_currency"]
        total["margin"] = margin(total) if same else None
    return totals
