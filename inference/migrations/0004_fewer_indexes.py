# Fewer indexes to maintain on every inference request, and room for the
# job row's two updates (start, settlement) on its own page.

import django.db.models.deletion
from django.db import migrations, models

from metering.migration_ops import postgresql_only

# PostgreSQL only (the demo's SQLite has neither):
# - the varchar_pattern_ops ("_like") index Django adds beside a unique
#   CharField serves LIKE 'prefix%' queries, which nothing runs on job ids;
#   Django drops it with IF EXISTS should the field ever change;
# - fillfactor 70 leaves room on each page, so that marking a job running and
#   settling it (no indexed column changes) are HOT updates: no new entry in
#   any of the job table's indexes. It applies to pages written from now on.
FORWARD = [
    "DROP INDEX IF EXISTS inference_job_public_id_295922b5_like",
    "ALTER TABLE inference_job SET (fillfactor = 70)",
]
BACKWARD = [
    "ALTER TABLE inference_job RESET (fillfactor)",
    "CREATE INDEX IF NOT EXISTS inference_job_public_id_295922b5_like "
    "ON inference_job (public_id varchar_pattern_ops)",
]


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0003_webhook_secret"),
        ("inference", "0003_job_input_tokens_source_and_tokenizer"),
    ]

    operations = [
        migrations.AlterField(
            model_name="job",
            name="organization",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="jobs",
                to="accounts.organization",
            ),
        ),
        postgresql_only(FORWARD, BACKWARD),
    ]
