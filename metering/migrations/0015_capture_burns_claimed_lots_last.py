"""A capture burns last the lots a pending refund claimed before its hold was placed.

The wallet's claim (0012) keeps new holds to the member's other credits, but
a capture burned in the usual order, which could put the refunded lot first:
new work then spent the credits the claim waits for, booked as lost, and the
member kept as many of their own. Now, within each expiry rank, a lot claimed
before the hold was placed (CreditLot.claimed_at, 0014) comes after the rest,
as metering.services.lots.burn_sort_key orders it. The function is 0013's with
that column read and that one ORDER BY term.
"""

import importlib

from django.db import migrations

_0007 = importlib.import_module("metering.migrations.0007_capture_burns_by_placement")
_0013 = importlib.import_module("metering.migrations.0013_settlement_reports_available")

_OLD_LOCKED = """            SELECT id, remaining, priority, expires_at, paid
              FROM metering_creditlot"""
_NEW_LOCKED = """            SELECT id, remaining, priority, expires_at, paid, claimed_at
              FROM metering_creditlot"""
_OLD_ORDER = """                                     ELSE 2 END,
                                CASE WHEN expires_at <= p_now AND expires_at > v_placed"""
_NEW_ORDER = """                                     ELSE 2 END,
                                CASE WHEN claimed_at < v_placed THEN 1 ELSE 0 END,
                                CASE WHEN expires_at <= p_now AND expires_at > v_placed"""

SETTLE_FUNCTION = _0007._replaced(
    _0013.SETTLE_FUNCTION, (_OLD_LOCKED, _NEW_LOCKED), (_OLD_ORDER, _NEW_ORDER)
)


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SETTLE_FUNCTION)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(_0013.SETTLE_FUNCTION)


class Migration(migrations.Migration):
    dependencies = [("metering", "0014_creditlot_claimed_at")]

    operations = [migrations.RunPython(forwards, backwards)]
