"""Beat's schedule names tasks that exist: a misspelt task name is not an error anywhere,
beat sends it every period and every worker drops it as unregistered, so the sweep it
stood for (expiring holds, settling refunds, retrying callbacks) silently never runs."""

from __future__ import annotations

from datetime import timedelta

from celery.schedules import crontab
from django.conf import settings

from gymbilling.celery import app


def test_every_scheduled_task_is_one_the_workers_run():
    # given the tasks a worker registers (the apps' tasks modules, as it imports them)
    app.loader.import_default_modules()
    registered = set(app.tasks)

    # then each entry of the schedule names one of them, on a schedule beat understands
    for name, entry in settings.CELERY_BEAT_SCHEDULE.items():
        assert entry["task"] in registered, f"{name}: {entry['task']} is not a task"
        assert isinstance(entry["schedule"], (crontab, timedelta, int, float)), name


def test_the_sweeps_money_waits_on_are_scheduled():
    # The hold sweep ends holds of work that vanished; the pending-reversal sweep takes
    # back refunded credits as running work returns them: each a minute or less apart.
    schedule = {
        entry["task"]: entry["schedule"] for entry in settings.CELERY_BEAT_SCHEDULE.values()
    }
    assert schedule["gymbilling.tasks.payment_reversals_pending_settle_task"] <= timedelta(
        seconds=10
    )
    assert schedule["metering.tasks.holds_expire_task"] == crontab(minute="*")
    assert schedule["metering.tasks.credits_expire_task"] == crontab(minute="*")
