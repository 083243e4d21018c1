"""A fill remembers the payout Stripe refused that last paid it.

A refused payout clears its fills' `payout` (their proceeds are back to available), so
nothing said which sales it was for. Finance marking one paid at Stripe after all (an
earlier send credited a customer deleted since) must put exactly those back as paid out.

Nullable, no default needed: workers of the previous release still write fills during
the deploy without it (NULL), and payouts they refuse then leave it unset; those cannot
be marked paid (payout_mark_paid says so).

Added as 0033 added a checkout's price, with metering/0016's operations: not atomic,
the foreign key NOT VALID then validated (a scan of the fills under a lock that lets
them be written), each ALTER under a lock_timeout, the index built concurrently under
Django's name; the schema and the state are AddField's.
"""

import importlib

import django.db.models.deletion
from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")

REFUSED_PAYOUT = models.ForeignKey(
    blank=True,
    null=True,
    on_delete=django.db.models.deletion.PROTECT,
    related_name="refused_fills",
    to="gymbilling.marketpayout",
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0039_payout_pending_sent_once"),
    ]

    operations = [
        _0016.AddForeignKeyNotValidOnPostgres("marketfill", "refused_payout", REFUSED_PAYOUT),
        _0016.ValidateForeignKeyOnPostgres(model_name="marketfill", name="refused_payout"),
        _0016.AddFieldIndexConcurrentlyOnPostgres(model_name="marketfill", name="refused_payout"),
    ]
