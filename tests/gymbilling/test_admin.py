"""Billing in the Django admin, as finance staff use it."""

from __future__ import annotations

import pytest
from django.contrib.admin import helpers
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gymbilling.market.money import money_account, money_post
from gymbilling.models import BillingCustomer, CreditPack, MoneyAccount, Plan, StripeEvent
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import changelist_column

pytestmark = pytest.mark.django_db


def _customer(**fields) -> BillingCustomer:
    organization = OrganizationFactory()
    return BillingCustomer.objects.create(
        organization=organization, stripe_customer_id=f"cus_{organization.slug}", **fields
    )


def staff_with(*codenames: str) -> Client:
    """A staff member signed in to the admin with these gymbilling permissions only."""
    user = UserFactory(is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(content_type__app_label="gymbilling", codename__in=codenames)
    )
    client = Client()
    client.force_login(user)
    return client


def run_action(client: Client, changelist: str, action: str, *pks: int):
    return client.post(changelist, {"action": action, helpers.ACTION_CHECKBOX_NAME: list(pks)})


def offered_actions(client: Client, changelist: str) -> set[str]:
    form = client.get(changelist).context["action_form"]  # None: no action at all
    return {name for name, _label in form.fields["action"].choices} if form else set()


def test_a_billing_customer_cannot_be_deleted_in_the_admin(admin_client):
    # given the customer later invoice.paid webhooks find their organization by
    customer = _customer()

    # when a superuser opens its delete page, and posts "delete selected" on the list
    page = admin_client.post(
        f"/admin/gymbilling/billingcustomer/{customer.pk}/delete/", {"post": "yes"}
    )
    listed = admin_client.post(
        "/admin/gymbilling/billingcustomer/",
        {"action": "delete_selected", helpers.ACTION_CHECKBOX_NAME: [customer.pk], "post": "yes"},
    )

    # then both are refused and the row is still there
    assert page.status_code == 403
    assert listed.status_code == 302  # back to the list: no such action
    assert BillingCustomer.objects.filter(pk=customer.pk).exists()


# --- actions need more than the view permission ----------------------------------------------


def test_staff_who_may_only_view_customers_cannot_unfreeze_resale():
    # given a customer frozen after a dispute, and staff who may only view customers
    frozen_at = timezone.now()
    customer = _customer(resale_frozen_at=frozen_at, resale_frozen_reason="dispute dp_1")
    viewer = staff_with("view_billingcustomer")
    changelist = "/admin/gymbilling/billingcustomer/"

    # when they post the unfreeze action
    run_action(viewer, changelist, "unfreeze_resale", customer.pk)

    # then the customer is still frozen, and the action is not offered to them
    customer.refresh_from_db()
    assert customer.resale_frozen_at == frozen_at
    assert customer.resale_frozen_reason == "dispute dp_1"
    assert "unfreeze_resale" not in offered_actions(viewer, changelist)
    editor = staff_with("view_billingcustomer", "change_billingcustomer")
    assert "unfreeze_resale" in offered_actions(editor, changelist)


def test_staff_who_may_only_view_stripe_events_cannot_replay_one():
    # given a failed event, and staff who may only view events
    event = StripeEvent.objects.create(
        stripe_event_id="evt_admin_replay",
        type="invoice.paid",
        stripe_created_at=timezone.now(),
        payload={},
        status="failed",
        attempts=3,
        last_error="Stripe unreachable",
    )
    viewer = staff_with("view_stripeevent")
    changelist = "/admin/gymbilling/stripeevent/"

    # when they post the replay action
    run_action(viewer, changelist, "replay", event.pk)

    # then the event was not processed again, and the action is offered only
    # to staff with the change permission (the event itself stays read-only)
    event.refresh_from_db()
    assert (event.status, event.attempts, event.processing_started_at) == ("failed", 3, None)
    assert "replay" not in offered_actions(viewer, changelist)
    editor = staff_with("view_stripeevent", "change_stripeevent")
    assert "replay" in offered_actions(editor, changelist)


# --- plans and packs: what a purchase relies on is checked when staff save it -----------------

PLAN_FORM = {
    "code": "admin-plan",
    "name": "Admin plan",
    "sort_order": 0,
    "currency": "usd",
    "monthly_price": 2000,
    "monthly_credits": 20_000_000,
    "rollover_percent": 0,
    "min_seats": 1,
    "max_seats": 1,
    "model_tiers": '["basic", "pro"]',
    "max_priority": "standard",
    "requests_per_minute": 60,
    "tokens_per_minute": 100_000,
    "concurrent_jobs": 4,
    "overage_price_per_1k": 0,
    "fair_use_ceiling": 0,
}
PACK_FORM = {
    "code": "admin-pack",
    "name": "Admin pack",
    "credits": 1_000_000,
    "price": 500,
    "currency": "usd",
    "validity_days": 365,
}


def field_errors(response) -> dict[str, list[str]]:
    assert response.status_code == 200, "the form was saved"
    return response.context["adminform"].form.errors


def test_staff_add_a_plan_and_a_pack_that_are_well_formed(admin_client):
    # when / then: both are saved as given
    assert admin_client.post("/admin/gymbilling/plan/add/", PLAN_FORM).status_code == 302
    assert admin_client.post("/admin/gymbilling/creditpack/add/", PACK_FORM).status_code == 302
    assert Plan.objects.get(code="admin-plan").model_tiers == ["basic", "pro"]
    assert CreditPack.objects.get(code="admin-pack").validity_days == 365


PLAN, PACK = (Plan, PLAN_FORM), (CreditPack, PACK_FORM)


@pytest.mark.parametrize(
    "kind, field, value",
    [
        (PLAN, "model_tiers", '"pro"'),
        (PLAN, "model_tiers", "3"),
        (PLAN, "model_tiers", '["basic", 2]'),
        (PLAN, "max_priority", "urgent"),
        (PLAN, "max_priority", "Priority"),
        (PLAN, "currency", "USD"),
        (PLAN, "currency", "us"),
        (PACK, "validity_days", 0),
        (PACK, "validity_days", 3651),
        (PACK, "validity_days", 3_000_000),
        (PACK, "currency", "Eur"),
    ],
)
def test_a_plan_or_pack_a_purchase_would_break_on_is_refused_with_the_field_named(
    admin_client, kind, field, value
):
    # when staff add a plan or a pack with the value
    model, form = kind
    add = f"/admin/gymbilling/{model._meta.model_name}/add/"
    response = admin_client.post(add, {**form, field: value})

    # then the form names the field, and nothing was saved
    assert list(field_errors(response)) == [field]
    assert not model.objects.filter(code=form["code"]).exists()


# --- the marketplace's money accounts -------------------------------------------------------


def _fee(seller, amount: int, key: str) -> None:
    """Money from buyer payments clearing to platform fees (system accounts only, so
    the sellers' proceeds still match their fills), through money_post."""
    money_post(
        kind="fee",
        key=key,
        currency="usd",
        organization=seller,
        postings=[
            (money_account(kind="buyer_clearing", currency="usd"), -amount),
            (money_account(kind="platform_fees", currency="usd"), amount),
        ],
    )


def test_the_money_account_list_shows_a_system_accounts_balance_as_the_sum_of_its_entries(
    admin_client,
):
    # given two postings between system accounts (no cached balance), and a
    # seller's account
    seller = OrganizationFactory()
    _fee(seller, 1200, "fee:admin-1")
    _fee(seller, 800, "fee:admin-2")
    pending = money_account(kind="seller_pending", currency="usd", organization=seller)
    clearing, fees = (
        MoneyAccount.objects.get(kind=kind, organization=None)
        for kind in ("buyer_clearing", "platform_fees")
    )
    assert clearing.balance == fees.balance == 0

    # when finance open the money account list
    page = admin_client.get("/admin/gymbilling/moneyaccount/").content.decode()

    # then each system account shows the sum of its entries and the seller's
    # account its cached balance, under a heading that says how each is made
    shown = changelist_column(page, "true_balance")
    assert [shown[str(a.pk)] for a in (clearing, fees, pending)] == ["-2000", "2000", "0"]
    assert "Balance (system: sum of entries)" in page


def test_the_money_account_list_takes_as_many_queries_for_many_sellers_as_for_one(
    admin_client,
):
    # given one seller's account, and the queries its list takes
    money_account(kind="seller_pending", currency="usd", organization=OrganizationFactory())
    with CaptureQueriesContext(connection) as one:
        assert admin_client.get("/admin/gymbilling/moneyaccount/").status_code == 200

    # when 30 more sellers have accounts
    for _ in range(30):
        money_account(kind="seller_pending", currency="usd", organization=OrganizationFactory())
    with CaptureQueriesContext(connection) as many:
        page = admin_client.get("/admin/gymbilling/moneyaccount/").content.decode()

    # then the list, naming each seller, takes the same queries
    assert len(changelist_column(page, "organization")) == 31
    assert len(many.captured_queries) == len(one.captured_queries)
