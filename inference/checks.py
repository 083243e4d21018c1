"""System checks of the inference settings (`python manage.py check`; migrate and runserver
run them too): a run limit that would fail every job, or that is capped without saying so."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, register
from django.core.checks import Warning as CheckWarning


@register(Tags.compatibility)
def job_run_limit_check(app_configs, **kwargs) -> list:
    from inference.services.jobs import job_run_limit

    wanted = settings.INFERENCE_JOB_DEADLINE_SECONDS
    if wanted <= 0:
        return [
            Error(
                f"INFERENCE_JOB_DEADLINE_SECONDS is {wanted:g}: every job would be stopped as "
                "it starts.",
                hint="Set it to the seconds a job may run (default 300); there is no 'off'.",
                id="inference.E001",
            )
        ]
    allowed = job_run_limit()
    if wanted > allowed:
        return [
            CheckWarning(
                f"INFERENCE_JOB_DEADLINE_SECONDS is {wanted:g}, but jobs run at most "
                f"{allowed:g} s: half the start margin, so that a job settles before its "
                "hold expires.",
                hint="The most a job may run is a quarter of METERING_HOLD_TTL_SECONDS, and "
                "never more than half of inference.services.jobs.JOB_START_MARGIN (5 minutes).",
                id="inference.W001",
            )
        ]
    return []
