# Fewer indexes to maintain: every inference request inserts two journal
# transactions, about five ledger entries, a hold and a usage record.

import django.db.models.deletion
from django.db import migrations, models

from metering.migration_ops import postgresql_only

# PostgreSQL only (the demo's SQLite has none of these): the varchar_pattern_ops
# ("_like") indexes Django adds beside unique CharFields serve LIKE 'prefix%'
# queries, which nothing runs on these keys; Django drops them with IF EXISTS
# should the fields ever change. The ledger accounts' balances are updated on
# every settlement (an organization's wallet and holds rows are hot): fillfactor
# 50 keeps room on their pages for those HOT updates (pages written from now on).
LIKE_INDEXES = {
    "metering_hold_key_53dd2f84_like": ("metering_hold", "key"),
    "metering_usagerecord_job_id_45950c1e_like": ("metering_usagerecord", "job_id"),
    "metering_journaltransaction_idempotency_key_87cbcb9d_like": (
        "metering_journaltransaction",
        "idempotency_key",
    ),
}
FORWARD = [f"DROP INDEX IF EXISTS {name}" for name in LIKE_INDEXES] + [
    "ALTER TABLE metering_ledgeraccount SET (fillfactor = 50)",
]
BACKWARD = [
    f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column} varchar_pattern_ops)"
    for name, (table, column) in LIKE_INDEXES.items()
] + ["ALTER TABLE metering_ledgeraccount RESET (fillfactor)"]


class Migration(migrations.Migration):

    dependencies = [
        ('accounts', '0003_webhook_secret'),
        ('metering', '0004_alter_creditlot_source'),
    ]

    operations = [
        migrations.AlterField(
            model_name='journaltransaction',
            name='organization',
            field=models.ForeignKey(blank=True, db_index=False, null=True, on_delete=django.db.models.deletion.PROTECT, related_name='journal_transactions', to='accounts.organization'),
        ),
        migrations.AlterField(
            model_name='ledgerentry',
            name='account',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='entries', to='metering.ledgeraccount'),
        ),
        migrations.AlterField(
            model_name='usagerecord',
            name='organization',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.PROTECT, related_name='usage_records', to='accounts.organization'),
        ),
        postgresql_only(FORWARD, BACKWARD),
    ]
