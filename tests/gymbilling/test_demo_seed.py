"""`manage.py demo_seed`, which `make demo` runs: the demo's catalog points at the dev engine.

Against the session's real tritonserver: after seeding, `triton_status` finds
the demo pool serving, with the load read from the metrics url the seed set.
"""

from __future__ import annotations

import json
import os
from io import StringIO

import pytest
from django.core.management import call_command

from accounts.models import Membership, Organization
from inference.models import CatalogModel, ServerPool
from metering.selectors import organization_balance
from tests.helpers import settings_in_a_fresh_process
from tests.inference import conftest as engine_fixtures

pytestmark = pytest.mark.django_db

# The engine fixture of tests/inference, used here as it is.
triton_server = engine_fixtures.triton_server


def test_the_demo_catalog_is_served_by_the_dev_engine_and_a_rerun_changes_nothing(
    triton_server,
):
    # when the demo is seeded twice, as make demo does on every start
    arguments = [
        "--triton-grpc",
        triton_server.grpc_url,
        "--triton-metrics",
        triton_server.metrics_url,
    ]
    call_command("demo_seed", *arguments, stdout=StringIO())
    call_command("demo_seed", *arguments, stdout=StringIO())

    # then one pool names the engine and its metrics; the model is on it
    pool = ServerPool.objects.get(name="dev-cpu")
    assert pool.grpc_urls == [triton_server.grpc_url]
    assert pool.metrics_urls == [triton_server.metrics_url]
    assert CatalogModel.objects.get(name="gym-tiny").pool == pool
    # and the demo organization got its credits once: 1,000 + 100 welcome
    demo = Organization.objects.get(slug="demo-gym")
    assert organization_balance(organization=demo).available == 1_100_000_000
    # and the demo customer owns it, and can sign in to the dashboard
    member = Membership.objects.get(user__email="member@gym.local")
    assert member.organization == demo and member.role == "owner"
    assert member.user.check_password("gym-demo-member")

    # and the operators' check finds it serving, its load read
    out = StringIO()
    call_command("triton_status", "--pool", "dev-cpu", "--json", stdout=out)
    [status] = json.loads(out.getvalue())["pools"]
    assert status["serving"] == 1
    assert status["servers"][0]["load"] is not None


def test_the_demo_database_on_sqlite_migrates_and_seeds(tmp_path):
    # given `make demo` with no DATABASE_URL: its local settings use SQLite, where raw
    # SQL in a migration (an UPDATE ... FROM alias, a PostgreSQL function) can fail
    database = tmp_path / "demo.sqlite3"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DJANGO_SETTINGS_MODULE": "gymbilling.settings.local",
        "STRIPE_SECRET_KEY": "",
    }

    # when every migration runs on a new file, then the demo seed
    done = settings_in_a_fresh_process(
        "from django.conf import settings\n"
        f"settings.DATABASES['default']['NAME'] = {str(database)!r}\n"
        "from django.core.management import call_command\n"
        "call_command('migrate', verbosity=0)\n"
        "call_command('demo_seed', '--triton-grpc', '127.0.0.1:1')\n"
        "from accounts.models import Organization\n"
        "print('organizations', Organization.objects.count())\n",
        env=env,
    )

    # then both finish, and the demo's organizations are there
    assert done.returncode == 0, done.stderr[-3000:]
    assert "organizations 0" not in done.stdout and "organizations " in done.stdout
