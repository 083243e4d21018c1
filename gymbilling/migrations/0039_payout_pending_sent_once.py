"""Payouts pending from before sends were counted (0038) count as sent once.

A send reads `send_attempts > 0 or last_error` as "an earlier send may have reached
Stripe": only then does it leave a payout to a customer deleted since to finance rather
than move it to the replacement customer. A send of the release before that died
mid-call (its worker killed) left neither, and may have credited the deleted customer.
The payout run records a payout and sends it in the same run, so a pending row was almost
always sent once: counted so, the worst case of one never sent is a payout finance look at
before it goes to the replacement, never one paid twice.

One UPDATE: pending payouts are few (each is sent, or fails, by the next run). Rows a
worker of the previous release records during the deploy, after this ran, are not
covered here: the `payouts_pending_sent_once` command runs this again once no such
worker is left. Reverse: nothing to undo (a count of sends is not lowered).
"""

from django.db import migrations


def pending_sent_once(apps, schema_editor) -> int:
    """Counts every pending payout with no send counted as sent once; returns how many."""
    MarketPayout = apps.get_model("gymbilling", "MarketPayout")
    return (
        MarketPayout.objects.using(schema_editor.connection.alias)
        .filter(status="pending", send_attempts=0)
        .update(send_attempts=1)
    )


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0038_marketpayout_send_attempts"),
    ]

    operations = [
        migrations.RunPython(pending_sent_once, migrations.RunPython.noop),
    ]
