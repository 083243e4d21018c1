"""Create an organization, optionally with an owner (created if the email is new)."""

from django.core.management.base import BaseCommand, CommandError

from accounts.errors import ApplicationError
from accounts.models import User
from accounts.services import organization_create


class Command(BaseCommand):
    help = "Create an organization: org_create <slug> [--owner EMAIL] [--name NAME]"

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--owner", help="email of the owner; a user is created if new")
        parser.add_argument("--name", default="")

    def handle(self, *args, slug, owner, name, **options):
        owner_user = None
        if owner:
            owner_user = User.objects.filter(email=User.objects.canonical_email(owner)).first()
            if owner_user is None:
                owner_user = User.objects.create_user(owner, None)  # sets no usable password
            elif not owner_user.email_verified:
                # Anyone may sign up under any address: an account that has not proven
                # this one may be a squatter's, not the person the operator means.
                raise CommandError(
                    f"{owner_user.email} has an account that has not verified the address; "
                    "it cannot be made an owner by it. Have them verify it first (the link "
                    "emailed to the address; signing up again with it mails a new one, and "
                    "setting a new password through 'Forgotten your password?' verifies it "
                    "too)."
                )
        try:
            org = organization_create(slug=slug, name=name, owner=owner_user)
        except ApplicationError as exc:
            raise CommandError(f"{exc.code}: {exc.message}") from None
        self.stdout.write(f"Created organization {org.slug} (id {org.pk}).")
