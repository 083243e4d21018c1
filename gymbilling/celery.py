"""The Celery application. Workers start with `celery -A gymbilling worker`.

Without DJANGO_SETTINGS_MODULE a worker or beat loads the production settings, as
wsgi.py and asgi.py do: a worker deployed without it must not run on the development
settings (DEBUG, an insecure SECRET_KEY, email printed to the console with its
tokens). `make demo` and the tests and benchmarks that start workers name their
settings module.
"""

import os

from celery import Celery
from celery.signals import task_postrun, task_prerun

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gymbilling.settings.production")

app = Celery("gymbilling")
# Every CELERY_* Django setting configures the app (see settings/base.py).
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Database connections in a worker follow CONN_MAX_AGE (DATABASE_URL's
# `conn_max_age`), as in a web process. Celery's Django fixup otherwise closes
# every connection before and after every task, whatever CONN_MAX_AGE says;
# then each task opens a new PostgreSQL connection, whose new backend starts
# with empty catalog caches and no prepared statements: about 8 ms per
# inference job on the development machine, more than the job's own queries
# (docs/BENCHMARKS.md). A large DB_REUSE_MAX turns the fixup's closing off;
# Django's own check below takes its place, around every task as Django does
# around every request: it closes a connection past its CONN_MAX_AGE, or one
# that had an error and no longer answers (a restarted PostgreSQL), so the
# next query reconnects. With CONN_MAX_AGE 0 (the default) that is still a
# new connection per task.
app.conf.CELERY_DB_REUSE_MAX = 2**62


@task_prerun.connect
@task_postrun.connect
def _close_old_connections(sender=None, **_kwargs) -> None:
    # A task run eagerly (`apply()`, or a test) runs inside its caller's request
    # or transaction, whose connection is not the task's to close (Celery's
    # fixup skips those too).
    if sender is not None and getattr(sender.request, "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()
