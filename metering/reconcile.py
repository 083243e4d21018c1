"""Checks every invariant of DESIGN.md's credit ledger over the whole database.

Each check is one SQL query that returns the offending rows, so reconcile is
cheap enough to run after every test and in production on a schedule. Other
apps add their own checks (each paid invoice has one grant, each marketplace
fill one transfer) with `register`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from django.db import connection

# The expiry sweep runs every minute (beat); a lot past its expiry by more than a few
# runs, with credits no pending hold may burn, is one it has not done.
EXPIRY_SWEEP_GRACE_MINUTES = 10

CHECKS: list[tuple[str, str, str]] = [
    (
        "transaction_balanced",
        "entries of every transaction sum to zero",
        """
        SELECT transaction_id, SUM(amount) AS total
          FROM metering_ledgerentry
         GROUP BY transaction_id
        HAVING SUM(amount) <> 0
        """,
    ),
    (
        "transaction_has_entries",
        "every journal transaction has at least two entries",
        """
        SELECT t.id, t.kind, COUNT(e.id) AS entries
          FROM metering_journaltransaction t
          LEFT JOIN metering_ledgerentry e ON e.transaction_id = t.id
         GROUP BY t.id, t.kind
        HAVING COUNT(e.id) < 2
        """,
    ),
    (
        "cached_balance",
        "each organization account's cached balance equals the sum of its entries",
        """
        SELECT a.id, a.kind, a.organization_id, a.balance, COALESCE(SUM(e.amount), 0) AS entries
          FROM metering_ledgeraccount a
          LEFT JOIN metering_ledgerentry e ON e.account_id = a.id
         WHERE a.organization_id IS NOT NULL
         GROUP BY a.id, a.kind, a.organization_id, a.balance
        HAVING a.balance <> COALESCE(SUM(e.amount), 0)
        """,
    ),
    (
        "non_negative",
        "wallets, holds and escrow never go negative",
        """
        SELECT id, kind, organization_id, balance
          FROM metering_ledgeraccount
         WHERE organization_id IS NOT NULL AND balance < 0
        """,
    ),
    (
        "claims_on_wallets",
        "only wallets carry a claim, and it is never negative",
        """
        SELECT id, kind, organization_id, claimed
          FROM metering_ledgeraccount
         WHERE claimed <> 0 AND (kind <> 'wallet' OR claimed < 0)
        """,
    ),
    (
        "lot_movements",
        "each lot's remaining credits equal the sum of its movements, within 0..amount",
        """
        SELECT l.id, l.amount, l.remaining, COALESCE(SUM(m.amount), 0) AS movements
          FROM metering_creditlot l
          LEFT JOIN metering_lotmovement m ON m.lot_id = l.id
         GROUP BY l.id, l.amount, l.remaining
        HAVING l.remaining <> COALESCE(SUM(m.amount), 0)
            OR l.remaining < 0 OR l.remaining > l.amount
        """,
    ),
    (
        "lots_cover_wallet",
        "a wallet's lots add up to the wallet plus the organization's holds",
        """
        SELECT w.organization_id, w.balance AS wallet, h.balance AS holds,
               COALESCE(l.remaining, 0) AS lots
          FROM metering_ledgeraccount w
          JOIN metering_ledgeraccount h
            ON h.organization_id = w.organization_id AND h.kind = 'holds'
          LEFT JOIN (SELECT account_id, SUM(remaining) AS remaining
                       FROM metering_creditlot GROUP BY account_id) l
            ON l.account_id = w.id
         WHERE w.kind = 'wallet'
           AND w.balance + h.balance <> COALESCE(l.remaining, 0)
        """,
    ),
    (
        "lots_cover_escrow",
        "an escrow account's lots add up to its balance",
        """
        SELECT a.organization_id, a.balance, COALESCE(l.remaining, 0) AS lots
          FROM metering_ledgeraccount a
          LEFT JOIN (SELECT account_id, SUM(remaining) AS remaining
                       FROM metering_creditlot GROUP BY account_id) l
            ON l.account_id = a.id
         WHERE a.kind = 'escrow' AND a.balance <> COALESCE(l.remaining, 0)
        """,
    ),
    (
        "lot_organization",
        "every lot belongs to the organization of the account it is in",
        """
        SELECT l.id, l.account_id, l.organization_id, a.organization_id AS account_organization_id
          FROM metering_creditlot l
          JOIN metering_ledgeraccount a ON a.id = l.account_id
         WHERE a.organization_id IS DISTINCT FROM l.organization_id
        """,
    ),
    (
        "expired_lots_swept",
        "credits of lots expired more than "
        f"{EXPIRY_SWEEP_GRACE_MINUTES} minutes ago are no more than what pending holds "
        "placed before they expired may still burn (the expiry sweep runs)",
        # Per account: what its lots expired before the grace still hold, against every
        # pending hold of a wallet placed before the latest of those expiries (an
        # upper bound of what holds may still burn of them: a hold burns only lots that
        # expired after it was placed). More is a sweep that has stalled or fails on the
        # account: expired credits that stay on the books, or worse, spendable.
        f"""
        SELECT a.id AS account_id, a.kind, a.organization_id, x.expired, x.latest_expiry,
               COALESCE(p.pending, 0) AS pending_holds
          FROM metering_ledgeraccount a
          JOIN (SELECT account_id, SUM(remaining) AS expired, MAX(expires_at) AS latest_expiry
                  FROM metering_creditlot
                 WHERE remaining > 0
                   AND expires_at <= now() - interval '{EXPIRY_SWEEP_GRACE_MINUTES} minutes'
                 GROUP BY account_id) x
            ON x.account_id = a.id
          LEFT JOIN LATERAL (SELECT SUM(h.amount) AS pending
                               FROM metering_hold h
                              WHERE a.kind = 'wallet'
                                AND h.organization_id = a.organization_id
                                AND h.status = 'pending'
                                AND h.created_at < x.latest_expiry) p
            ON true
         WHERE x.expired > COALESCE(p.pending, 0)
        """,
    ),
    (
        "holds_account",
        "an organization's holds account equals the sum of its pending holds",
        """
        SELECT a.organization_id, a.balance, COALESCE(p.amount, 0) AS pending
          FROM metering_ledgeraccount a
          LEFT JOIN (SELECT organization_id, SUM(amount) AS amount
                       FROM metering_hold WHERE status = 'pending'
                      GROUP BY organization_id) p
            ON p.organization_id = a.organization_id
         WHERE a.kind = 'holds' AND a.balance <> COALESCE(p.amount, 0)
        """,
    ),
    (
        "hold_settled_once",
        "each settlement transaction belongs to exactly one settled hold",
        """
        SELECT t.id, t.kind, t.idempotency_key
          FROM metering_journaltransaction t
          LEFT JOIN metering_hold h ON h.settle_transaction_id = t.id
         WHERE t.kind IN ('hold_capture', 'hold_release', 'hold_expire')
           AND h.id IS NULL
        """,
    ),
    (
        "hold_capture_matches",
        "a settled hold's consumption entry equals what it captured",
        """
        SELECT h.id, h.key, h.captured, COALESCE(c.consumed, 0) AS consumed
          FROM metering_hold h
          LEFT JOIN (SELECT e.transaction_id, SUM(e.amount) AS consumed
                       FROM metering_ledgerentry e
                       JOIN metering_ledgeraccount a ON a.id = e.account_id
                      WHERE a.kind = 'consumption'
                      GROUP BY e.transaction_id) c
            ON c.transaction_id = h.settle_transaction_id
         WHERE h.status <> 'pending' AND h.captured <> COALESCE(c.consumed, 0)
        """,
    ),
]


@dataclass
class Violation:
    check: str
    description: str
    rows: list[dict]


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


_EXTRA: list[tuple[str, str, Callable[[], list[dict]]]] = []


def register(name: str, description: str, check: Callable[[], list[dict]]) -> None:
    """Add an app's own invariant: `check` returns the offending rows."""
    if all(existing[0] != name for existing in _EXTRA):
        _EXTRA.append((name, description, check))


def sql_rows(sql: str, params: list | None = None) -> list[dict]:
    """Run one check's SQL; other apps' checks use it too."""
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        columns = [c[0] for c in cursor.description]
        return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]


def ledger_reconcile() -> Report:
    report = Report()
    checks = [(n, d, (lambda sql=sql: sql_rows(sql))) for n, d, sql in CHECKS] + _EXTRA
    for name, description, check in checks:
        report.checked.append(name)
        rows = check()
        if rows:
            report.violations.append(Violation(check=name, description=description, rows=rows))
    return report
