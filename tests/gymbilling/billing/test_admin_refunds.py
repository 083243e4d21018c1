"""Finance refund a payment from the admin: at Stripe (the stand-in, over HTTP), and the
credits it bought are taken back at once, before any webhook arrives; where that fails
here once Stripe refunded, the refund's webhook takes them back, once."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime

import pytest
from django.contrib import messages
from django.contrib.auth.models import Permission
from django.db import connection, transaction
from django.test import Client

from accounts.models import AuditEvent
from gymbilling import stripe_client
from gymbilling.locks import transaction_lock
from gymbilling.models import CheckoutSession, PaymentReversal, StripeEvent
from gymbilling.services import stripe_event_process
from metering.models import MICRO
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place
from tests.factories import UserFactory
from tests.helpers import ledger_rows, on_own_connection

pytestmark = pytest.mark.django_db


@pytest.fixture
def bought_pack(customer, catalog, stripe_standin, deliver) -> CheckoutSession:
    """A 1,000-credit pack ($12.00) bought through Checkout, 300 credits of it spent."""
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    deliver()
    hold_place(organization=org, amount=300 * MICRO, key="job-1")
    hold_capture(key="job-1", amount=300 * MICRO)
    return CheckoutSession.objects.get(organization=org)


def _key() -> str:
    """A form's key, as the page draws it: unique (the stand-in outlives this test)."""
    return uuid.uuid4().hex


def _refund_url(checkout: CheckoutSession) -> str:
    return f"/admin/gymbilling/checkoutsession/{checkout.pk}/refund/"


def _refunded_at_stripe(checkout: CheckoutSession) -> int:
    """What Stripe (the stand-in) has refunded of the checkout's payment, in cents."""
    return stripe_client.payment_intent_charge(checkout.stripe_payment_intent_id)["amount_refunded"]


def test_finance_refund_a_pack_and_its_unspent_credits_come_back_at_once(
    admin_client, admin_user, bought_pack
):
    # when finance refund the whole payment from the checkout's page, and the form is
    # sent a second time
    org = bought_pack.organization
    page = admin_client.get(f"/admin/gymbilling/checkoutsession/{bought_pack.pk}/change/")
    form = {"note": "Customer asked within 14 days", "key": _key()}  # one form, sent twice
    first = admin_client.post(_refund_url(bought_pack), form)
    again = admin_client.post(_refund_url(bought_pack), form)

    # then the page offered it, Stripe made one refund of $12.00, and without any webhook
    # the 700 unspent credits are taken back, the 300 spent recorded as lost, and the
    # customer's audit log says who refunded and why
    assert _refund_url(bought_pack).encode() in page.content
    assert first.status_code == again.status_code == 302
    assert _refunded_at_stripe(bought_pack) == 1200
    reversal = PaymentReversal.objects.get()
    assert (reversal.kind, reversal.credits_clawed_back, reversal.credits_lost) == (
        "refund",
        700 * MICRO,
        300 * MICRO,
    )
    assert organization_balance(organization=org).available == 0
    [event] = AuditEvent.objects.filter(organization=org, action="payment.refunded")
    assert event.actor_user == admin_user and event.data["note"] == "Customer asked within 14 days"


def test_the_same_form_sent_again_says_its_refund_was_already_made(admin_client, bought_pack):
    # given: finance refunded the whole payment from a form
    org = bought_pack.organization
    form = {"note": "Customer asked within 14 days", "key": _key()}
    first = admin_client.post(_refund_url(bought_pack), form, follow=True)
    [made] = stripe_client.refunds_list(payment_intent=bought_pack.stripe_payment_intent_id)
    balance = organization_balance(organization=org)

    # when: the same form is sent again (a double click, the back button)
    again = admin_client.post(_refund_url(bought_pack), form, follow=True)

    # then: the first send says it refunded; the second names the refund the form already
    # made, and when, and says nothing more was refunded: not "Refunded" as if made now
    [said_first] = [str(m) for m in first.context["messages"]]
    [said] = list(again.context["messages"])
    when = datetime.fromtimestamp(made["created"], tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    assert said_first == f"Refunded 1200 usd ({made['id']}); the credits it bought are taken back."
    assert str(said) == (
        f"Already refunded: this form's refund {made['id']} of 1200 usd was made at {when} "
        "UTC; nothing more was refunded now, and the credits it bought are taken back."
    )
    assert said.level == messages.INFO
    # and Stripe holds the one refund; nothing more was taken back
    assert _refunded_at_stripe(bought_pack) == 1200
    assert PaymentReversal.objects.count() == 1
    assert organization_balance(organization=org) == balance


def test_a_partial_refund_takes_back_its_share(admin_client, bought_pack):
    # when finance refund $3.00 of the $12.00
    response = admin_client.post(
        _refund_url(bought_pack), {"amount": "300", "note": "Partial goodwill", "key": _key()}
    )

    # then a quarter of the 1,000 credits is taken back from the 700 unspent
    assert response.status_code == 302, response.context["form"].errors
    assert _refunded_at_stripe(bought_pack) == 300
    reversal = PaymentReversal.objects.get()
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (250 * MICRO, 0)
    assert organization_balance(organization=bought_pack.organization).available == 450 * MICRO


def test_a_refund_stripe_refuses_is_shown_on_the_form_and_changes_nothing(
    admin_client, bought_pack
):
    # given the ledger as it is
    rows = ledger_rows()
    balance = organization_balance(organization=bought_pack.organization)

    # when finance ask for more than was paid
    response = admin_client.post(
        _refund_url(bought_pack), {"amount": "5000", "note": "Typo", "key": _key()}
    )

    # then the form says Stripe refused, and nothing was refunded or taken back
    assert response.status_code == 200
    assert "Stripe refused the refund" in " ".join(response.context["form"].non_field_errors())
    assert _refunded_at_stripe(bought_pack) == 0
    assert not PaymentReversal.objects.exists()
    assert (ledger_rows(), organization_balance(organization=bought_pack.organization)) == (
        rows,
        balance,
    )


@pytest.mark.parametrize(
    ("fields", "field"),
    [({"amount": "0"}, "amount"), ({"amount": "-5"}, "amount"), ({"note": " "}, "note")],
)
def test_a_malformed_refund_is_refused_on_the_form(admin_client, bought_pack, fields, field):
    response = admin_client.post(_refund_url(bought_pack), {"note": "x", "key": _key(), **fields})

    assert response.status_code == 200
    assert field in response.context["form"].errors
    assert _refunded_at_stripe(bought_pack) == 0


@pytest.mark.parametrize(
    "typed",
    # Dollars with a point, a sign, full-width and Arabic-Indic digits, a digit
    # separator, an exponent: Django's IntegerField read the first seven as cents.
    [
        "12.00",
        "12.0",
        " 12.00 ",
        "+1200",
        "\uff11\uff12\uff10\uff10",
        "\u0661\u0662\u0660\u0660",
        "1_200",
        "1.2e3",
        "12,00",
    ],
)
def test_an_amount_not_in_plain_cents_is_refused_on_the_form(admin_client, bought_pack, typed):
    # given the ledger as it is
    rows = ledger_rows()
    balance = organization_balance(organization=bought_pack.organization)

    # when finance type the amount other than as a whole number of cents
    response = admin_client.post(
        _refund_url(bought_pack), {"amount": typed, "note": "Refund $12", "key": _key()}
    )

    # then the form says how to write it, and nothing was refunded or taken back
    assert response.status_code == 200
    [error] = response.context["form"].errors["amount"]
    assert "in cents: 1200 is $12.00" in error
    assert _refunded_at_stripe(bought_pack) == 0
    assert not PaymentReversal.objects.exists()
    assert (ledger_rows(), organization_balance(organization=bought_pack.organization)) == (
        rows,
        balance,
    )


def test_only_staff_allowed_to_refund_may(bought_pack):
    # given staff who may view checkouts but not refund
    viewer = UserFactory(is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_checkoutsession"))
    client = Client()
    client.force_login(viewer)

    # when they open the refund page or post it
    opened = client.get(_refund_url(bought_pack))
    posted = client.post(_refund_url(bought_pack), {"note": "x", "key": _key()})
    page = client.get(f"/admin/gymbilling/checkoutsession/{bought_pack.pk}/change/")

    # then both are refused, the page offers no refund, and Stripe refunded nothing
    assert (opened.status_code, posted.status_code) == (403, 403)
    assert page.status_code == 200 and _refund_url(bought_pack).encode() not in page.content
    assert _refunded_at_stripe(bought_pack) == 0


def test_a_refund_stripe_made_that_cannot_be_applied_here_is_applied_once_by_its_webhook(
    admin_client, bought_pack, deliver, caplog
):
    # given: another worker applying a reversal of the same charge holds the charge's
    # lock (gymbilling.locks, on a connection of its own) for as long as the test needs,
    # and the web process gives up on a lock after 100 ms (PostgreSQL's lock_timeout, as
    # ops set it for web roles): the refund's local apply will fail, for real, after
    # Stripe made the refund
    org = bought_pack.organization
    charge = stripe_client.payment_intent_charge(bought_pack.stripe_payment_intent_id)["id"]
    held, release, errors = threading.Event(), threading.Event(), []

    def hold_the_charge_lock() -> None:
        with transaction.atomic():
            transaction_lock(f"stripe-charge:{charge}")
            held.set()
            release.wait(timeout=60)

    worker = threading.Thread(target=on_own_connection, args=(hold_the_charge_lock, errors))
    worker.start()
    assert held.wait(timeout=60)
    before = organization_balance(organization=org)

    # when: finance refund the whole payment from the checkout's page
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL lock_timeout = '100ms'")
    try:
        response = admin_client.post(
            _refund_url(bought_pack), {"note": "Charged twice", "key": _key()}, follow=True
        )
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SET LOCAL lock_timeout = 0")
        release.set()
        worker.join(timeout=60)

    # then: Stripe refunded $12.00, and finance are told so, and that the webhook will
    # take the credits back (not to refund again); the failure is logged, nothing of it
    # was applied here, and the audit log has the refund
    assert errors == []
    assert _refunded_at_stripe(bought_pack) == 1200
    [message] = list(response.context["messages"])
    assert message.level == messages.WARNING
    assert str(message).startswith("Refunded 1200 usd (re_")
    assert "Stripe's webhook for the refund will apply it. Do not refund again." in str(message)
    assert "applying it now failed" in caplog.text
    assert not PaymentReversal.objects.exists()
    assert organization_balance(organization=org) == before
    assert AuditEvent.objects.filter(organization=org, action="payment.refunded").count() == 1

    # when: Stripe's webhook for the refund is delivered, and then again
    assert "failed" not in deliver()
    refunded = StripeEvent.objects.get(type="charge.refunded")
    assert stripe_event_process(event_pk=refunded.pk, force=True) == "processed"

    # then: the refund is applied once: the 700 unspent credits taken back, the 300
    # spent recorded as lost, one reversal
    [reversal] = PaymentReversal.objects.all()
    assert (reversal.kind, reversal.amount) == ("refund", 1200)
    assert (reversal.credits_clawed_back, reversal.credits_pending, reversal.credits_lost) == (
        700 * MICRO,
        0,
        300 * MICRO,
    )
    balance = organization_balance(organization=org)
    assert (balance.total, balance.available) == (0, 0)


def test_an_old_form_sent_again_after_stripe_forgot_its_key_refunds_nothing_more(
    admin_client, bought_pack, stripe_standin
):
    # given: finance refunded $3.00 of the pack from a form
    org = bought_pack.organization
    form = {"amount": "300", "note": "Partial goodwill", "key": _key()}
    first = admin_client.post(_refund_url(bought_pack), form, follow=True)
    [refund_id] = [
        r["id"]
        for r in stripe_client.refunds_list(payment_intent=bought_pack.stripe_payment_intent_id)
    ]
    reversal = PaymentReversal.objects.get()
    balance = organization_balance(organization=org)

    # when: more than a day later Stripe has forgotten the form's idempotency key, and the
    # same form is sent again (the browser's back button)
    stripe_standin.expire_idempotency_keys()
    again = admin_client.post(_refund_url(bought_pack), form, follow=True)

    # then: no second refund: Stripe still holds the one $3.00 refund, the page names that
    # refund, and nothing more is taken back or audited
    [said] = [str(m) for m in again.context["messages"]]
    assert [str(m) for m in first.context["messages"]] != [said]
    assert said.startswith(f"Already refunded: this form's refund {refund_id} of 300 usd")
    assert [
        r["id"]
        for r in stripe_client.refunds_list(payment_intent=bought_pack.stripe_payment_intent_id)
    ] == [refund_id]
    assert _refunded_at_stripe(bought_pack) == 300
    assert list(PaymentReversal.objects.all()) == [reversal]
    assert organization_balance(organization=org) == balance
    assert AuditEvent.objects.filter(organization=org, action="payment.refunded").count() == 1


def test_an_old_form_whose_refund_failed_is_refused_and_refunds_nothing(
    admin_client, bought_pack, stripe_standin, deliver
):
    # given: finance refunded $3.00 of the pack from a form; the refund then failed at
    # Stripe (the customer's card closed), and Stripe has since forgotten the form's key
    form = {"amount": "300", "note": "Partial goodwill", "key": _key()}
    assert admin_client.post(_refund_url(bought_pack), form).status_code == 302
    intent = bought_pack.stripe_payment_intent_id
    [made] = stripe_client.refunds_list(payment_intent=intent)
    assert stripe_standin.fail_refund(made["id"])["status"] == "failed"
    deliver()
    stripe_standin.expire_idempotency_keys()

    # when: the same form is sent again
    again = admin_client.post(_refund_url(bought_pack), form)

    # then: refused on the form as the failed refund it made; nothing refunded again
    assert again.status_code == 200
    errors = " ".join(again.context["form"].non_field_errors())
    assert "refund_failed" in errors and made["id"] in errors
    assert [r["id"] for r in stripe_client.refunds_list(payment_intent=intent)] == [made["id"]]
    assert _refunded_at_stripe(bought_pack) == 0
