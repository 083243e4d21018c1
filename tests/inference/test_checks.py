"""The inference app's system checks (inference/checks.py), as `manage.py check` runs them."""

from __future__ import annotations

import json
import os
from datetime import timedelta

from django.core.checks import run_checks

from tests.helpers import settings_in_a_fresh_process


def _ids() -> list[str]:
    return [message.id for message in run_checks() if message.id.startswith("inference.")]


def test_the_default_run_limit_passes(settings):
    assert settings.INFERENCE_JOB_DEADLINE_SECONDS == 300
    assert _ids() == []


def test_a_run_limit_that_would_stop_every_job_is_an_error(settings):
    settings.INFERENCE_JOB_DEADLINE_SECONDS = 0
    [error] = [m for m in run_checks() if m.id == "inference.E001"]
    assert error.is_serious() and "every job would be stopped" in error.msg


def test_a_stream_reader_marker_too_short_to_outlive_its_renewals_is_an_error(settings):
    # given a marker that lapses between two renewals of a reader that is alive
    settings.INFERENCE_STREAM_READER_TTL_SECONDS = 0.5

    # when / then
    [error] = [m for m in run_checks() if m.id == "inference.E002"]
    assert error.is_serious() and "would be cancelled" in error.msg


def test_a_run_limit_above_what_holds_allow_is_a_warning_that_names_the_cap(settings):
    # given holds of 10 minutes: jobs run at most a quarter of it, 150 s
    settings.METERING_HOLD_TTL = timedelta(minutes=10)
    settings.INFERENCE_JOB_DEADLINE_SECONDS = 300
    [warning] = [m for m in run_checks() if m.id == "inference.W001"]
    assert not warning.is_serious()
    assert "jobs run at most 150 s" in warning.msg


def test_a_long_run_limit_alone_raises_what_must_outlast_a_run():
    # given only a 30-minute run limit in the environment, in a process of
    # its own (the settings derive their defaults as they are read)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("METERING_HOLD_TTL_SECONDS", "CELERY_VISIBILITY_TIMEOUT_SECONDS")
    }
    env.update(
        INFERENCE_JOB_DEADLINE_SECONDS="1800", DJANGO_SETTINGS_MODULE="gymbilling.settings.test"
    )
    env.setdefault("CELERY_BROKER_URL", "redis://127.0.0.1:6379/13")
    report = """
import json
from django.conf import settings
from django.core.checks import run_checks

from tests.helpers import settings_in_a_fresh_process
from inference.services.jobs import job_run_limit, job_start_margin
print(json.dumps({
    "run": job_run_limit(),
    "margin": job_start_margin().total_seconds(),
    "visibility": settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"],
    "hold_ttl": settings.METERING_HOLD_TTL.total_seconds(),
    "slot_lease": settings.RATELIMIT_SLOT_LEASE_SECONDS,
    "checks": [m.id for m in run_checks() if m.id.startswith("inference.")],
}))
"""
    done = settings_in_a_fresh_process(report, env=env)
    assert done.returncode == 0, done.stderr

    # then jobs run 30 minutes, start with an hour left on their hold, a dead
    # worker's message comes back after 90 minutes, holds live 3 hours, a
    # job's concurrency slot counts as long as its hold lives, and nothing is
    # left to warn of
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {
        "run": 1800,
        "margin": 3600,
        "visibility": 5400,
        "hold_ttl": 10800,
        "slot_lease": 11100,
        "checks": [],
    }


def test_a_visibility_timeout_a_job_may_outrun_is_a_warning(settings):
    # given a Redis broker handing back unacknowledged messages after 10
    # minutes, and 5-minute runs (a start margin of 10 minutes)
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/13"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 600}
    [warning] = [m for m in run_checks() if m.id == "inference.W002"]
    assert "a job may run and settle for 600 s" in warning.msg
    assert "above 600 s" in warning.hint
    # while RabbitMQ hands a message back only when its consumer goes
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
    assert _ids() == []


def test_a_visibility_timeout_that_leaves_no_time_to_start_is_a_warning(settings):
    # given hour-long holds and a message handed back after 50 minutes: the
    # job it carries needs 10 minutes of its hold left to start
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/13"
    # (the orphaned jobs' grace following it, as its default does: W005)
    settings.METERING_HOLD_TTL = timedelta(hours=1)
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 3000}
    settings.INFERENCE_ORPHAN_GRACE_SECONDS = 3300
    [warning] = [m for m in run_checks() if m.id == "inference.W003"]
    assert "comes back too late to start" in warning.msg
    assert "at least 3601" in warning.hint
    # and at 45 minutes it starts in time
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 2700}
    settings.INFERENCE_ORPHAN_GRACE_SECONDS = 3000
    assert _ids() == []


def test_the_hold_life_a_warning_names_leaves_room_for_the_whole_margin(settings):
    # given holds of 1000 s, 5-minute runs and a message handed back after 30
    # minutes: the start margin is capped at half the hold's life, 500 s
    settings.CELERY_BROKER_URL = "sentinel://127.0.0.1:26379"
    settings.METERING_HOLD_TTL = timedelta(seconds=1000)
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 1800}
    warnings = {m.id: m for m in run_checks() if m.id.startswith("inference.")}

    # then the runs are capped (a quarter of 1000 s), and the hold life each
    # warning names is enough on its own: 1200 s for the runs; for the
    # visibility timeout, 30 minutes and the margin a longer life gives (10
    # minutes), not the 500 s it has now (and the orphaned jobs' grace, 35
    # minutes, outlives such a hold: W006; so does the orphaned jobs' sweep's margin of
    # 5 minutes before a hold's expiry, which starts before the message comes back: W007)
    assert set(warnings) == {
        "inference.W001",
        "inference.W003",
        "inference.W006",
        "inference.W007",
    }
    assert "at least 1200" in warnings["inference.W001"].hint
    assert "at least 2401" in warnings["inference.W003"].hint
    settings.METERING_HOLD_TTL = timedelta(seconds=2401)
    assert _ids() == []


def test_a_wait_for_an_answer_longer_than_the_idempotency_lock_is_a_warning(settings):
    # given requests that wait up to 10 minutes for their answer, and an
    # Idempotency-Key taken to be abandoned after 5
    settings.INFERENCE_TIMEOUT_SECONDS = 600
    settings.IDEMPOTENCY_LOCK_TIMEOUT = timedelta(minutes=5)

    # then a retry with the key could run (and charge) a second job while the
    # first is still answered: said
    [warning] = [m for m in run_checks() if m.id == "inference.W004"]
    assert not warning.is_serious()
    assert "IDEMPOTENCY_LOCK_TIMEOUT_SECONDS" in warning.msg


def test_an_orphan_grace_under_the_visibility_timeout_is_a_warning(settings):
    # given a Redis broker handing back a dead worker's messages after 30
    # minutes, and a sweep ending jobs whose run's lease is gone after 20
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/13"
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 1800}
    settings.INFERENCE_ORPHAN_GRACE_SECONDS = 1200

    # then the sweep would end such a worker's jobs before their messages
    # come back to run them again: said, with what to raise it to
    [warning] = [m for m in run_checks() if m.id == "inference.W005"]
    assert not warning.is_serious()
    assert "before the broker hands their messages back" in warning.msg
    assert "at least 1800" in warning.hint
    # while at the visibility timeout it is quiet, and RabbitMQ (which hands a
    # message back as its consumer's connection ends) has no such timeout
    settings.INFERENCE_ORPHAN_GRACE_SECONDS = 1800
    assert _ids() == []
    settings.INFERENCE_ORPHAN_GRACE_SECONDS = 1200
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
    assert _ids() == []


def test_an_orphan_grace_as_long_as_a_hold_is_a_warning(settings):
    # given hour-long holds and a sweep that waits an hour
    settings.METERING_HOLD_TTL = timedelta(hours=1)
    settings.INFERENCE_ORPHAN_GRACE_SECONDS = 3600

    # then a job whose worker vanished ends expired with its hold, unbilled,
    # before the sweep would end it: said
    [warning] = [m for m in run_checks() if m.id == "inference.W006"]
    assert not warning.is_serious()
    assert "ends expired with its hold" in warning.msg
    assert "below 3600" in warning.hint
    settings.INFERENCE_ORPHAN_GRACE_SECONDS = 3599
    assert "inference.W006" not in _ids()


def test_an_orphan_sweep_so_slow_its_hold_margin_precedes_the_broker_is_a_warning(settings):
    # given hour-long holds, a Redis broker handing back a dead worker's messages
    # after 30 minutes, and the orphaned jobs' sweep every 10 minutes: a job whose
    # hold expires within 5 sweeps (50 minutes) is ended as if past its grace
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/13"
    settings.METERING_HOLD_TTL = timedelta(hours=1)
    settings.CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": 1800}
    settings.INFERENCE_ORPHAN_GRACE_SECONDS = 2100
    settings.INFERENCE_ORPHAN_SWEEP_SECONDS = 600

    # then such a job would be ended 10 minutes after it was submitted, before its
    # message comes back: said, with the slowest sweep that leaves room
    [warning] = [m for m in run_checks() if m.id == "inference.W007"]
    assert not warning.is_serious()
    assert "before CELERY_VISIBILITY_TIMEOUT_SECONDS (1800)" in warning.msg
    assert "at most 360" in warning.hint
    # while at 6 minutes the margin (30 minutes) starts as the message comes back,
    # and RabbitMQ (which hands a message back as its consumer's connection ends)
    # has no such timeout
    settings.INFERENCE_ORPHAN_SWEEP_SECONDS = 360
    assert _ids() == []
    settings.INFERENCE_ORPHAN_SWEEP_SECONDS = 600
    settings.CELERY_BROKER_URL = "amqp://guest:guest@127.0.0.1:5672//"
    assert _ids() == []
