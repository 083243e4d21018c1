"""The Stripe stand-in over real HTTP, a webhook receiver, and an SDK client.

Session-scoped: one stand-in process serves the whole run; tests create their
own customers and prices, so they do not depend on each other's state.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import stripe

from gymbilling.stripe_standin.process import StripeStandIn

WEBHOOK_SECRET = "whsec_standin_tests"


class WebhookReceiver:
    """Collects events whose signature `stripe.Webhook.construct_event` accepts."""

    def __init__(self) -> None:
        self.events: list[stripe.Event] = []
        self.rejected: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                payload = self.rfile.read(int(self.headers["Content-Length"]))
                try:
                    event = stripe.Webhook.construct_event(
                        payload, self.headers["Stripe-Signature"], WEBHOOK_SECRET
                    )
                except (ValueError, stripe.SignatureVerificationError) as error:
                    receiver.rejected.append(str(error))
                    self.send_response(400)
                else:
                    with receiver._lock:
                        receiver.events.append(event)
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/stripe/webhook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait_for(self, event_type: str, object_id: str, timeout: float = 10.0) -> stripe.Event:
        """The first event of this type about this object; fails after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                for event in self.events:
                    if (
                        event.type == event_type
                        and getattr(event.data.object, "id", None) == object_id
                    ):
                        return event
            time.sleep(0.05)
        seen = [(e.type, getattr(e.data.object, "id", None)) for e in self.events]
        raise AssertionError(
            f"no {event_type} for {object_id} within {timeout}s; seen: {json.dumps(seen)[-2000:]}"
        )

    def types_for(self, object_id: str) -> list[str]:
        with self._lock:
            return [e.type for e in self.events if getattr(e.data.object, "id", None) == object_id]

    def stop(self) -> None:
        self._server.shutdown()


@pytest.fixture(scope="session")
def webhook_receiver() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def stripe_standin(tmp_path_factory, webhook_receiver) -> Iterator[StripeStandIn]:
    standin = StripeStandIn(
        data_dir=tmp_path_factory.mktemp("stripe-standin"),
        webhook_url=webhook_receiver.url,
        webhook_secret=WEBHOOK_SECRET,
    )
    yield standin
    standin.stop()


@pytest.fixture(scope="session")
def stripe_client(stripe_standin) -> stripe.StripeClient:
    return stripe.StripeClient(
        "sk_test_standin",
        base_addresses={"api": stripe_standin.api_base},
        stripe_version=stripe.api_version,
        max_network_retries=0,
    )
