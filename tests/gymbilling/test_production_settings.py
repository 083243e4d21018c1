"""Production settings refuse to start without what they must not guess.

Each case starts a process of its own, with exactly the environment given: settings
read the environment as the process starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings

from tests.helpers import settings_in_a_fresh_process

BASE = {
    "PATH": os.environ.get("PATH", ""),
    "DJANGO_SETTINGS_MODULE": "gymbilling.settings.production",
    "DJANGO_SECRET_KEY": "not the development key",
    "SITE_URL": "https://gym.example.com",
    "EMAIL_URL": "smtp+tls://mailer:secret@smtp.example.com:587",
}
REPORT = (
    "from django.conf import settings\n"
    "print(settings.SITE_URL, settings.EMAIL_BACKEND, settings.EMAIL_HOST, "
    "settings.EMAIL_PORT, settings.EMAIL_USE_TLS)\n"
)


def test_production_takes_the_site_and_the_mail_server_from_the_environment():
    done = settings_in_a_fresh_process(REPORT, env=BASE)

    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "https://gym.example.com",
        "django.core.mail.backends.smtp.EmailBackend",
        "smtp.example.com",
        "587",
        "True",
    ]


@pytest.mark.parametrize("missing", ["SITE_URL", "EMAIL_URL"])
def test_production_will_not_start_without_them(missing):
    # (else: links to 127.0.0.1 in every email, or emails and their tokens in the logs)
    env = {name: value for name, value in BASE.items() if name != missing}

    done = settings_in_a_fresh_process(REPORT, env=env)

    assert done.returncode != 0
    assert f"Set the {missing} environment variable" in done.stderr


def test_a_celery_worker_without_a_settings_module_runs_on_the_production_settings():
    # given the environment of a deployed worker that names no DJANGO_SETTINGS_MODULE
    env = {name: value for name, value in BASE.items() if name != "DJANGO_SETTINGS_MODULE"}
    script = (
        "import environ\n"
        "environ.Env.read_env = lambda *a, **k: None\n"  # a developer's .env is not read
        "from gymbilling.celery import app\n"
        "app.loader.import_default_modules()\n"  # as `celery worker` does on starting
        "from django.conf import settings\n"
        "print(settings.SETTINGS_MODULE, settings.DEBUG, settings.EMAIL_BACKEND)\n"
    )

    # when the Celery app loads, as `celery -A gymbilling worker` loads it
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # then the settings are production's, as the web app's (wsgi.py, asgi.py) are
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [
        "gymbilling.settings.production",
        "False",
        "django.core.mail.backends.smtp.EmailBackend",
    ]
