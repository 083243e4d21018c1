"""Running jobs by their start, for the orphaned jobs' sweep (inference.tasks.jobs_orphaned_sweep).

The sweep looks every minute for jobs running since before its grace; without
an index that is a scan of every job ever run. Built concurrently, outside a
transaction, as metering/0008 built its index, so live jobs keep starting and
settling while it builds; partial, so it holds only the jobs running now.
"""

import importlib

from django.db import migrations, models

_0008 = importlib.import_module("metering.migrations.0008_hold_pending_by_organization")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("inference", "0011_job_settle_drops_the_36_argument_function"),
        ("metering", "0008_hold_pending_by_organization"),
    ]

    operations = [
        _0008.AddIndexConcurrentlyOnPostgres(
            model_name="job",
            index=models.Index(
                condition=models.Q(("status", "running")),
                fields=["started_at"],
                name="job_running_started",
            ),
        ),
    ]
