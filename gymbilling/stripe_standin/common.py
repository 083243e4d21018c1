"""Shared plumbing: Stripe-shaped errors, request parsing and JSON responses.

Every handler is a plain function of keyword arguments that returns a localstripe
`StripeObject`; `api()` turns it into an aiohttp handler so that parsing, `expand`
and serialisation live in one place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import stripe
from aiohttp import web
from localstripe.errors import UserError
from localstripe.server import get_post_data, unflatten_data

# Events and objects claim the version the SDK pins, so a webhook handler that
# checks `event.api_version` sees the same value as against real Stripe.
API_VERSION: str = stripe.api_version


def now() -> int:
    return int(time.time())


def stripe_error(
    status: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    error_type: str | None = None,
    **extra: Any,
) -> UserError:
    """A localstripe `UserError` carrying Stripe's `{"error": {...}}` body.

    The SDK picks its exception class from the HTTP status (400/404 invalid
    request, 402 card error), so the status is what must be right.
    """
    contents = {"code": code, "param": param, "message": message, **extra}
    error = UserError(status, message, contents)
    error.body["error"]["type"] = error_type or (
        "card_error" if status == 402 else "invalid_request_error"
    )
    return error


def not_found(kind: str, object_id: str, param: str = "id") -> UserError:
    return stripe_error(404, f"No such {kind}: '{object_id}'", code="resource_missing", param=param)


def to_int(value: Any, param: str, *, minimum: int | None = None) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise stripe_error(
            400, f"Invalid integer: {value!r}", code="parameter_invalid_integer", param=param
        ) from None
    if minimum is not None and number < minimum:
        raise stripe_error(
            400,
            f"{param} must be at least {minimum}",
            code="parameter_invalid_integer",
            param=param,
        )
    return number


def to_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.lower() == "true"
    return bool(value)


def to_decimal(value: Any, param: str) -> Decimal:
    try:
        return Decimal(str(value))
    except ArithmeticError:
        raise stripe_error(
            400, f"Invalid decimal: {value!r}", code="parameter_invalid_decimal", param=param
        ) from None


def round_minor(amount: Decimal) -> int:
    """Round an amount in minor units to an integer, half up (Stripe rounds half up)."""
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def merge_metadata(current: dict[str, str] | None, update: Any) -> dict[str, str]:
    """Stripe's metadata update: keys merge, an empty string deletes a key."""
    merged = dict(current or {})
    if update in (None, ""):
        return {} if update == "" else merged
    if not isinstance(update, dict):
        raise stripe_error(
            400, "metadata must be a hash", code="parameter_invalid_hash", param="metadata"
        )
    for key, value in update.items():
        if value in ("", None):
            merged.pop(key, None)
        else:
            merged[key] = str(value)
    return merged


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(
        body, status=status, dumps=lambda x: json.dumps(x, indent=2, sort_keys=True)
    )


async def read_params(request: web.Request) -> dict[str, Any]:
    """Form or JSON body, plus the query string and the path's ids."""
    data = dict(await get_post_data(request) or {})
    data.update(unflatten_data(request.query) or {})
    data.update(request.match_info)
    return data


def api(
    func: Callable[..., Any], *, headers: dict[str, str] | None = None
) -> Callable[[web.Request], Any]:
    """Wrap `func(**params) -> StripeObject` as an aiohttp handler. `headers`: request
    headers `func` is given too, as the keyword each maps to (None when not sent)."""

    async def handler(request: web.Request) -> web.Response:
        params = await read_params(request)
        for header, keyword in (headers or {}).items():
            params[keyword] = request.headers.get(header)
        expand = params.pop("expand", None)
        if isinstance(expand, str):
            expand = [expand]
        result = func(**params)
        if isinstance(result, web.StreamResponse):
            return result
        return json_response(result._export(expand=expand))

    handler.__name__ = func.__name__
    return handler


def list_of(url: str, items: list[Any], *, limit: Any = None, starting_after: Any = None):
    """A localstripe `List` (Stripe's list shape, with cursor pagination)."""
    from localstripe.resources import List

    page = List(url, limit=limit, starting_after=starting_after)
    page._list = list(items)
    return page


def objects_of(object_name: str) -> list[Any]:
    """Every stored object of a kind, oldest first (the store keeps insertion order)."""
    from localstripe.resources import store

    prefix = object_name + ":"
    return [value for key, value in store.items() if key.startswith(prefix)]


def newest_first(items: list[Any]) -> list[Any]:
    # Stripe lists newest first; the store keeps insertion order, so reverse it.
    return list(reversed(items))


def stored(object_name: str, object_id: Any, *, param: str = "id") -> Any:
    """The stored object, or Stripe's 404 (`resource_missing`)."""
    from localstripe.resources import store

    obj = store.get(f"{object_name}:{object_id}") if isinstance(object_id, str) else None
    if obj is None:
        raise not_found(object_name.replace("_", " "), str(object_id), param=param)
    return obj


class ApiDict:
    """A plain API object that is not stored (list rows built on the fly)."""

    def __init__(self, **fields: Any) -> None:
        self.__dict__.update(fields)

    def _export(self, expand: Any = None) -> dict[str, Any]:
        return dict(self.__dict__)


def customer_referenced(customer_id: Any, *, param: str = "customer") -> Any:
    """The customer a request names as a parameter, or Stripe's answer when it has none
    (never had, or deleted): 400 `resource_missing` naming the parameter (a 404 is for
    the object a request's path names)."""
    from localstripe.resources import store

    obj = store.get(f"customer:{customer_id}") if isinstance(customer_id, str) else None
    if obj is None:
        raise stripe_error(
            400, f"No such customer: '{customer_id}'", code="resource_missing", param=param
        )
    return obj
