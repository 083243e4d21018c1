"""What each Stripe price buys: its credits, on the price's row (and a pack checkout's).

Until now a paid invoice or pack was granted the plan's or pack's credits as they are at
grant time, whatever the price paid had been made for: after finance changed Pro from
$99 / 12,000 credits to $129 / 15,000, members still on the $99 price got 15,000 at each
renewal. From here each price records the credits it was made for (catalog_sync makes a
new price when the credits change, as when the amount does).

Rows of prices made before this are filled with their plan's or pack's credits now: what
they were granted until now, the only record there is (a price made before an earlier
change of credits cannot be told apart). Overage prices buy no credits: left null.
Backwards drops the fields. The ORM only: `make demo` migrates a SQLite file.
"""

from django.db import migrations, models


def backfill(apps, schema_editor):
    alias = schema_editor.connection.alias
    StripePrice = apps.get_model("gymbilling", "StripePrice")
    for price in (
        StripePrice.objects.using(alias)
        .filter(credits__isnull=True, kind__in=["plan", "pack"])
        .select_related("plan", "pack")
    ):
        owner = price.plan.monthly_credits if price.kind == "plan" else price.pack.credits
        StripePrice.objects.using(alias).filter(pk=price.pk).update(credits=owner)


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0031_invoice_total"),
    ]

    operations = [
        migrations.AddField(
            model_name="checkoutsession",
            name="credits",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.AddField(
            model_name="stripeprice",
            name="credits",
            field=models.BigIntegerField(blank=True, null=True),
        ),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
