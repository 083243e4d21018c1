"""The price a checkout was opened at, and (a pack's) the credits it buys, recorded when it
is opened: the grant no longer asks Stripe for the session's line items.

No backfill: which price an open row was opened at is Stripe's record alone. A pack
checkout without recorded credits (opened before this, or by an old process during the
deploy, which writes neither column: both stay null) is granted as before, from its line
item at Stripe, recorded then. Backwards drops the column; the credits stay.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0032_stripeprice_credits"),
    ]

    operations = [
        migrations.AddField(
            model_name="checkoutsession",
            name="price",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="+",
                to="gymbilling.stripeprice",
            ),
        ),
    ]
