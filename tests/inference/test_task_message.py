"""What the job's Celery message carries: the prompt in its arguments, and nowhere else.

Celery describes a task's arguments in the message headers (`argsrepr`), which
monitoring tools and task events show; a prompt must not be there (prompts are
not stored unless the organization opts in). The headers are read from
Celery's own `before_task_publish` signal, on a real publish to the broker.
"""

from __future__ import annotations

import pytest
from celery.signals import before_task_publish

from inference.models import JobStatus
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
    args = body[0]
    assert args[:2] == [job.pk, "Strength training"]
    # with what the engine call needs (inference.tasks: sent before the job
    # is marked running), which is not the prompt
    spec = args[2]
    assert spec["id"] == job.public_id and spec["params"]["max_tokens"] == 4
    assert "Strength" not in repr(spec)
    assert "Strength" not in headers["argsrepr"]
    assert headers["argsrepr"] == f"({job.pk}, <prompt: 17 characters>)"
