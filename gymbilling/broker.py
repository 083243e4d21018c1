"""The Celery broker transport: kombu's Redis transport, with its Redis client kept.

kombu's Redis channel builds a new `redis.Redis` object for every command it
sends outside its event loop: each task published, and in a worker each
delivery recorded for late acknowledgement and each acknowledgement
(`Channel._create_client`, kombu 5.7). With redis-py 8 building one costs
about 45 µs of CPU (its response-callback tables), three or four times per
inference job on the paths docs/BENCHMARKS.md profiles. A `redis.Redis` is a
thread-safe handle on a connection pool, so each channel keeps one per pool
instead; the connections, and so every command on the wire, are the same.

Used only when the broker URL is a redis:// or rediss:// one (settings:
CELERY_BROKER_TRANSPORT); any other broker keeps kombu's transport for it.
"""

from __future__ import annotations

from django.conf import settings
from kombu.transport import redis as kombu_redis

TRANSPORT = "gymbilling.broker:Transport"


class Channel(kombu_redis.Channel):
    def _create_client(self, asynchronous=False):
        # The event loop's own (asynchronous) client is made once per channel by
        # kombu already; only the synchronous one is rebuilt per command.
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        kept = getattr(self, "_gym_client", None)
        if kept is None or kept.connection_pool is not pool:
            kept = self._gym_client = super()._create_client(asynchronous=False)
        return kept


class Transport(kombu_redis.Transport):
    Channel = Channel


def publish_declare(queue_name: str) -> list | None:
    """What a publisher on the hot path passes as `apply_async(declare=...)` for a queue.

    A task sent to a queue of a direct exchange goes out through the
    anonymous exchange (Celery converts it), which on Redis is an LPUSH to
    the queue's list (its priority list included): nothing needs declaring
    first. Celery's default declares the queue on every publish all the
    same, and kombu's check that it already did binds a copy of the queue
    each time: 0.05-0.15 ms of the API's CPU per inference request here
    (bench: 340 against 440 µs per publish). So [] (declare nothing) on this
    transport for such a queue; None (Celery's default) for a queue of
    another exchange type or with queue arguments (routed through bindings,
    or expiring: declaring does something there), and on any other broker,
    where a message published before any worker declared its queue would be
    dropped.
    """
    if getattr(settings, "CELERY_BROKER_TRANSPORT", "") != TRANSPORT:
        return None
    from gymbilling.celery import app

    queue = app.amqp.queues[queue_name]  # Celery's own, made on first use as it makes it
    if queue.exchange.type != "direct" or queue.queue_arguments or queue.expires:
        return None
    return []
