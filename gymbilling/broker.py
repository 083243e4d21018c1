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

`task_publish` sends the inference jobs' messages: on this transport, for a
plain queue, it writes Celery's message straight onto the queue's Redis list,
as `apply_async` would, for a third of the CPU.
"""

from __future__ import annotations

import base64
import functools
import logging
import os
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import redis
from celery import signals
from celery.utils.nodenames import anon_nodename
from django.conf import settings
from django.test.signals import setting_changed
from kombu.entity import maybe_delivery_mode
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps

logger = logging.getLogger(__name__)

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


# --- a task message written straight onto its queue ------------------------------
#
# `apply_async` cost the API process about 0.33 ms of CPU per inference job
# here, a fifth of its CPU per request (docs/BENCHMARKS.md, eighth pass), for
# what is on this transport one LPUSH of a JSON document: Celery's routing,
# option merging, producer pool, connection `ensure` and retry wrappers around
# it. `task_publish` builds the same message with Celery's own builder
# (`amqp.as_task_v2`: protocol 2's headers and body) and kombu's envelope (as
# kombu's virtual channel wraps it: base64 body, a delivery tag, the delivery
# info), and pushes it onto the list kombu's Redis transport reads the queue
# from. Workers cannot tell the two apart (tests/gymbilling/test_broker.py
# compares them field by field). Celery's publish signals are sent as Celery
# sends them. Where anything differs from the plain case this mirrors (another
# broker, a TLS or key-prefixed Redis, a queue with bindings or arguments, a
# task with time limits, another serializer, sent events, a publish from
# inside a task, which Celery links to its parent), it is `apply_async`.


@dataclass(frozen=True)
class _Plan:
    """What a pushed message of one task to one queue takes from the configuration."""

    delivery_mode: int
    ignore_result: bool
    retry_policy: dict


@functools.cache
def _push_plan(task_name: str, queue_name: str) -> _Plan | None:
    """How `task_name`'s messages to `queue_name` are pushed straight onto its list, or
    None when they must go through apply_async.

    Read once per task and queue: Celery's configuration lookups cost about
    0.1 ms a message (its layered ConfigurationView). Settings changes
    (Django's setting_changed, as tests make them) empty the cache; Celery's
    configuration is not changed at run time.
    """
    if publish_declare(queue_name) != []:
        return None  # another broker, or a queue routed through bindings
    from gymbilling.celery import app

    conf = app.conf
    task = app.tasks[task_name]
    options = conf.broker_transport_options or {}
    # Options the task itself sets for its messages, which apply_async applies.
    # (Its serializer and ignore_result are read below.)
    task_options = {
        k: v
        for k, v in task._get_exec_options().items()
        if k not in ("ignore_result", "serializer")
    }
    plain = (
        urlsplit(_broker_url()).scheme.lower() == "redis"
        and not conf.broker_use_ssl
        and not conf.task_always_eager
        and not any(value is not None for value in task_options.values())
        and not {"global_keyprefix", "priority_steps", "sep", "body_encoding"} & set(options)
        and conf.task_protocol == 2
        and conf.task_serializer == "json"
        and not conf.task_compression
        and not conf.task_send_sent_event
        and getattr(task, "serializer", None) in (None, "json")
    )
    if not plain:
        return None
    return _Plan(
        delivery_mode=maybe_delivery_mode(
            app.amqp.queues[queue_name].exchange.delivery_mode or conf.task_default_delivery_mode
        ),
        ignore_result=bool(task.ignore_result),
        retry_policy=dict(conf.task_publish_retry_policy),
    )


def _settings_changed(**_kwargs) -> None:
    _push_plan.cache_clear()
    _broker_redis.cache_clear()


setting_changed.connect(_settings_changed, weak=False)


def _broker_url() -> str:
    """Where Celery publishes: its broker_write_url if set, else the broker URL."""
    from gymbilling.celery import app

    return app.conf.broker_write_url or settings.CELERY_BROKER_URL


@functools.cache
def _broker_redis() -> redis.Redis:
    # The broker's Redis (_broker_url), which may be another database or
    # server than REDIS_URL's. A connection that cannot be made fails within
    # a second (then Celery's publish is tried: nothing was sent); an answer
    # is waited for up to 10 s, and one that does not come is an error, not
    # a reason to publish again (the push may have been applied).
    return redis.Redis.from_url(_broker_url(), socket_timeout=10.0, socket_connect_timeout=1.0)


@functools.cache
def _origin() -> str:
    # Celery asks the host's name for every message (anon_nodename); it holds
    # the process id, so a forked child asks again.
    return anon_nodename()


os.register_at_fork(after_in_child=_origin.cache_clear)


def task_publish(
    task,
    *,
    args: list,
    queue: str,
    headers: dict | None = None,
    argsrepr: str | None = None,
    kwargsrepr: str | None = None,
) -> None:
    """Send `task(*args)` to `queue`, as `task.apply_async(args=..., queue=..., headers=...)`.

    On a Redis broker, to a plain queue, the message is pushed onto the
    queue's list directly (above); else, and should that push fail, through
    `apply_async` (which retries the publish as the Celery settings say).
    """
    from gymbilling.celery import app

    # A message sent from inside a task is linked to it (parent and root ids).
    plan = _push_plan(task.name, queue) if app.current_worker_task is None else None
    if plan is not None:
        try:
            _push(
                task.name,
                plan,
                args=args,
                queue=queue,
                headers=headers or {},
                argsrepr=argsrepr,
                kwargsrepr=kwargsrepr,
            )
            return
        except redis.ConnectionError:
            # No connection to the broker (refused, or lost): Celery's own
            # publish then retries as its policy says. A push lost with its
            # connection after it was sent may then be sent twice, as with
            # Celery's own retries (a job's second run settles nothing twice:
            # inference.tasks). A timeout is not retried: the push may have
            # been applied; the error goes to the caller.
            logger.warning(
                "could not push a %s message to %s; publishing through Celery",
                task.name,
                queue,
                exc_info=True,
            )
    task.apply_async(
        args=args,
        queue=queue,
        headers=headers,
        priority=None,
        argsrepr=argsrepr,
        kwargsrepr=kwargsrepr,
        declare=publish_declare(queue),
    )


def _push(name: str, plan: _Plan, *, args, queue, headers, argsrepr, kwargsrepr) -> None:
    from gymbilling.celery import app

    task_id = str(uuid.uuid4())
    task_headers, properties, body, _sent_event = app.amqp.as_task_v2(
        task_id,
        name,
        args=args,
        kwargs={},
        reply_to=app.thread_oid,
        origin=_origin(),
        ignore_result=plan.ignore_result,
        argsrepr=argsrepr,
        kwargsrepr=kwargsrepr,
    )
    task_headers.update(headers)
    # Celery copies the options it has no other use for into the properties:
    # the argument descriptions, here.
    properties.update(
        {k: v for k, v in (("argsrepr", argsrepr), ("kwargsrepr", kwargsrepr)) if v is not None}
    )
    properties["delivery_mode"] = plan.delivery_mode
    # Celery sends a direct queue's task through the anonymous exchange,
    # routed by the queue's name.
    exchange, routing_key = "", queue
    signals.before_task_publish.send(
        sender=name,
        body=body,
        exchange=exchange,
        routing_key=routing_key,
        declare=[],
        headers=task_headers,
        properties=properties,
        retry_policy=dict(plan.retry_policy),
    )
    # kombu's virtual channel: the body serialized, then base64 (the Redis
    # transport's body encoding); priority 0 (none asked), whose list is the
    # queue's own name (kombu's `_q_for_pri`).
    envelope = {
        "body": base64.b64encode(dumps(body).encode("utf-8")).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": task_headers,
        "properties": {
            **properties,
            "delivery_info": {"exchange": exchange, "routing_key": routing_key},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    _broker_redis().lpush(queue, dumps(envelope))
    signals.after_task_publish.send(
        sender=name,
        body=body,
        headers=task_headers,
        exchange=exchange,
        routing_key=routing_key,
    )
