"""Create an API key and print it, alone, on stdout (for scripts: KEY=$(...))."""

from django.core.management.base import BaseCommand, CommandError

from accounts.errors import ApplicationError
from accounts.models import Organization, Scope
from accounts.services import apikey_create


class Command(BaseCommand):
    help = "Create an API key: apikey_create <org-slug> [--name NAME] [--scopes S ...]"

    def add_arguments(self, parser):
        parser.add_argument("org_slug")
        parser.add_argument("--name", default="cli")
        parser.add_argument(
            "--scopes",
            nargs="+",
            default=[Scope.INFERENCE, Scope.BILLING_READ],
            choices=Scope.values,
            help="default: inference billing:read",
        )
        parser.add_argument(
            "--rpm", type=int, help="requests per minute for this key (default: the organization's)"
        )

    def handle(self, *args, org_slug, name, scopes, rpm, **options):
        org = Organization.objects.filter(slug=org_slug).first()
        if org is None:
            raise CommandError(f"No organization has the slug {org_slug!r}.")
        try:
            _key, raw = apikey_create(
                organization=org, name=name, scopes=scopes, requests_per_minute=rpm
            )
        except ApplicationError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        self.stdout.write(raw)
