"""Grant credits to an organization as a recorded adjustment with a reason."""

import uuid

from django.core.management.base import BaseCommand, CommandError

from accounts.errors import ApplicationError
from accounts.models import Organization, User
from metering.selectors import organization_balance
from metering.services import credits_adjust
from metering.services.postings import amount_display, credits_parse


class Command(BaseCommand):
    help = "credits_grant <org-slug> <credits> --reason TEXT [--actor EMAIL] [--key KEY]"

    def add_arguments(self, parser):
        parser.add_argument("org_slug")
        parser.add_argument("credits", help="whole or decimal credits, e.g. 250 or 0.5")
        parser.add_argument("--reason", required=True)
        parser.add_argument("--actor", help="email of the staff member making the adjustment")
        parser.add_argument(
            "--key", help="idempotency key: re-running with the same key grants once"
        )

    def handle(self, *args, org_slug, credits, reason, actor, key, **options):
        org = Organization.objects.filter(slug=org_slug).first()
        if org is None:
            raise CommandError(f"No organization has the slug {org_slug!r}.")
        try:
            micro = credits_parse(credits)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        actor_user = None
        if actor:
            actor_user = User.objects.filter(email=actor.lower()).first()
            if actor_user is None:
                raise CommandError(f"No user has the email {actor!r}.")
        try:
            credits_adjust(
                organization=org,
                amount=micro,
                reason=reason,
                key=key or f"cli:{uuid.uuid4()}",
                actor=actor_user,
            )
        except ApplicationError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        balance = organization_balance(organization=org)
        self.stdout.write(
            f"Granted {credits} credits to {org.slug}; available {amount_display(balance.available)}."
        )
