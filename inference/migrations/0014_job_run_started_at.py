"""When a job's current run started, and running jobs by it, for the orphaned jobs' sweep.

`run_started_at` is set by every start of a job, a restart's too (job_start), where
`started_at` keeps the first start (reports read it). The sweep (inference.tasks.
jobs_orphaned_sweep) measures its grace from the current run's start: measured from the
first, a job run again after its whole worker died (its message back after the
visibility timeout) was past the grace for most of its new run, and only its run lease
kept the sweep from ending it live.

Nullable, no default: processes of the previous release, still running during a
deploy, neither read nor write it; a job one of them first started has it null, and the
sweep reads started_at for it (models.job_run_start, the index's expression). A job a
new worker started and an old one restarted keeps the first run's value (not null): its
grace runs from that first start, and only its lease keeps the sweep off the live
restart. Drain the previous release's workers before the new sweep runs (README,
deploy notes). The ALTER waits
at most a lock_timeout (metering/0016's AddFieldIfAbsentOnPostgres), not atomic; the
index is partial (running jobs only) and built concurrently, as 0012's. 0012's index on
started_at stays for the previous release's sweep while it runs.
"""

import importlib

from django.db import migrations, models
from django.db.models.functions import Coalesce

_0008 = importlib.import_module("metering.migrations.0008_hold_pending_by_organization")
_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("inference", "0013_catalogmodel_default_max_tokens"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="job",
            name="run_started_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        _0008.AddIndexConcurrentlyOnPostgres(
            model_name="job",
            index=models.Index(
                Coalesce("run_started_at", "started_at"),
                condition=models.Q(("status", "running")),
                name="job_running_run_started",
            ),
        ),
    ]
