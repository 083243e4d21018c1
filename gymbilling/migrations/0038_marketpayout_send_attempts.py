"""Payouts count their sends, and one that may have paid a customer deleted since waits for
finance.

`send_attempts`: a send that finds an earlier one may have reached Stripe (its answer
lost) no longer moves the payout to the seller's new customer by itself. Payouts pending
from before keep 0: a send reads their `last_error` as well. `may_have_paid` marks the
failed payout that holds the seller's payouts wherever they would go.

Both have a database default: workers of the previous release still record payouts
during the deploy, without them.

Added as 0035 added its columns, each ALTER waiting at most a lock_timeout, not atomic.
`send_attempts` is a PositiveIntegerField, whose `>= 0` CHECK Django writes into the ADD
COLUMN, scanning the payouts under its ACCESS EXCLUSIVE lock: it is added NOT VALID
instead, under the name PostgreSQL gave that one, then validated under a lock that lets
payouts be written. The schema and the state are AddField's.
"""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0037_overagereport_identifier_no_key_separator"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="marketpayout",
            name="may_have_paid",
            field=models.BooleanField(db_default=False, default=False),
        ),
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="marketpayout",
            name="send_attempts",
            field=models.PositiveIntegerField(db_default=0, default=0),
        ),
        _0016.ValidateFieldCheckOnPostgres(model_name="marketpayout", name="send_attempts"),
    ]
