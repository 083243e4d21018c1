"""The settlement hot path in SQL: one statement to place a hold, one to settle it.

Inference places and settles a hold for every request, so these two calls
are the ledger's hot path. Through the ORM they cost 16 statements and about
13 ms of client CPU per settlement (docs/BENCHMARKS.md); here they write the
very same rows with one statement each (the settlement's calls a
server-side function, migrations 0005 and 0007), its own transaction when the caller
has none open, so no round trip happens while the wallet is locked.

This is an optimisation of the common case only. Whenever anything is not
ordinary (the organization's accounts are not open yet, the wallet is short,
a pending refund's claim included, or has lots due to expire, the key was
used before, the hold is not pending) the fast path writes nothing, or rolls
back what it wrote, and returns None; the caller then runs the ORM path,
which is the reference implementation and produces the right error, sweep or
replay. The tests run the whole ledger suite through both paths
(METERING_FAST_PATH).

Locking is the same as the ORM path's, in the same order: the hold row,
then the wallet, then the holds account (the wallet is opened first, so its
primary key is lower, which is the order `post()` uses), then the wallet's
lots. Every writer of a wallet's lots holds the wallet's row lock, which is
why the settlement reads the lots in a later statement than the one that
took that lock: its snapshot sees every committed lot.

Inference writes its own row in the same statements: a new job's row with
its hold's placement (hold_place's `row`), and its job's claim with the
settlement (`SETTLE_ARGS`, called from migrations inference/0004 and 0010), so
that a request's ledger writes are two statements, each its own transaction.
"""

from __future__ import annotations

import contextlib
import functools
from datetime import datetime

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction

from accounts import sql
from metering.models import Hold
from metering.services.lots import LedgerInconsistent
from metering.services.usage import UsageDraft

# Every statement here is prepared, with server-side binding and each
# parameter cast (accounts.sql): they are large and run on every request, and
# client-side binding made PostgreSQL parse and plan them every time (about
# 2.5 ms of its CPU per settlement here). With DATABASE_PREPARED_STATEMENTS
# off (an old transaction-pooling PgBouncer), the ORM path runs instead.

# In the model's field order, which is the order Model.from_db expects.
HOLD_COLUMNS = tuple(f.column for f in Hold._meta.concrete_fields)
_RETURNING = ", ".join(HOLD_COLUMNS)


def enabled() -> bool:
    return sql.available() and getattr(settings, "METERING_FAST_PATH", True)


def _hold_from_row(row) -> Hold:
    return Hold.from_db(
        connection.alias, [f.attname for f in Hold._meta.concrete_fields], list(row)
    )


# The placement: its common table expressions (the accounts, the journal
# transaction, its entries), then the hold row. Every insert hangs off the
# wallet's update, so a wallet that is short writes nothing. Short means what
# post() refuses: less than `amount` beyond what pending refunds and disputes
# have claimed (`claimed`, read in the row this statement updates anyway).
_PLACE_CTES = """
WITH acct AS MATERIALIZED (
    SELECT max(id) FILTER (WHERE kind = 'wallet') AS wallet_id,
           max(id) FILTER (WHERE kind = 'holds') AS holds_id
      FROM metering_ledgeraccount
     WHERE organization_id = %(org)s::bigint AND kind IN ('wallet', 'holds')
),
w AS (
    UPDATE metering_ledgeraccount a
       SET balance = a.balance - %(amount)s::bigint
      FROM acct
     WHERE a.id = acct.wallet_id
       AND a.balance - a.claimed >= %(amount)s::bigint
       AND (a.next_expiry_at IS NULL OR a.next_expiry_at > %(now)s::timestamptz)
    RETURNING a.id, a.balance
),
h AS (
    UPDATE metering_ledgeraccount a
       SET balance = a.balance + %(amount)s::bigint
      FROM acct, w
     WHERE a.id = acct.holds_id
    RETURNING a.id, a.balance
),
t AS (
    INSERT INTO metering_journaltransaction
           (kind, idempotency_key, fingerprint, organization_id, memo, created_at)
    SELECT 'hold_place', %(txn_key)s::text, %(fp)s::text, %(org)s::bigint, %(memo)s::text, %(now)s::timestamptz FROM h
    RETURNING id
),
e AS (
    INSERT INTO metering_ledgerentry (transaction_id, account_id, amount, balance_after, created_at)
    SELECT t.id, w.id, -%(amount)s::bigint, w.balance, %(now)s::timestamptz FROM t, w
    UNION ALL
    SELECT t.id, h.id, %(amount)s::bigint, h.balance, %(now)s::timestamptz FROM t, h
)
"""
_PLACE_HOLD = f"""
INSERT INTO metering_hold
       (organization_id, key, amount, captured, status, expires_at, place_transaction_id, created_at)
SELECT %(org)s::bigint, %(key)s::text, %(amount)s::bigint, 0, 'pending', %(expires_at)s::timestamptz, t.id, %(now)s::timestamptz FROM t
RETURNING {_RETURNING}
"""
_PLACE = _PLACE_CTES + _PLACE_HOLD


# For a placement its caller makes durable later (hold_place's `durable`): its
# own transaction commits without waiting for the WAL flush. set_config's
# third argument makes the setting the transaction's alone, so the
# connection's next statement commits as configured again; it is joined into
# the last SELECT so that PostgreSQL evaluates it (an unreferenced CTE that
# only reads is never run).
_NOT_FLUSHED = ", (SELECT set_config('synchronous_commit', 'off', true)) unflushed"
_PLACE_NOT_FLUSHED = _PLACE.replace(" FROM t\nRETURNING", f" FROM t{_NOT_FLUSHED}\nRETURNING")
assert _PLACE_NOT_FLUSHED != _PLACE


@functools.cache
def _place_with_row(
    table: str, columns: str, values: str, pk_column: str, durable: bool = True
) -> str:
    """The placement, then a row inserted only if the hold was (`RowInsert`'s parts)."""
    return f"""{_PLACE_CTES.rstrip()},
placed AS ({_PLACE_HOLD}),
extra AS (
    INSERT INTO {table} ({columns}) SELECT {values} FROM placed RETURNING {pk_column}
)
SELECT placed.*, extra.{pk_column} FROM placed, extra{"" if durable else _NOT_FLUSHED}
"""


def hold_place_fast(
    *,
    organization_id: int,
    amount: int,
    key: str,
    txn_key: str,
    fp: str,
    memo: str,
    now: datetime,
    expires_at: datetime,
    savepoint: bool = True,
    row: sql.RowInsert | None = None,
    durable: bool = True,
) -> Hold | None:
    """Place a hold in one statement, or None to say "take the ORM path".

    `savepoint=False` when the key cannot have been used before (see
    hold_place's `new_key`): a used key is the only error the savepoint
    recovers from; without it, that error is raised, and the caller's
    transaction with it.

    `row`: an INSERT written by the same statement, only if the hold is
    placed (a new job's row); the hold returned carries its primary key as
    `row_pk`. Nothing at all is written when the hold is not.

    `durable=False`: with no transaction open, the commit does not wait for
    the WAL flush (see hold_place).
    """
    params = {
        "org": organization_id,
        "amount": amount,
        "key": key,
        "txn_key": txn_key,
        "fp": fp,
        "memo": memo[:500],
        "now": now,
        "expires_at": expires_at,
    }
    # Alone (no transaction open), the statement is its own transaction,
    # committed as it ends: the wallet's row lock is not held across a round
    # trip. Inside the caller's, a savepoint unless the key is new, and the
    # caller's commit is durable (it may write more than this hold).
    alone = not connection.in_atomic_block
    durable = durable or not alone
    statement = _PLACE if durable else _PLACE_NOT_FLUSHED
    if row is not None:
        statement = _place_with_row(row.table, row.columns, row.values, row.pk_column, durable)
        params.update(row.params)
    try:
        with contextlib.nullcontext() if alone else transaction.atomic(savepoint=savepoint):
            result = sql.execute(statement, params)
    except IntegrityError:
        if not savepoint:
            raise
        return None  # the key was used before: the ORM path replays or refuses
    # No row: the wallet was short, due to expire, or not opened yet, and the
    # statement wrote nothing (every insert hangs off the wallet's update).
    if not result:
        return None
    if row is None:
        return _hold_from_row(result)
    hold = _hold_from_row(result[:-1])
    hold.row_pk = result[-1]
    return hold


# The settlement runs server-side (`metering_hold_settle`: migrations 0005 and 0007,
# and 0017's, which takes the record's user, as 0018 left it: the only one since
# 0020 dropped the one without it, so a call with other arguments fails):
# the accounts statement, then the lots statement with a fresh snapshot, in
# one round trip and with the function's EXCEPTION block as its savepoint,
# so the wallet's row lock is never held while this process waits for a CPU.
#
# SETTLE_ARGS are the function's arguments, named as `settle_params` names
# them, and HOLD_RESULT its result as the columns `hold_from_result` reads:
# inference calls the function from its own (inference_job_settle).
SETTLE_ARGS = """%(key)s::text, %(captured)s::bigint, %(status)s::text, %(txn_kind)s::text,
           %(fp)s::text, %(now)s::timestamptz,
           %(u_record)s::boolean, %(u_org)s::bigint, %(u_key)s::bigint, %(u_job)s::text,
           %(u_model)s::text, %(u_priority)s::text, %(u_in)s::integer, %(u_cached)s::integer,
           %(u_out)s::integer, %(u_ms)s::integer, %(u_credits)s::bigint, %(u_price)s::bigint,
           %(u_cost)s::bigint, %(u_currency)s::text, %(u_user)s::bigint"""
HOLD_RESULT = "s.o_wallet_balance, " + ", ".join(f"(s.o_hold).{c}" for c in HOLD_COLUMNS)
_SETTLE = f"""
SELECT {HOLD_RESULT}
  FROM metering_hold_settle(
           {SETTLE_ARGS}
       ) s
"""

# SQLSTATE the function raises when the wallet's lots cannot cover a capture.
_LOTS_SHORT = "GYM02"


def hold_settle_fast(
    *,
    key: str,
    captured: int,
    status: str,
    txn_kind: str,
    fp: str,
    now: datetime,
    usage: UsageDraft | None = None,
) -> Hold | None:
    """Settle a pending hold in one statement, or None to say "take the ORM path".

    With `usage`, its usage record is written by the same statement; a
    record the job already has makes it take the ORM path, which replays it.
    Lots that cannot cover the capture raise LedgerInconsistent; inside a
    transaction, that transaction is then aborted (the statement failed).
    """
    params = settle_params(
        key=key, captured=captured, status=status, txn_kind=txn_kind, fp=fp, now=now, usage=usage
    )
    with lots_short_raised():
        row = sql.execute(_SETTLE, params)
    if row is None:
        return None  # nothing written: not ordinary, the ORM path decides
    return hold_from_result(row)


def settle_params(
    *, key: str, captured: int, status: str, txn_kind: str, fp: str, now: datetime, usage
) -> dict:
    """The parameters SETTLE_ARGS names."""
    return {
        "key": key,
        "captured": captured,
        "status": status,
        "txn_kind": txn_kind,
        "fp": fp,
        "now": now,
        **_usage_params(usage),
    }


@contextlib.contextmanager
def lots_short_raised():
    """Report the function's GYM02 (lots short of the capture) as LedgerInconsistent."""
    try:
        yield
    except DatabaseError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == _LOTS_SHORT:
            raise LedgerInconsistent(str(exc.__cause__)) from exc
        raise


def hold_from_result(row) -> Hold:
    """The settled hold from HOLD_RESULT's columns."""
    wallet_balance, *hold_row = row
    hold = _hold_from_row(hold_row)
    # What the organization may spend just after this settlement: inference
    # answers with it (X-Gym-Credits-Remaining) without reading it again. None
    # while the wallet has a lot due to expire (migration 0018): what the sweep
    # would move then is the balance selector's to reckon, and the caller asks it.
    hold.wallet_balance_after = wallet_balance
    return hold


def _usage_params(usage: UsageDraft | None) -> dict:
    if usage is None:
        # One statement for both cases (one prepared plan): nothing inserted.
        return dict.fromkeys(_USAGE_PARAMS) | {"u_record": False}
    return {
        "u_record": True,
        "u_org": usage.organization_id,
        "u_key": usage.api_key_id,
        "u_job": usage.job_id,
        "u_model": usage.model_name,
        "u_priority": usage.priority,
        "u_in": usage.usage.input_tokens,
        "u_cached": usage.usage.cached_input_tokens,
        "u_out": usage.usage.output_tokens,
        "u_ms": usage.engine_busy_ms,
        "u_credits": usage.credits,
        "u_price": usage.model_price.pk if usage.model_price is not None else None,
        "u_cost": usage.serving_cost,
        "u_currency": usage.currency,
        "u_user": usage.user_id,
    }


_USAGE_PARAMS = (
    "u_org",
    "u_key",
    "u_job",
    "u_model",
    "u_priority",
    "u_in",
    "u_cached",
    "u_out",
    "u_ms",
    "u_credits",
    "u_price",
    "u_cost",
    "u_currency",
    "u_user",
)
