"""Expire unspent credits of lots past their expiry, and holds nobody settled."""

from django.core.management.base import BaseCommand
from django.utils import timezone

from metering.services import credits_expire, holds_expire
from metering.services.postings import amount_display


class Command(BaseCommand):
    help = "Move expired lots' remainders to the expiry account and release stale holds."

    def handle(self, *args, **options):
        now = timezone.now()
        expired = credits_expire(now=now)
        holds = holds_expire(now=now)
        self.stdout.write(
            f"Expired {amount_display(expired)} credits; released {holds} stale holds."
        )
