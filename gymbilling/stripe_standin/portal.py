"""Billing portal sessions and the local page they point at.

The page lists the customer's subscriptions with a "cancel at period end" button
and a card form; both do what the API does (`cancel_at_period_end=true`, a new
default card), so webhooks follow as from the real portal.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from localstripe.errors import UserError
from localstripe.resources import Customer, StripeObject

from gymbilling.stripe_standin.common import (
    customer_referenced,
    json_response,
    objects_of,
    read_params,
    stored,
    stripe_error,
)
from gymbilling.stripe_standin.pages import card_form, e, money, page
from gymbilling.stripe_standin.payments import card_create, customer_card_replace
from gymbilling.stripe_standin.subscriptions import ENDED, subscription_update


class PortalSession(StripeObject):
    object = "billing_portal.session"
    _id_prefix = "bps_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)


async def _create(request: web.Request) -> web.Response:
    params = await read_params(request)
    customer = params.get("customer")
    if not customer:
        raise stripe_error(
            400, "Missing required param: customer.", code="parameter_missing", param="customer"
        )
    customer_referenced(customer)
    session = PortalSession(
        customer=customer,
        return_url=params.get("return_url"),
        configuration=None,
        locale=None,
        url=None,
    )
    session.url = f"{request.scheme}://{request.host}/billing_portal/{session.id}"
    return json_response(session._export())


def _subscription_rows(customer_id: str, session_id: str) -> str:
    rows = []
    for sub in objects_of("subscription"):
        if sub.customer != customer_id or sub.status in ENDED:
            continue
        items = ", ".join(
            f"{i.quantity} x {i.price.nickname or i.price.id} ({money(i.price.unit_amount or 0, i.price.currency)})"
            for i in sub.items._list
        )
        if sub.cancel_at_period_end:
            action = "Cancels at period end"
        else:
            action = (
                f"<form method='post' action='/billing_portal/{e(session_id)}/cancel'>"
                f"<input type='hidden' name='subscription' value='{e(sub.id)}'>"
                "<button type='submit'>Cancel at period end</button></form>"
            )
        rows.append(
            f"<tr><td>{e(sub.id)}</td><td>{e(items)}</td><td>{e(sub.status)}</td><td>{action}</td></tr>"
        )
    return "".join(rows) or "<tr><td colspan='4'>No subscriptions.</td></tr>"


def _render(session: PortalSession, *, error: str | None = None, status: int = 200) -> web.Response:
    back = f"<p><a href='{e(session.return_url)}'>Return</a></p>" if session.return_url else ""
    body = (
        f"<h2>Subscriptions</h2><table><tr><th>Id</th><th>Items</th><th>Status</th><th></th></tr>"
        f"{_subscription_rows(session.customer, session.id)}</table>"
        f"<h2>Payment method</h2>{card_form(f'/billing_portal/{session.id}/card', button='Update card', error=error)}{back}"
    )
    return page("Billing portal", body, status=status)


async def portal_page(request: web.Request) -> web.Response:
    return _render(stored("billing_portal.session", request.match_info["id"]))


async def portal_cancel(request: web.Request) -> web.Response:
    session = stored("billing_portal.session", request.match_info["id"])
    params = await read_params(request)
    subscription = stored("subscription", params.get("subscription"))
    if subscription.customer != session.customer:
        raise stripe_error(404, "No such subscription for this customer.", code="resource_missing")
    subscription_update(id=subscription.id, cancel_at_period_end="true")
    raise web.HTTPSeeOther(f"/billing_portal/{session.id}")


async def portal_card(request: web.Request) -> web.Response:
    session = stored("billing_portal.session", request.match_info["id"])
    params = await read_params(request)
    try:
        customer_card_replace(
            customer=Customer._api_retrieve(session.customer),
            method=card_create(str(params.get("card", ""))),
        )
    except UserError as error:
        return _render(session, error=error.body["error"].get("message"), status=error.code)
    raise web.HTTPSeeOther(f"/billing_portal/{session.id}")


routes = [
    ("POST", "/v1/billing_portal/sessions", _create),
    ("GET", "/billing_portal/{id}", portal_page),
    ("POST", "/billing_portal/{id}/cancel", portal_cancel),
    ("POST", "/billing_portal/{id}/card", portal_card),
]
