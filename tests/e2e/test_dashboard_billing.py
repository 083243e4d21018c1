"""The billing and marketplace pages in a real browser, served as production serves them.

Each test also asserts that nothing the page loaded failed (tests/e2e/conftest.py).
"""

from __future__ import annotations

import pytest

from accounts.models import Membership
from gymbilling.market.services import listing_create
from gymbilling.models import (
    CheckoutSession,
    MarketListing,
    MarketOrder,
    Plan,
    StripePrice,
    Subscription,
)
from gymbilling.services import catalog_sync
from metering.models import MICRO
from metering.selectors import organization_balance
from tests.e2e.test_dashboard import EMAIL, sign_up
from tests.gymbilling import conftest as payment_fixtures
from tests.gymbilling.billing import conftest as billing_fixtures
from tests.gymbilling.market.conftest import market_member

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# The plans and packs synced to the Stripe stand-in, and webhook delivery (tests/gymbilling).
catalog, deliver = billing_fixtures.catalog, payment_fixtures.deliver
buy = billing_fixtures.buy


def test_a_customer_lists_credits_and_sees_them_in_escrow(app_server, visit, grant):
    # given a new customer with 500 credits of a paid subscription
    sign_up(visit, app_server)
    org = Membership.objects.get(user__email=EMAIL).organization
    grant(org, 500 * MICRO)
    page = visit.page

    # when they list 120 of them at 3 USD per 1,000 credits, from the menu's Marketplace
    page.click("nav.side >> text=Marketplace")
    page.wait_for_url(f"{app_server}/dashboard/market")
    page.fill("#sell-quantity", "120")
    page.fill("#sell-price", "3")
    page.click("text=List credits")
    page.wait_for_selector(".message.success")

    # then the listing is under "Your listings", open, at its exact price
    listing = MarketListing.objects.get(seller=org)
    mine = page.locator(f"tr[data-own-listing='{listing.pk}']")
    assert mine.locator("[data-col=quantity]").inner_text() == "120"
    assert mine.locator("[data-col=price]").inner_text() == "3.00 USD"
    assert mine.locator("[data-col=status]").inner_text() == "Open"
    assert (listing.quantity, listing.price_per_1k) == (120 * MICRO, 300)
    # and the overview shows them in escrow, out of what is available
    page.click("nav.side >> text=Overview")
    assert page.locator("[data-figure=escrowed]").inner_text() == "120"
    assert page.locator("[data-figure=available]").inner_text() == "380"
    assert visit.failures == []


def test_a_refused_listing_is_shown_on_the_page(app_server, visit, grant):
    # given a customer whose only credits are 50 of a pack (not resellable)
    sign_up(visit, app_server)
    org = Membership.objects.get(user__email=EMAIL).organization
    grant(org, 50 * MICRO, source="pack", resellable=False)
    page = visit.page
    page.goto(f"{app_server}/dashboard/market")

    # when they try to list 20
    page.fill("#sell-quantity", "20")
    page.fill("#sell-price", "3")
    with page.expect_response(f"{app_server}/dashboard/market") as answer:
        page.click("text=List credits")

    # then the page says why, with the code, and their credits stay theirs
    assert answer.value.status == 402
    alert = page.locator("[role=alert]")
    assert alert.get_attribute("data-error-code") == "insufficient_resellable_credits"
    assert page.locator("#sell-quantity").input_value() == "20"
    assert organization_balance(organization=org).available == 50 * MICRO
    assert not MarketListing.objects.exists()
    visit.failures.remove(f"402 {app_server}/dashboard/market")  # the refusal itself
    assert visit.failures == []


def test_a_double_click_on_buy_makes_one_order_and_lands_on_its_checkout(
    app_server, visit, stripe_standin
):
    # given another organization offering 100 credits at 2.50 USD per 1,000, and a new
    # customer on the marketplace page, asking for 40 of them
    offer = listing_create(
        seller=market_member(credits_amount=500 * MICRO),
        quantity=100 * MICRO,
        price_per_1k=250,
        currency="usd",
    )
    sign_up(visit, app_server)
    org = Membership.objects.get(user__email=EMAIL).organization
    page = visit.page
    page.goto(f"{app_server}/dashboard/market")
    page.fill(f"tr[data-listing='{offer.pk}'] input[name=quantity]", "40")
    sent = []
    page.on("request", lambda r: r.method == "POST" and sent.append(r.url))

    # when they press the offer's Buy twice, a person's double click apart (Playwright's
    # own dblclick is too quick: the second click cancels the first before it is sent)
    page.locator(f"tr[data-listing='{offer.pk}'] >> text=Buy").evaluate(
        "button => { button.click(); setTimeout(() => button.click(), 40); }"
    )

    # then one order reserves 40 credits, and the browser is on its Checkout
    checkout = f"{stripe_standin.api_base}/checkout/"
    for _ in range(150):  # wait_for_url fails on the first navigation, which was dropped
        if page.url.startswith(checkout):
            break
        page.wait_for_timeout(100)
    page.wait_for_load_state()
    assert sent == [f"{app_server}/dashboard/market"] * 2  # the form was sent twice
    order = MarketOrder.objects.get(buyer=org)
    assert order.quantity == 40 * MICRO
    assert page.url == order.checkout_url
    assert "0.10 USD" in page.inner_text("body")
    assert CheckoutSession.objects.count() == 1
    # and nothing failed but the first send, which the browser dropped for the second
    assert visit.failures == [f"failed {app_server}/dashboard/market"]


def test_a_customer_buys_a_pack_through_stripe_checkout(
    app_server, visit, catalog, stripe_standin, deliver
):
    # given a new customer on the billing page
    sign_up(visit, app_server)
    org = Membership.objects.get(user__email=EMAIL).organization
    page = visit.page
    page.click("nav.side >> text=Plan and billing")
    assert page.locator("tr[data-pack=boost-1k] [data-col=price]").inner_text() == "12.00 USD"

    # when they buy the 1,000-credit pack
    page.click("tr[data-pack=boost-1k] >> text=Buy")

    # then the browser is on Stripe's Checkout page (the stand-in's) for 12.00 USD
    page.wait_for_url(f"{stripe_standin.api_base}/checkout/**")
    session = CheckoutSession.objects.get(organization=org)
    assert page.url == session.url
    assert "12.00 USD" in page.inner_text("body")

    # and once paid there, Stripe sends them back (the app's SITE_URL is not this
    # server's, so the test pays as the page's form does and follows the return
    # link itself), the credits are theirs, and the purchase is listed
    stripe_standin.pay_checkout(session.stripe_session_id)
    deliver()
    page.goto(f"{app_server}/billing/?checkout=success")
    assert page.url == f"{app_server}/dashboard/billing?checkout=success"
    assert page.locator("[data-checkout=success]").is_visible()
    page.click("nav.side >> text=Overview")
    assert page.locator("[data-figure=available]").inner_text() == "1000"
    page.click("nav.side >> text=Invoices")
    bought = page.locator(f"tr[data-checkout='{session.stripe_session_id}']")
    assert bought.locator("[data-col=amount]").inner_text() == "12.00 USD"
    assert bought.locator("[data-col=credits]").inner_text() == "1000"
    assert visit.failures == []


def test_an_old_price_s_member_moves_to_the_plan_s_current_price(
    app_server, visit, catalog, stripe_standin, deliver, buy
):
    # given a customer on Pro at $99 for 12,000 credits a month; then finance make Pro $129
    # for 15,000 and sync the catalog (members on the $99 price keep it)
    sign_up(visit, app_server)
    org = Membership.objects.get(user__email=EMAIL).organization
    buy(org, plan="pro")
    Plan.objects.filter(code="pro").update(monthly_price=12_900, monthly_credits=15_000 * MICRO)
    catalog_sync()
    page = visit.page
    page.click("nav.side >> text=Plan and billing")
    assert page.locator("[data-figure=price-move]").inner_text() == (
        "Pro sells at 129.00 USD a period for 15000 credits now; you pay 99.00 USD for 12000."
    )

    # when they press "Move to the current price", and confirm on the question it asks
    page.click("[data-form=price-move] >> text=Move to the current price")
    question = page.locator("section.confirm")
    assert question.locator("h2").inner_text() == "Move your subscription to Pro's current price?"
    assert "It costs 129.00 USD a period for 15000 credits, instead of the 99.00 USD for 12000" in (
        question.inner_text()
    )
    question.locator("text=Move to the current price").click()
    page.wait_for_selector(".message.success")
    assert "failed" not in deliver()

    # then, charged the prorated difference now, the page shows the current price's credits
    # and amount, and offers no move any more
    page.reload()
    assert page.locator("[data-figure=period-credits]").inner_text() == "15000"
    assert page.locator("[data-figure=period-price]").inner_text() == "129.00 USD"
    assert page.locator("[data-figure=price-move]").count() == 0
    sub = Subscription.objects.get(organization=org)
    assert sub.price == StripePrice.objects.get(lookup_key="gym_plan_pro", current=True)
    assert visit.failures == []


def test_a_dollar_member_is_not_offered_a_euro_plan_and_switches_to_a_dollar_one(
    app_server, visit, catalog, stripe_standin, deliver, buy
):
    # given a customer on Pro, paid in dollars; and a plan sold only in euros
    sign_up(visit, app_server)
    org = Membership.objects.get(user__email=EMAIL).organization
    buy(org, plan="pro")
    billing_fixtures.plan_sold_only_in_euros()
    page = visit.page
    page.click("nav.side >> text=Plan and billing")

    # then the euro plan is listed at its price, its button disabled, saying why in one line
    euro = page.locator("tr[data-plan=pro-eu]")
    assert euro.locator("[data-col=price]").inner_text() == "89.00 EUR"
    assert euro.locator("button").is_disabled()
    assert euro.locator("[data-col=refused]").inner_text() == (
        "Sold in EUR, and your subscription is paid in USD: a subscription cannot change currency."
    )
    assert euro.locator("form").count() == 0

    # when they press "Switch to Basic", offered in dollars, and confirm the question
    page.click("tr[data-plan=basic] >> text=Switch to Basic")
    question = page.locator("section.confirm")
    assert question.locator("h2").inner_text() == "Change your subscription to Basic?"
    assert "It costs 20.00 USD a period." in question.inner_text()
    question.locator("text=Change my subscription").click()
    page.wait_for_selector(".message.success")
    assert "failed" not in deliver()

    # then Basic is scheduled from the next period, and the euro plan still not offered
    page.reload()
    assert page.locator("[data-figure=scheduled]").inner_text() == "From the next period: Basic."
    assert page.locator("tr[data-plan=pro-eu] button").is_disabled()
    sub = Subscription.objects.get(organization=org)
    assert sub.scheduled_plan.code == "basic"
    assert visit.failures == []
