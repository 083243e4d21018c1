"""The inference app's system checks (inference/checks.py), as `manage.py check` runs them."""

from __future__ import annotations

from datetime import timedelta

from django.core.checks import run_checks


def _ids() -> list[str]:
    return [message.id for message in run_checks() if message.id.startswith("inference.")]


def test_the_default_run_limit_passes(settings):
    assert settings.INFERENCE_JOB_DEADLINE_SECONDS == 300
    assert _ids() == []


def test_a_run_limit_that_would_stop_every_job_is_an_error(settings):
    settings.INFERENCE_JOB_DEADLINE_SECONDS = 0
    [error] = [m for m in run_checks() if m.id == "inference.E001"]
    assert error.is_serious() and "every job would be stopped" in error.msg


def test_a_run_limit_above_what_holds_allow_is_a_warning_that_names_the_cap(settings):
    # given holds of 10 minutes: a start margin of 5, so jobs run at most 150 s
    settings.METERING_HOLD_TTL = timedelta(minutes=10)
    settings.INFERENCE_JOB_DEADLINE_SECONDS = 300
    [warning] = [m for m in run_checks() if m.id == "inference.W001"]
    assert not warning.is_serious()
    assert "jobs run at most 150 s" in warning.msg
