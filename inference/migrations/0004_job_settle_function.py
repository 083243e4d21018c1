"""A job's settlement as one server-side call: the claim, then the hold's settlement.

`inference.services.jobs.job_settle` claims the job (the UPDATE that writes
its end, only from a state it may end from) and settles its hold, in one
transaction. From a worker, with no transaction open, that was BEGIN, the
claim, the settlement (metering_hold_settle, metering migration 0005) and
COMMIT: four round trips, the organization's wallet locked across the last
two. This function runs the same two steps server-side, so the call is one
statement and its own transaction.

Semantics are the transaction's exactly: the claim first (a job already
ended, or not in `p_only`, is left alone: o_claimed false, nothing written),
then the settlement. A settlement the fast path would not do (its function
returns no row: not ordinary, the ORM path decides) raises GYM03, which
undoes the claim as well; the caller then runs the whole transaction
through the ORM path. GYM02 (lots short) passes through unchanged.

Only PostgreSQL has it; SQLite runs the transaction.
"""

from django.db import migrations

SETTLE_FUNCTION = """
CREATE OR REPLACE FUNCTION inference_job_settle(
    p_job bigint, p_only text[],
    j_status text, j_finished_at timestamptz, j_input_tokens integer,
    j_cached_input_tokens integer, j_output_tokens integer, j_input_tokens_source text,
    j_engine_ms integer, j_credits_charged bigint, j_serving_cost bigint,
    j_finish_reason text, j_error_code text, j_error_message text, j_output text,
    j_first_token_at timestamptz,
    p_key text, p_captured bigint, p_status text, p_txn_kind text, p_fp text,
    p_now timestamptz,
    u_record boolean, u_org bigint, u_key bigint, u_job text, u_model text,
    u_priority text, u_in integer, u_cached integer, u_out integer, u_ms integer,
    u_credits bigint, u_price bigint, u_cost bigint, u_currency text
) RETURNS TABLE (o_claimed boolean, o_wallet_balance bigint, o_hold metering_hold)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    r record;
BEGIN
    UPDATE inference_job
       SET status = j_status,
           finished_at = j_finished_at,
           input_tokens = j_input_tokens,
           cached_input_tokens = j_cached_input_tokens,
           output_tokens = j_output_tokens,
           input_tokens_source = j_input_tokens_source,
           engine_ms = j_engine_ms,
           credits_charged = j_credits_charged,
           serving_cost = j_serving_cost,
           finish_reason = j_finish_reason,
           error_code = j_error_code,
           error_message = j_error_message,
           output = j_output,
           first_token_at = COALESCE(first_token_at, j_first_token_at)
     WHERE id = p_job AND status = ANY(p_only);
    IF NOT FOUND THEN
        o_claimed := false;
        RETURN NEXT;
        RETURN;
    END IF;
    SELECT s.* INTO r
      FROM metering_hold_settle(
               p_key, p_captured, p_status, p_txn_kind, p_fp, p_now,
               u_record, u_org, u_key, u_job, u_model, u_priority, u_in, u_cached,
               u_out, u_ms, u_credits, u_price, u_cost, u_currency
           ) s;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'job %% needs the ORM settlement', p_job USING ERRCODE = 'GYM03';
    END IF;
    o_claimed := true;
    o_wallet_balance := r.o_wallet_balance;
    o_hold := r.o_hold;
    RETURN NEXT;
END;
$fn$;
"""

SIGNATURE = (
    "inference_job_settle(bigint, text[], text, timestamptz, integer, integer, integer, text, "
    "integer, bigint, bigint, text, text, text, text, timestamptz, text, bigint, text, text, "
    "text, timestamptz, boolean, bigint, bigint, text, text, text, integer, integer, integer, "
    "integer, bigint, bigint, bigint, text)"
)


def forwards(apps, schema_editor):
    # schema_editor.execute binds parameters, hence the doubled %% above.
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SETTLE_FUNCTION)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0003_job_input_tokens_source_and_tokenizer"),
        ("metering", "0005_hold_settle_function"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
