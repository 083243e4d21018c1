"""Billing meters and meter events (`/v1/billing/meters`, `/v1/billing/meter_events`).

Real Stripe accepts meter events asynchronously and reports bad ones later; here
they are checked at once (unknown `event_name` → 400, a repeated `identifier` →
400 `resource_already_exists`) so a test sees the outcome immediately. Only the
`sum` aggregation and `by_id` customer mapping are emulated. Usage is billed
when a subscription's period ends (`/_config/subscriptions/<id>/advance`).

A customer it has not got (deleted, or never made) is a 404 as well, unless
`POST /_config/meter_events/validation {"later": true}`: then, as at Stripe, the
event is taken (200) and never counted, and a `v1.billing.meter.error_report_triggered`
thin event reports it (`meter_event_customer_not_found`), naming it as Stripe does: by
its request's Idempotency-Key, in `sample_errors[].request.identifier`, not by the
event's identifier. Its identifier stays taken, as a counted one's does: an event sent
again under the same identifier is refused whatever its Idempotency-Key.

Stripe enforces an identifier's uniqueness only "within a rolling period of at least 24
hours" (its API reference, `identifier`): here for exactly 24 hours from the event's
`created` (IDENTIFIER_WINDOW_S), after which the same identifier is taken, and counted,
again. `POST /_config/meter_events/age {"seconds": N}` makes every event (a customer's,
with `"customer"`) N seconds older, as a day's wait would, so a test sees what a re-send
after the window does.

An event's `timestamp` must be "within the past 35 calendar days" and at most 5 minutes
ahead (Stripe's docs); here one outside is refused at once, a 400 with the code Stripe's
meter error reports give it (`timestamp_too_far_in_past`, `timestamp_in_future`),
against the stand-in's clock.
"""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

from localstripe.errors import UserError
from localstripe.resources import Customer, StripeObject, store

from gymbilling.stripe_standin import webhooks
from gymbilling.stripe_standin.common import (
    api,
    json_response,
    list_of,
    newest_first,
    now,
    objects_of,
    read_params,
    stored,
    stripe_error,
    to_bool,
    to_decimal,
    to_int,
)

# Accepted events live in the store (so they survive a restart) under one key; those
# taken but dropped (`validate_later`) too, marked `dropped` with Stripe's error code.
EVENTS_KEY = "standin:meter_events"
CUSTOMER_NOT_FOUND = "meter_event_customer_not_found"
# Stripe validates meter events in windows and reports each window's errors at once.
VALIDATION_WINDOW_S = 10
# How long an identifier is refused again: Stripe guarantees at least 24 hours.
IDENTIFIER_WINDOW_S = 24 * 60 * 60
# How old, and how far ahead, an event's timestamp may be.
TIMESTAMP_MAX_AGE_S = 35 * 24 * 60 * 60
TIMESTAMP_MAX_AHEAD_S = 5 * 60
_validate_later = False


def meter_validation_set(*, later: bool) -> None:
    """Report an event for a customer it has not got later, as Stripe does (True), or
    refuse it at once with a 404 (False, the default)."""
    global _validate_later
    _validate_later = later


class Meter(StripeObject):
    object = "billing.meter"
    _id_prefix = "mtr_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)


class MeterEvent(StripeObject):
    """The response object of `POST /v1/billing/meter_events` (not stored)."""

    object = "billing.meter_event"

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)


def _accepted_events() -> list[dict[str, Any]]:
    if EVENTS_KEY not in store:
        store[EVENTS_KEY] = []
    return store[EVENTS_KEY]


def meter_create(
    *,
    display_name: str | None = None,
    event_name: str | None = None,
    default_aggregation: Any = None,
    customer_mapping: Any = None,
    value_settings: Any = None,
    event_time_window: str | None = None,
    **_ignored: Any,
) -> Meter:
    if not display_name or not event_name:
        missing = "display_name" if not display_name else "event_name"
        raise stripe_error(
            400, f"Missing required param: {missing}.", code="parameter_missing", param=missing
        )
    formula = (default_aggregation or {}).get("formula", "sum")
    if formula != "sum":
        raise stripe_error(
            400, "Only the sum aggregation is emulated.", param="default_aggregation[formula]"
        )
    if any(
        m.event_name == event_name and m.status == "active" for m in objects_of("billing.meter")
    ):
        raise stripe_error(
            400,
            f"An active meter already uses event_name '{event_name}'.",
            code="resource_already_exists",
            param="event_name",
        )
    return Meter(
        display_name=display_name,
        event_name=event_name,
        default_aggregation={"formula": formula},
        customer_mapping={
            "type": "by_id",
            "event_payload_key": (customer_mapping or {}).get(
                "event_payload_key", "stripe_customer_id"
            ),
        },
        value_settings={
            "event_payload_key": (value_settings or {}).get("event_payload_key", "value")
        },
        event_time_window=event_time_window,
        status="active",
        status_transitions={"deactivated_at": None},
        updated=now(),
    )


def _meter_for_event(event_name: str) -> Meter:
    for meter in objects_of("billing.meter"):
        if meter.event_name == event_name and meter.status == "active":
            return meter
    raise stripe_error(
        400,
        f"No active meter found for event_name '{event_name}'.",
        code="resource_missing",
        param="event_name",
    )


def meter_event_create(
    *,
    event_name: str | None = None,
    payload: Any = None,
    identifier: str | None = None,
    timestamp: Any = None,
    request_key: str | None = None,
    **_ignored: Any,
) -> MeterEvent:
    """`request_key`: the request's Idempotency-Key; an SDK always sends one (a random one
    when the caller gives none), and one is made up like it where none came."""
    if not event_name:
        raise stripe_error(
            400, "Missing required param: event_name.", code="parameter_missing", param="event_name"
        )
    meter = _meter_for_event(event_name)
    payload = dict(payload or {})
    customer_id = payload.get(meter.customer_mapping["event_payload_key"])
    if not customer_id:
        raise stripe_error(
            400,
            "The payload has no customer id.",
            code="parameter_missing",
            param=f"payload[{meter.customer_mapping['event_payload_key']}]",
        )
    dropped = _customer_missing(customer_id)
    value = to_decimal(
        payload.get(meter.value_settings["event_payload_key"], "1"), "payload[value]"
    )
    timestamp = to_int(timestamp, "timestamp") if timestamp is not None else now()
    _timestamp_check(timestamp)
    identifier = identifier or f"standin-{uuid.uuid4()}"
    events = _accepted_events()
    held_since = now() - IDENTIFIER_WINDOW_S
    if any(e["identifier"] == identifier and e["created"] > held_since for e in events):
        raise stripe_error(
            400,
            f"An event already exists with identifier {identifier}.",
            code="resource_already_exists",
            param="identifier",
        )
    event = {
        "identifier": identifier,
        "event_name": event_name,
        "meter": meter.id,
        "customer": customer_id,
        "value": str(value),
        "payload": {k: str(v) for k, v in payload.items()},
        "timestamp": timestamp,
        "created": now(),
        "billed_on_invoice": None,
        "dropped": CUSTOMER_NOT_FOUND if dropped else None,
        "request_key": request_key or str(uuid.uuid4()),
    }
    events.append(event)
    if dropped:
        _error_report_emit(meter=meter, event=event, message=dropped)
    return MeterEvent(
        event_name=event_name,
        identifier=identifier,
        payload=event["payload"],
        timestamp=event["timestamp"],
        created=event["created"],
        livemode=False,
    )


def _timestamp_check(timestamp: int) -> None:
    """Refuse a timestamp older than Stripe takes, or too far ahead of its clock."""
    if timestamp < now() - TIMESTAMP_MAX_AGE_S:
        raise stripe_error(
            400,
            "The event's timestamp must be within the past 35 calendar days.",
            code="timestamp_too_far_in_past",
            param="timestamp",
        )
    if timestamp > now() + TIMESTAMP_MAX_AHEAD_S:
        raise stripe_error(
            400,
            "The event's timestamp must not be more than 5 minutes in the future.",
            code="timestamp_in_future",
            param="timestamp",
        )


def meter_events_age(seconds: int, customer: str | None = None) -> int:
    """Make every meter event (of `customer`, when given) `seconds` older (its `created`),
    as if sent that much earlier: one past IDENTIFIER_WINDOW_S no longer holds its
    identifier. Returns how many were aged."""
    events = [e for e in _accepted_events() if customer is None or e["customer"] == customer]
    for event in events:
        event["created"] -= seconds
    return len(events)


def _customer_missing(customer_id: str) -> str | None:
    """Stripe's message when the event's customer is not there, for a report later; None
    when it is. Refused at once (404) unless validation is later."""
    try:
        Customer._api_retrieve(customer_id)
        return None
    except UserError as error:
        if not _validate_later or error.code != 404:
            raise
        return f"No customer found for stripe_customer_id {customer_id}."


def _error_report_emit(*, meter: Meter, event: dict[str, Any], message: str) -> None:
    """The meter's error report of the window the event was validated in: one event, named
    by its request's idempotency key, as Stripe's `sample_errors` name it."""
    start = event["created"] - event["created"] % VALIDATION_WINDOW_S
    webhooks.publish_thin(
        webhooks.ThinEvent(
            "v1.billing.meter.error_report_triggered",
            related_object={
                "id": meter.id,
                "type": "billing.meter",
                "url": f"/v1/billing/meters/{meter.id}",
            },
            data={
                "developer_message_summary": "There is 1 invalid event",
                "reason": {
                    "error_count": 1,
                    "error_types": [
                        {
                            "code": event["dropped"],
                            "error_count": 1,
                            "sample_errors": [
                                {
                                    "error_message": message,
                                    "request": {"identifier": event["request_key"]},
                                }
                            ],
                        }
                    ],
                },
                "validation_start": webhooks.iso_time(start),
                "validation_end": webhooks.iso_time(start + VALIDATION_WINDOW_S),
            },
        )
    )


def meter_usage_take(*, customer_id: str, meter_id: str, invoice_id: str) -> Decimal:
    """Sum the customer's unbilled usage on a meter and mark it billed on this invoice."""
    total = Decimal(0)
    for event in _accepted_events():
        if (
            event["customer"] == customer_id
            and event["meter"] == meter_id
            and event["billed_on_invoice"] is None
            and not event.get("dropped")
        ):
            total += Decimal(event["value"])
            event["billed_on_invoice"] = invoice_id
    return total


async def config_meter_events(request):
    """`GET /_config/meter_events?customer=cus_...[&event_name=...]`: accepted events, in
    order (those counted: not those taken, then dropped)."""
    customer = request.query.get("customer")
    event_name = request.query.get("event_name")
    events = [
        e
        for e in _accepted_events()
        if (customer is None or e["customer"] == customer)
        and (event_name is None or e["event_name"] == event_name)
        and not e.get("dropped")
    ]
    return json_response(
        {
            "object": "list",
            "data": events,
            "total_value": str(sum((Decimal(e["value"]) for e in events), Decimal(0))),
        }
    )


def _meter_get(*, id: str, **_ignored: Any) -> Meter:
    return stored("billing.meter", id)


def _meter_list(
    *, status: str | None = None, limit: Any = None, starting_after: Any = None, **_ignored: Any
):
    meters = newest_first(objects_of("billing.meter"))
    if status:
        meters = [m for m in meters if m.status == status]
    return list_of("/v1/billing/meters", meters, limit=limit, starting_after=starting_after)


def _meter_deactivate(*, id: str, **_ignored: Any) -> Meter:
    meter = stored("billing.meter", id)
    meter.status = "inactive"
    meter.status_transitions["deactivated_at"] = now()
    meter.updated = now()
    return meter


def _meter_reactivate(*, id: str, **_ignored: Any) -> Meter:
    """Stripe's reactivate: events are accepted again and `deactivated_at` is cleared. An
    event name has at most one active meter, so reactivating one whose name another active
    meter has taken since is refused, as creating it would be."""
    meter = stored("billing.meter", id)
    if any(
        m.id != meter.id and m.event_name == meter.event_name and m.status == "active"
        for m in objects_of("billing.meter")
    ):
        raise stripe_error(
            400,
            f"An active meter already uses event_name '{meter.event_name}'.",
            code="resource_already_exists",
            param="event_name",
        )
    meter.status = "active"
    meter.status_transitions["deactivated_at"] = None
    meter.updated = now()
    return meter


async def config_meter_validation(request):
    """`POST /_config/meter_events/validation {"later": true|false}`."""
    params = await read_params(request)
    meter_validation_set(later=to_bool(params.get("later")))
    return json_response({"later": _validate_later})


async def config_meter_events_age(request):
    """`POST /_config/meter_events/age {"seconds": N, "customer"?: "cus_…"}`."""
    params = await read_params(request)
    seconds = to_int(params.get("seconds"), "seconds", minimum=0)
    aged = meter_events_age(seconds, params.get("customer") or None)
    return json_response({"aged": aged, "seconds": seconds})


routes = [
    ("POST", "/_config/meter_events/validation", config_meter_validation),
    ("POST", "/_config/meter_events/age", config_meter_events_age),
    ("POST", "/v1/billing/meters", api(meter_create)),
    ("GET", "/v1/billing/meters", api(_meter_list)),
    ("GET", "/v1/billing/meters/{id}", api(_meter_get)),
    ("POST", "/v1/billing/meters/{id}/deactivate", api(_meter_deactivate)),
    ("POST", "/v1/billing/meters/{id}/reactivate", api(_meter_reactivate)),
    (
        "POST",
        "/v1/billing/meter_events",
        api(meter_event_create, headers={"Idempotency-Key": "request_key"}),
    ),
    ("GET", "/_config/meter_events", config_meter_events),
]
