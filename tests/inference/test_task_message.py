"""What the job's Celery message carries: the prompt in its arguments, and nowhere else;
what the engine call needs in a header, so that workers of an earlier release run it too.

Celery describes a task's arguments in the message headers (`argsrepr`), which
monitoring tools and task events show; a prompt must not be there (prompts are
not stored unless the organization opts in). The headers are read from
Celery's own `before_task_publish` signal, on a real publish to the broker.
"""

from __future__ import annotations

import time

import pytest
from celery.signals import before_task_publish

from inference.models import JobStatus
from inference.services.jobs import ENGINE_SPEC_HEADER
from tests.factories import OrganizationFactory
from tests.helpers import credits
from tests.inference.test_catalog_cache import _model, _prices, _run_job

pytestmark = pytest.mark.django_db(transaction=True)


def test_the_prompt_is_in_the_task_arguments_but_not_in_their_description(
    celery_worker_process, triton_server, grant
):
    # given a model, and a listener on what Celery publishes
    _prices("1")
    _model([triton_server.grpc_url])
    org = OrganizationFactory(tokens_per_minute=10_000_000)
    grant(org, credits(10))
    published = []

    def listen(sender=None, headers=None, body=None, **_kwargs):
        if sender == "inference.tasks.job_run":
            published.append((headers, body))

    before_task_publish.connect(listen, weak=False)
    try:
        # when a job is submitted (and runs)
        job = _run_job(org)
    finally:
        before_task_publish.disconnect(listen)

    # then its one message carried the prompt as an argument only
    assert job.status == JobStatus.SUCCEEDED
    [(headers, body)] = published
    # and only the two arguments a worker of an earlier release takes
    assert body[0] == [job.pk, "Strength training"]
    # with what the engine call needs (inference.tasks: sent before the job
    # is marked running) in a header, which is not the prompt
    spec = headers[ENGINE_SPEC_HEADER]
    assert spec["id"] == job.public_id and spec["params"]["max_tokens"] == 4
    assert 0 < time.time() - spec["sent_at"] < 60
    assert "Strength" not in repr(spec)
    assert "Strength" not in headers["argsrepr"]
    assert headers["argsrepr"] == f"({job.pk}, <prompt: 17 characters>)"
