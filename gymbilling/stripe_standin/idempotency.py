"""Idempotency-Key replay for `POST /v1/...`, as Stripe does (in memory, until told).

Stripe keeps a key about 24 hours; here a key is kept until a test expires
them all (`POST /_config/idempotency_keys/expire`), as a day's wait would: a
request sent again after that runs again, as it would at Stripe.

The same key on the same path returns the first response byte for byte, with
`Idempotent-Replayed: true`. The same key with different parameters is refused
(400 `idempotency_error`), as Stripe refuses it. 5xx responses are not kept, so a
retry after a crash runs again, except one a fault says Stripe answered after it ran the
request (faults.py, `taken`): Stripe keeps that 5xx under the key, and replays it saying
`Stripe-Should-Retry: false`, as retrying gets the same answer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from aiohttp import web

from gymbilling.stripe_standin.common import stripe_error


@dataclass(frozen=True)
class Saved:
    body_hash: str
    status: int
    body: bytes
    content_type: str


_saved: dict[tuple[str, str, str], Saved] = {}


def forget() -> None:
    """Every saved key gone: what 24 hours do at Stripe (and a data reset here)."""
    _saved.clear()


def _key_of(request: web.Request) -> tuple[str, str, str] | None:
    key = request.headers.get("Idempotency-Key")
    if request.method != "POST" or not key or not request.path.startswith("/v1/"):
        return None
    return (request.headers.get("Authorization", ""), request.path, key)


@web.middleware
async def idempotency_middleware(request: web.Request, handler):
    key = _key_of(request)
    if key is None:
        return await handler(request)
    body_hash = hashlib.sha256(await request.read()).hexdigest()
    saved = _saved.get(key)
    if saved is not None:
        if saved.body_hash != body_hash:
            raise stripe_error(
                400,
                f"Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{key[2]}'.",
                error_type="idempotency_error",
                code="idempotency_key_in_use",
            )
        response = web.Response(
            status=saved.status, body=saved.body, content_type=saved.content_type
        )
        response.headers["Idempotent-Replayed"] = "true"
        if saved.status >= 500:
            response.headers["Stripe-Should-Retry"] = "false"
        response.headers["Idempotency-Key"] = key[2]
        return response
    response = await handler(request)
    if response.status < 500:
        _save(key, body_hash, response)
    response.headers["Idempotency-Key"] = key[2]
    return response


async def keep(request: web.Request, response: web.StreamResponse) -> None:
    """Keep `response` as the answer to the request's Idempotency-Key, whatever its status
    (a 5xx after the request ran: faults.py), in place of the one its handler gave."""
    key = _key_of(request)
    if key is not None:
        _save(key, hashlib.sha256(await request.read()).hexdigest(), response)


def _save(key: tuple[str, str, str], body_hash: str, response: web.StreamResponse) -> None:
    if isinstance(response, web.Response) and response.body is not None:
        _saved[key] = Saved(body_hash, response.status, bytes(response.body), response.content_type)
