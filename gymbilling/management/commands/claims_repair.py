"""Set each wallet's claim to what its refunds and disputes still have pending, where
`ledger_reconcile` reports them apart (check `wallet_claim_pending`), and mark the lots they
wait on as their claims do (new work burns them last). For a deploy in which old workers
ran beside the migration that filled claims in; prints each wallet changed."""

from django.core.management.base import BaseCommand

from gymbilling.reconcile import wallet_claims_repair
from metering.services.postings import amount_display


class Command(BaseCommand):
    help = __doc__

    def handle(self, *args, **options):
        repaired = wallet_claims_repair()
        for row in repaired:
            self.stdout.write(
                f"organization {row['organization_id']}: claim {amount_display(row['before'])}"
                f" -> {amount_display(row['after'])} credits"
            )
        self.stdout.write(f"{len(repaired)} wallets repaired")
