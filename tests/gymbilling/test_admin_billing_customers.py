"""Billing customers in the Django admin: what finance's saves and "Allow reselling again"
leave of a resale freeze that refunds and disputes set meanwhile."""

from __future__ import annotations

import pytest
from django.contrib.admin import helpers
from django.contrib.auth.models import Permission
from django.test import Client

from accounts.models import AuditEvent, User
from gymbilling.models import BillingCustomer
from gymbilling.services import resale_freeze
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import drawn_form

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/gymbilling/billingcustomer/"
UNFREEZE = "unfreeze_resale"


def _customer(**fields) -> BillingCustomer:
    organization = OrganizationFactory()
    return BillingCustomer.objects.create(
        organization=organization, stripe_customer_id=f"cus_{organization.slug}", **fields
    )


def finance() -> tuple[Client, User]:
    """Staff who may view and change billing customers, signed in to the admin."""
    user = UserFactory(is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="gymbilling",
            codename__in=["view_billingcustomer", "change_billingcustomer"],
        )
    )
    client = Client()
    client.force_login(user)
    return client, user


def frozen(customer: BillingCustomer) -> tuple:
    customer.refresh_from_db()
    return customer.resale_frozen_at, customer.resale_frozen_reason


def shown(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def unfreeze_page(client: Client, *customers: BillingCustomer):
    """The action's first step: the page showing the selected freezes, asking for a note."""
    return client.post(
        CHANGELIST,
        {"action": UNFREEZE, helpers.ACTION_CHECKBOX_NAME: [c.pk for c in customers]},
    )


def page_sent(client: Client, page, note: str):
    """The action's page sent back as drawn, with `note`; the list it comes back to."""
    fields = drawn_form(page.content.decode(), "unfreeze-form")
    ticked = [v for k, v in fields.items() if k == helpers.ACTION_CHECKBOX_NAME]
    assert ticked, "the page carries the customers it shows"
    return client.post(
        CHANGELIST, {**fields, "note": note, "_unfreeze": "Allow reselling again"}, follow=True
    )


def test_saving_a_customer_from_a_page_drawn_before_a_dispute_keeps_the_freeze():
    # given a seller's page finance opened while it was not frozen
    customer = _customer(email="old@example.test")
    client, _user = finance()
    url = f"{CHANGELIST}{customer.pk}/change/"
    fields = drawn_form(client.get(url).content.decode(), "billingcustomer_form")
    # and a dispute froze the seller meanwhile
    resale_freeze(organization=customer.organization, reason="dispute of ch_2")
    freeze = frozen(customer)
    assert freeze[0] is not None

    # when finance save that page with a new address, and with the freeze's fields sent
    # empty, as a form showing them would send them
    saved = client.post(
        url,
        {
            **fields,
            "email": "billing@example.test",
            "resale_frozen_at_0": "",
            "resale_frozen_at_1": "",
            "resale_frozen_reason": "",
        },
    )

    # then the address is saved and the seller is still frozen, for the dispute
    assert saved.status_code == 302, saved.content[:2000]
    customer.refresh_from_db()
    assert customer.email == "billing@example.test"
    assert frozen(customer) == freeze == (freeze[0], "dispute of ch_2")


def test_finance_allow_reselling_again_and_the_audit_log_records_who_and_why():
    # given a customer frozen by a refund
    customer = _customer()
    resale_freeze(organization=customer.organization, reason="refund of ch_1")
    frozen_at, _reason = frozen(customer)
    client, user = finance()

    # when finance choose "Allow reselling again", read the page, and send it with a note
    page = unfreeze_page(client, customer)
    assert page.status_code == 200
    assert "refund of ch_1" in page.content.decode()
    done = page_sent(client, page, "  Refund was our error; ticket 7 ")

    # then the customer may resell again, and its organization's audit log says who,
    # which freeze and why
    assert shown(done) == [f"customer {customer.pk}: reselling allowed again"]
    assert frozen(customer) == (None, "")
    [event] = AuditEvent.objects.filter(
        organization=customer.organization, action="billing.resale_unfrozen"
    )
    assert (event.actor_user, event.target) == (user, customer.stripe_customer_id)
    assert event.data == {
        "frozen_at": frozen_at.isoformat(),
        "reason": "refund of ch_1",
        "note": "Refund was our error; ticket 7",
    }


def test_a_dispute_after_finance_drew_the_unfreeze_page_keeps_the_customer_frozen():
    # given finance's page lifting a freeze for a refund of ch_1
    customer = _customer()
    resale_freeze(organization=customer.organization, reason="refund of ch_1")
    client, _user = finance()
    page = unfreeze_page(client, customer)
    assert page.status_code == 200
    # and a dispute of another charge froze the customer again before they sent it
    resale_freeze(organization=customer.organization, reason="dispute of ch_2")

    # when finance send the page they read
    done = page_sent(client, page, "refund of ch_1 was our error")

    # then nothing is lifted: the freeze names both causes, finance are told it changed,
    # and nothing is recorded as lifted
    frozen_at, reason = frozen(customer)
    assert frozen_at is not None and reason == "refund of ch_1; dispute of ch_2"
    [message] = shown(done)
    assert message.startswith(f"customer {customer.pk}: not lifted:")
    assert "(resale_freeze_changed)" in message
    assert not AuditEvent.objects.filter(action="billing.resale_unfrozen").exists()


def test_an_unfreeze_without_a_note_lifts_nothing():
    # given a frozen customer and finance's page for it
    customer = _customer()
    resale_freeze(organization=customer.organization, reason="refund of ch_1")
    freeze = frozen(customer)
    client, _user = finance()
    page = unfreeze_page(client, customer)

    # when finance send it with no note
    again = page_sent(client, page, "")

    # then the page is drawn again asking for one, and the customer stays frozen
    assert again.context["form"].errors["note"]
    assert frozen(customer) == freeze


def test_changing_a_sellers_connect_account_is_in_the_audit_log():
    # given a seller paid to one Connect account
    customer = _customer(stripe_connect_account_id="acct_old")
    client, user = finance()
    url = f"{CHANGELIST}{customer.pk}/change/"
    fields = drawn_form(client.get(url).content.decode(), "billingcustomer_form")

    # when finance save its page with another account, then save it again unchanged
    first = client.post(url, {**fields, "stripe_connect_account_id": "acct_new"})
    fields = drawn_form(client.get(url).content.decode(), "billingcustomer_form")
    second = client.post(url, fields)

    # then payouts go to the new account, and the audit log records the change once,
    # with who made it and the account it replaced
    assert (first.status_code, second.status_code) == (302, 302)
    customer.refresh_from_db()
    assert customer.stripe_connect_account_id == "acct_new"
    [event] = AuditEvent.objects.filter(
        organization=customer.organization, action="billing.connect_account_changed"
    )
    assert (event.actor_user, event.target) == (user, customer.stripe_customer_id)
    assert event.data == {"from": "acct_old", "to": "acct_new"}
