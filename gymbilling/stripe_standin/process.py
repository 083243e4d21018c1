"""Run the stand-in as a subprocess: for pytest fixtures and scripts/demo.sh.

    with StripeStandIn() as standin:
        client = stripe.StripeClient("sk_test_standin", base_addresses={"api": standin.api_base},
                                     stripe_version=stripe.api_version)
        standin.register_webhook("http://127.0.0.1:9000/stripe/webhook", "whsec_test")
        ...
        standin.advance(subscription_id)

The `/_config` helpers use only the standard library, so a script can use them
without the SDK.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

STARTUP_TIMEOUT_S = 20


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StandInError(RuntimeError):
    """A `/_config` call answered with an error; `.status` and `.body` say which."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"stand-in answered {status}: {body}")
        self.status = status
        self.body = body


class StripeStandIn:
    """The stand-in as a child process on a free loopback port, with its own state."""

    def __init__(
        self,
        port: int | None = None,
        data_dir: str | Path | None = None,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        *,
        fresh: bool = True,
        log_path: str | Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.data_dir = (
            Path(data_dir) if data_dir else Path(tempfile.mkdtemp(prefix="stripe-standin-"))
        )
        self.api_base = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_path) if log_path else self.data_dir / "standin.log"
        command = [
            sys.executable,
            "-m",
            "gymbilling.stripe_standin",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        if fresh:
            command.append("--fresh")
        if webhook_url:
            command += ["--webhook-url", webhook_url, "--webhook-secret", webhook_secret or ""]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # TMPDIR per process: anything left that still uses the temp dir stays private.
        env = {**os.environ, "TMPDIR": str(self.data_dir)}
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            command,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
        )
        self._wait_until_ready()

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"stripe stand-in exited with {self._process.returncode}; see {self.log_path}"
                )
            try:
                self.config("GET", "/_config/health")
                return
            except (OSError, StandInError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(
            f"stripe stand-in did not answer within {STARTUP_TIMEOUT_S}s; see {self.log_path}"
        )

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._log.close()

    def __enter__(self) -> StripeStandIn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- /_config helpers -----------------------------------------------------------

    def config(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        query: dict[str, str] | None = None,
    ) -> Any:
        url = self.api_base + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            raise StandInError(error.code, json.loads(error.read() or b"null")) from None

    def register_webhook(
        self, url: str, secret: str, *, webhook_id: str = "default", events: list[str] | None = None
    ) -> None:
        self.config(
            "POST",
            f"/_config/webhooks/{webhook_id}",
            {"url": url, "secret": secret, "events": events},
        )

    def reset(self) -> None:
        self.config("DELETE", "/_config/data")

    def expire_idempotency_keys(self) -> None:
        """Forget every idempotency key, as Stripe does after about 24 hours."""
        self.config("POST", "/_config/idempotency_keys/expire")

    def fault(
        self,
        path: str,
        status: int,
        *,
        method: str = "POST",
        count: int = 1,
        taken: bool = False,
    ) -> dict[str, Any]:
        """Answer the next `count` requests of `method` to `path` with `status` (429 or a
        5xx) in Stripe's error shape, without running them; `taken` (a 5xx): run them, then
        answer the 5xx, which their Idempotency-Key keeps (faults.py). An SDK's own
        retries are requests too, each taking one of `count`."""
        body = {"method": method, "path": path, "status": status, "count": count, "taken": taken}
        return self.config("POST", "/_config/faults", body)

    def faults(self) -> list[dict[str, Any]]:
        """Every fault, in order, with the requests left (`remaining`) and answered
        (`faulted`)."""
        return self.config("GET", "/_config/faults")["data"]

    def clear_faults(self) -> None:
        self.config("DELETE", "/_config/faults")

    def advance(self, subscription_id: str) -> dict[str, Any]:
        """End the subscription's current period (renew, or cancel at period end)."""
        return self.config("POST", f"/_config/subscriptions/{subscription_id}/advance")

    def age_checkout(self, session_id: str, seconds: int) -> dict[str, Any]:
        """Make a Checkout Session `seconds` older: past its `expires_at`, it is expired."""
        return self.config(
            "POST", f"/_config/checkout/sessions/{session_id}/age", {"seconds": seconds}
        )

    def set_capabilities(self, account_id: str, **capabilities: str) -> dict[str, Any]:
        """Turn a Connect account's capabilities on or off: `transfers="inactive"`."""
        return self.config("POST", f"/_config/accounts/{account_id}/capabilities", capabilities)

    def refuse_refunds(self, code: str | None) -> None:
        """Refuse every refund with `code` (`balance_insufficient`), or, None, take them."""
        self.config("POST", "/_config/refunds/refuse", {"code": code})

    def set_card(self, customer_id: str, card: str) -> dict[str, Any]:
        """Replace the customer's default payment method with a test card number."""
        return self.config("POST", f"/_config/customers/{customer_id}/card", {"card": card})

    def dispute(
        self,
        charge_id: str,
        *,
        amount: int | None = None,
        reason: str = "fraudulent",
        status: str = "needs_response",
    ) -> dict[str, Any]:
        """Open a dispute; status "warning_needs_response" makes it an inquiry (no funds move)."""
        body = {"amount": amount, "reason": reason, "status": status}
        return self.config("POST", f"/_config/charges/{charge_id}/dispute", body)

    def close_dispute(self, dispute_id: str, *, status: str = "won") -> dict[str, Any]:
        """End a dispute: "won" (Stripe reinstates the funds), "lost", or "warning_closed"."""
        return self.config("POST", f"/_config/disputes/{dispute_id}/close", {"status": status})

    def fail_refund(self, refund_id: str, *, reason: str = "expired_or_canceled_card") -> dict:
        """A refund fails after it was made (the card closed): the money is the merchant's
        again, with Stripe's `charge.refund.updated` and `refund.failed` events."""
        return self.config("POST", f"/_config/refunds/{refund_id}/fail", {"reason": reason})

    def pay_checkout(self, session_id: str, card: str = "4242424242424242") -> dict[str, Any]:
        """Pay a Checkout Session as the page's form would; returns the session (raises if declined)."""
        request = urllib.request.Request(
            f"{self.api_base}/checkout/{session_id}/pay",
            data=json.dumps({"card": card}).encode(),
            method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise StandInError(error.code, json.loads(error.read() or b"null")) from None

    def events(self, event_type: str | None = None) -> list[dict[str, Any]]:
        return self.config(
            "GET", "/_config/events", query={"type": event_type} if event_type else None
        )["data"]

    def meter_events(self, customer_id: str | None = None) -> list[dict[str, Any]]:
        return self.config(
            "GET", "/_config/meter_events", query={"customer": customer_id} if customer_id else None
        )["data"]

    def validate_meter_events_later(self, later: bool = True) -> None:
        """An event for a customer the stand-in has not got: taken and reported dropped in
        a thin `v1.billing.meter.error_report_triggered` event, as Stripe does (True), or
        refused at once with a 404 (False, the default)."""
        self.config("POST", "/_config/meter_events/validation", {"later": later})

    def meter_events_total(self, customer_id: str) -> int:
        """The value of the customer's meter events Stripe counts (not those dropped)."""
        listing = self.config("GET", "/_config/meter_events", query={"customer": customer_id})
        return int(listing["total_value"])

    def age_meter_events(self, seconds: int, customer_id: str | None = None) -> int:
        """Make every meter event (of the customer, when given) `seconds` older: past 24
        hours its identifier is taken again, as Stripe forgets one. Returns how many."""
        body = {"seconds": seconds, "customer": customer_id}
        return self.config("POST", "/_config/meter_events/age", body)["aged"]

    def hold_webhooks(self) -> None:
        self.config("POST", "/_config/webhooks/hold")

    def release_webhooks(self) -> None:
        self.config("POST", "/_config/webhooks/release")
