"""Jobs in the Django admin, as finance and operations staff look them up.

One database transaction per test, never committed: no job's task is sent.
"""

from __future__ import annotations

import pytest

from inference.models import Job, JobStatus
from tests.factories import OrganizationFactory
from tests.helpers import credits, served_model, submit_job

pytestmark = pytest.mark.django_db


def test_staff_find_the_jobs_that_ran_past_their_limit(admin_client, grant):
    # given two jobs, one failed at its run limit (its worker's outcome,
    # written as the settlement writes it)
    served_model("gym-admin")
    org = OrganizationFactory()
    grant(org, credits(10))
    stopped, other = submit_job(org, "gym-admin"), submit_job(org, "gym-admin")
    Job.objects.filter(pk=stopped.pk).update(
        status=JobStatus.FAILED, error_code="job_deadline_exceeded"
    )

    # when staff filter the job list by that error
    listed = admin_client.get("/admin/inference/job/", {"error_code": "job_deadline_exceeded"})

    # then they see that job only, and the list's filters offer the codes
    page = listed.content.decode()
    assert listed.status_code == 200
    assert stopped.public_id in page and other.public_id not in page
    assert "By error code" in page
