"""An overage batch's identifier holds no ':': a batch is sent with `<identifier>:<attempt>`
as its idempotency key, and Stripe's meter error report names a dropped event by that
key, so the batch is what comes before the first ':'. Every identifier written so far is
`ovg_<lot>_<credits>` (and `_r<n>`): none holds one.

Added NOT VALID (a moment's ACCESS EXCLUSIVE lock, no scan), then validated apart, under
a lock that lets batches be written, each ALTER waiting at most a lock_timeout
(metering/0016's operations); not atomic, so the first lock is not held through the scan.
The constraint, and the state, are AddConstraint's."""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0036_marketpayout_customer_deleted"),
    ]

    operations = [
        _0016.AddCheckNotValidOnPostgres(
            model_name="overagereport",
            constraint=models.CheckConstraint(
                condition=~models.Q(identifier__contains=":"),
                name="overage_report_identifier_no_key_separator",
            ),
        ),
        _0016.ValidateConstraintOnPostgres(
            model_name="overagereport", constraint="overage_report_identifier_no_key_separator"
        ),
    ]
