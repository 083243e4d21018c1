"""Among lots that expired after its hold was placed, a capture burns the soonest-expired
first (metering.services.lots.burn_sort_key).

0007 ordered them by priority: a hold could then burn a lot that a later hold
could also use, leaving that later hold only a lot that had expired before it
was placed, which the sweep then expired from under it (the sweep's replay of
the pending holds assumes each takes the lots fewer holds may use first). The
function is 0007's with one more ORDER BY term.
"""

import importlib

from django.db import migrations

_0007 = importlib.import_module("metering.migrations.0007_capture_burns_by_placement")

_OLD_ORDER = """                                     ELSE 2 END,"""
_NEW_ORDER = """                                     ELSE 2 END,
                                CASE WHEN expires_at <= p_now AND expires_at > v_placed
                                     THEN expires_at END,"""

SETTLE_FUNCTION = _0007._replaced(_0007.SETTLE_FUNCTION, (_OLD_ORDER, _NEW_ORDER))


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SETTLE_FUNCTION)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(_0007.SETTLE_FUNCTION)


class Migration(migrations.Migration):
    dependencies = [("metering", "0008_hold_pending_by_organization")]

    operations = [migrations.RunPython(forwards, backwards)]
