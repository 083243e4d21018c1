"""Seed the demo: an admin, a customer, an organization with credits, a price book.

Safe to re-run."""

from datetime import timedelta
from decimal import Decimal

from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from accounts.models import ApiKey, Membership, Organization, Role, Scope, User
from accounts.services import (
    apikey_create,
    apikey_revoke,
    membership_add,
    organization_create,
)
from gymbilling.services.catalog import catalog_seed_defaults
from inference.models import CatalogModel, Precision, ServerPool
from metering.models import PriceBook
from metering.selectors import organization_balance
from metering.services import credits_grant, price_book_publish
from metering.services.postings import amount_display

DEMO_ADMIN_EMAIL = "admin@gym.local"
DEMO_ADMIN_PASSWORD = "gym-demo-admin"  # a local demo only
DEMO_MEMBER_EMAIL = "member@gym.local"  # the customer dashboard's sign-in
DEMO_MEMBER_PASSWORD = "gym-demo-member"  # a local demo only
DEMO_ORG = "demo-gym"
MICRO = 1_000_000


class Command(BaseCommand):
    help = (
        "Create demo data: an admin user, a customer who owns the demo-gym organization "
        "with credits, prices."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--triton-grpc",
            default="127.0.0.1:8002",
            help="gRPC address of the development Triton server (manage.py triton_dev)",
        )
        parser.add_argument(
            "--triton-metrics",
            default="",
            help="its Prometheus metrics url, e.g. http://127.0.0.1:8003/metrics (optional: "
            "routing reads the load of each server of a pool from it)",
        )
        parser.add_argument(
            "--key-file", help="write a fresh demo API key to this file (the old one is revoked)"
        )

    def handle(self, *args, **options):
        with transaction.atomic():
            admin = User.objects.filter(email=DEMO_ADMIN_EMAIL).first()
            if admin is None:
                User.objects.create_superuser(DEMO_ADMIN_EMAIL, DEMO_ADMIN_PASSWORD)
            member = User.objects.filter(email=DEMO_MEMBER_EMAIL).first()
            if member is None:
                member = User.objects.create_user(DEMO_MEMBER_EMAIL, DEMO_MEMBER_PASSWORD)
            org = Organization.objects.filter(slug=DEMO_ORG).first() or organization_create(
                slug=DEMO_ORG, name="Demo Gym", owner=member
            )
            # A demo database from before the dashboard has the organization but no customer.
            if not Membership.objects.filter(user=member, organization=org).exists():
                membership_add(organization=org, user=member, role=Role.OWNER)
        plans, packs = catalog_seed_defaults()
        self.stdout.write(f"catalog: {plans} plans and {packs} credit packs added")
        if not PriceBook.objects.exists():
            price_book_publish(
                prices=[
                    {
                        "model_name": "gym-tiny",
                        "input_rate": Decimal("0.5"),
                        "cached_input_rate": Decimal("0.25"),
                        "output_rate": Decimal("1.5"),
                        "minimum_charge": 10,
                    },
                    {
                        "model_name": "gym-large-fp8",
                        "input_rate": Decimal("3"),
                        "cached_input_rate": Decimal("1.5"),
                        "output_rate": Decimal("12"),
                        "minimum_charge": 100,
                    },
                ],
                batch_multiplier=Decimal("0.5"),
                standard_multiplier=Decimal("1"),
                priority_multiplier=Decimal("2"),
                notes="demo prices",
            )
        # The period and its expiry derive from the month, so a re-run in the
        # same month replays the same grant instead of conflicting with it.
        now = timezone.now()
        period = now.strftime("%Y-%m")
        period_end = (
            now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)
        ).replace(day=1)
        credits_grant(
            organization=org,
            amount=1_000 * MICRO,
            source="subscription",
            paid=True,
            resellable=True,
            key=f"demo:{org.slug}:subscription:{period}",
            expires_at=period_end,
            memo="demo subscription period",
        )
        credits_grant(
            organization=org,
            amount=100 * MICRO,
            source="promotion",
            paid=False,
            resellable=False,
            key=f"demo:{org.slug}:welcome",
            priority=50,
            memo="welcome promotion",
        )
        pool, _ = ServerPool.objects.update_or_create(
            name="dev-cpu",
            defaults={
                "grpc_urls": [options["triton_grpc"]],
                "metrics_urls": [options["triton_metrics"]] if options["triton_metrics"] else [],
            },
        )
        CatalogModel.objects.update_or_create(
            name="gym-tiny",
            defaults={
                "pool": pool,
                "triton_model": "ensemble",
                "precision": Precision.FP16,
                "kv_cache_dtype": "fp16",
                "gpu_type": "cpu",
                "gpu_hour_cost": 0,
                "context_limit": 4096,
                # The development engine's max_input_len (its config.pbtxt);
                # its preprocessing adds no special tokens (prompt_special_tokens 0).
                "max_input_tokens": 2048,
                "max_output_tokens": 1024,
                "tokenizer_file": "inference/engine/tokenizer.json",
                "access_tier": "basic",
            },
        )
        if options.get("key_file"):
            for old in ApiKey.objects.filter(organization=org, name="demo", revoked_at=None):
                apikey_revoke(key=old)
            _key, raw = apikey_create(
                organization=org,
                name="demo",
                scopes=[Scope.INFERENCE, Scope.BILLING_READ, Scope.ADMIN, Scope.MARKETPLACE],
            )
            with open(options["key_file"], "w") as out:
                out.write(raw)
        balance = organization_balance(organization=org)
        self.stdout.write(
            f"Organization {org.slug}: {amount_display(balance.available)} credits available."
        )
