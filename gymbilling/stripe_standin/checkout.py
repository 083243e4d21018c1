"""Checkout Sessions and the local page that pays them.

`url` points at this server (`/checkout/<id>`): a form with a card number.
Submitting it (or `POST /checkout/<id>/pay` with `card=...` from a script) does what
Stripe Checkout does: creates the customer if needed, attaches the card as the
customer's default, then starts the subscription (mode=subscription) or takes the
payment (mode=payment), completes the session and redirects to `success_url`.
A declined card leaves the session open and shows the error.

Scripts that want JSON instead of a redirect send `Accept: application/json`.

A session is open until its `expires_at` (24 hours unless the request says otherwise,
between 30 minutes and 24 hours ahead, as at Stripe). Stripe expires it then on its
own; here it is expired when it is next read, listed or paid, with the same
`checkout.session.expired` event. `/_config/checkout/sessions/<id>/age` makes a
session older, so tests reach its expiry without waiting.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from localstripe.errors import UserError
from localstripe.resources import Customer, StripeObject

from gymbilling.stripe_standin.common import (
    ApiDict,
    api,
    customer_referenced,
    json_response,
    list_of,
    merge_metadata,
    newest_first,
    now,
    objects_of,
    read_params,
    round_minor,
    stored,
    stripe_error,
    to_int,
)
from gymbilling.stripe_standin.pages import card_form, e, money, page
from gymbilling.stripe_standin.payments import card_create, customer_card_replace, payment_collect
from gymbilling.stripe_standin.prices import Price, price_create, price_retrieve
from gymbilling.stripe_standin.subscriptions import (
    customer_currency_refuse,
    prices_currency_refuse,
    subscription_start,
)
from gymbilling.stripe_standin.webhooks import emit

SESSION_LIFETIME_S = 24 * 3600
SESSION_LIFETIME_MIN_S = 30 * 60


class CheckoutSession(StripeObject):
    object = "checkout.session"
    _id_prefix = "cs_test_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)


def _line_items(line_items: Any, mode: str) -> list[dict[str, Any]]:
    if not line_items:
        raise stripe_error(
            400, "Missing required param: line_items.", code="parameter_missing", param="line_items"
        )
    if isinstance(line_items, dict):
        line_items = [line_items]
    parsed = []
    for index, raw in enumerate(line_items):
        if raw.get("price"):
            price = price_retrieve(raw["price"])
        elif raw.get("price_data"):
            price = price_create(**raw["price_data"])
        else:
            raise stripe_error(
                400,
                "Each line item needs a price or price_data.",
                code="parameter_missing",
                param=f"line_items[{index}][price]",
            )
        if (mode == "subscription") != bool(price.recurring):
            # Stripe allows one-time prices in a subscription's first invoice; not emulated.
            need = "recurring" if mode == "subscription" else "one-time"
            raise stripe_error(
                400,
                f"mode={mode} needs {need} prices here; {price.id} is not.",
                param=f"line_items[{index}][price]",
            )
        quantity = to_int(raw.get("quantity", 1), f"line_items[{index}][quantity]", minimum=1)
        parsed.append({"price": price.id, "quantity": quantity})
    return parsed


def _amount_of(line_items: list[dict[str, Any]]) -> int:
    return sum(
        round_minor(price_retrieve(li["price"])._unit_amount_exact * li["quantity"])
        for li in line_items
    )


def _expires_at(expires_at: Any) -> int:
    """Stripe's bounds: at least 30 minutes and at most 24 hours from the session's creation."""
    created = now()
    if not expires_at:
        return created + SESSION_LIFETIME_S
    when = to_int(expires_at, "expires_at")
    if when < created + SESSION_LIFETIME_MIN_S:
        raise stripe_error(
            400,
            "The `expires_at` timestamp must be at least 30 minutes from Checkout Session creation.",
            param="expires_at",
        )
    if when > created + SESSION_LIFETIME_S:
        raise stripe_error(
            400,
            "The `expires_at` timestamp must be less than 24 hours from Checkout Session creation.",
            param="expires_at",
        )
    return when


def checkout_session_create(
    request_base: str,
    *,
    mode: str = "payment",
    customer: str | None = None,
    customer_email: str | None = None,
    line_items: Any = None,
    success_url: str | None = None,
    cancel_url: str | None = None,
    client_reference_id: str | None = None,
    metadata: Any = None,
    subscription_data: Any = None,
    payment_intent_data: Any = None,
    expires_at: Any = None,
    **_ignored: Any,
) -> CheckoutSession:
    if mode not in ("payment", "subscription"):
        raise stripe_error(
            400, "mode must be payment or subscription (setup is not emulated).", param="mode"
        )
    if customer:
        customer_referenced(customer)
    items = _line_items(line_items, mode)
    first_price: Price = price_retrieve(items[0]["price"])
    if mode == "subscription":
        # Refused now, as Stripe does, not when the customer pays (subscription_start
        # checks again then: a subscription in another currency started meanwhile).
        prices_currency_refuse([price_retrieve(li["price"]) for li in items], param="line_items")
        if customer:
            customer_currency_refuse(customer, first_price.currency)
    amount = _amount_of(items)
    session = CheckoutSession(
        mode=mode,
        status="open",
        payment_status="unpaid",
        customer=customer,
        customer_email=customer_email,
        customer_details=None,
        client_reference_id=client_reference_id,
        metadata=merge_metadata({}, metadata),
        success_url=success_url,
        cancel_url=cancel_url,
        currency=first_price.currency,
        amount_subtotal=amount,
        amount_total=amount,
        expires_at=_expires_at(expires_at),
        subscription=None,
        payment_intent=None,
        invoice=None,
        url=None,
        _line_items=items,
        _subscription_data=dict(subscription_data or {}),
        _payment_intent_data=dict(payment_intent_data or {}),
        _last_error=None,
    )
    session.url = f"{request_base}/checkout/{session.id}"
    return session


def _customer_for(session: CheckoutSession) -> Customer:
    if session.customer:
        return Customer._api_retrieve(session.customer)
    return Customer(email=session.customer_email)


def checkout_session_pay(session: CheckoutSession, card: str) -> CheckoutSession:
    """Pay an open session with a test card number. Raises a 402 UserError if declined."""
    if session.status != "open":
        raise stripe_error(400, f"This Checkout Session is {session.status}.", param="session")
    # Checked before the customer exists, so a declined card leaves nothing behind.
    method = card_create(card)
    if method._attaching_is_declined():
        raise stripe_error(
            402, "Your card was declined.", code="card_declined", decline_code="generic_decline"
        )
    customer = _customer_for(session)
    customer_card_replace(customer=customer, method=method)
    session.customer = customer.id
    session.customer_details = {"email": customer.email, "name": customer.name}
    if session.mode == "subscription":
        data = session._subscription_data
        subscription = subscription_start(
            customer_id=customer.id,
            items=session._line_items,
            metadata=data.get("metadata"),
            payment_method_id=method.id,
            off_session=False,
        )
        session.subscription = subscription.id
        session.invoice = subscription.latest_invoice
    else:
        data = session._payment_intent_data
        intent = payment_collect(
            customer_id=customer.id,
            amount=session.amount_total,
            currency=session.currency,
            payment_method_id=method.id,
            off_session=False,
            metadata=merge_metadata({}, data.get("metadata")),
            transfer_group=data.get("transfer_group"),
            description=data.get("description"),
        )
        session.payment_intent = intent.id
    session.status = "complete"
    session.payment_status = "paid"
    session.url = None
    emit("checkout.session.completed", session)
    return session


def _expire_if_due(session: CheckoutSession) -> CheckoutSession:
    """An open session past its `expires_at` is expired, as Stripe does on its own then."""
    if session.status == "open" and now() >= session.expires_at:
        _close_expired(session)
    return session


def checkout_session_age(session: CheckoutSession, seconds: int) -> CheckoutSession:
    """The session as if created `seconds` earlier (its expiry as much earlier)."""
    session.created -= seconds
    session.expires_at -= seconds
    return _expire_if_due(session)


def checkout_session_expire(session: CheckoutSession) -> CheckoutSession:
    if session.status != "open":
        raise stripe_error(
            400,
            f"Only an open Checkout Session can be expired; this one is {session.status}.",
            param="session",
        )
    return _close_expired(session)


def _close_expired(session: CheckoutSession) -> CheckoutSession:
    session.status = "expired"
    session.url = None
    emit("checkout.session.expired", session)
    return session


def session_retrieve(session_id: str) -> CheckoutSession:
    return _expire_if_due(stored("checkout.session", session_id, param="session"))


# --- API handlers -------------------------------------------------------------------


async def _create(request: web.Request) -> web.Response:
    params = await read_params(request)
    params.pop("expand", None)
    base = f"{request.scheme}://{request.host}"
    return json_response(checkout_session_create(base, **params)._export())


def _get(*, id: str, **_ignored: Any) -> CheckoutSession:
    return session_retrieve(id)


def _expire(*, id: str, **_ignored: Any) -> CheckoutSession:
    return checkout_session_expire(session_retrieve(id))


def _list(
    *,
    customer: str | None = None,
    payment_intent: str | None = None,
    subscription: str | None = None,
    status: str | None = None,
    limit: Any = None,
    starting_after: Any = None,
    **_ignored: Any,
):
    sessions = [_expire_if_due(s) for s in newest_first(objects_of("checkout.session"))]
    for field, value in (
        ("customer", customer),
        ("payment_intent", payment_intent),
        ("subscription", subscription),
        ("status", status),
    ):
        if value:
            sessions = [s for s in sessions if getattr(s, field) == value]
    return list_of("/v1/checkout/sessions", sessions, limit=limit, starting_after=starting_after)


def _line_items_list(*, id: str, **_ignored: Any):
    session = session_retrieve(id)
    rows = []
    for index, li in enumerate(session._line_items):
        price = price_retrieve(li["price"])
        amount = round_minor(price._unit_amount_exact * li["quantity"])
        rows.append(
            ApiDict(
                id=f"li_{session.id[-10:]}{index}",
                object="item",
                price=price._export(),
                quantity=li["quantity"],
                currency=price.currency,
                amount_subtotal=amount,
                amount_total=amount,
                description=price.nickname or price.product,
            )
        )
    return list_of(f"/v1/checkout/sessions/{id}/line_items", rows, limit=100)


# --- the payment page ------------------------------------------------------------------


def _wants_json(request: web.Request) -> bool:
    return "application/json" in request.headers.get("Accept", "")


def _success_url(session: CheckoutSession) -> str:
    return (session.success_url or "/").replace("{CHECKOUT_SESSION_ID}", session.id)


def _render(
    session: CheckoutSession, *, error: str | None = None, status: int = 200
) -> web.Response:
    rows = "".join(
        f"<tr><td>{e(li['quantity'])} x {e(price_retrieve(li['price']).nickname or li['price'])}</td></tr>"
        for li in session._line_items
    )
    if session.status != "open":
        body = f"<p>This session is <b>{e(session.status)}</b>.</p>"
    else:
        cancel = (
            f"<p><a href='{e(session.cancel_url)}'>Cancel</a></p>" if session.cancel_url else ""
        )
        what = "Subscribe" if session.mode == "subscription" else "Pay"
        body = (
            f"<table>{rows}</table><p>Total: <b>{e(money(session.amount_total, session.currency))}</b></p>"
            + card_form(
                f"/checkout/{session.id}/pay",
                button=f"{what} {money(session.amount_total, session.currency)}",
                error=error,
            )
            + cancel
        )
    return page("Checkout", body, status=status)


async def checkout_page(request: web.Request) -> web.Response:
    return _render(session_retrieve(request.match_info["id"]))


async def checkout_page_pay(request: web.Request) -> web.StreamResponse:
    session = session_retrieve(request.match_info["id"])
    params = await read_params(request)
    try:
        checkout_session_pay(session, str(params.get("card", "")))
    except UserError as error:
        # The session stays open: the customer may try another card.
        if _wants_json(request):
            raise
        return _render(session, error=error.body["error"].get("message"), status=error.code)
    if _wants_json(request):
        return json_response(session._export())
    raise web.HTTPSeeOther(_success_url(session))


routes = [
    ("POST", "/v1/checkout/sessions", _create),
    ("GET", "/v1/checkout/sessions", api(_list)),
    ("GET", "/v1/checkout/sessions/{id}", api(_get)),
    ("POST", "/v1/checkout/sessions/{id}/expire", api(_expire)),
    ("GET", "/v1/checkout/sessions/{id}/line_items", api(_line_items_list)),
    ("GET", "/checkout/{id}", checkout_page),
    ("POST", "/checkout/{id}/pay", checkout_page_pay),
]
