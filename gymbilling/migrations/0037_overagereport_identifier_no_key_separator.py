"""An overage batch's identifier holds no ':': a batch is sent with `<identifier>:<attempt>`
as its idempotency key, and Stripe's meter error report names a dropped event by that
key, so the batch is what comes before the first ':'. Every identifier written so far is
`ovg_<lot>_<credits>` (and `_r<n>`): none holds one. A small table, checked at once."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0036_marketpayout_customer_deleted"),
    ]

    operations = [
        migrations.AddConstraint(
            model_name="overagereport",
            constraint=models.CheckConstraint(
                condition=~models.Q(identifier__contains=":"),
                name="overage_report_identifier_no_key_separator",
            ),
        ),
    ]
