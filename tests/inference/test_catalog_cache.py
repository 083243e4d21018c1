"""The catalog and price caches (accounts.cache): a change is seen by the next request, in
every process.

The cross-process tests use the session's real Celery worker process, which
keeps its own caches: a catalog change made here must reach it through Redis
before its next job. Nothing is mocked; Redis "down" is a real client pointed
at a port where nothing listens.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
import redis
from django.db import transaction

from accounts.cache import SharedCache
from accounts.errors import ApplicationError
from inference.models import CatalogModel, JobStatus, ModelStatus, ServerPool
from inference.selectors import catalog_model_resolve
from inference.services import job_submit
from inference.services.jobs import SubmitParams
from metering.selectors import model_price
from metering.services import price_book_publish
from tests.factories import OrganizationFactory
from tests.helpers import credits, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gym-cached"


def _prices(rate: str) -> None:
    price_book_publish(
        prices=[
            {
                "model_name": MODEL,
                "input_rate": Decimal(rate),
                "cached_input_rate": Decimal(rate),
                "output_rate": Decimal(rate),
            }
        ]
    )


def _model(urls: list[str]) -> CatalogModel:
    pool = ServerPool.objects.create(name="cache-tests", grpc_urls=urls)
    return CatalogModel.objects.create(name=MODEL, pool=pool, access_tier="basic")


def _run_job(org) -> str:
    job = job_submit(
        organization=org,
        api_key=None,
        model_name=MODEL,
        prompt="Strength training",
        params=SubmitParams(max_tokens=4, seed=1),
    )
    job = wait_until(
        lambda: type(job).objects.filter(pk=job.pk, finished_at__isnull=False).first(),
        what="the job to end",
    )
    return job


def test_a_new_price_book_prices_the_very_next_request():
    # given a price read (and so cached) in this process
    _prices("1")
    assert model_price(model_name=MODEL).input_rate == Decimal("1")

    # when a new book is published
    _prices("2")

    # then the next read already has it
    assert model_price(model_name=MODEL).input_rate == Decimal("2")


def test_a_retired_model_is_refused_by_the_very_next_request():
    # given a model resolved (and so cached) for an organization
    _model(["127.0.0.1:1"])
    org = OrganizationFactory()
    assert catalog_model_resolve(name=MODEL, organization=org).status == ModelStatus.ACTIVE

    # when staff retire it
    model = CatalogModel.objects.get(name=MODEL)
    model.status = ModelStatus.RETIRED
    model.save()

    # then the next request is refused
    with pytest.raises(ApplicationError) as refused:
        catalog_model_resolve(name=MODEL, organization=org)
    assert refused.value.code == "model_not_found"


def test_a_pool_moved_to_another_server_is_used_by_the_worker_for_its_next_job(
    celery_worker_process, triton_server, dead_grpc_url, grant
):
    # given a job the worker ran against a pool whose server is down (the worker
    # has now read the model and its pool)
    _prices("1")
    model = _model([dead_grpc_url])
    org = OrganizationFactory(tokens_per_minute=10_000_000)
    grant(org, credits(10))
    failed = _run_job(org)
    assert (failed.status, failed.error_code) == (JobStatus.FAILED, "engine_unavailable")

    # when staff point the pool at a live server
    model.pool.grpc_urls = [triton_server.grpc_url]
    model.pool.save()

    # then the worker's next job goes there, and is billed
    served = _run_job(org)
    assert served.status == JobStatus.SUCCEEDED
    assert served.output_tokens > 0 and served.credits_charged > 0


def test_what_a_rolled_back_transaction_read_is_not_kept():
    # given a model created and read inside a transaction that is rolled back
    with transaction.atomic():
        _model(["127.0.0.1:1"])
        assert catalog_model_resolve(name=MODEL, organization=OrganizationFactory())
        transaction.set_rollback(True)

    # then the model does not exist for the next request
    with pytest.raises(ApplicationError) as missing:
        catalog_model_resolve(name=MODEL, organization=OrganizationFactory())
    assert missing.value.code == "model_not_found"


def test_two_processes_caches_are_dropped_together():
    # given two caches of one name, as two processes hold them, each with a value
    here, there = SharedCache("test-pair"), SharedCache("test-pair")
    loads = {"here": 0, "there": 0}

    def load(side: str, value: str):
        def run() -> str:
            loads[side] += 1
            return value

        return run

    assert here.get("k", load("here", "v1")) == "v1"
    assert there.get("k", load("there", "v1")) == "v1"
    assert there.get("k", load("there", "unused")) == "v1"  # kept
    assert loads == {"here": 1, "there": 1}

    # when one side invalidates (a change committed there)
    here.invalidate()

    # then the other reloads on its next read
    assert there.get("k", load("there", "v2")) == "v2"
    assert loads == {"here": 1, "there": 2}


def test_without_redis_every_read_goes_to_the_database(monkeypatch):
    # given Redis unreachable (a real client, on a port where nothing listens)
    import accounts.cache

    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5, socket_timeout=0.5)
    monkeypatch.setattr(accounts.cache, "get_redis", lambda: dead)
    cache = SharedCache("test-no-redis")
    loads = []

    # when the same key is read twice
    first = cache.get("k", lambda: loads.append(1) or "v")
    second = cache.get("k", lambda: loads.append(1) or "v")

    # then both reads loaded: nothing could say whether a kept value is current
    assert (first, second, len(loads)) == ("v", "v", 2)


def test_a_unit_of_work_reads_the_tokens_once_and_sees_its_own_changes():
    from accounts.cache import cache_scope
    from accounts.redis import get_redis

    cache = SharedCache("test-scope")
    with cache_scope():
        # given a value read in a unit of work (a request, a job)
        assert cache.get("k", lambda: "v1") == "v1"

        # when another process commits a change (it writes a new token)
        get_redis().set("cachegen:test-scope", "changed elsewhere")

        # then this unit goes on with the tokens it read at its start
        assert cache.get("k", lambda: "v2") == "v1"

        # but a change it commits itself, it sees at once
        cache.invalidate()
        assert cache.get("k", lambda: "v3") == "v3"

    # and the next unit sees the other process's change
    get_redis().set("cachegen:test-scope", "changed elsewhere again")
    with cache_scope():
        assert cache.get("k", lambda: "v4") == "v4"


def test_an_edited_chat_template_renders_on_the_next_request():
    from inference.apis import render_chat

    # given a model whose template has rendered once (and is compiled, cached)
    model = CatalogModel(
        name="templated", chat_template="A:{% for m in messages %}{{ m.content }}{% endfor %}"
    )
    messages = [{"role": "user", "content": "hi"}]
    first = render_chat(model, messages)

    # when an operator edits the template
    model.chat_template = "B:{% for m in messages %}{{ m.role }}={{ m.content }}{% endfor %}"

    # then the next prompt is rendered with the new one, and the old still works
    assert (first, render_chat(model, messages)) == ("A:hi", "B:user=hi")
    model.chat_template = "A:{% for m in messages %}{{ m.content }}{% endfor %}"
    assert render_chat(model, messages) == "A:hi"
