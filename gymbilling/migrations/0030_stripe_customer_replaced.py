"""A Stripe customer deleted at Stripe is replaced by a new one (FormerStripeCustomer keeps
the old id); each subscription says which customer it belongs to; an overage report that
can never be sent (its customer deleted) is marked failed rather than retried for good.

Every subscription here so far belongs to its organization's one customer (none was ever
replaced): that is what the backfill writes; a subscription written meanwhile by a process
of the previous release gets "" (db_default: its inserts stay valid), read as the
organization's customer. Backwards, the new field simply goes. The ORM only: `make demo`
migrates a SQLite file.
"""

import django.db.models.deletion
from django.db import migrations, models
from django.db.models.functions import Coalesce


def backfill(apps, schema_editor):
    alias = schema_editor.connection.alias
    Subscription = apps.get_model("gymbilling", "Subscription")
    BillingCustomer = apps.get_model("gymbilling", "BillingCustomer")
    customer = BillingCustomer.objects.using(alias).filter(
        organization_id=models.OuterRef("organization_id")
    )
    Subscription.objects.using(alias).filter(stripe_customer_id="").update(
        stripe_customer_id=Coalesce(
            models.Subquery(customer.values("stripe_customer_id")[:1]), models.Value("")
        )
    )


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0010_invitation_invited_by_key"),
        ("gymbilling", "0029_rollovercarry_held_claimed"),
    ]

    operations = [
        migrations.AddField(
            model_name="overagereport",
            name="error",
            field=models.CharField(blank=True, db_default="", max_length=500),
        ),
        migrations.AddField(
            model_name="overagereport",
            name="failed_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="subscription",
            name="stripe_customer_id",
            field=models.CharField(blank=True, db_default="", max_length=255),
        ),
        migrations.CreateModel(
            name="FormerStripeCustomer",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True, primary_key=True, serialize=False, verbose_name="ID"
                    ),
                ),
                ("stripe_customer_id", models.CharField(max_length=255, unique=True)),
                ("replaced_by", models.CharField(max_length=255)),
                ("replaced_at", models.DateTimeField(auto_now_add=True)),
                (
                    "organization",
                    models.ForeignKey(
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="former_stripe_customers",
                        to="accounts.organization",
                    ),
                ),
            ],
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
