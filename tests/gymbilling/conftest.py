"""Fixtures of every billing and marketplace test."""

from __future__ import annotations

import pytest

from gymbilling.stripe_client import API_VERSION


@pytest.fixture
def deliver(stripe_standin):
    """Apply, in this test's transaction, every event the stand-in sent since the last call.

    For tests that run inside one database transaction (no live server): the
    events are recorded as the webhook view would and processed in order,
    reading the current objects from the stand-in like the worker does.
    """
    from gymbilling.services import stripe_event_process, stripe_event_record
    from gymbilling.stripe_client import WebhookEvent

    seen = {event["id"] for event in stripe_standin.events()}

    def _deliver(*, first: tuple[str, ...] = (), later: tuple[str, ...] = ()) -> list[str]:
        """`first`: event types to process before the others, as a late webhook leaves them;
        `later`: event types (or their start, "invoice.") left for a later call, as events
        whose processing failed until then."""
        statuses = []
        events = [
            event
            for event in stripe_standin.events()
            if event["id"] not in seen and not (later and event["type"].startswith(later))
        ]
        events.sort(key=lambda event: event["type"] not in first)  # stable: Stripe's order else
        for event in events:
            seen.add(event["id"])
            row, _ = stripe_event_record(
                event=WebhookEvent(
                    id=event["id"],
                    type=event["type"],
                    created=int(event["created"]),
                    livemode=False,
                    api_version=API_VERSION,
                    object_type=event["object"],
                    object_id=event["object_id"],
                    payload={
                        "id": event["id"],
                        "type": event["type"],
                        "data": {"object": {"id": event["object_id"]}},
                    },
                )
            )
            statuses.append(stripe_event_process(event_pk=row.pk))
        return statuses

    return _deliver
