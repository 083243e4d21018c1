"""The settlement fast path as one server-side function: one round trip, no savepoint.

`metering.services.fastpath.hold_settle_fast` used to send its two statements
(accounts, then lots) from Python, inside a savepoint. Every client round
trip between the first write to the wallet and the commit is time the
wallet's row lock is held while the client process waits for a CPU; with 8
clients settling on one wallet that serialized them (docs/BENCHMARKS.md, the
hot wallet). This function runs the same two statements server-side, so a
settlement is one statement: alone, it is its own transaction; inside the
caller's, its EXCEPTION block is the savepoint, with no round trip.

Semantics are the two statements' exactly. A VOLATILE function takes a new
snapshot for each statement it runs, so the lots statement still sees every
lot committed before the first statement took the wallet's lock. A pending
hold that is not ordinary (not found, already settled, over its amount,
accounts not set up, a key or usage record used before) leaves nothing
written and returns no row: the caller then runs the ORM path, which
replays or raises the right error. Lots short of the capture raise GYM02,
which the caller reports as LedgerInconsistent.

Only PostgreSQL has it; SQLite runs the ORM path (METERING_FAST_PATH only
applies to PostgreSQL).
"""

from django.db import migrations

SETTLE_FUNCTION = """
CREATE OR REPLACE FUNCTION metering_hold_settle(
    p_key text, p_captured bigint, p_status text, p_txn_kind text, p_fp text,
    p_now timestamptz,
    u_record boolean, u_org bigint, u_key bigint, u_job text, u_model text,
    u_priority text, u_in integer, u_cached integer, u_out integer, u_ms integer,
    u_credits bigint, u_price bigint, u_cost bigint, u_currency text
) RETURNS TABLE (o_wallet_balance bigint, o_hold metering_hold)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_hold bigint;
    v_txn bigint;
    v_wallet bigint;
    r record;
BEGIN
    BEGIN
        WITH hd AS MATERIALIZED (
            SELECT id, organization_id, amount
              FROM metering_hold
             WHERE key = p_key AND status = 'pending' AND amount >= p_captured
               FOR UPDATE
        ),
        acct AS MATERIALIZED (
            SELECT max(a.id) FILTER (WHERE a.kind = 'wallet') AS wallet_id,
                   max(a.id) FILTER (WHERE a.kind = 'holds') AS holds_id,
                   (SELECT id FROM metering_ledgeraccount
                     WHERE organization_id IS NULL AND kind = 'consumption') AS consumption_id
              FROM metering_ledgeraccount a JOIN hd ON a.organization_id = hd.organization_id
             WHERE a.kind IN ('wallet', 'holds')
        ),
        w AS (
            -- Always written, even with nothing to give back: the wallet's row
            -- lock is what guards its lots, which the capture burns next.
            UPDATE metering_ledgeraccount a
               SET balance = a.balance + (hd.amount - p_captured)
              FROM acct, hd
             WHERE a.id = acct.wallet_id AND acct.consumption_id IS NOT NULL
            RETURNING a.id, a.balance
        ),
        h AS (
            UPDATE metering_ledgeraccount a
               SET balance = a.balance - hd.amount
              FROM acct, hd, w
             WHERE a.id = acct.holds_id AND a.balance >= hd.amount
            RETURNING a.id, a.balance
        ),
        t AS (
            INSERT INTO metering_journaltransaction
                   (kind, idempotency_key, fingerprint, organization_id, memo, created_at)
            SELECT p_txn_kind, 'hold:' || p_key || ':settle', p_fp, hd.organization_id, '', p_now
              FROM hd, h
            RETURNING id
        ),
        e AS (
            INSERT INTO metering_ledgerentry
                   (transaction_id, account_id, amount, balance_after, created_at)
            SELECT t.id, h.id, -hd.amount, h.balance, p_now FROM t, h, hd
            UNION ALL
            SELECT t.id, acct.consumption_id, p_captured, NULL, p_now FROM t, acct
             WHERE p_captured > 0
            UNION ALL
            SELECT t.id, w.id, hd.amount - p_captured, w.balance, p_now FROM t, w, hd
             WHERE hd.amount > p_captured
        )
        SELECT hd.id, t.id, w.id, w.balance INTO v_hold, v_txn, v_wallet, o_wallet_balance
          FROM hd, t, w;
        IF v_hold IS NULL THEN
            -- Not pending, over the hold, not set up, or the holds account
            -- disagreed (then the wallet was written): undo, let Python decide.
            RAISE EXCEPTION USING ERRCODE = 'GYM01';
        END IF;

        -- A new statement, so a new snapshot: it sees every lot committed
        -- before the statement above took the wallet's lock. Lots are locked
        -- in primary-key order, then burned in the documented burn order
        -- (metering.services.lots).
        WITH locked AS MATERIALIZED (
            SELECT id, remaining, priority, expires_at, paid
              FROM metering_creditlot
             WHERE account_id = v_wallet AND remaining > 0 AND p_captured > 0
             ORDER BY id
               FOR UPDATE
        ),
        ranked AS (
            SELECT id, remaining,
                   sum(remaining) OVER (
                       ORDER BY COALESCE(expires_at <= p_now, false) DESC,
                                priority,
                                expires_at ASC NULLS LAST,
                                paid,
                                id
                   ) AS through
              FROM locked
        ),
        take AS (
            SELECT id, LEAST(remaining, p_captured - (through - remaining)) AS amount
              FROM ranked
             WHERE through - remaining < p_captured
        ),
        burn AS (
            UPDATE metering_creditlot l SET remaining = l.remaining - take.amount
              FROM take WHERE l.id = take.id
            RETURNING l.id
        ),
        moves AS (
            INSERT INTO metering_lotmovement (lot_id, transaction_id, amount)
            SELECT id, v_txn, -amount FROM take
        ),
        settled AS (
            UPDATE metering_hold hh
               SET status = p_status, captured = p_captured,
                   settle_transaction_id = v_txn, settled_at = p_now
             WHERE hh.id = v_hold
            RETURNING hh
        ),
        rec AS (
            INSERT INTO metering_usagerecord
                   (organization_id, api_key_id, job_id, hold_id, model_name, priority,
                    input_tokens, cached_input_tokens, output_tokens, engine_busy_ms, credits,
                    model_price_id, serving_cost, currency, created_at)
            SELECT u_org, u_key, u_job, v_hold, u_model, u_priority, u_in, u_cached, u_out,
                   u_ms, u_credits, u_price, u_cost, u_currency, p_now
              FROM settled
             WHERE u_record
        )
        SELECT (SELECT COALESCE(sum(amount), 0) FROM take) AS burned, settled.hh AS hold
          INTO r
          FROM settled;
        IF NOT FOUND THEN
            -- Cannot happen (the hold is locked by the first statement); if it
            -- did, fail the whole settlement rather than answer with nothing.
            RAISE EXCEPTION 'hold %% was not settled', v_hold USING ERRCODE = 'GYM02';
        END IF;
    EXCEPTION
        -- A used settlement key or usage record, or GYM01 above: nothing
        -- stays written (the block is a subtransaction); no row returned.
        WHEN unique_violation OR SQLSTATE 'GYM01' THEN
            RETURN;
    END;
    IF r.burned <> p_captured THEN
        RAISE EXCEPTION 'lots of account %% hold %% of the %% to burn', v_wallet, r.burned, p_captured
            USING ERRCODE = 'GYM02';
    END IF;
    o_hold := r.hold;
    RETURN NEXT;
END;
$fn$;
"""

SIGNATURES = (
    "metering_hold_settle(text, bigint, text, text, text, timestamptz, boolean, bigint, "
    "bigint, text, text, text, integer, integer, integer, integer, bigint, bigint, bigint, text)",
)


def forwards(apps, schema_editor):
    # schema_editor.execute binds parameters, hence the doubled %% above.
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SETTLE_FUNCTION)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for signature in SIGNATURES:
            schema_editor.execute(f"DROP FUNCTION IF EXISTS {signature}")


class Migration(migrations.Migration):
    dependencies = [("metering", "0004_alter_creditlot_source")]

    operations = [migrations.RunPython(forwards, backwards)]
