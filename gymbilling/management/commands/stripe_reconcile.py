"""Every paid subscription invoice at Stripe has exactly one credit grant, and every
invoice grant a paid invoice. Prints mismatches; exit code 1 if there are any."""

import sys

from django.core.management.base import BaseCommand, CommandError

from gymbilling import stripe_client
from gymbilling.reconcile import stripe_reconcile


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options):
        if not stripe_client.configured():
            raise CommandError("STRIPE_SECRET_KEY is not set: there is no Stripe to compare with.")
        try:
            report = stripe_reconcile()
        except stripe_client.StripeUnavailable as exc:
            raise CommandError(f"Stripe is unreachable: {exc}") from exc
        for line in report.mismatches:
            self.stdout.write(f"MISMATCH {line}")
        self.stdout.write(
            f"{report.checked} paid subscription invoices checked, {len(report.mismatches)} mismatches"
        )
        if not report.ok:
            sys.exit(1)
