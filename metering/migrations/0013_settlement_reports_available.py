"""The settlement reports what a new hold may take, less the wallet's claim (0012).

Its first result (`o_wallet_balance`) is the `X-Gym-Credits-Remaining` of an
inference answer. It was the wallet's balance, which counts credits a pending
refund has set aside and no hold may take; it is now that balance less the
claim, never below 0, as `organization_balance().available` says. The function
is 0009's with the wallet's update returning its claim, and that one result.
"""

import importlib

from django.db import migrations

_0007 = importlib.import_module("metering.migrations.0007_capture_burns_by_placement")
_0009 = importlib.import_module("metering.migrations.0009_capture_burns_soonest_expired_first")

_OLD_WALLET = """             WHERE a.id = acct.wallet_id AND acct.consumption_id IS NOT NULL
            RETURNING a.id, a.balance"""
_NEW_WALLET = """             WHERE a.id = acct.wallet_id AND acct.consumption_id IS NOT NULL
            RETURNING a.id, a.balance, a.claimed"""
_OLD_INTO = """        SELECT hd.id, t.id, w.id, w.balance, hd.created_at"""
_NEW_INTO = """        SELECT hd.id, t.id, w.id, GREATEST(w.balance - w.claimed, 0), hd.created_at"""

SETTLE_FUNCTION = _0007._replaced(
    _0009.SETTLE_FUNCTION, (_OLD_WALLET, _NEW_WALLET), (_OLD_INTO, _NEW_INTO)
)


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SETTLE_FUNCTION)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(_0009.SETTLE_FUNCTION)


class Migration(migrations.Migration):
    dependencies = [("metering", "0012_wallet_claim")]

    operations = [migrations.RunPython(forwards, backwards)]
