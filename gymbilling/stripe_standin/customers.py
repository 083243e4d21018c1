"""Deleting a customer as Stripe does (localstripe only drops it from its store).

- `DELETE /v1/customers/{id}` cancels the customer's subscriptions that have not
  ended, at once (`customer.subscription.deleted` each), then deletes it
  (`customer.deleted`), answering `{"id", "object": "customer", "deleted": true}`.
- `GET /v1/customers/{id}` of a deleted customer answers that same object, a 200,
  as Stripe does; one never made is a 404 `resource_missing`.
- A request naming it as a parameter (a Checkout Session's or a portal session's
  `customer`) is refused 400 `resource_missing` (`common.customer_referenced`).
"""

from __future__ import annotations

from typing import Any

from localstripe.resources import Customer, DeletedObject, store

from gymbilling.stripe_standin.common import api, objects_of
from gymbilling.stripe_standin.subscriptions import ENDED, subscription_cancel

# Where a deleted customer's id is kept (the store: it survives a restart, and a data
# reset clears it), so that retrieving it answers `deleted: true`.
_DELETED = "standin_deleted_customer:"


def _customer_get(*, id: str, **_ignored: Any):
    if store.get(_DELETED + id):
        return DeletedObject(id, "customer")
    return Customer._api_retrieve(id)


def _customer_delete(*, id: str, **_ignored: Any):
    Customer._api_retrieve(id)  # 404 when there is none
    for subscription in objects_of("subscription"):
        if subscription.customer == id and subscription.status not in ENDED:
            subscription_cancel(subscription)
    deleted = Customer._api_delete(id)
    store[_DELETED + id] = True
    return deleted


routes = [
    ("GET", "/v1/customers/{id}", api(_customer_get)),
    ("DELETE", "/v1/customers/{id}", api(_customer_delete)),
]
