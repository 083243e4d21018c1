"""Root and price the credit lots that processes running older code left without.

During a rolling deploy, processes that do not know CreditLot.root and revenue yet keep
inserting lots after metering/0016 and gymbilling/0014 ran: split lots without their
root, grants without what they were sold for. Run this once every process runs the new
code (and again whenever: it only fills what is still empty, a thousand lots per
transaction). It runs the migrations' own backfills, so it prices lots exactly as they
did: roots of split lots and free grants at 0 (metering/0016), then paid grants from
their invoices and checkouts (gymbilling/0014).
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import connection

from metering.models import CreditLot

BACKFILLS = (
    "metering.migrations.0016_creditlot_revenue",
    "gymbilling.migrations.0014_creditlot_sale_backfill",
)


class Command(BaseCommand):
    help = "Write the root and the sale of credit lots that older code inserted without them."

    def handle(self, *args, **options):
        # The backfills read only the editor's connection: none of its schema changes.
        editor = SimpleNamespace(connection=connection)
        for name in BACKFILLS:
            importlib.import_module(name).backfill(apps, editor)
        unrooted = CreditLot.objects.filter(parent__isnull=False, root__isnull=True).count()
        unpriced = CreditLot.objects.filter(parent__isnull=True, revenue__isnull=True).count()
        self.stdout.write(
            f"{unrooted} split lots without a root, {unpriced} granted lots without a price "
            "(paid grants that said nothing of it: the report shows them as such)."
        )
