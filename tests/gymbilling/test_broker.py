"""The broker transport (gymbilling/broker.py): kombu's Redis transport, its client kept.

Against the real Redis broker of the test run. The worker-process tests
(test_celery_worker.py, the inference suites) send every task through it.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid

import pytest
import redis
from django.conf import settings
from kombu import Exchange, Queue

from gymbilling import broker
from gymbilling.broker import TRANSPORT, Channel, publish_declare, task_publish
from gymbilling.celery import app
from inference.services.jobs import ENGINE_SPEC_HEADER
from inference.tasks import job_run


def test_a_redis_broker_uses_the_transport_that_keeps_its_client():
    assert settings.CELERY_BROKER_URL.startswith("redis://")
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        assert isinstance(channel, Channel)

        # one client per pool, where kombu built one per command
        first = channel._create_client()
        assert channel._create_client() is first
        assert first.connection_pool is channel.pool

        # a client for the event loop is still kombu's own
        assert channel._create_client(asynchronous=True) is not first


def test_a_message_goes_through_and_is_acknowledged():
    queue_name = f"gym-test-broker-{uuid.uuid4().hex}"
    with app.connection_for_write() as connection, connection.SimpleQueue(queue_name) as queue:
        try:
            queue.put({"job": 7, "prompt": "héllo"})
            message = queue.get(timeout=5)
            assert message.payload == {"job": 7, "prompt": "héllo"}
            message.ack()
            with pytest.raises(queue.Empty):
                queue.get(block=False)
        finally:
            queue.clear()


def test_a_channel_whose_pools_were_dropped_builds_a_client_on_the_new_pool():
    with app.connection_for_write() as connection:
        channel = connection.default_channel
        before = channel._create_client()
        # what kombu does when a channel reconnects (Channel._disconnect_pools)
        channel._disconnect_pools()
        after = channel._create_client()
        assert after is not before
        assert after.connection_pool is channel.pool
        assert after.ping()


def test_publishers_declare_nothing_for_a_direct_queue_on_this_transport(settings):
    # given the test run's Redis broker
    assert settings.CELERY_BROKER_TRANSPORT == TRANSPORT

    # then a hot-path publish to an inference queue declares nothing ([]);
    # on another broker, the queue is declared as Celery does by default (None)
    assert publish_declare("inference.standard") == []
    del settings.CELERY_BROKER_TRANSPORT
    assert publish_declare("inference.standard") is None


@pytest.mark.parametrize(
    "queue",
    [
        Queue("gym-test-topic", Exchange("gym-test-topic", type="topic"), routing_key="a.#"),
        Queue("gym-test-expiring", expires=60),
    ],
    ids=["topic exchange", "expiring queue"],
)
def test_a_queue_routed_through_bindings_or_expiring_is_declared_as_celery_does(queue):
    # given a queue whose declaration does something on Redis
    app.amqp.queues.add(queue)
    try:
        # then a publisher declares it (Celery's default)
        assert publish_declare(queue.name) is None
    finally:
        del app.amqp.queues[queue.name]


def test_a_task_published_without_declaring_its_queue_reaches_the_queue():
    # given a queue nothing declared in this process
    queue_name = f"gym-test-undeclared-{uuid.uuid4().hex}"
    with app.connection_for_write() as connection:
        client = connection.default_channel.client
        try:
            # when a task is sent to it as the inference jobs are
            app.tasks["celery.accumulate"].apply_async(
                args=[1], queue=queue_name, declare=publish_declare(queue_name)
            )

            # then its message is in the queue's list
            assert client.llen(queue_name) == 1
        finally:
            client.delete(queue_name)


# --- task_publish: the message written straight onto its queue's list -------------


def _queued(queue_name: str) -> list[dict]:
    """The raw messages in a queue's Redis list, oldest first, as a worker would read them."""
    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    return [json.loads(raw) for raw in reversed(client.lrange(queue_name, 0, -1))]


def _drop_queue(queue_name: str) -> None:
    redis.Redis.from_url(settings.CELERY_BROKER_URL).delete(queue_name)
    app.amqp.queues.pop(queue_name, None)


@pytest.fixture
def apply_async_calls(monkeypatch):
    """Every call of job_run.apply_async, passed on to Celery's own."""
    calls = []
    real = job_run.apply_async

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(job_run, "apply_async", counted)
    return calls


def test_a_message_pushed_onto_its_queue_is_the_one_celery_publishes(apply_async_calls):
    # given a plain queue nothing consumes, and the same task sent to it both ways
    queue_name = f"gym-test-direct-{uuid.uuid4().hex}"
    headers = {ENGINE_SPEC_HEADER: {"id": "job_x", "params": {"stop": ["\n"]}, "sent_at": 1.5}}
    try:
        task_publish(
            job_run,
            args=[7, "héllo ✓"],
            queue=queue_name,
            headers=headers,
            argsrepr="(7, <prompt: 7 characters>)",
            kwargsrepr="{}",
        )
        assert apply_async_calls == []  # pushed, not published through Celery
        job_run.apply_async(
            args=[7, "héllo ✓"],
            queue=queue_name,
            headers=headers,
            priority=None,
            argsrepr="(7, <prompt: 7 characters>)",
            kwargsrepr="{}",
        )
        ours, celerys = _queued(queue_name)
    finally:
        _drop_queue(queue_name)

    # then, but for the ids each message gets, they are the same message
    for message in ours, celerys:
        task_id = message["headers"].pop("id")
        assert message["headers"].pop("root_id") == task_id
        assert message["properties"].pop("correlation_id") == task_id
        uuid.UUID(message["properties"].pop("delivery_tag"))
    assert ours == celerys
    assert ours["headers"][ENGINE_SPEC_HEADER] == headers[ENGINE_SPEC_HEADER]
    assert json.loads(base64.b64decode(ours["body"]))[0] == [7, "héllo ✓"]


def test_a_push_that_fails_is_published_through_celery(monkeypatch, apply_async_calls):
    # given a broker client that cannot connect (a port nothing listens on)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setattr(
        broker,
        "_broker_redis",
        lambda: redis.Redis(port=closed_port, socket_connect_timeout=0.5),
    )
    queue_name = f"gym-test-direct-{uuid.uuid4().hex}"
    try:
        # when a task is sent
        task_publish(job_run, args=[8, "x"], queue=queue_name, argsrepr="(8, ...)")

        # then Celery published it instead, once
        [(message)] = _queued(queue_name)
    finally:
        _drop_queue(queue_name)
    assert len(apply_async_calls) == 1
    assert message["headers"]["task"] == job_run.name
    assert json.loads(base64.b64decode(message["body"]))[0] == [8, "x"]


@pytest.mark.parametrize(
    "change",
    [
        # (Celery's own setting: an environment CELERY_BROKER_URL overrides
        # Django's, as in CI)
        {"broker_write_url": "rediss://127.0.0.1:6379/15"},
        {"broker_transport_options": {"global_keyprefix": "gym:"}},
        {"task_send_sent_event": True},
        {"task_compression": "gzip"},
    ],
    ids=["TLS broker", "key prefix", "sent events", "compression"],
)
def test_what_the_push_does_not_mirror_goes_through_celery(settings, change):
    # given a queue the push serves as things are
    queue_name = "inference.standard"
    assert broker._push_plan(job_run.name, queue_name) is not None

    # when the broker or Celery is set up in a way the push does not copy
    saved = {}
    for name, value in change.items():
        if name.isupper():
            setattr(settings, name, value)
        else:
            saved[name] = app.conf[name]
            app.conf[name] = value
    broker._push_plan.cache_clear()  # Celery's configuration changed (settings clear it)
    try:
        # then its messages go through apply_async
        assert broker._push_plan(job_run.name, queue_name) is None
    finally:
        for name, value in saved.items():
            app.conf[name] = value
        broker._push_plan.cache_clear()


def test_a_task_sent_from_inside_a_task_goes_through_celery(apply_async_calls):
    # Celery links such a message to the task that sent it (parent and root
    # ids): given a task running in this thread, as a worker runs one
    from celery._state import _task_stack

    running = app.tasks["celery.accumulate"]
    running.push_request(id="p", root_id="r", called_directly=False)
    queue_name = f"gym-test-direct-{uuid.uuid4().hex}"
    _task_stack.push(running)
    try:
        assert app.current_worker_task is not None
        # when it sends a task
        task_publish(job_run, args=[9, "y"], queue=queue_name)
        [message] = _queued(queue_name)
    finally:
        _task_stack.pop()
        running.pop_request()
        _drop_queue(queue_name)

    # then Celery published it, linked to the running task
    assert len(apply_async_calls) == 1
    assert (message["headers"]["parent_id"], message["headers"]["root_id"]) == ("p", "r")
