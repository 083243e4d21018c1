"""Plan and billing, and invoices: the Django test client against the Stripe stand-in over HTTP.

Checkout sends the browser to the stand-in's payment page; the tests pay there as
a customer would (`pay_checkout`), and the stand-in's webhooks are applied as the
worker would apply them (`deliver`), before the page is read again.
"""

from __future__ import annotations

import urllib.parse
import urllib.request

import pytest
from django.test import Client, override_settings

from accounts.models import Role
from gymbilling.models import (
    BillingCustomer,
    CheckoutSession,
    CreditPack,
    Invoice,
    Plan,
    StripePrice,
    Subscription,
)
from gymbilling.services import billing_customer_ensure, catalog_sync
from gymbilling.services.invoices import invoice_sync
from metering.models import MICRO
from metering.selectors import organization_balance
from tests.dashboard.pages import figure, post_forms, refused, row, rows, text
from tests.factories import OrganizationFactory
from tests.gymbilling import conftest as payment_fixtures
from tests.gymbilling.billing import conftest as billing_fixtures
from tests.helpers import ledger_rows

pytestmark = pytest.mark.django_db

# The billing tests' own: the default plans and packs synced to the stand-in, and
# webhook delivery into this test's transaction.
catalog, deliver = billing_fixtures.catalog, payment_fixtures.deliver
stripe_sdk = billing_fixtures.stripe_sdk

BILLING = "/dashboard/billing"


def billing_rows():
    return (
        BillingCustomer.objects.count(),
        CheckoutSession.objects.count(),
        Subscription.objects.count(),
        ledger_rows(),
    )


def checkout(client, **fields):
    return client.post(BILLING, {"action": "checkout", **fields})


def subscribed(client, org, stripe_standin, deliver, **fields) -> None:
    """`org` subscribed from the page by its member (`client`), paid, its events applied."""
    checkout(client, **fields)
    stripe_standin.pay_checkout(CheckoutSession.objects.get(organization=org).stripe_session_id)
    assert "failed" not in deliver()


def canceling_pro(client, org, stripe_standin, stripe_sdk, deliver) -> Subscription:
    """`org` subscribed to Pro from the page, then canceled at period end at Stripe (as in
    the portal), its events applied: our row shows it canceling."""
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    sub = Subscription.objects.get(organization=org)
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id, params={"cancel_at_period_end": True}
    )
    assert "failed" not in deliver()
    return sub


def pack_bought(client, org, stripe_standin, deliver) -> CheckoutSession:
    """Boost 1k bought from the page by `org`'s member (`client`), paid, its events applied."""
    checkout(client, pack="boost-1k")
    session = CheckoutSession.objects.get(organization=org)
    stripe_standin.pay_checkout(session.stripe_session_id)
    assert "failed" not in deliver()
    session.refresh_from_db()
    return session


def test_the_page_shows_the_plans_and_packs_at_their_exact_prices(client, member, catalog):
    member(Role.BILLING)

    page = client.get(BILLING)

    assert page.status_code == 200
    assert figure(page, "no-subscription").startswith("No subscription yet")
    assert rows(page, "data-plan") == ["basic", "pro", "team", "enterprise"]
    assert row(page, "data-plan", "pro") == {"price": "99.00 USD", "credits": "12000"}
    assert row(page, "data-plan", "team") == {
        "price": "49.00 USD a seat",
        "credits": "5000 a seat",
    }
    assert row(page, "data-pack", "boost-1k") == {"credits": "1000", "price": "12.00 USD"}
    assert row(page, "data-pack", "boost-10k") == {"credits": "10000", "price": "100.00 USD"}


def test_subscribing_goes_to_checkout_and_the_paid_subscription_shows(
    client, member, catalog, stripe_standin, deliver
):
    # given an owner with no subscription
    _, org = member(Role.OWNER)

    # when they subscribe to Pro on the page
    response = checkout(client, plan="pro")

    # then the browser is sent to Stripe's Checkout page, for the session just recorded
    session = CheckoutSession.objects.get(organization=org)
    assert response.status_code == 302
    assert response["Location"] == session.url
    assert session.url.startswith(f"{stripe_standin.api_base}/checkout/")
    assert (session.kind, session.plan.code, session.seats, session.status) == (
        "subscription",
        "pro",
        1,
        "open",
    )

    # and once they paid there and Stripe's events arrived, the page shows the subscription
    stripe_standin.pay_checkout(session.stripe_session_id)
    assert "failed" not in deliver()
    page = client.get(BILLING)
    assert figure(page, "plan") == "Pro"
    assert figure(page, "status") == "Active"
    assert figure(page, "period-credits") == "12000"
    assert figure(page, "period-price") == "99.00 USD"
    assert 'data-figure="cancel-at-period-end"' not in text(page)
    # (Pro also lends a 20,000-credit overage allowance, billed as it is used)
    overview = text(client.get("/dashboard/"))
    assert 'data-figure="available">32000<' in overview
    # ... which the overview says is not prepaid
    assert 'data-figure="overage">Of what is available, 20000 is your plan' in overview
    assert "<td>Subscription period</td>" in overview and '<td class="num">12000</td>' in overview
    # and its invoice is listed, paid, with what it granted
    [invoice] = Invoice.objects.filter(organization=org)
    invoices = client.get("/dashboard/invoices")
    assert row(invoices, "data-invoice", invoice.stripe_invoice_id) == {
        "amount": "99.00 USD",
        "paid": "99.00 USD",
        "status": "paid",
        "credits": "12000",
    }


def test_an_old_price_s_member_sees_what_their_price_gives_and_costs(
    client, member, catalog, stripe_standin, deliver
):
    # given an owner subscribed to Pro at $99 for 12,000 credits a month; then finance make
    # Pro $129 for 15,000 and sync the catalog (members on the old price keep it)
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    Plan.objects.filter(code="pro").update(monthly_price=12_900, monthly_credits=15_000 * MICRO)
    catalog_sync()

    # when they read the page
    page = client.get(BILLING)

    # then it shows their own price's credits and amount, which their renewals grant and cost
    assert figure(page, "period-credits") == "12000"
    assert figure(page, "period-price") == "99.00 USD"
    # while the plans on sale show Pro as it is sold now
    assert row(page, "data-plan", "pro") == {"price": "129.00 USD", "credits": "15000"}


@pytest.mark.parametrize(
    ("pro_now", "credits_now", "consequence", "kind_said", "figures"),
    [
        (
            12_900,
            15_000,
            "Costing more, it starts now: the prorated difference is charged at once to "
            "the card on file.",
            "Your plan is changed.",
            ("15000", "129.00 USD", None),
        ),
        (
            7_900,
            10_000,
            "Costing less, it starts with the next period; until then you keep what you paid for.",
            "Your plan changes at the end of the current period",
            ("12000", "99.00 USD", "From the next period: Pro, at its current price."),
        ),
    ],
    ids=["dearer", "cheaper"],
)
def test_an_old_price_s_member_moves_to_the_plan_s_current_price_from_the_page(
    client,
    member,
    catalog,
    stripe_standin,
    stripe_sdk,
    deliver,
    pro_now,
    credits_now,
    consequence,
    kind_said,
    figures,
):
    # given an owner on Pro at $99 for 12,000 credits a month; then finance change Pro's
    # price and credits, and sync the catalog
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    Plan.objects.filter(code="pro").update(
        monthly_price=pro_now, monthly_credits=credits_now * MICRO
    )
    catalog_sync()
    current = StripePrice.objects.get(lookup_key="gym_plan_pro", current=True)

    # when they read the page, it offers the move to Pro's current price, saying both prices
    page = client.get(BILLING)
    now = f"{pro_now // 100}.00 USD"
    assert figure(page, "price-move") == (
        f"Pro sells at {now} a period for {credits_now} credits now; you pay 99.00 USD for 12000."
    )
    assert "Move to the current price" in text(page)
    # and when they press it, the page asks first, at the current price
    asked = checkout(client, plan="pro", seats="1")
    assert "Move your subscription to Pro&#x27;s current price?" in text(asked)
    assert f"It costs {now} a period for {credits_now} credits" in text(asked)
    assert consequence in text(asked)
    # and when they confirm
    response = checkout(client, plan="pro", seats="1", confirmed="yes")
    assert "failed" not in deliver()

    # then Stripe's item is at the current price, and the page says what happened and shows
    # what the period gives, costs and what comes next
    assert response.status_code == 302 and response["Location"] == BILLING
    sub = Subscription.objects.get(organization=org)
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == current.stripe_price_id
    page = client.get(BILLING)
    assert kind_said in text(page)
    credits_shown, price_shown, scheduled = figures
    assert figure(page, "period-credits") == credits_shown
    assert figure(page, "period-price") == price_shown
    if scheduled is None:
        assert 'data-figure="scheduled"' not in text(page)
    else:
        assert figure(page, "scheduled") == scheduled
    # and no move is offered any more (done, or scheduled: asking again would take it back)
    assert _no_move_offered(page)


def _no_move_offered(page) -> bool:
    return 'data-figure="price-move"' not in text(page) and "Move to the current" not in text(page)


def test_a_member_on_the_current_price_is_offered_no_move(
    client, member, catalog, stripe_standin, deliver
):
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")

    assert _no_move_offered(client.get(BILLING))


def test_a_move_to_a_current_price_in_another_currency_is_not_offered(
    client, member, catalog, stripe_standin, deliver
):
    # given an owner on Pro at $99; then finance sell Pro in euros (a new current price),
    # which they cannot move to (asking for Pro is no_change)
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    billing_fixtures.plans_sold_in("eur", "pro")

    # then the page offers no move it would refuse
    assert _no_move_offered(client.get(BILLING))


@pytest.mark.parametrize("sold_in", ["usd", "eur"], ids=["current-price", "sold-in-euros-now"])
def test_a_team_pressing_change_seats_unchanged_is_answered_no_change_not_asked(
    client, member, catalog, stripe_standin, stripe_sdk, deliver, sold_in
):
    # given a team of 2 seats at $49 a seat; then, maybe, finance sell Team in euros (a new
    # current price, which it cannot move to: Stripe keeps a customer in one currency)
    _, org = member(Role.ADMIN)
    subscribed(client, org, stripe_standin, deliver, plan="team", seats="2")
    billing_fixtures.plans_sold_in(sold_in, "team")
    sub = Subscription.objects.get(organization=org)
    before = (billing_fixtures.subscription_state_unsynced(stripe_sdk, sub), billing_rows())

    # when they press "Change seats" with the number left at 2; and confirm it from a page
    # drawn before (or a question asked before finance changed the currency)
    asked = checkout(client, plan="team", seats="2")
    confirmed = checkout(client, plan="team", seats="2", confirmed="yes")

    # then both are refused as nothing to change, whatever the price is in: no question
    # whose "yes" could only be refused; nothing changed at Stripe, here or in the ledger
    assert refused(asked, 409, "no_change"), (asked.status_code, text(asked)[-600:])
    assert 'name="confirmed"' not in text(asked)
    assert refused(confirmed, 409, "no_change"), (confirmed.status_code, text(confirmed)[-600:])
    assert _no_move_offered(asked)
    assert (billing_fixtures.subscription_state_unsynced(stripe_sdk, sub), billing_rows()) == before


def test_a_change_of_a_subscription_canceled_at_period_end_is_refused_not_asked(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given Pro, canceled in the portal: it ends with its period
    _, org = member(Role.OWNER)
    sub = canceling_pro(client, org, stripe_standin, stripe_sdk, deliver)
    before = (billing_fixtures.subscription_state_unsynced(stripe_sdk, sub), billing_rows())

    # when they press "Switch to Basic"
    asked = checkout(client, plan="basic")

    # then refused at once, as its "yes" would be, saying to renew it first
    assert refused(asked, 409, "subscription_canceling"), (asked.status_code, text(asked)[-600:])
    assert 'name="confirmed"' not in text(asked)
    assert (billing_fixtures.subscription_state_unsynced(stripe_sdk, sub), billing_rows()) == before


def test_a_member_who_renewed_at_stripe_before_its_webhook_is_asked_and_changes(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given Pro, canceled at period end (its webhook applied); then renewed at Stripe, the
    # cancellation taken back, its webhook not delivered yet (late, or being retried)
    _, org = member(Role.OWNER)
    sub = canceling_pro(client, org, stripe_standin, stripe_sdk, deliver)
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id, params={"cancel_at_period_end": False}
    )
    assert Subscription.objects.get(pk=sub.pk).cancel_at_period_end

    # when they press "Switch to Basic", and confirm the question
    asked = checkout(client, plan="basic")
    confirmed = checkout(client, plan="basic", confirmed="yes")
    assert "failed" not in deliver()

    # then asked, as Stripe has it, not refused from our row; and the change is scheduled,
    # the subscription renewing, at Stripe and here
    assert asked.status_code == 200, (asked.status_code, text(asked)[-600:])
    assert "Change your subscription to Basic?" in text(asked)
    assert 'name="confirmed" value="yes"' in text(asked)
    assert confirmed.status_code == 302 and confirmed["Location"] == BILLING
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == (
        StripePrice.objects.get(lookup_key="gym_plan_basic", current=True).stripe_price_id
    )
    assert at_stripe.cancel_at_period_end is False
    page = client.get(BILLING)
    assert figure(page, "plan") == "Pro"
    assert figure(page, "scheduled").startswith("From the next period: Basic")
    assert 'data-figure="cancel-at-period-end"' not in text(page)


def test_seats_changed_at_stripe_before_its_webhook_are_asked_about_not_no_change(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given a team of 2 seats; then 3 at Stripe (its portal, its dashboard), the webhook
    # not delivered yet: our row still shows 2
    _, org = member(Role.ADMIN)
    subscribed(client, org, stripe_standin, deliver, plan="team", seats="2")
    sub = Subscription.objects.get(organization=org)
    item = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)["items"].data[0]
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id, params={"items": [{"id": item.id, "quantity": 3}]}
    )
    assert Subscription.objects.get(pk=sub.pk).seats == 2

    # when they press "Change seats" with 2, as the page drawn from the row shows it
    asked = checkout(client, plan="team", seats="2")

    # then a change from the 3 they have is asked about, not refused as no_change
    assert asked.status_code == 200, (asked.status_code, text(asked)[-600:])
    assert "Change your subscription to Team, 2 seats?" in text(asked)
    assert 'name="confirmed" value="yes"' in text(asked)
    assert figure(client.get(BILLING), "seats") == "3"


def test_a_refusal_the_page_cannot_check_at_stripe_is_a_503_not_a_stale_refusal(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given Pro, canceled at period end as our row shows it; and Stripe unreachable, so
    # whether it was renewed since cannot be known
    _, org = member(Role.OWNER)
    sub = canceling_pro(client, org, stripe_standin, stripe_sdk, deliver)
    before = (billing_fixtures.subscription_state(stripe_sdk, sub), billing_rows())

    # when they press "Switch to Basic"
    with override_settings(STRIPE_API_BASE="http://127.0.0.1:9", STRIPE_MAX_NETWORK_RETRIES=0):
        asked = checkout(client, plan="basic")

    # then the page says the payment provider cannot be reached, asks nothing, and
    # nothing changed at Stripe, here or in the ledger
    assert refused(asked, 503, "payments_unavailable"), (asked.status_code, text(asked)[-600:])
    assert 'name="confirmed"' not in text(asked)
    assert (billing_fixtures.subscription_state(stripe_sdk, sub), billing_rows()) == before


def test_a_team_whose_plan_sells_in_another_currency_changes_seats_at_its_own_price(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given a team of 2 seats at $49 a seat; then finance sell Team in euros
    _, org = member(Role.ADMIN)
    subscribed(client, org, stripe_standin, deliver, plan="team", seats="2")
    sub = Subscription.objects.get(organization=org)
    paid = sub.price
    billing_fixtures.plans_sold_in("eur", "team")

    # when they ask for 3 seats, the page asks at their $49 a seat, and they confirm
    asked = checkout(client, plan="team", seats="3")
    assert "Change your subscription to Team, 3 seats?" in text(asked)
    assert "It costs 147.00 USD a period." in text(asked)
    response = checkout(client, plan="team", seats="3", confirmed="yes")
    assert "failed" not in deliver()

    # then the seats change at the price they pay, in their currency
    assert response.status_code == 302 and response["Location"] == BILLING
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    item = at_stripe["items"].data[0]
    assert (item.price.id, item.quantity) == (paid.stripe_price_id, 3)
    page = client.get(BILLING)
    assert figure(page, "seats") == "3"
    assert figure(page, "period-price") == "147.00 USD"


def test_a_switch_to_a_plan_sold_in_the_currency_paid_is_asked_after_theirs_went_euro(
    client, member, catalog, stripe_standin, deliver
):
    # given an owner on Pro at $99; then finance sell Pro in euros, Basic still in dollars
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    billing_fixtures.plans_sold_in("eur", "pro")

    # when they press "Switch to Basic", in the dollars they pay in, and confirm it
    asked = checkout(client, plan="basic")
    confirmed = checkout(client, plan="basic", confirmed="yes")
    assert "failed" not in deliver()

    # then asked and scheduled, as through the API
    assert "Change your subscription to Basic?" in text(asked), text(asked)[-600:]
    assert "It costs 20.00 USD a period." in text(asked)
    assert confirmed.status_code == 302 and confirmed["Location"] == BILLING
    assert figure(client.get(BILLING), "scheduled") == "From the next period: Basic."


def test_a_switch_to_a_plan_sold_in_another_currency_than_paid_is_refused_not_asked(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given an owner on Pro at $99; then finance sell Pro and Basic in euros
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    sub = Subscription.objects.get(organization=org)
    billing_fixtures.plans_sold_in("eur", "pro", "basic")
    before = (billing_fixtures.subscription_state_unsynced(stripe_sdk, sub), billing_rows())

    # when they press "Switch to Basic"
    asked = checkout(client, plan="basic")

    # then refused at once, as its "yes" would be (Stripe keeps the customer in dollars):
    # nothing changed at Stripe, here or in the ledger
    assert refused(asked, 400, "currency_mismatch"), (asked.status_code, text(asked)[-600:])
    assert "paid in USD and Basic sells in EUR" in text(asked)
    assert 'name="confirmed"' not in text(asked)
    assert (billing_fixtures.subscription_state_unsynced(stripe_sdk, sub), billing_rows()) == before


def _plan_forms(page) -> list[str]:
    """The plans the page's forms would buy or change to, in the page's order."""
    return [fields["plan"] for _, fields in post_forms(page) if fields.get("plan")]


EURO_REFUSED = (
    "Sold in EUR, and your subscription is paid in USD: a subscription cannot change currency."
)


def test_a_dollar_subscriber_is_offered_no_plan_sold_only_in_euros(
    client, member, catalog, stripe_standin, deliver
):
    # given an owner on Pro, paid in dollars; and a plan sold only in euros
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    billing_fixtures.plan_sold_only_in_euros()

    # when they read the page
    page = client.get(BILLING)

    # then the euro plan is listed at its price, saying in one line why it cannot be had,
    # with no form to press (a press could only be refused: currency_mismatch); every plan
    # in dollars is offered as before
    assert rows(page, "data-plan") == ["basic", "pro", "pro-eu", "team", "enterprise"]
    assert row(page, "data-plan", "pro-eu") == {
        "price": "89.00 EUR",
        "credits": "12000",
        "refused": EURO_REFUSED,
    }
    assert row(page, "data-plan", "basic") == {"price": "20.00 USD", "credits": "2000"}
    assert _plan_forms(page) == ["basic", "team", "enterprise"]


def test_a_dollar_subscriber_s_offered_change_still_works_beside_a_euro_plan(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given an owner on Pro, paid in dollars, and a plan sold only in euros on the page
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    billing_fixtures.plan_sold_only_in_euros()
    [basic] = [f for _, f in post_forms(client.get(BILLING)) if f.get("plan") == "basic"]

    # when they press "Switch to Basic" as the page offers it, and confirm the question
    asked = checkout(client, plan=basic["plan"])
    confirmed = checkout(client, plan="basic", confirmed="yes")
    assert "failed" not in deliver()

    # then asked at Basic's dollar price, and scheduled: Stripe's item at it
    assert "Change your subscription to Basic?" in text(asked), text(asked)[-600:]
    assert "It costs 20.00 USD a period." in text(asked)
    assert confirmed.status_code == 302 and confirmed["Location"] == BILLING
    sub = Subscription.objects.get(organization=org)
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == (
        StripePrice.objects.get(lookup_key="gym_plan_basic", current=True).stripe_price_id
    )
    page = client.get(BILLING)
    assert figure(page, "scheduled") == "From the next period: Basic."
    assert row(page, "data-plan", "pro-eu")["refused"] == EURO_REFUSED


def test_a_euro_plan_asked_for_from_a_form_made_by_hand_is_refused_changing_nothing(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given an owner on Pro, paid in dollars, and a plan sold only in euros
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    billing_fixtures.plan_sold_only_in_euros()
    sub = Subscription.objects.get(organization=org)
    before = (billing_fixtures.subscription_state_unsynced(stripe_sdk, sub), billing_rows())

    # when a form the page does not draw asks for it, confirmed
    confirmed = checkout(client, plan="pro-eu", confirmed="yes")

    # then refused, saying why, before Stripe is asked: nothing changed there, here or in
    # the ledger
    assert refused(confirmed, 400, "currency_mismatch"), text(confirmed)[-600:]
    assert "paid in USD and Pro EU sells in EUR" in text(confirmed)
    assert (billing_fixtures.subscription_state_unsynced(stripe_sdk, sub), billing_rows()) == before


def test_an_organization_without_a_subscription_is_offered_every_plan_euros_too(
    client, member, catalog, stripe_standin, deliver
):
    # given an owner with no subscription, and a plan sold only in euros
    _, org = member(Role.OWNER)
    billing_fixtures.plan_sold_only_in_euros()

    # when they read the page, and subscribe to the euro plan
    page = client.get(BILLING)
    response = checkout(client, plan="pro-eu")
    stripe_standin.pay_checkout(CheckoutSession.objects.get(organization=org).stripe_session_id)
    assert "failed" not in deliver()

    # then every plan is offered, each in its own currency; and the euro one, bought, is
    # their subscription, paid in euros
    assert row(page, "data-plan", "pro-eu") == {"price": "89.00 EUR", "credits": "12000"}
    assert _plan_forms(page) == ["basic", "pro", "pro-eu", "team", "enterprise"]
    assert response.status_code == 302
    page = client.get(BILLING)
    assert (figure(page, "plan"), figure(page, "period-price")) == ("Pro EU", "89.00 EUR")
    # and, paying in euros now, it is the dollar plans that are listed but not offered
    assert row(page, "data-plan", "basic")["refused"] == (
        "Sold in USD, and your subscription is paid in EUR: a subscription cannot change currency."
    )
    assert _plan_forms(page) == []


def test_a_team_whose_plan_went_euro_sees_its_own_seat_price_in_dollars(
    client, member, catalog, stripe_standin, deliver
):
    # given a team of 2 seats at $49 a seat; then finance sell Team in euros
    _, org = member(Role.ADMIN)
    subscribed(client, org, stripe_standin, deliver, plan="team", seats="2")
    billing_fixtures.plans_sold_in("eur", "team")

    # when they read the page
    page = client.get(BILLING)

    # then their plan's row shows what a change of seats costs them, in dollars, and offers
    # it (a change of seats stays at the price they pay)
    assert row(page, "data-plan", "team") == {"price": "49.00 USD a seat", "credits": "5000 a seat"}
    assert "team" in _plan_forms(page)


def test_a_member_whose_row_names_another_plan_s_price_sees_their_plan_s(
    client, member, catalog, stripe_standin, deliver
):
    # given an owner subscribed to Pro ($99 for 12,000 credits a month) whose row names
    # Basic's price: a worker of the release before Subscription.price moved its plan
    # and left the price of the plan it had
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, plan="pro")
    basic = StripePrice.objects.get(lookup_key="gym_plan_basic", current=True)
    Subscription.objects.filter(organization=org).update(price=basic)

    # when they read the page
    page = client.get(BILLING)

    # then it shows what Pro gives and costs, not Basic's
    assert figure(page, "plan") == "Pro"
    assert figure(page, "period-credits") == "12000"
    assert figure(page, "period-price") == "99.00 USD"


def test_a_team_subscription_changes_seats_with_the_card_on_file(
    client, member, catalog, stripe_standin, deliver
):
    # given a team subscription of 5 seats, paid through Checkout
    _, org = member(Role.ADMIN)
    checkout(client, plan="team", seats="5")
    stripe_standin.pay_checkout(CheckoutSession.objects.get(organization=org).stripe_session_id)
    deliver()
    assert figure(client.get(BILLING), "seats") == "5"

    # when they ask to lower it to 2 seats, the page asks first, and nothing changes yet
    asked = checkout(client, plan="team", seats="2")
    assert asked.status_code == 200
    assert "Change your subscription to Team, 2 seats?" in text(asked)
    assert "It costs 98.00 USD a period." in text(asked)
    assert 'name="confirmed" value="yes"' in text(asked)
    deliver()
    assert 'data-figure="scheduled"' not in text(client.get(BILLING))
    # and when they confirm
    response = checkout(client, plan="team", seats="2", confirmed="yes")
    deliver()

    # then no second Checkout: the change is scheduled at Stripe for the period's end,
    # and the page says so once
    assert response.status_code == 302 and response["Location"] == BILLING
    assert CheckoutSession.objects.filter(organization=org).count() == 1
    page = client.get(BILLING)
    assert "Your plan changes at the end of the current period" in text(page)
    assert figure(page, "seats") == "5"
    assert figure(page, "scheduled") == "From the next period: Team, 2 seats."
    assert figure(page, "period-credits") == "25000"
    assert figure(page, "period-price") == "245.00 USD"


@pytest.mark.parametrize(
    "fields", [{"plan": "pro"}, {"plan": "team", "seats": "3"}], ids=["from-pro", "from-team"]
)
def test_a_scheduled_change_to_a_plan_not_sold_per_seat_shows_no_seats(
    client, member, catalog, stripe_standin, deliver, fields
):
    # given an owner on Pro, or a team of 3 seats, paid through Checkout
    _, org = member(Role.OWNER)
    subscribed(client, org, stripe_standin, deliver, **fields)

    # when they move to Basic, which is not sold per seat, from the next period
    response = checkout(client, plan="basic", confirmed="yes")
    assert "failed" not in deliver()

    # then the page names the plan alone: the scheduled seats (1) mean nothing for Basic
    assert response.status_code == 302 and response["Location"] == BILLING
    assert Subscription.objects.get(organization=org).scheduled_seats == 1
    assert figure(client.get(BILLING), "scheduled") == "From the next period: Basic."


def test_an_old_price_s_team_is_asked_its_own_unit_price_for_more_seats(
    client, member, catalog, stripe_standin, stripe_sdk, deliver
):
    # given a team of 2 seats at $49 a seat; then finance make Team $59 a seat
    _, org = member(Role.ADMIN)
    checkout(client, plan="team", seats="2")
    stripe_standin.pay_checkout(CheckoutSession.objects.get(organization=org).stripe_session_id)
    assert "failed" not in deliver()
    Plan.objects.filter(code="team").update(monthly_price=5_900)
    catalog_sync()

    # when they ask for 3 seats
    asked = checkout(client, plan="team", seats="3")

    # then the page asks at their $49 a seat, which the change is made at
    assert "It costs 147.00 USD a period." in text(asked)
    checkout(client, plan="team", seats="3", confirmed="yes")
    assert "failed" not in deliver()
    sub = Subscription.objects.get(organization=org)
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    item = at_stripe["items"].data[0]
    assert (item.price.id, item.quantity, item.price.unit_amount) == (
        sub.price.stripe_price_id,
        3,
        4_900,
    )
    assert figure(client.get(BILLING), "period-price") == "147.00 USD"


def test_a_change_while_an_upgrade_is_unconfirmed_is_refused_saying_when_to_try_again(
    client,
    member,
    catalog,
    stripe_standin,
    stripe_sdk,
    deliver,
    monkeypatch,
    django_capture_on_commit_callbacks,
):
    # given Pro, paid through Checkout, with a downgrade to Basic scheduled
    _, org = member(Role.BILLING)
    checkout(client, plan="pro")
    stripe_standin.pay_checkout(CheckoutSession.objects.get(organization=org).stripe_session_id)
    deliver()
    assert checkout(client, plan="basic", confirmed="yes").status_code == 302
    deliver()
    sub = Subscription.objects.get(organization=org)
    # and an upgrade to Enterprise whose first request Stripe did not answer (it may
    # still land there for a minute)
    billing_fixtures.stripe_holds_next_update(monkeypatch)
    with django_capture_on_commit_callbacks(execute=False):
        interrupted = checkout(client, plan="enterprise", confirmed="yes")
    assert refused(interrupted, 503, "payments_unavailable")
    before = (billing_fixtures.subscription_state(stripe_sdk, sub), billing_rows())

    # when the member confirms it again within the minute
    response = checkout(client, plan="enterprise", confirmed="yes")

    # then the page again, saying in how many seconds to try, with a Retry-After as the
    # API's; nothing sent to Stripe or written here
    assert refused(response, 409, "change_pending"), (response.status_code, text(response)[-600:])
    wait = int(response["Retry-After"])
    assert 1 <= wait <= 60
    assert f"Nothing was done: try again in {wait} seconds." in text(response)
    assert (billing_fixtures.subscription_state(stripe_sdk, sub), billing_rows()) == before


def test_buying_a_pack_goes_to_checkout_and_its_credits_show(
    client, member, catalog, stripe_standin, deliver
):
    # given
    _, org = member(Role.BILLING)

    # when
    response = checkout(client, pack="boost-1k")

    # then
    session = CheckoutSession.objects.get(organization=org)
    assert response.status_code == 302 and response["Location"] == session.url
    assert (session.kind, session.pack.code, session.amount_total) == ("pack", "boost-1k", 1_200)
    stripe_standin.pay_checkout(session.stripe_session_id)
    deliver()
    assert organization_balance(organization=org).available == 1_000 * MICRO
    assert figure(client.get("/dashboard/"), "available") == "1000"
    invoices = client.get("/dashboard/invoices")
    assert row(invoices, "data-checkout", session.stripe_session_id) == {
        "amount": "12.00 USD",
        "credits": "1000",
    }


def test_packs_bought_show_the_credits_they_bought_after_the_pack_changed(
    client, member, catalog, stripe_standin, deliver
):
    # given: Boost 1k bought for $12.00 (1,000 credits); then finance make it $15.00 for
    # 1,500 and sync the catalog
    _, org = member(Role.BILLING)
    session = pack_bought(client, org, stripe_standin, deliver)
    CreditPack.objects.filter(code="boost-1k").update(price=1_500, credits=1_500 * MICRO)
    catalog_sync()

    # when
    invoices = client.get("/dashboard/invoices")

    # then: the purchase shows what it bought, not what the pack gives now
    assert row(invoices, "data-checkout", session.stripe_session_id) == {
        "amount": "12.00 USD",
        "credits": "1000",
    }


@pytest.mark.parametrize(
    ("fields", "status", "code"),
    [
        ({"plan": "no-such-plan"}, 404, "plan_not_found"),
        ({"pack": "no-such-pack"}, 404, "pack_not_found"),
        ({"plan": "pro", "pack": "boost-1k"}, 400, "invalid_request"),
        ({}, 400, "invalid_request"),
        ({"plan": "team", "seats": "1"}, 400, "invalid_seats"),
        ({"plan": "pro", "seats": "3"}, 400, "invalid_seats"),
        ({"plan": "team", "seats": "two"}, 400, "invalid_seats"),
        ({"plan": "team", "seats": "0"}, 400, "invalid_seats"),
        # What the API refuses, the page refuses too (not read as 2 seats).
        ({"plan": "team", "seats": "2.0"}, 400, "invalid_seats"),
        ({"plan": "team", "seats": "\N{ARABIC-INDIC DIGIT TWO}"}, 400, "invalid_seats"),
        ({"plan": "team", "seats": "\N{FULLWIDTH DIGIT TWO}"}, 400, "invalid_seats"),
        ({"plan": "team", "seats": "+2"}, 400, "invalid_seats"),
        ({"pack": "boost-1k", "seats": "5"}, 400, "invalid_seats"),
        ({"action": "coupon", "plan": "pro"}, 400, "invalid_request"),
    ],
)
def test_a_refused_checkout_is_drawn_with_its_code_and_changes_nothing(
    client, member, catalog, fields, status, code
):
    member(Role.OWNER)
    before = billing_rows()

    response = client.post(BILLING, {"action": "checkout", **fields})

    assert refused(response, status, code), (response.status_code, text(response)[-600:])
    assert rows(response, "data-plan") == [
        "basic",
        "pro",
        "team",
        "enterprise",
    ]  # the page, drawn again
    assert billing_rows() == before


def test_a_plan_no_longer_offered_cannot_be_bought_from_a_stale_page(client, member, catalog):
    member(Role.OWNER)
    page = client.get(BILLING)
    Plan.objects.filter(code="basic").update(active=False)
    before = billing_rows()

    response = checkout(client, plan="basic")

    assert "basic" in rows(page, "data-plan")
    assert refused(response, 400, "plan_not_available")
    assert billing_rows() == before


def test_stripe_unreachable_is_a_503_on_the_page_and_writes_nothing(client, member, catalog):
    member(Role.OWNER)
    before = billing_rows()

    with override_settings(STRIPE_API_BASE="http://127.0.0.1:9", STRIPE_MAX_NETWORK_RETRIES=0):
        response = checkout(client, pack="boost-1k")

    assert refused(response, 503, "payments_unavailable")
    assert billing_rows() == before


def test_canceling_in_the_billing_portal_shows_on_the_page(
    client, member, catalog, stripe_standin, deliver
):
    # given a paid Pro subscription
    _, org = member(Role.OWNER)
    checkout(client, plan="pro")
    stripe_standin.pay_checkout(CheckoutSession.objects.get(organization=org).stripe_session_id)
    deliver()
    subscription = Subscription.objects.get(organization=org)

    # when they open the billing portal from the page, and cancel there
    response = client.post(BILLING, {"action": "portal"})
    portal = response["Location"]
    with urllib.request.urlopen(portal, timeout=10) as shown:
        offered = shown.read().decode()
    cancel = urllib.request.Request(
        f"{portal}/cancel",
        data=urllib.parse.urlencode({"subscription": subscription.stripe_subscription_id}).encode(),
        method="POST",
    )
    urllib.request.urlopen(cancel, timeout=10).close()
    deliver()

    # then the portal was Stripe's, for this subscription, and the page shows it ending
    assert response.status_code == 302 and portal.startswith(f"{stripe_standin.api_base}/")
    assert subscription.stripe_subscription_id in offered
    page = client.get(BILLING)
    assert figure(page, "status") == "Active"
    assert figure(page, "cancel-at-period-end").startswith("It ends then")


@pytest.mark.parametrize("path", [BILLING, "/dashboard/invoices"])
def test_a_member_without_a_billing_role_is_refused(client, member, catalog, path):
    member(Role.MEMBER)
    before = billing_rows()

    page = client.get(path)
    bought = client.post(path, {"action": "checkout", "pack": "boost-1k"})

    assert refused(page, 403, "permission_denied")
    assert bought.status_code == 403
    assert billing_rows() == before


def test_a_post_needs_its_csrf_token(member, catalog):
    user, org = member(Role.OWNER)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)

    response = browser.post(BILLING, {"action": "checkout", "pack": "boost-1k"})

    assert response.status_code == 403
    assert not CheckoutSession.objects.filter(organization=org).exists()


def _invoice(org, n: int) -> Invoice:
    """An open (unpaid) subscription invoice, mirrored as a Stripe event would mirror it."""
    customer = BillingCustomer.objects.get(organization=org).stripe_customer_id
    return invoice_sync(
        invoice={
            "id": f"in_page_{org.pk}_{n}",
            "customer": customer,
            "status": "open",
            "currency": "jpy",
            "amount_due": 1_000 + n,
            "amount_paid": 0,
            "created": 1_700_000_000 + n,
            "hosted_invoice_url": f"https://invoice.stripe.test/{n}",
            "billing_reason": "subscription_cycle",
        },
        subscription=None,
    )


def test_invoices_are_the_organizations_own_newest_first_and_paginated(
    client, member, stripe_standin
):
    # given 30 invoices of this organization (in yen: no decimals) and one of another
    _, org = member(Role.BILLING)
    other = OrganizationFactory()
    for each in (org, other):
        billing_customer_ensure(organization=each)
    for n in range(30):
        _invoice(org, n)
    _invoice(other, 99)

    # when the first and the second page are read
    first = client.get("/dashboard/invoices")
    second = client.get("/dashboard/invoices?page=2")

    # then 25 then 5, newest first, exact amounts, each with its link; none of the other's
    assert rows(first, "data-invoice") == [f"in_page_{org.pk}_{n}" for n in range(29, 4, -1)]
    assert rows(second, "data-invoice") == [f"in_page_{org.pk}_{n}" for n in range(4, -1, -1)]
    assert row(first, "data-invoice", f"in_page_{org.pk}_29") == {
        "amount": "1029 JPY",
        "paid": "0 JPY",
        "status": "open",
        "credits": "0",
    }
    assert 'href="https://invoice.stripe.test/29"' in text(first)
    assert f"in_page_{other.pk}_99" not in text(first) + text(second)


@pytest.mark.parametrize(
    ("role", "status"),
    [(Role.OWNER, 200), (Role.ADMIN, 200), (Role.BILLING, 200), (Role.MEMBER, 403)],
)
def test_the_invoices_api_is_open_to_the_roles_the_invoices_page_is(
    client, member, stripe_standin, role, status
):
    # given an invoice, whose hosted link opens Stripe's page for it to whoever holds it
    _, org = member(role)
    billing_customer_ensure(organization=org)
    _invoice(org, 1)

    # when a person in `role` opens the invoices page, and asks the API for the same list
    page = client.get("/dashboard/invoices")
    api = client.get("/api/v1/billing/invoices", headers={"x-organization": org.slug})

    # then both answer alike: a plain member gets neither the list nor the link
    assert (page.status_code, api.status_code) == (status, status)
    if status == 200:
        assert [each["id"] for each in api.json()["results"]] == [f"in_page_{org.pk}_1"]
    else:
        assert api.json()["error"]["code"] == "permission_denied"
        assert "invoice.stripe.test" not in api.content.decode()


def test_the_invoice_page_reads_as_many_queries_for_many_rows_as_for_few(
    client, member, stripe_standin
):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    _, org = member(Role.BILLING)
    billing_customer_ensure(organization=org)
    _invoice(org, 0)
    with CaptureQueriesContext(connection) as few:
        client.get("/dashboard/invoices")
    for n in range(1, 20):
        _invoice(org, n)
    with CaptureQueriesContext(connection) as many:
        client.get("/dashboard/invoices")

    assert len(many) == len(few)


def test_stripe_sends_customers_back_to_these_pages(client, member):
    member(Role.OWNER)

    billing = client.get("/billing/?checkout=success")
    market = client.get("/market/?order=7&checkout=canceled")

    assert billing.status_code == 302 and billing["Location"] == f"{BILLING}?checkout=success"
    assert market["Location"] == "/dashboard/market?order=7&checkout=canceled"
    assert figure(client.get(billing["Location"]), "no-subscription")
    assert 'data-checkout="success"' in text(client.get(billing["Location"]))


def test_a_refund_that_failed_shows_its_credits_given_back(
    client, member, catalog, stripe_standin, deliver
):
    # given a pack bought for $12.00, half of it refunded, then the refund failed
    from gymbilling import stripe_client

    _, org = member(Role.BILLING)
    session = pack_bought(client, org, stripe_standin, deliver)
    refund = stripe_client.refund_create(
        key=f"t-{session.pk}", payment_intent=session.stripe_payment_intent_id, amount=600
    )
    deliver()
    stripe_standin.fail_refund(refund["id"])
    deliver()

    # when the member opens the invoices page
    invoices = client.get("/dashboard/invoices")

    # then the refund is shown as failed, its credits given back, not as a won dispute
    assert organization_balance(organization=org).available == 1_000 * MICRO
    assert "refund failed, the money stayed with us: 500 credits given back" in text(invoices)
