"""Signed webhook delivery: in creation order, retried with backoff, pausable.

localstripe fires each event in its own task after sleeping a second, so events
can arrive out of order and a failed delivery is lost. This module replaces its
`schedule_webhook`: every endpoint gets a queue and one worker that sends events
in the order they were created, retrying a failed delivery (non-2xx or connection
error) like Stripe does, only faster. The signature is Stripe's
(`Stripe-Signature: t=<unix>,v1=<hmac-sha256>`), so
`stripe.Webhook.construct_event` verifies it.

Thin events (`ThinEvent`, Stripe's v2 events such as the billing meter's error
reports) carry no data: an endpoint gets them only when its `events` name them,
as a Stripe event destination with the thin payload style selects them, and
`GET /v2/core/events/<id>` answers one whole, with its `data`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import localstripe.resources
import localstripe.webhooks
from localstripe.resources import Event, store

from gymbilling.stripe_standin.common import API_VERSION, api, now, stored

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


# Where thin events are kept whole (the store: they survive a restart, and a data reset
# clears them), for `GET /v2/core/events/<id>`.
THIN_EVENT = "v2.core.event"


class ThinEvent:
    """A v2 event: delivered thin (id, type, related object), read back whole."""

    def __init__(self, event_type: str, *, related_object: dict | None, data: dict) -> None:
        self.id = f"evt_test_{secrets.token_hex(16)}"
        self.type = event_type
        self.created = now()
        self.related_object = related_object
        self.data = data

    def _export(self, expand: Any = None) -> dict[str, Any]:
        """The thin payload, as Stripe posts it: the data is read with the event's id."""
        return {
            "id": self.id,
            "object": THIN_EVENT,
            "type": self.type,
            "created": iso_time(self.created),
            "livemode": False,
            "context": None,
            "reason": None,
            "related_object": self.related_object,
        }


def iso_time(unix: int) -> str:
    """A v2 API time: ISO 8601 in UTC, to the millisecond, as Stripe writes it."""
    return (
        datetime.fromtimestamp(unix, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def publish_thin(event: ThinEvent) -> ThinEvent:
    """Keep a thin event for reading back, and queue it for the endpoints that name it."""
    store[f"{THIN_EVENT}:{event.id}"] = {**event._export(), "data": event.data}
    related = event.related_object or {}
    record = {
        "id": event.id,
        "type": event.type,
        "created": event.created,
        "object": related.get("type"),
        "object_id": related.get("id"),
        "deliveries": {},
    }
    _log.append(record)
    for endpoint_id, endpoint in _endpoints.items():
        if endpoint.events is not None and event.type in endpoint.events:
            record["deliveries"][endpoint_id] = "pending"
            endpoint.queue.put_nowait((time.monotonic(), event, record))
    return event


class _StoredThinEvent:
    def __init__(self, body: dict) -> None:
        self.body = body

    def _export(self, expand: Any = None) -> dict[str, Any]:
        return self.body


def _thin_event_get(*, id: str, **_ignored: Any) -> _StoredThinEvent:
    return _StoredThinEvent(stored(THIN_EVENT, id))


routes = [("GET", "/v2/core/events/{id}", api(_thin_event_get))]


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
