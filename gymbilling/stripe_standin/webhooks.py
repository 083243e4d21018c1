"""Signed webhook delivery: in creation order, retried with backoff, pausable.

localstripe fires each event in its own task after sleeping a second, so events
can arrive out of order and a failed delivery is lost. This module replaces its
`schedule_webhook`: every endpoint gets a queue and one worker that sends events
in the order they were created, retrying a failed delivery (non-2xx or connection
error) like Stripe does, only faster. The signature is Stripe's
(`Stripe-Signature: t=<unix>,v1=<hmac-sha256>`), so
`stripe.Webhook.construct_event` verifies it.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import localstripe.resources
import localstripe.webhooks
from localstripe.resources import Event

from gymbilling.stripe_standin.common import API_VERSION

logger = logging.getLogger("stripe_standin.webhooks")

# A short pause before the first attempt: the API response that caused the event
# should reach the caller first, as it does with real Stripe (and the caller's
# transaction commit, too, in the common case).
FIRST_ATTEMPT_DELAY_S = 0.05
# Stripe retries for days; a test cannot wait that long. Five attempts in ~6 s.
RETRY_DELAYS_S = (0.2, 0.5, 1.5, 4.0)
DELIVERY_TIMEOUT_S = 10


@dataclass
class Endpoint:
    url: str
    secret: str
    events: list[str] | None
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    worker: asyncio.Task | None = None


_endpoints: dict[str, Endpoint] = {}
# Every event sent, in order: what `GET /_config/events` returns.
_log: list[dict[str, Any]] = []
_released = asyncio.Event()
_released.set()


def emit(event_type: str, obj: Any) -> Event:
    """Create an event with a snapshot of `obj` and queue it for every endpoint."""
    return publish(Event(event_type, obj))


def publish(event: Event) -> Event:
    """Stands in for localstripe's `schedule_webhook` (its own events come here too)."""
    event.api_version = API_VERSION
    obj = event.data["object"]
    record = {
        "id": event.id,
        "type": event.type,
        "created": event.created,
        "object": obj.get("object"),
        "object_id": obj.get("id"),
        "deliveries": {},
    }
    _log.append(record)
    for endpoint_id, endpoint in _endpoints.items():
        if endpoint.events is None or event.type in endpoint.events or "*" in endpoint.events:
            record["deliveries"][endpoint_id] = "pending"
            endpoint.queue.put_nowait((time.monotonic(), event, record))
    return event


def register(endpoint_id: str, url: str, secret: str, events: list[str] | None = None) -> None:
    """Add or replace a delivery target; its worker starts on the running loop."""
    old = _endpoints.pop(endpoint_id, None)
    if old and old.worker:
        old.worker.cancel()
        # What the replaced target had not delivered yet never will be.
        while not old.queue.empty():
            _queued_at, _event, record = old.queue.get_nowait()
            record["deliveries"][endpoint_id] = "canceled"
    endpoint = Endpoint(url=url, secret=secret, events=events)
    endpoint.worker = asyncio.get_running_loop().create_task(
        _deliver_forever(endpoint_id, endpoint)
    )
    _endpoints[endpoint_id] = endpoint


def hold() -> None:
    _released.clear()


def release() -> None:
    _released.set()


def is_held() -> bool:
    return not _released.is_set()


def event_log() -> list[dict[str, Any]]:
    return _log


def forget_events() -> None:
    _log.clear()


def sign(payload: bytes, secret: str, timestamp: int) -> str:
    signed = b"%d.%s" % (timestamp, payload)
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


async def _deliver_forever(endpoint_id: str, endpoint: Endpoint) -> None:
    timeout = aiohttp.ClientTimeout(total=DELIVERY_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            queued_at, event, record = await endpoint.queue.get()
            await asyncio.sleep(max(0.0, queued_at + FIRST_ATTEMPT_DELAY_S - time.monotonic()))
            await _released.wait()
            delivered = await _deliver_with_retries(session, endpoint, event)
            record["deliveries"][endpoint_id] = "delivered" if delivered else "failed"


async def _deliver_with_retries(
    session: aiohttp.ClientSession, endpoint: Endpoint, event: Event
) -> bool:
    payload = json.dumps(event._export(), indent=2, sort_keys=True).encode()
    for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S), start=1):
        await asyncio.sleep(delay)
        # Signed at send time: the SDK rejects signatures older than 5 minutes,
        # and an event held with `/_config/webhooks/hold` may wait longer.
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign(payload, endpoint.secret, int(time.time())),
        }
        try:
            async with session.post(endpoint.url, data=payload, headers=headers) as response:
                if 200 <= response.status < 300:
                    return True
                logger.warning(
                    "webhook %s to %s: HTTP %s (attempt %d)",
                    event.type,
                    endpoint.url,
                    response.status,
                    attempt,
                )
        except (TimeoutError, aiohttp.ClientError) as error:
            logger.warning(
                "webhook %s to %s failed: %s (attempt %d)", event.type, endpoint.url, error, attempt
            )
    return False


def install() -> None:
    """Route localstripe's own events (customer.created, ...) through this module."""
    localstripe.webhooks.schedule_webhook = publish
    localstripe.resources.schedule_webhook = publish
