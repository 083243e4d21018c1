"""The plan price each subscription's current period is paid at (Subscription.price).

The rollover cap and the billing page read the credits that price sold, as the grant does
(since 0032), not the plan's credits now. No backfill: which of a plan's prices a
subscription pays is only at Stripe. Null reads as before (the plan's credits now) until
the subscription's next sync fills it from Stripe's item; and null is what a process of
the previous release writes during a deploy, so no database default is needed.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('gymbilling', '0033_checkoutsession_price'),
    ]

    operations = [
        migrations.AddField(
            model_name='subscription',
            name='price',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='+', to='gymbilling.stripeprice'),
        ),
    ]
