"""An organization's pending holds, found without reading its settled ones.

Built concurrently, outside a transaction, so a live ledger keeps placing and
settling holds while it builds (docs/BENCHMARKS.md, "Migrations on a
populated ledger")."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("accounts", "0004_idempotency_replayed_headers"),
        ("metering", "0007_capture_burns_by_placement"),
    ]

    operations = [
        AddIndexConcurrently(
            model_name="hold",
            index=models.Index(
                condition=models.Q(("status", "pending")),
                fields=["organization", "created_at"],
                name="hold_pending_org",
            ),
        ),
    ]
