"""The settlement reports no balance while its wallet has a lot due to expire.

Its first result (`o_wallet_balance`, 0013) is an inference answer's
`X-Gym-Credits-Remaining`: what a new hold may take. A lot that expired while a
job ran still counts in the wallet until the minute's sweep moves it, and the
settlement reported it, while `organization_balance` leaves it out and a new
hold, which sweeps first, never finds it: an answer said credits remained that
the next request was refused. What the sweep would move is the replay of every
pending hold over the lots (metering.services.lots.lots_expirable), too much to
do under the wallet's lock for what a sweep ends within the minute. So, once
the wallet's `next_expiry_at` has come (never later than the truth), the result
is NULL, which every caller reads as "the settlement did not say" and asks the
selector instead (inference.tasks._final_event): queries only in that rare case.
The column is returned by the wallet's update the settlement runs anyway, as
the placement reads it: no statement more.

Both overloads are replaced, signatures kept: 0017's, and 0015's (20 arguments)
for processes still running the code before 0017. Every release since the
settlement first reported a balance reads NULL so, and `inference_job_settle`
(inference/0004, 0010) passes the result on as it is.
"""

import importlib

from django.db import migrations

_0007 = importlib.import_module("metering.migrations.0007_capture_burns_by_placement")
_0013 = importlib.import_module("metering.migrations.0013_settlement_reports_available")
_0015 = importlib.import_module("metering.migrations.0015_capture_burns_claimed_lots_last")
_0017 = importlib.import_module("metering.migrations.0017_usagerecord_user")

_OLD_WALLET = _0013._NEW_WALLET
_NEW_WALLET = _OLD_WALLET.replace("a.claimed", "a.claimed, a.next_expiry_at")
_OLD_INTO = _0013._NEW_INTO
_NEW_INTO = """        SELECT hd.id, t.id, w.id,
               CASE WHEN w.next_expiry_at IS NULL OR w.next_expiry_at > p_now
                    THEN GREATEST(w.balance - w.claimed, 0) END,
               hd.created_at"""

# Each function as it was, 0015's then 0017's; forwards replaces each with itself
# reporting nothing while a lot is due.
REPLACED = (_0015.SETTLE_FUNCTION, _0017.SETTLE_FUNCTION)


def reporting_nothing_with_lots_due(function: str) -> str:
    return _0007._replaced(function, (_OLD_WALLET, _NEW_WALLET), (_OLD_INTO, _NEW_INTO))


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for function in REPLACED:
            schema_editor.execute(reporting_nothing_with_lots_due(function))


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        for function in REPLACED:
            schema_editor.execute(function)


class Migration(migrations.Migration):
    dependencies = [("metering", "0017_usagerecord_user")]

    operations = [migrations.RunPython(forwards, backwards)]
