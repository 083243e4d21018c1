"""The price a checkout was opened at, and (a pack's) the credits it buys, recorded when it
is opened: the grant no longer asks Stripe for the session's line items.

No backfill: which price an open row was opened at is Stripe's record alone. A pack
checkout without recorded credits (opened before this, or by an old process during the
deploy, which writes neither column: both stay null) is granted as before, from its line
item at Stripe, recorded then. Backwards drops the column; the credits stay.

Safe on a live table (README, "Running the parts yourself"), with metering/0016's
operations: not atomic, so each step holds its lock only for itself; the column is
added nullable (no rewrite), its foreign key NOT VALID then validated under a lock
that lets checkouts be written, each ALTER waiting at most a lock_timeout; the index
db_index gives it is built concurrently under Django's name. The schema and the state
are what Django's AddField made, as a database that ran this migration before it was
rewritten so has them. Re-runnable after a stop partway.
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
        ("gymbilling", "0032_stripeprice_credits"),
    ]

    operations = [
        _0016.AddForeignKeyNotValidOnPostgres("checkoutsession", "price", PRICE),
        _0016.ValidateForeignKeyOnPostgres(model_name="checkoutsession", name="price"),
        _0016.AddFieldIndexConcurrentlyOnPostgres(model_name="checkoutsession", name="price"),
    ]
