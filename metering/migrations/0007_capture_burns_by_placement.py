"""The settlement's burn order knows when its hold was placed (metering.services.lots).

A capture used to burn every expired lot first, so a hold placed after a lot
expired burned the expired credits the sweep was keeping for an older hold:
expired credits paid for new work. Now lots that expired after the hold was
placed come first, and lots that had expired before it come last (burned only
if nothing else is left, never a failed settlement). The function is 0005's
with that one ORDER BY term, and the hold's placement read with its lock.
"""

import importlib

from django.db import migrations

_0005 = importlib.import_module("metering.migrations.0005_hold_settle_function")

_OLD_PICK = """            SELECT id, organization_id, amount
              FROM metering_hold"""
_NEW_PICK = """            SELECT id, organization_id, amount, created_at
              FROM metering_hold"""
_OLD_INTO = """        SELECT hd.id, t.id, w.id, w.balance INTO v_hold, v_txn, v_wallet, o_wallet_balance
          FROM hd, t, w;"""
_NEW_INTO = """        SELECT hd.id, t.id, w.id, w.balance, hd.created_at
          INTO v_hold, v_txn, v_wallet, o_wallet_balance, v_placed
          FROM hd, t, w;"""
_OLD_DECLARE = """    v_wallet bigint;
"""
_NEW_DECLARE = """    v_wallet bigint;
    v_placed timestamptz;
"""
_OLD_ORDER = """                       ORDER BY COALESCE(expires_at <= p_now, false) DESC,"""
_NEW_ORDER = """                       ORDER BY CASE WHEN expires_at IS NULL OR expires_at > p_now THEN 1
                                     WHEN expires_at > v_placed THEN 0
                                     ELSE 2 END,"""


def _replaced(text: str, *pairs: tuple[str, str]) -> str:
    for old, new in pairs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


SETTLE_FUNCTION = _replaced(
    _0005.SETTLE_FUNCTION,
    (_OLD_PICK, _NEW_PICK),
    (_OLD_INTO, _NEW_INTO),
    (_OLD_DECLARE, _NEW_DECLARE),
    (_OLD_ORDER, _NEW_ORDER),
)


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SETTLE_FUNCTION)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(_0005.SETTLE_FUNCTION)


class Migration(migrations.Migration):
    dependencies = [("metering", "0006_unique_keys_without_like_indexes")]

    operations = [migrations.RunPython(forwards, backwards)]
