"""Injected faults: the next requests to a path answered 429 or 5xx, as Stripe answers
some under load (`POST /_config/faults`, `DELETE /_config/faults`; control.py).

A fault is a method, a path (`/v1/...` or `/v2/...`, matched exactly), a status and a
count: the next `count` requests that match are answered that status, in Stripe's error
shape, then requests pass again. Faults are tried in the order they were added, so a
429 then a 503 on one path is two faults. Each keeps how many requests it answered
(`faulted`), which `GET /_config/faults` lists: an SDK retries some answers by itself
(stripe-python: 5xx, unless `Stripe-Should-Retry: false`; a 429 only when that header
says `true`), and each retry is a request that takes one of `count`.

- 429 `rate_limit` (type `invalid_request_error`): Stripe's rate limiters run before
  its idempotency layer, so the request is not run and no result is kept under its
  Idempotency-Key: the same key sent again runs the request. No `Retry-After`: Stripe
  documents none, and its SDKs back off on their own.
- 5xx (type `api_error`), by default: the request never reached the API (an overloaded
  or failing front), so it is not run either and nothing is kept.
- 5xx with `"taken": true`: the API ran the request (its objects are made, its events
  sent) and then failed to answer. Stripe keeps a 5xx under the request's Idempotency-Key
  once the endpoint began (the same key is answered the same 5xx, for a day), and says
  `Stripe-Should-Retry: false`, so the SDK does not retry it: whoever sent it learns what
  happened only by asking again another way, or under another key.

Faults live in memory, not in the store: a restart, `DELETE /_config/faults` and
`DELETE /_config/data` forget them. Only the API is faulted, never `/_config/...`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from aiohttp import web

from gymbilling.stripe_standin import idempotency
from gymbilling.stripe_standin.common import json_response, stripe_error, to_bool, to_int

FAULTED_PREFIXES = ("/v1/", "/v2/")
METHODS = frozenset({"GET", "POST", "DELETE"})


@dataclass
class Fault:
    method: str
    path: str
    status: int
    count: int
    taken: bool
    remaining: int
    faulted: int = 0


_faults: list[Fault] = []


def fault_add(
    *,
    method: Any = "POST",
    path: Any = None,
    status: Any = None,
    count: Any = 1,
    taken: Any = False,
    **_ignored: Any,
) -> Fault:
    """Answer the next `count` requests of `method` to `path` with `status`."""
    method = str(method or "POST").upper()
    if method not in METHODS:
        raise stripe_error(400, f"method must be one of {sorted(METHODS)}.", param="method")
    if not isinstance(path, str) or not path.startswith(FAULTED_PREFIXES):
        raise stripe_error(
            400, "path must be an API path, starting /v1/ or /v2/ (matched exactly).", param="path"
        )
    status = to_int(status, "status")
    if status != 429 and not 500 <= status <= 599:
        raise stripe_error(400, "status must be 429 or a 5xx.", param="status")
    count = to_int(count, "count", minimum=1)
    taken = to_bool(taken)
    if taken and status == 429:
        raise stripe_error(
            400,
            "A 429 is answered before Stripe runs the request: taken only goes with a 5xx.",
            param="taken",
        )
    fault = Fault(method, path, status, count, taken, remaining=count)
    _faults.append(fault)
    return fault


def forget() -> None:
    _faults.clear()


def listing() -> list[dict[str, Any]]:
    return [asdict(fault) for fault in _faults]


def _take(request: web.Request) -> Fault | None:
    """The first fault with requests left that matches, one of them used up. No await in
    between: the event loop runs one request at a time here, so two never take the last."""
    for fault in _faults:
        if fault.remaining and fault.method == request.method and fault.path == request.path:
            fault.remaining -= 1
            fault.faulted += 1
            return fault
    return None


def _answer(fault: Fault) -> web.Response:
    if fault.status == 429:
        error = {
            "type": "invalid_request_error",
            "code": "rate_limit",
            "message": "Request rate limit exceeded. Learn more about rate limits here "
            "https://stripe.com/docs/rate-limits.",
        }
    else:
        error = {
            "type": "api_error",
            "code": None,
            "message": "An unknown error occurred (a fault injected at the stand-in).",
        }
    response = json_response({"error": {**error, "param": None}}, status=fault.status)
    if fault.taken:
        response.headers["Stripe-Should-Retry"] = "false"
    return response


@web.middleware
async def fault_middleware(request: web.Request, handler):
    """Before the idempotency layer and every handler: a faulted request is not run (or,
    `taken`, run and then answered the fault, which is what its key keeps)."""
    if not request.path.startswith(FAULTED_PREFIXES):
        return await handler(request)
    fault = _take(request)
    if fault is None:
        return await handler(request)
    response = _answer(fault)
    if fault.taken:
        await handler(request)
        await idempotency.keep(request, response)
    return response
