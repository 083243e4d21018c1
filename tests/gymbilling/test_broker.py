"""The broker transport (gymbilling/broker.py): kombu's Redis transport, its client kept.

Against the real Redis broker of the test run. The worker-process tests
(test_celery_worker.py, the inference suites) send every task through it.
"""

from __future__ import annotations

import uuid

import pytest
from django.conf import settings
from kombu import Exchange, Queue

from gymbilling.broker import TRANSPORT, Channel, publish_declare
from gymbilling.celery import app


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
