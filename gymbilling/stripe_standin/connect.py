"""Connect for the marketplace: Express accounts, onboarding links, transfers,
reversals; plus customer balance transactions.

Accounts are created ready (`charges_enabled` and `payouts_enabled` true, the
`transfers` capability active); the onboarding page only links back; a test
turns a capability off with `/_config/accounts/<id>/capabilities`. Transfers
move no balance and check nothing but the destination: it exists, and can
receive transfers (else Stripe's 400 `insufficient_capabilities_for_transfer`). Customer balance transactions change
`customer.balance` (negative = credit), which the next invoice finalized uses (invoices.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web
from localstripe.resources import Customer, StripeObject

from gymbilling.stripe_standin.common import (
    api,
    json_response,
    list_of,
    merge_metadata,
    newest_first,
    now,
    objects_of,
    read_params,
    stored,
    stripe_error,
    to_int,
)
from gymbilling.stripe_standin.pages import e, page
from gymbilling.stripe_standin.webhooks import emit


class Account(StripeObject):
    object = "account"
    _id_prefix = "acct_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)


class Transfer(StripeObject):
    object = "transfer"
    _id_prefix = "tr_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)
        self.reversals = list_of(f"/v1/transfers/{self.id}/reversals", [], limit=100)

    @property
    def reversed(self) -> bool:
        return self.amount_reversed >= self.amount


class TransferReversal(StripeObject):
    object = "transfer_reversal"
    _id_prefix = "trr_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)


class CustomerBalanceTransaction(StripeObject):
    object = "customer_balance_transaction"
    _id_prefix = "cbtxn_"

    def __init__(self, **fields: Any) -> None:
        super().__init__()
        self.__dict__.update(fields)


def account_create(
    *,
    type: str = "express",
    email: str | None = None,
    country: str = "US",
    metadata: Any = None,
    **_ignored: Any,
) -> Account:
    account = Account(
        type=type,
        email=email,
        country=country,
        default_currency="usd",
        metadata=merge_metadata({}, metadata),
        charges_enabled=True,
        payouts_enabled=True,
        details_submitted=True,
        capabilities={"transfers": "active", "card_payments": "active"},
        requirements={
            "currently_due": [],
            "eventually_due": [],
            "past_due": [],
            "disabled_reason": None,
        },
    )
    emit("account.updated", account)
    return account


def _account_update(
    *, id: str, metadata: Any = None, email: str | None = None, **_ignored: Any
) -> Account:
    account = stored("account", id, param="account")
    account.metadata = merge_metadata(account.metadata, metadata)
    if email:
        account.email = email
    emit("account.updated", account)
    return account


def account_capabilities_set(*, id: str, **capabilities: Any) -> Account:
    """A capability turned on or off ("active" / "inactive"), as Stripe's review does."""
    account = stored("account", id, param="account")
    for name, status in capabilities.items():
        if status not in ("active", "inactive", "pending"):
            raise stripe_error(400, f"Unknown capability status: {status!r}", param=name)
        account.capabilities = {**account.capabilities, name: status}
    emit("account.updated", account)
    return account


def _account_get(*, id: str, **_ignored: Any) -> Account:
    return stored("account", id, param="account")


def _account_list(*, limit: Any = None, starting_after: Any = None, **_ignored: Any):
    return list_of(
        "/v1/accounts",
        newest_first(objects_of("account")),
        limit=limit,
        starting_after=starting_after,
    )


async def _account_link_create(request: web.Request) -> web.Response:
    params = await read_params(request)
    account = stored("account", params.get("account"), param="account")
    url = request.url.with_path(f"/connect/onboarding/{account.id}").with_query(
        {
            "return_url": params.get("return_url") or "",
            "refresh_url": params.get("refresh_url") or "",
        }
    )
    return json_response(
        {"object": "account_link", "url": str(url), "created": now(), "expires_at": now() + 300}
    )


async def onboarding_page(request: web.Request) -> web.Response:
    account = stored("account", request.match_info["id"], param="account")
    back = request.query.get("return_url")
    link = f"<p><a href='{e(back)}'>Done: return to the marketplace</a></p>" if back else ""
    return page(
        "Connect onboarding",
        f"<p>Account <b>{e(account.id)}</b> ({e(account.email or '')}) is ready: charges and payouts enabled.</p>{link}",
    )


def transfer_create(
    *,
    amount: Any = None,
    currency: str | None = None,
    destination: str | None = None,
    transfer_group: str | None = None,
    metadata: Any = None,
    description: str | None = None,
    source_transaction: str | None = None,
    **_ignored: Any,
) -> Transfer:
    if not currency:
        raise stripe_error(
            400, "Missing required param: currency.", code="parameter_missing", param="currency"
        )
    amount_int = to_int(amount, "amount", minimum=1)
    account = stored("account", destination, param="destination")
    if account.capabilities.get("transfers") != "active":
        raise stripe_error(
            400,
            f"Your destination account ({account.id}) needs to have the transfers capability enabled.",
            code="insufficient_capabilities_for_transfer",
            param="destination",
        )
    transfer = Transfer(
        amount=amount_int,
        amount_reversed=0,
        currency=currency.lower(),
        destination=destination,
        transfer_group=transfer_group,
        metadata=merge_metadata({}, metadata),
        description=description,
        source_transaction=source_transaction,
        balance_transaction=None,
        destination_payment=None,
    )
    emit("transfer.created", transfer)
    return transfer


def transfer_reverse(
    *, id: str, amount: Any = None, metadata: Any = None, **_ignored: Any
) -> TransferReversal:
    transfer = stored("transfer", id, param="id")
    left = transfer.amount - transfer.amount_reversed
    amount_int = left if amount is None else to_int(amount, "amount", minimum=1)
    if amount_int > left:
        raise stripe_error(
            400,
            f"Reversal amount ({amount_int}) exceeds what is left on the transfer ({left}).",
            param="amount",
        )
    reversal = TransferReversal(
        amount=amount_int,
        currency=transfer.currency,
        transfer=transfer.id,
        metadata=merge_metadata({}, metadata),
    )
    transfer.amount_reversed += amount_int
    transfer.reversals._list.append(reversal)
    emit("transfer.reversed", transfer)
    return reversal


def _transfer_get(*, id: str, **_ignored: Any) -> Transfer:
    return stored("transfer", id)


_CREATED_BOUNDS = {
    "gt": lambda at, bound: at > bound,
    "gte": lambda at, bound: at >= bound,
    "lt": lambda at, bound: at < bound,
    "lte": lambda at, bound: at <= bound,
}


def _created_within(created: Any) -> Callable[[Any], bool]:
    """Stripe's `created` filter of a list: a Unix time, or a hash of gt/gte/lt/lte."""
    if created in (None, ""):
        return lambda obj: True
    if not isinstance(created, dict):
        at = to_int(created, "created")
        return lambda obj: obj.created == at
    bounds = []
    for name, value in created.items():
        if name not in _CREATED_BOUNDS:
            raise stripe_error(
                400, f"Received unknown parameter: created[{name}]", param=f"created[{name}]"
            )
        bounds.append((_CREATED_BOUNDS[name], to_int(value, f"created[{name}]")))
    return lambda obj: all(test(obj.created, bound) for test, bound in bounds)


def _transfer_list(
    *,
    created: Any = None,
    destination: str | None = None,
    transfer_group: str | None = None,
    limit: Any = None,
    starting_after: Any = None,
    **_ignored: Any,
):
    """Stripe's filters of `GET /v1/transfers`: `created`, `destination`, `transfer_group`
    (exact matches; not metadata), newest first."""
    within = _created_within(created)
    transfers = [t for t in newest_first(objects_of("transfer")) if within(t)]
    if destination:
        transfers = [t for t in transfers if t.destination == destination]
    if transfer_group:
        transfers = [t for t in transfers if t.transfer_group == transfer_group]
    return list_of("/v1/transfers", transfers, limit=limit, starting_after=starting_after)


def _reversal_list(*, id: str, **_ignored: Any):
    return stored("transfer", id).reversals


def balance_transaction_create(
    *,
    id: str,
    amount: Any = None,
    currency: str | None = None,
    description: str | None = None,
    metadata: Any = None,
    **_ignored: Any,
) -> CustomerBalanceTransaction:
    customer = Customer._api_retrieve(id)
    amount_int = to_int(amount, "amount")
    if not currency:
        raise stripe_error(
            400, "Missing required param: currency.", code="parameter_missing", param="currency"
        )
    # localstripe's Customer has no `balance`; it is added here (negative = credit).
    customer.balance = getattr(customer, "balance", 0) + amount_int
    transaction = CustomerBalanceTransaction(
        amount=amount_int,
        currency=currency.lower(),
        customer=customer.id,
        description=description,
        metadata=merge_metadata({}, metadata),
        ending_balance=customer.balance,
        type="adjustment",
        invoice=None,
        credit_note=None,
    )
    emit("customer.updated", customer)
    return transaction


def _balance_transaction_list(
    *, id: str, limit: Any = None, starting_after: Any = None, **_ignored: Any
):
    Customer._api_retrieve(id)
    rows = [t for t in newest_first(objects_of("customer_balance_transaction")) if t.customer == id]
    return list_of(
        f"/v1/customers/{id}/balance_transactions", rows, limit=limit, starting_after=starting_after
    )


routes = [
    ("POST", "/v1/accounts", api(account_create)),
    ("GET", "/v1/accounts", api(_account_list)),
    ("GET", "/v1/accounts/{id}", api(_account_get)),
    ("POST", "/v1/accounts/{id}", api(_account_update)),
    ("POST", "/v1/account_links", _account_link_create),
    ("GET", "/connect/onboarding/{id}", onboarding_page),
    ("POST", "/v1/transfers", api(transfer_create)),
    ("GET", "/v1/transfers", api(_transfer_list)),
    ("GET", "/v1/transfers/{id}", api(_transfer_get)),
    ("POST", "/v1/transfers/{id}/reversals", api(transfer_reverse)),
    ("GET", "/v1/transfers/{id}/reversals", api(_reversal_list)),
    ("POST", "/v1/customers/{id}/balance_transactions", api(balance_transaction_create)),
    ("GET", "/v1/customers/{id}/balance_transactions", api(_balance_transaction_list)),
]
