"""`/_config/...`: control endpoints for tests and the demo (no auth, like localstripe's).

    GET    /_config/health                        {"ok": true}
    DELETE /_config/data                          forget everything (store, events, idempotency keys, faults)
    POST   /_config/idempotency_keys/expire       forget the idempotency keys only, as Stripe does
                                                  after 24 h: a request sent again runs again
    POST   /_config/webhooks/<id>                 {"url", "secret", "events"?: [...]} add/replace a target
    POST   /_config/webhooks/hold                 queue events without sending them
    POST   /_config/webhooks/release              send what was held, in order
    GET    /_config/events[?type=...]             {"data": [{"id", "type", "object", "object_id",
                                                    "created", "deliveries": {<webhook id>: "pending|delivered|failed|canceled"}}]}
    POST   /_config/subscriptions/<id>/advance    end the current period → the subscription
    POST   /_config/checkout/sessions/<id>/age    {"seconds": N} as if created N seconds earlier
                                                  → the session (expired if past its expires_at)
    POST   /_config/refunds/refuse                {"code": "balance_insufficient"|null} refuse every
                                                  refund with that code, or take them again
    POST   /_config/accounts/<id>/capabilities    {"transfers": "active"|"inactive"} → the account
                                                  (inactive: transfers to it are refused)
    POST   /_config/customers/<id>/card           {"card": "4242424242424242"} new default card → the payment method
    POST   /_config/charges/<id>/dispute          {"amount"?, "reason"?, "status"?} → the dispute
                                                  (status "warning_needs_response": an inquiry)
    POST   /_config/disputes/<id>/close           {"status": "won"|"lost"|"warning_closed"} → the dispute
                                                  (won: charge.dispute.funds_reinstated, then .closed)
    POST   /_config/refunds/<id>/fail             {"reason"?} a refund fails later → the refund
                                                  (charge.refund.updated, refund.updated, refund.failed)
    GET    /_config/meter_events?customer=cus_…   {"data": [...accepted events], "total_value": "…"}  (meters.py)
    POST   /_config/meter_events/validation       {"later": true|false} an event for a customer the
                                                  stand-in has not got: taken, then reported in a
                                                  thin error report event (true), or 404 (meters.py)
    POST   /_config/meter_events/age              {"seconds": N, "customer"?: "cus_…"} every meter
                                                  event (of that customer) as if sent N seconds
                                                  earlier: past 24 h its identifier is taken
                                                  again, as Stripe forgets one → {"aged": n} (meters.py)
    POST   /_config/faults                        {"method"?: "POST", "path": "/v1/…", "status": 429|5xx,
                                                  "count"?: 1, "taken"?: false} the next `count` requests
                                                  to that path answer that status (429 `rate_limit`,
                                                  5xx `api_error`), not run, storing nothing; taken (5xx
                                                  only): run, then answered the 5xx, which its
                                                  Idempotency-Key keeps (faults.py) → the fault
    GET    /_config/faults                        {"data": [{"method", "path", "status", "count", "taken",
                                                    "remaining", "faulted"}]}  faulted: requests answered
    DELETE /_config/faults                        forget every fault (so does DELETE /_config/data)

`/_config/webhooks/<id>` with id `hold`/`release` is taken by the hold/release
endpoints, so those two names cannot be used as webhook ids.
"""

from __future__ import annotations

from dataclasses import asdict

from aiohttp import web
from localstripe.resources import Customer, store

from gymbilling.stripe_standin import faults, idempotency, webhooks
from gymbilling.stripe_standin.checkout import checkout_session_age, session_retrieve
from gymbilling.stripe_standin.common import json_response, read_params, stripe_error, to_int
from gymbilling.stripe_standin.connect import account_capabilities_set
from gymbilling.stripe_standin.meters import meter_validation_set
from gymbilling.stripe_standin.payments import (
    card_create,
    customer_card_replace,
    dispute_close,
    dispute_open,
    refund_fail,
    refunds_refuse,
)
from gymbilling.stripe_standin.subscriptions import subscription_advance


async def health(request: web.Request) -> web.Response:
    return json_response({"ok": True})


async def data_forget(request: web.Request) -> web.Response:
    store.clear()
    webhooks.forget_events()
    idempotency.forget()
    faults.forget()
    refunds_refuse(None)
    meter_validation_set(later=False)
    return json_response({"ok": True})


async def idempotency_keys_expire(request: web.Request) -> web.Response:
    idempotency.forget()
    return json_response({"ok": True})


async def fault_add(request: web.Request) -> web.Response:
    params = await read_params(request)
    return json_response(asdict(faults.fault_add(**params)))


async def faults_list(request: web.Request) -> web.Response:
    return json_response({"object": "list", "data": faults.listing()})


async def faults_forget(request: web.Request) -> web.Response:
    faults.forget()
    return json_response({"ok": True})


async def webhook_register(request: web.Request) -> web.Response:
    params = await read_params(request)
    url, secret, events = params.get("url"), params.get("secret"), params.get("events")
    if not url or not str(url).startswith("http") or not secret:
        raise stripe_error(400, "A webhook needs an http(s) url and a secret.", param="url")
    if events is not None and not isinstance(events, list):
        raise stripe_error(400, "events must be a list of event types.", param="events")
    webhooks.register(request.match_info["id"], url, secret, events)
    return json_response({"id": request.match_info["id"], "url": url, "events": events})


async def webhooks_hold(request: web.Request) -> web.Response:
    webhooks.hold()
    return json_response({"held": True})


async def webhooks_release(request: web.Request) -> web.Response:
    webhooks.release()
    return json_response({"held": False})


async def events_list(request: web.Request) -> web.Response:
    event_type = request.query.get("type")
    events = [e for e in webhooks.event_log() if event_type is None or e["type"] == event_type]
    return json_response({"object": "list", "data": events, "held": webhooks.is_held()})


async def subscription_advance_handler(request: web.Request) -> web.Response:
    return json_response(subscription_advance(request.match_info["id"])._export())


async def checkout_session_aged(request: web.Request) -> web.Response:
    params = await read_params(request)
    seconds = to_int(params.get("seconds"), "seconds", minimum=0)
    session = checkout_session_age(session_retrieve(request.match_info["id"]), seconds)
    return json_response(session._export())


async def refunds_refused(request: web.Request) -> web.Response:
    params = await read_params(request)
    refunds_refuse(params.get("code"))
    return json_response({"ok": True})


async def account_capabilities(request: web.Request) -> web.Response:
    params = await read_params(request)
    account_id = params.pop("id")
    return json_response(account_capabilities_set(id=account_id, **params)._export())


async def customer_card(request: web.Request) -> web.Response:
    params = await read_params(request)
    customer = Customer._api_retrieve(request.match_info["id"])
    method = customer_card_replace(
        customer=customer, method=card_create(str(params.get("card", "")))
    )
    return json_response(method._export())


async def charge_dispute(request: web.Request) -> web.Response:
    params = await read_params(request)
    dispute = dispute_open(
        charge_id=request.match_info["id"],
        amount=params.get("amount"),
        reason=params.get("reason") or "fraudulent",
        status=params.get("status") or "needs_response",
    )
    return json_response(dispute._export())


async def dispute_end(request: web.Request) -> web.Response:
    params = await read_params(request)
    dispute = dispute_close(
        dispute_id=request.match_info["id"], status=params.get("status") or "won"
    )
    return json_response(dispute._export())


async def refund_failed(request: web.Request) -> web.Response:
    params = await read_params(request)
    refund = refund_fail(
        refund_id=request.match_info["id"],
        reason=params.get("reason") or "expired_or_canceled_card",
    )
    return json_response(refund._export())


routes = [
    ("GET", "/_config/health", health),
    ("DELETE", "/_config/data", data_forget),
    ("POST", "/_config/idempotency_keys/expire", idempotency_keys_expire),
    ("POST", "/_config/faults", fault_add),
    ("GET", "/_config/faults", faults_list),
    ("DELETE", "/_config/faults", faults_forget),
    # hold/release before `{id}`: aiohttp matches routes in the order they are added.
    ("POST", "/_config/webhooks/hold", webhooks_hold),
    ("POST", "/_config/webhooks/release", webhooks_release),
    ("POST", "/_config/webhooks/{id}", webhook_register),
    ("GET", "/_config/events", events_list),
    ("POST", "/_config/subscriptions/{id}/advance", subscription_advance_handler),
    ("POST", "/_config/checkout/sessions/{id}/age", checkout_session_aged),
    ("POST", "/_config/accounts/{id}/capabilities", account_capabilities),
    ("POST", "/_config/refunds/refuse", refunds_refused),
    ("POST", "/_config/customers/{id}/card", customer_card),
    ("POST", "/_config/charges/{id}/dispute", charge_dispute),
    ("POST", "/_config/disputes/{id}/close", dispute_end),
    ("POST", "/_config/refunds/{id}/fail", refund_failed),
]
