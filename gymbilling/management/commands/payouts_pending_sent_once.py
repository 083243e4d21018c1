"""Count the payouts still pending with no send counted as sent once, as gymbilling/0039
did at the deploy, for those that workers of the release before 0038 recorded after it.

Such a worker records a payout and sends it in the same run, and counts no send (that
release did not): one killed mid-call leaves the payout pending with `send_attempts` 0 and
no error, though its balance credit may have reached the seller's Stripe customer. The
new code would then take a customer deleted since for one never paid, and pay the
replacement customer too. Counted as sent once, such a payout is left to finance instead
(may_have_paid).

Run it once no worker of that release is left, so no such payout can appear after it, and
before any worker of this release starts (a payout run it makes could otherwise redirect
one first: README, the deploy order, step 2); again whenever: it changes only payouts
still at 0. A payout this release recorded and
has not sent yet is counted too; the worst that does is what 0039's does: finance looks
at it before it goes to a replacement customer, never a payout paid twice.
"""

from __future__ import annotations

import importlib
from types import SimpleNamespace

from django.apps import apps
from django.core.management.base import BaseCommand
from django.db import connection

_0039 = importlib.import_module("gymbilling.migrations.0039_payout_pending_sent_once")


class Command(BaseCommand):
    help = "Count every pending payout with no send counted as sent once (gymbilling/0039)."

    def handle(self, *args, **options):
        # The migration's own function: it reads only the editor's connection.
        counted = _0039.pending_sent_once(apps, SimpleNamespace(connection=connection))
        self.stdout.write(f"{counted} pending payouts with no send counted now count as sent once")
