"""The one module that talks to Stripe (STYLE.md 13).

Everything else in the project calls the functions here and gets plain dicts
back, never SDK objects, so services read Stripe's JSON as documented for the
pinned API version and a test can point the whole project at the local
stand-in (gymbilling/stripe_standin) by setting STRIPE_API_BASE.

- The API version is pinned (`API_VERSION`): Stripe changes object shapes
  between versions, and the webhook payloads follow the account's version, so
  we only ever read objects we fetched ourselves under this version.
- Every call has a timeout and the SDK's own retries for network errors, 409
  and 5xx (it sends the same idempotency key on each retry); it follows Stripe's
  `Stripe-Should-Retry` header, so a 429 is retried only where Stripe says so, and
  a 5xx Stripe kept under the key (it ran the request) is not.
- Every POST carries an idempotency key derived from our own rows
  (`checkout:<org>:<uuid>`, `customer:org:<pk>`, ...), so a retry after a
  timeout cannot create a second customer, subscription or transfer.
- Errors become three types the services handle: `StripeUnavailable` (try
  again later: network, 5xx, rate limit), `StripeCardDeclined`, and
  `StripeRequestRefused` (Stripe said no to the request itself).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import stripe
from django.conf import settings

# The version this code reads objects in. Upgrading it is a code change:
# read Stripe's changelog for every field services/ and the stand-in use.
API_VERSION = "2026-10-28.endive"


class StripeNotConfigured(RuntimeError):
    """STRIPE_SECRET_KEY is not set: billing is off in this deployment."""


class StripeUnavailable(RuntimeError):
    """Stripe did not answer, or answered 5xx/429: nothing is known to have happened."""


class StripeRequestRefused(RuntimeError):
    """Stripe refused the request (4xx). `code` is Stripe's error code, `request_id` the id
    Stripe's support finds the request by (its `Request-Id` header; None where the stand-in
    sends none)."""

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        request_id: str | None = None,
    ):
        super().__init__(message)
        self.code = code or ""
        self.status = status
        self.request_id = request_id or None


class StripeCardDeclined(StripeRequestRefused):
    """The customer's card was declined (402)."""


class WebhookSignatureInvalid(ValueError):
    """The webhook's Stripe-Signature does not match its body, or is too old."""


class WebhookEventInvalid(ValueError):
    """A correctly signed body that is not a Stripe event this service can store."""


# Bounds of what StripeEvent stores (its columns), checked before it is written.
_EVENT_TEXT_LIMITS = {"id": 255, "type": 100, "api_version": 64}
_CREATED_MAX = 2**32  # seconds since 1970: the year 2106
# A NUL escaped in JSON text (after an even number of backslashes, so not an
# escaped backslash followed by "u0000").
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def configured() -> bool:
    return bool(settings.STRIPE_SECRET_KEY)


def _client() -> stripe.StripeClient:
    if not configured():
        raise StripeNotConfigured("Set STRIPE_SECRET_KEY to enable billing.")
    kwargs: dict[str, Any] = {}
    if settings.STRIPE_API_BASE:
        kwargs["base_addresses"] = {"api": settings.STRIPE_API_BASE}
    return stripe.StripeClient(
        settings.STRIPE_SECRET_KEY,
        stripe_version=API_VERSION,
        max_network_retries=settings.STRIPE_MAX_NETWORK_RETRIES,
        http_client=stripe.RequestsClient(timeout=settings.STRIPE_TIMEOUT_SECONDS),
        **kwargs,
    )


def _plain(obj: Any) -> dict:
    """Plain JSON data: the SDK parses `*_decimal` fields into Decimal, which a
    JSONField (a stored webhook payload) cannot hold; they stay strings, as
    Stripe sends them."""
    data = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
    return json.loads(json.dumps(data, default=str))


def _call(fn, *args, key: str | None = None, **params) -> dict:
    """Run one SDK call, translating its errors into ours."""
    options = {"idempotency_key": key} if key else None
    try:
        if options:
            result = fn(*args, params=params or None, options=options)
        else:
            result = fn(*args, params=params or None)
    except stripe.CardError as exc:
        raise StripeCardDeclined(
            exc.user_message or str(exc),
            code=exc.code,
            status=exc.http_status,
            request_id=exc.request_id,
        ) from exc
    except (stripe.APIConnectionError, stripe.RateLimitError, stripe.APIError) as exc:
        raise StripeUnavailable(str(exc)) from exc
    except stripe.StripeError as exc:
        status = exc.http_status
        if status is not None and status >= 500:
            raise StripeUnavailable(str(exc)) from exc
        raise StripeRequestRefused(
            exc.user_message or str(exc), code=exc.code, status=status, request_id=exc.request_id
        ) from exc
    return _plain(result)


def _list(fn, *args, **params) -> list[dict]:
    page = _call(fn, *args, **params)
    return list(page.get("data", []))


def _pages(fn, *args, **params) -> Iterator[dict]:
    """Every object of a list, page after page (Stripe's order: newest first)."""
    params.setdefault("limit", 100)
    while True:
        page = _call(fn, *args, **params)
        data = page.get("data", [])
        yield from data
        if not page.get("has_more") or not data:
            return
        params["starting_after"] = data[-1]["id"]


# --- catalog -------------------------------------------------------------------


def product_upsert(*, product_id: str, name: str, description: str, metadata: dict) -> dict:
    """Create the product under our own id, or update its name and metadata."""
    v1 = _client().v1
    try:
        _call(v1.products.retrieve, product_id)
    except StripeRequestRefused as exc:
        if exc.status != 404:
            raise
        return _call(
            v1.products.create,
            key=f"product:{product_id}",
            id=product_id,
            name=name,
            description=description or None,
            metadata=metadata,
        )
    return _call(
        v1.products.update,
        product_id,
        name=name,
        description=description or None,
        metadata=metadata,
    )


def prices_by_lookup_key(lookup_keys: list[str]) -> list[dict]:
    return _list(_client().v1.prices.list, lookup_keys=lookup_keys, active=True, limit=100)


def prices_active() -> Iterator[dict]:
    """Every price active at Stripe, page after page."""
    return _pages(_client().v1.prices.list, active=True)


def price_create(*, key: str, **params) -> dict:
    return _call(_client().v1.prices.create, key=key, **params)


def price_deactivate(price_id: str) -> dict:
    return _call(_client().v1.prices.update, price_id, active=False)


def price_reactivate(price_id: str) -> dict:
    """Make an archived price usable again: Stripe refuses to put a subscription item on an
    inactive price (services.checkout: an old-price member's item put back at their price)."""
    return _call(_client().v1.prices.update, price_id, active=True)


def meter_ensure(*, event_name: str, display_name: str) -> dict:
    """The billing meter overage is reported to, created once.

    Looked for among every meter, page after page: its creation's idempotency key lasts
    a day at Stripe, so a meter missed past the first page would be made a second time
    for the same events (or refused as a duplicate event name).

    Only an active meter takes events. One deactivated (by hand, in the dashboard) is
    reactivated rather than replaced: the metered prices already name it, so events
    counted on a new meter would be billed on none of them."""
    v1 = _client().v1
    inactive = None
    for meter in _pages(v1.billing.meters.list):
        if meter.get("event_name") != event_name:
            continue
        if meter.get("status") == "active":
            return meter
        # Newest first: of several deactivated meters for the name, the latest is taken.
        inactive = inactive or meter
    if inactive is not None:
        return _meter_reactivate(inactive)
    return _call(
        v1.billing.meters.create,
        key=f"meter:{event_name}",
        display_name=display_name,
        event_name=event_name,
        default_aggregation={"formula": "sum"},
        customer_mapping={"event_payload_key": "stripe_customer_id", "type": "by_id"},
        value_settings={"event_payload_key": "value"},
    )


def meter_retrieve(meter_id: str) -> dict:
    return _call(_client().v1.billing.meters.retrieve, meter_id)


def _meter_reactivate(meter: dict) -> dict:
    # No key of ours, as for price_deactivate: setting a status is safe to send twice, and
    # a fixed key would replay (Stripe keeps keys a day) the answer of an earlier
    # reactivation, leaving a meter deactivated again since then inactive.
    return _call(_client().v1.billing.meters.reactivate, meter["id"])


# --- customers, checkout, portal ------------------------------------------------


def customer_create(*, key: str, email: str, name: str, metadata: dict) -> dict:
    return _call(
        _client().v1.customers.create, key=key, email=email or None, name=name, metadata=metadata
    )


def customer_retrieve(customer_id: str) -> dict:
    """The customer; one deleted at Stripe is answered `{"id", "object", "deleted": true}`
    (a 200, not a 404), which `customer_gone` reads as gone."""
    return _call(_client().v1.customers.retrieve, customer_id)


def customer_gone(customer_id: str) -> bool:
    """Whether Stripe says, for certain, that the customer was deleted: a retrieve answers
    it with `deleted: true` (a 200). False while it has the customer, and for a 404: an
    id this account never knew is a key of another account or mode (a key rotated
    wrongly), where replacing every organization's customer, and giving up their
    unsent overage, would be a mass repair once the key is fixed; the refusal reaches
    the caller instead. Another refusal, or Stripe unreachable, is raised, as not
    knowing."""
    try:
        return bool(customer_retrieve(customer_id).get("deleted"))
    except StripeRequestRefused as exc:
        if exc.status == 404 and exc.code == "resource_missing":
            return False
        raise


def checkout_session_create(*, key: str, **params) -> dict:
    # Cards only: an asynchronous method (a bank debit) can complete a session
    # unpaid and fail days later, after the credits were reserved or granted.
    params.setdefault("payment_method_types", ["card"])
    return _call(_client().v1.checkout.sessions.create, key=key, **params)


def checkout_session_retrieve(session_id: str) -> dict:
    return _call(_client().v1.checkout.sessions.retrieve, session_id)


def checkout_session_line_items(session_id: str) -> list[dict]:
    """What a Checkout session sells: its line items, each with the price it was opened at."""
    return list(_pages(_client().v1.checkout.sessions.line_items.list, session_id))


def checkout_session_expire(session_id: str) -> dict:
    return _call(_client().v1.checkout.sessions.expire, session_id)


def portal_session_create(*, customer: str, return_url: str) -> dict:
    return _call(
        _client().v1.billing_portal.sessions.create, customer=customer, return_url=return_url
    )


# --- subscriptions and invoices -------------------------------------------------


def subscription_retrieve(subscription_id: str) -> dict:
    return _call(_client().v1.subscriptions.retrieve, subscription_id)


def subscriptions_list(*, customer: str) -> list[dict]:
    """Every subscription of the customer that has not ended (Stripe's default filter:
    not canceled), all pages, newest first."""
    return list(_pages(_client().v1.subscriptions.list, customer=customer))


def subscription_update(subscription_id: str, *, key: str, **params) -> dict:
    return _call(_client().v1.subscriptions.update, subscription_id, key=key, **params)


def invoice_retrieve(invoice_id: str) -> dict:
    # Since API version 2025-03-31 an invoice names its PaymentIntent only in
    # `payments`, which Stripe includes only when asked: without it a refund
    # of the payment could not be traced back to the credits it bought.
    return _call(_client().v1.invoices.retrieve, invoice_id, expand=["payments"])


def invoices_list(*, customer: str | None = None, status: str | None = None) -> list[dict]:
    """Every invoice (all pages), newest first."""
    client = _client()
    params: dict[str, Any] = {"limit": 100}
    if customer:
        params["customer"] = customer
    if status:
        params["status"] = status
    invoices: list[dict] = []
    while True:
        page = _call(client.v1.invoices.list, **params)
        invoices.extend(page.get("data", []))
        if not page.get("has_more") or not page.get("data"):
            return invoices
        params["starting_after"] = page["data"][-1]["id"]


def charge_retrieve(charge_id: str) -> dict:
    return _call(_client().v1.charges.retrieve, charge_id)


def dispute_retrieve(dispute_id: str) -> dict:
    return _call(_client().v1.disputes.retrieve, dispute_id)


def payment_intent_retrieve(payment_intent_id: str) -> dict:
    return _call(_client().v1.payment_intents.retrieve, payment_intent_id)


def payment_intent_charge(payment_intent_id: str) -> dict | None:
    """The charge that paid a PaymentIntent (its latest), or None when it has none."""
    intent = _call(
        _client().v1.payment_intents.retrieve, payment_intent_id, expand=["latest_charge"]
    )
    charge = intent.get("latest_charge")
    if isinstance(charge, str):  # not expanded after all
        return charge_retrieve(charge)
    return charge or None


def refund_retrieve(refund_id: str) -> dict:
    return _call(_client().v1.refunds.retrieve, refund_id)


def refunds_list(*, charge: str | None = None, payment_intent: str | None = None) -> list[dict]:
    """Every refund of a charge, or of a PaymentIntent (all pages), oldest first (the order
    they were made in), whatever their status: a failed or canceled one is the merchant's
    money again."""
    if (charge is None) == (payment_intent is None):
        raise ValueError("refunds_list takes a charge or a payment_intent")
    of = {"charge": charge} if charge is not None else {"payment_intent": payment_intent}
    # Stripe lists newest first, in a stable order, at most 100 a page. Every page: the
    # first alone misses the oldest, where a charge's running total of refunds starts
    # and an order's shortfall refund stands. Reversed, the order they were made in.
    return list(reversed(list(_pages(_client().v1.refunds.list, **of))))


def disputes_list(*, payment_intent: str) -> list[dict]:
    """The disputes of a payment (a charge has at most one; a PaymentIntent one per charge)."""
    return _list(_client().v1.disputes.list, payment_intent=payment_intent, limit=100)


# --- usage, payouts ---------------------------------------------------------------


def meter_event_create(
    *, event_name: str, customer: str, value: int, identifier: str, timestamp: int, key: str
) -> dict | None:
    """Report usage; None when Stripe already has an event with this identifier.

    `key`, the idempotency key, is what Stripe's meter error report names a dropped
    event by (`sample_errors[].request.identifier`), so it names the batch; it names the
    attempt too, or a batch Stripe refused at once (a customer it cannot find) and sent
    again at the next run would be answered Stripe's saved refusal for a day. A resend
    of an event Stripe took is kept from counting twice by its `identifier`, which Stripe
    refuses twice whatever the key."""
    try:
        return _call(
            _client().v1.billing.meter_events.create,
            key=key,
            event_name=event_name,
            payload={"stripe_customer_id": customer, "value": str(value)},
            identifier=identifier,
            timestamp=timestamp,
        )
    except StripeRequestRefused as exc:
        if exc.code == "resource_already_exists":
            return None
        raise


def connect_account_create(*, key: str, email: str, metadata: dict) -> dict:
    return _call(
        _client().v1.accounts.create, key=key, type="express", email=email, metadata=metadata
    )


def transfer_create(*, key: str, **params) -> dict:
    return _call(_client().v1.transfers.create, key=key, **params)


def transfers_list(*, transfer_group: str, destination: str | None = None) -> list[dict]:
    """Every transfer of `transfer_group` (to `destination`, when given), newest first.

    Stripe filters transfers by `transfer_group`, `destination` and `created`
    only (not by metadata): a caller that must know a transfer again gives it
    a transfer group of its own when it creates it.
    """
    params: dict[str, Any] = {"transfer_group": transfer_group}
    if destination:
        params["destination"] = destination
    return list(_pages(_client().v1.transfers.list, **params))


def customer_balance_credit(*, key: str, customer: str, **params) -> dict:
    return _call(_client().v1.customers.balance_transactions.create, customer, key=key, **params)


def customer_balance_transactions_since(customer: str, *, created_gte: int) -> list[dict]:
    """The customer's balance transactions created at or after `created_gte` (Unix time),
    newest first. Paged until an older one: the list is newest first."""
    found = []
    for txn in _pages(_client().v1.customers.balance_transactions.list, customer):
        if int(txn.get("created") or 0) < created_gte:
            break
        found.append(txn)
    return found


def refund_create(*, key: str, **params) -> dict:
    return _call(_client().v1.refunds.create, key=key, **params)


def thin_event_retrieve(event_id: str) -> dict:
    """A v2 event (`/v2/core/events/<id>`) whole: a thin event's webhook carries only its
    id, type and related object; its `data` is read here."""
    return _call(_client().v2.core.events.retrieve, event_id)


# --- webhooks -------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookEvent:
    id: str
    type: str
    created: int
    livemode: bool
    api_version: str
    object_type: str
    object_id: str
    payload: dict


# A thin event (an event destination's "thin" payload style, the only one Stripe sends
# `v1.billing.meter.*` events in): its id, type and related object, no data.
THIN_EVENT_OBJECT = "v2.core.event"


def _verified_secret(payload: bytes, signature: str | None) -> str:
    """The signing secret the Stripe-Signature verifies with: the webhook endpoint's, or
    the thin event destination's (Stripe gives each destination its own secret)."""
    secrets = [
        s for s in (settings.STRIPE_WEBHOOK_SECRET, settings.STRIPE_THIN_WEBHOOK_SECRET) if s
    ]
    tolerance = settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS
    for secret in secrets[:-1]:
        try:
            stripe.WebhookSignature.verify_header(payload, signature, secret, tolerance=tolerance)
            return secret
        except stripe.SignatureVerificationError:
            continue
    stripe.WebhookSignature.verify_header(payload, signature, secrets[-1], tolerance=tolerance)
    return secrets[-1]


def webhook_event_construct(payload: bytes, signature: str | None) -> WebhookEvent:
    """Verify the Stripe-Signature header (HMAC and a 5-minute tolerance) and parse."""
    if not settings.STRIPE_WEBHOOK_SECRET:
        raise StripeNotConfigured("Set STRIPE_WEBHOOK_SECRET to accept webhooks.")
    tolerance = settings.STRIPE_WEBHOOK_TOLERANCE_SECONDS
    try:
        secret = _verified_secret(payload, signature)
        data = json.loads(payload)
    except stripe.SignatureVerificationError as exc:
        raise WebhookSignatureInvalid(str(exc)) from exc
    except ValueError as exc:
        raise WebhookSignatureInvalid(f"The body is not a Stripe event: {exc}") from exc
    if not isinstance(data, dict):
        # The SDK reads any JSON as an object (an AttributeError, a 500, otherwise).
        raise WebhookEventInvalid("The event is not a JSON object.")
    if data.get("object") == THIN_EVENT_OBJECT:
        return _thin_event(data)
    event = stripe.Webhook.construct_event(payload, signature, secret, tolerance=tolerance)
    body = _plain(event)
    if not isinstance(body.get("id"), str) or not isinstance(body.get("type"), str):
        raise WebhookSignatureInvalid("The event has no id or type.")
    _require_storable(body)
    obj = body["data"]["object"]
    return WebhookEvent(
        id=body["id"],
        type=body["type"],
        created=body.get("created") or 0,
        livemode=bool(body.get("livemode")),
        api_version=str(body.get("api_version") or ""),
        object_type=str(obj.get("object") or "")[:64],
        object_id=str(obj.get("id") or "")[:255],
        payload=body,
    )


def _thin_event(body: dict) -> WebhookEvent:
    """A verified thin event: stored as it came; its data is read from Stripe when it is
    processed (thin_event_retrieve). Its `created` is an ISO 8601 time, not a Unix one."""
    if not isinstance(body.get("id"), str) or not isinstance(body.get("type"), str):
        raise WebhookSignatureInvalid("The event has no id or type.")
    related = body.get("related_object") or {}
    if not isinstance(related, dict):
        raise WebhookEventInvalid("The event's related_object is not an object.")
    try:
        created = datetime.fromisoformat(str(body.get("created"))).timestamp()
    except ValueError as exc:
        raise WebhookEventInvalid("The event's created is not an ISO 8601 time.") from exc
    _require_storable(body, created=int(created))
    return WebhookEvent(
        id=body["id"],
        type=body["type"],
        created=int(created),
        livemode=bool(body.get("livemode")),
        api_version="",
        object_type=str(related.get("type") or "")[:64],
        object_id=str(related.get("id") or "")[:255],
        payload=body,
    )


def _require_storable(body: dict, *, created: int | None = None) -> None:
    """Refuse, as WebhookEventInvalid, a signed event whose shape would fail as it is
    stored or read (a 500 otherwise): Stripe's own events always pass. Only a holder of
    the signing secret can send one that does not. `created`: a thin event's, read from
    its ISO time; a snapshot event must have data.object and a Unix `created`."""
    if created is None:
        data = body.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("object"), dict):
            raise WebhookEventInvalid("The event has no data.object.")
        created = body.get("created", 0)
    if type(created) is not int or not 0 <= created < _CREATED_MAX:
        raise WebhookEventInvalid("The event's created is not a Unix time.")
    for field, limit in _EVENT_TEXT_LIMITS.items():
        if len(str(body.get(field) or "")) > limit:
            raise WebhookEventInvalid(f"The event's {field} is longer than {limit} characters.")
    try:
        # jsonb holds no NaN or Infinity, no lone surrogate, nor a NUL in a string.
        text = json.dumps(body, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
    except (ValueError, UnicodeEncodeError) as exc:
        raise WebhookEventInvalid(f"The event is not storable JSON: {exc}") from exc
    if _JSON_NUL.search(text):
        raise WebhookEventInvalid("The event holds a NUL character.")
