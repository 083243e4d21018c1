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


def test_the_deploy_checks_find_https_enforced_and_hsts_sent():
    # given production's settings as deployed, and the same with the redirect turned off
    check = "from django.core.management import call_command\ncall_command('check', deploy=True)\n"
    off = BASE | {"DJANGO_SECURE_SSL_REDIRECT": "false", "DJANGO_SECURE_HSTS_SECONDS": "0"}

    # when Django's deployment checks run on each
    deployed = settings_in_a_fresh_process(check, env=BASE)
    turned_off = settings_in_a_fresh_process(check, env=off)

    # then neither HSTS (W004) nor the HTTPS redirect (W008) is missing, unless turned off
    assert deployed.returncode == 0, deployed.stderr
    assert "security.W004" not in deployed.stderr and "security.W008" not in deployed.stderr
    assert "security.W004" in turned_off.stderr and "security.W008" in turned_off.stderr


def test_plain_http_is_redirected_to_https_except_the_load_balancers_probes():
    # given production's settings, behind a TLS terminator that sets X-Forwarded-Proto
    db = settings.DATABASES["default"]
    user = f"{db['USER']}:{db.get('PASSWORD') or ''}"
    env = BASE | {
        "DJANGO_ALLOWED_HOSTS": "gym.example.com",
        "DATABASE_URL": f"postgres://{user}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
    }
    script = (
        "from django.test import Client\n"
        "client = Client(HTTP_HOST='gym.example.com')\n"
        "def show(path, **headers):\n"
        "    answer = client.get(path, headers=headers)\n"
        "    print(path, answer.status_code, answer.get('Location', '-'),\n"
        "          answer.get('Strict-Transport-Security', '-'))\n"
        "show('/api/v1/plans')\n"
        "show('/dashboard/?page=2')\n"
        "show('/ping')\n"
        "show('/healthz')\n"
        "show('/ping', x_forwarded_proto='https')\n"
    )

    # when pages and the probes are asked for over plain HTTP, and over HTTPS
    done = settings_in_a_fresh_process(script, env=env)

    # then HTTP is sent to the same address on HTTPS; the probes answer on HTTP; HTTPS
    # answers carry HSTS for a year
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "/api/v1/plans 301 https://gym.example.com/api/v1/plans -",
        "/dashboard/?page=2 301 https://gym.example.com/dashboard/?page=2 -",
        "/ping 200 - -",
        "/healthz 200 - -",
        "/ping 200 - max-age=31536000",
    ]
