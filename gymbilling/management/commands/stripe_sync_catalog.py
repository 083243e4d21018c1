"""Create or update the Stripe products and prices of every plan and pack (idempotent)."""

from django.core.management.base import BaseCommand, CommandError

from gymbilling import stripe_client
from gymbilling.services import catalog_sync


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options):
        if not stripe_client.configured():
            raise CommandError("STRIPE_SECRET_KEY is not set: there is no Stripe to sync to.")
        try:
            report = catalog_sync()
        except stripe_client.StripeUnavailable as exc:
            raise CommandError(
                f"Stripe is unreachable ({exc}); nothing more was changed. Run again."
            ) from exc
        self.stdout.write(f"products: {len(report.products)}")
        self.stdout.write(f"prices created: {', '.join(report.created) or 'none'}")
        self.stdout.write(f"prices unchanged: {', '.join(report.unchanged) or 'none'}")
        if report.deactivated:
            self.stdout.write(f"prices deactivated: {', '.join(report.deactivated)}")
