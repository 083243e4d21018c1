"""The stand-in's aiohttp application: our routes first, then localstripe's.

localstripe's module-level `app` already holds its routes; a new application is
built with ours registered first and localstripe's copied after, minus the ones
ours replace (subscriptions, invoices, and its own `/_config`), so a path such
as `/v1/invoices/{id}/pay` reaches our handler and not localstripe's.
"""

from __future__ import annotations

import logging
import secrets
import traceback
from pathlib import Path

import localstripe.resources
import localstripe.server
from aiohttp import web
from localstripe.errors import UserError
from localstripe.resources import Customer, Store, store

from gymbilling.stripe_standin import (
    checkout,
    connect,
    control,
    customers,
    faults,
    idempotency,
    invoices,
    meters,
    payments,
    portal,
    prices,
    subscriptions,
    webhooks,
)
from gymbilling.stripe_standin.common import json_response, stripe_error

logger = logging.getLogger("stripe_standin")

# localstripe routes replaced by ours (prefix match on the route's path).
REPLACED_PREFIXES = (
    "/v1/subscriptions",
    "/v1/subscription_items",
    "/v1/invoices",
    "/v1/refunds",
    "/v1/customers/{id}/subscriptions",
    "/_config/",
)
# Paths served without an API key: control endpoints and the pages a browser opens.
PUBLIC_PREFIXES = ("/_config/", "/checkout/", "/billing_portal/", "/connect/", "/js.stripe.com/")


def _stripe_error_body(error: UserError) -> dict:
    body = error.body
    details = body.setdefault("error", {})
    details.setdefault("message", "Bad request")
    details.setdefault("code", "resource_missing" if error.code == 404 else None)
    details.setdefault("param", None)
    if error.code == 402:
        details["type"] = "card_error"
        details["code"] = details.get("code") or "card_declined"
    return body


@web.middleware
async def error_middleware(request: web.Request, handler):
    """Every error in Stripe's shape: {"error": {"type", "code", "message", "param"}}."""
    try:
        return await handler(request)
    except UserError as error:
        return json_response(_stripe_error_body(error), status=error.code)
    except web.HTTPException as http_error:
        if http_error.status == 404 and request.path.startswith("/v1/"):
            return json_response(
                {
                    "error": {
                        "type": "invalid_request_error",
                        "code": None,
                        "param": None,
                        "message": f"Unrecognized request URL ({request.method}: {request.path}). This stand-in does not emulate it.",
                    }
                },
                status=404,
            )
        raise
    except Exception as error:  # a bug here must reach the client as Stripe's 500, not a hang
        logger.error(
            "stand-in crashed on %s %s:\n%s", request.method, request.path, traceback.format_exc()
        )
        return json_response(
            {
                "error": {
                    "type": "api_error",
                    "code": None,
                    "param": None,
                    "message": f"stand-in error: {error!r}",
                }
            },
            status=500,
        )


@web.middleware
async def request_id_middleware(request: web.Request, handler):
    """Stripe's `Request-Id` on every answer: the SDK puts it on its errors, and a
    service shows it to whoever asks its support about a refused request."""
    response = await handler(request)
    response.headers.setdefault("Request-Id", f"req_{secrets.token_hex(7)}")
    return response


@web.middleware
async def auth_middleware(request: web.Request, handler):
    if request.path.startswith(PUBLIC_PREFIXES):
        return await handler(request)
    return await localstripe.server.auth_middleware(request, handler)


def _use_data_dir(data_dir: Path) -> None:
    """Keep localstripe's pickle in our data dir, written once per request.

    localstripe writes `/tmp/localstripe.pickle` on every store assignment: two
    servers would share state, and large stores get slow. The save middleware
    still writes after each POST/DELETE.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    pickle_path = data_dir / "localstripe.pickle"

    def try_load_from_disk(self) -> None:
        import pickle

        if pickle_path.exists():
            with pickle_path.open("rb") as f:
                old = pickle.load(f)
            self.clear()
            self.update(old)

    def dump_to_disk(self) -> None:
        import pickle

        tmp = pickle_path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            pickle.dump(dict(self), f, protocol=pickle.HIGHEST_PROTOCOL)
        tmp.replace(pickle_path)  # atomic: a crash never leaves half a file

    Store.try_load_from_disk = try_load_from_disk
    Store.dump_to_disk = dump_to_disk
    Store.__setitem__ = dict.__setitem__
    Store.__delitem__ = dict.__delitem__


def _is_replaced(path: str) -> bool:
    return path.startswith(REPLACED_PREFIXES)


def create_app(
    *,
    data_dir: Path,
    fresh: bool = False,
    webhook_url: str | None = None,
    webhook_secret: str | None = None,
) -> web.Application:
    _use_data_dir(data_dir)
    webhooks.install()
    # New-shape field localstripe's Customer lacks (negative = credit).
    Customer.balance = 0
    if not fresh:
        store.try_load_from_disk()

    app = web.Application(
        middlewares=[
            request_id_middleware,
            error_middleware,
            auth_middleware,
            # After the key is checked (Stripe limits an account), before the idempotency
            # layer and every handler: a faulted request stores nothing (faults.py).
            faults.fault_middleware,
            idempotency.idempotency_middleware,
            error_middleware,
            localstripe.server.save_store_middleware,
        ]
    )
    for module in (
        control,
        meters,
        prices,
        checkout,
        portal,
        connect,
        customers,
        payments,
        invoices,
        subscriptions,
        webhooks,
    ):
        for method, path, handler in module.routes:
            app.router.add_route(method, path, handler)
    for route in localstripe.server.app.router.routes():
        path = route.resource.canonical if route.resource else ""
        if route.method != "HEAD" and not _is_replaced(path):
            app.router.add_route(route.method, path, route.handler)

    async def start_default_webhook(app: web.Application) -> None:
        if webhook_url and webhook_secret:
            webhooks.register("default", webhook_url, webhook_secret)

    app.on_startup.append(start_default_webhook)
    return app


def run(
    *,
    host: str,
    port: int,
    data_dir: Path,
    fresh: bool,
    webhook_url: str | None,
    webhook_secret: str | None,
) -> None:
    if (webhook_url is None) != (webhook_secret is None):
        raise SystemExit("--webhook-url and --webhook-secret go together")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s stripe-standin %(levelname)s %(message)s"
    )
    app = create_app(
        data_dir=data_dir, fresh=fresh, webhook_url=webhook_url, webhook_secret=webhook_secret
    )
    # print=None: the helper waits on /_config/health, not on a banner.
    web.run_app(app, host=host, port=port, access_log=None, print=None)


__all__ = ["create_app", "run", "stripe_error"]
