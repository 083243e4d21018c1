"""Accounts whose next expiry has come, found without reading every account.

The minute's sweep (metering.services.lots.credits_expire) now also visits an
account whose `next_expiry_at` has come though no lot of it is due, to move it
on to the next real expiry. Built concurrently, outside a transaction, as 0008
built its index, so a live ledger keeps settling while it builds; partial, so
accounts with no expiring lot (holds, system accounts, wallets without expiring
lots) are not in it.
"""

import importlib

from django.db import migrations, models

_0008 = importlib.import_module("metering.migrations.0008_hold_pending_by_organization")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("metering", "0018_settlement_says_nothing_with_lots_due")]

    operations = [
        _0008.AddIndexConcurrentlyOnPostgres(
            model_name="ledgeraccount",
            index=models.Index(
                condition=models.Q(("next_expiry_at__isnull", False)),
                fields=["next_expiry_at"],
                name="ledger_account_next_expiry",
            ),
        ),
    ]
