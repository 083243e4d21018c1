"""A real Celery worker process runs the ledger's tasks against the test database."""

from datetime import timedelta

import pytest
from django.utils import timezone

from metering.models import Hold, HoldStatus
from metering.selectors import organization_balance
from metering.services import hold_place
from metering.tasks import holds_expire_task
from tests.factories import OrganizationFactory
from tests.helpers import credits


@pytest.mark.django_db(transaction=True)
def test_worker_process_runs_a_task_against_the_database(celery_worker_process, grant):
    # given a hold that nobody settled, already past its expiry
    org = OrganizationFactory()
    grant(org, credits(10))
    hold_place(organization=org, amount=credits(4), key="stale-job", ttl=timedelta(seconds=-1))
    assert organization_balance(organization=org).held == credits(4)

    # when the beat task is sent through Redis to the worker process
    result = holds_expire_task.apply_async(expires=60)
    released = result.get(timeout=60)

    # then the worker released it and the credits are available again
    assert released == 1
    assert Hold.objects.get(key="stale-job").status == HoldStatus.EXPIRED
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held) == (credits(10), 0)
    assert timezone.now() > Hold.objects.get(key="stale-job").expires_at
