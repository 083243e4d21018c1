"""Jobs in the Django admin, as finance and operations staff look them up.

One database transaction per test, never committed: no job's task is sent.
"""

from __future__ import annotations

import pytest

from accounts.models import Scope
from accounts.services import apikey_create
from inference.models import Job, JobStatus
from tests.factories import OrganizationFactory, UserFactory
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


def test_staff_see_who_sent_each_job_and_find_a_members_jobs(admin_client, grant):
    # given a job a member sent from the dashboard (its session), and one a key sent
    served_model("gym-admin")
    org = OrganizationFactory()
    grant(org, credits(10))
    member = UserFactory(email="ana@example.test")
    key, _raw = apikey_create(organization=org, name="app", scopes=[Scope.INFERENCE])
    by_member = submit_job(org, "gym-admin", user=member)
    by_key = submit_job(org, "gym-admin", api_key=key)

    # when staff list the jobs, then search them by the member's address
    listed = admin_client.get("/admin/inference/job/").content.decode()
    found = admin_client.get("/admin/inference/job/", {"q": "ana@example.test"}).content.decode()
    detail = admin_client.get(f"/admin/inference/job/{by_member.pk}/change/").content.decode()

    # then the list says who sent each (the member's through the dashboard, the
    # other its key), the search finds the member's only, and the job's page names them
    assert "dashboard (ana@example.test)" in listed and key.prefix in listed
    assert by_member.public_id in found and by_key.public_id not in found
    assert "ana@example.test" in detail
