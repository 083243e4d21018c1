"""The plan price each subscription's current period is paid at (Subscription.price).

The rollover cap and the billing page read the credits that price sold, as the grant does
(since 0032), not the plan's credits now. No backfill: which of a plan's prices a
subscription pays is only at Stripe. Null reads as before (the plan's credits now) until
the subscription's next sync fills it from Stripe's item; and null is what a process of
the previous release writes during a deploy, so no database default is needed.

Added as 0033 added a checkout's price, with metering/0016's operations: not atomic,
the foreign key NOT VALID then validated, each ALTER under a lock_timeout, the index
built concurrently under Django's name; the schema and the state are AddField's.
"""

import importlib

import django.db.models.deletion
from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")

PRICE = models.ForeignKey(
    blank=True,
    null=True,
    on_delete=django.db.models.deletion.PROTECT,
    related_name="+",
    to="gymbilling.stripeprice",
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0033_checkoutsession_price"),
    ]

    operations = [
        _0016.AddForeignKeyNotValidOnPostgres("subscription", "price", PRICE),
        _0016.ValidateForeignKeyOnPostgres(model_name="subscription", name="price"),
        _0016.AddFieldIndexConcurrentlyOnPostgres(model_name="subscription", name="price"),
    ]
