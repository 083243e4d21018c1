"""A dashboard form is acted on once, however often it is sent (accounts.dashboard.MemberPage,
`form_token`): a double click, a reload of the answer, a retry after a slow one.

The forms here are the pages' own: drawn with GET, their hidden fields (`acting_for`,
`form_token`, ...) read from the page (tests.dashboard.pages.post_forms), then sent
twice as a browser sends them again. Stripe is the stand-in over HTTP.
"""

from __future__ import annotations

import re
import threading

import pytest
from django.core import mail
from django.db import connection

from accounts.models import ApiKey, AuditEvent, IdempotencyRecord, Invitation, Role, Scope
from accounts.services import apikey_create
from gymbilling.market.services import listing_create
from gymbilling.models import CheckoutSession, MarketListing, MarketOrder, Subscription
from metering.selectors import organization_balance
from tests.dashboard.conftest import DashboardClient, assert_refused
from tests.dashboard.pages import post_forms, posts_to_page, row, text
from tests.dashboard.test_market_pages import signed_in, state
from tests.gymbilling import conftest as payment_fixtures
from tests.gymbilling.billing import conftest as billing_fixtures
from tests.gymbilling.market import conftest as market_fixtures
from tests.helpers import credits, ledger_rows

pytestmark = pytest.mark.django_db

market_stripe, seller, buyer = (
    market_fixtures.market_stripe,
    market_fixtures.seller,
    market_fixtures.buyer,
)
catalog, deliver = billing_fixtures.catalog, payment_fixtures.deliver

MARKET = "/dashboard/market"
SECRET = re.compile(rb"<code data-secret>([^<]+)</code>")


def drawn(page, to: str | None = None, **match: str) -> dict[str, str]:
    """The hidden fields of the one form of `page` (that POSTs `to` that address, if given)
    whose hidden fields include `match`."""
    found = [
        fields
        for action, fields in post_forms(page)
        if (to is None or action == to)
        and all(fields.get(name) == value for name, value in match.items())
    ]
    assert len(found) == 1, (match, found)
    return found[0]


def sent_twice(browser, path: str, form: dict):
    """The same drawn form sent twice, as a double click or a reload of the answer sends it."""
    return browser.post(path, form), browser.post(path, form)


# --- every form has a token of its own ------------------------------------------------------


def test_every_form_of_a_page_has_a_token_of_its_own_drawn_anew(seller, buyer):
    # given two offers on the book, and a trader of the buyer
    for price in (250, 300):
        listing_create(seller=seller, quantity=credits(100), price_per_1k=price, currency="usd")
    browser = signed_in(buyer)

    # when the market page is drawn twice
    first, second = browser.get(MARKET), browser.get(MARKET)

    # then each form that POSTs to a page has a token, no two alike, and none drawn again
    tokens = [
        fields.get("form_token")
        for page in (first, second)
        for action, fields in post_forms(page)
        if posts_to_page(action)
    ]
    assert len(tokens) >= 2 * 4 and all(tokens)  # two Buys, Reserve and pay, List credits
    assert len(set(tokens)) == len(tokens)


# --- the marketplace ------------------------------------------------------------------------


def test_a_buy_sent_twice_makes_one_order_and_both_answers_go_to_its_checkout(seller, buyer):
    # given 100 credits on offer, and a trader with the page drawn
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=250, currency="usd")
    browser = signed_in(buyer, Role.BILLING)
    form = drawn(browser.get(MARKET), listing_id=str(listing.pk)) | {"quantity": "40"}

    # when its Buy form is sent twice
    first, second = sent_twice(browser, MARKET, form)

    # then one order reserves 40 credits, with one Checkout, and the second answer goes to
    # the same Checkout (the browser shows the second answer of a double click)
    order = MarketOrder.objects.get(buyer=buyer)
    assert order.quantity == credits(40)
    assert CheckoutSession.objects.count() == 1
    assert first.status_code == second.status_code == 302
    assert first["Location"] == second["Location"] == order.checkout_url
    assert second["Idempotent-Replayed"] == "true"
    assert row(browser.get(MARKET), "data-listing", listing.pk)["available"] == "60"


def test_a_listing_sent_twice_is_listed_and_escrowed_once(seller):
    # given a seller with 1,000 resellable credits, on the page
    browser = signed_in(seller)
    form = drawn(browser.get(MARKET), action="sell") | {"quantity": "100", "price": "2.50"}

    # when the listing's form is sent twice
    first, second = sent_twice(browser, MARKET, form)

    # then one listing holds 100 credits in escrow, not 200
    listing = MarketListing.objects.get(seller=seller)
    assert listing.quantity == credits(100)
    balance = organization_balance(organization=seller)
    assert (balance.available, balance.escrowed) == (credits(900), credits(100))
    # and the second answer goes where the first did, saying it was done once
    assert first.status_code == second.status_code == 302
    assert first["Location"] == second["Location"] == MARKET
    page = text(browser.get(MARKET))
    assert (
        "This form was already sent, and was acted on once. "
        f"Listed 100 credits (listing #{listing.pk})" in page
    )


def test_a_form_sent_again_with_other_values_is_refused_and_does_nothing(seller):
    # given a listing sent from a drawn form
    browser = signed_in(seller)
    form = drawn(browser.get(MARKET), action="sell") | {"quantity": "100", "price": "2.50"}
    browser.post(MARKET, form)
    before = state(seller)

    # when the same drawn form is sent with another quantity (Back, edit, send)
    response = browser.post(MARKET, form | {"quantity": "300"})

    # then it is refused, and nothing more is listed
    assert_refused(response, 422, "idempotency_key_reused")
    assert "This form was already sent with other values" in text(response)
    assert state(seller) == before


def test_a_refused_form_may_be_sent_again_and_is_acted_on_then(seller):
    # given a seller on the page, and a listing of more than they have
    browser = signed_in(seller)
    form = drawn(browser.get(MARKET), action="sell") | {"quantity": "1500", "price": "2.50"}
    assert_refused(browser.post(MARKET, form), 402, "insufficient_resellable_credits")

    # when they receive more credits, and send the same form again
    market_fixtures.subscription_credits(seller, credits(1000))
    response = browser.post(MARKET, form)

    # then it is listed: the refusal kept nothing under the form's token
    assert response.status_code == 302 and "Idempotent-Replayed" not in response
    assert MarketListing.objects.get(seller=seller).quantity == credits(1500)


# Transactional: the two sends run at once, each in its own thread and connection, as two
# web workers do; the second must wait for the first's outcome, not act nor say "running".
@pytest.mark.django_db(transaction=True)
def test_a_buy_sent_twice_at_once_makes_one_order(market_stripe):
    # given 100 credits on offer, and a trader with the page drawn
    seller = market_fixtures.market_member(credits_amount=credits(1000))
    buyer = market_fixtures.market_member()
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=250, currency="usd")
    browser = signed_in(buyer, Role.BILLING)
    form = drawn(browser.get(MARKET), listing_id=str(listing.pk)) | {"quantity": "40"}
    start = threading.Barrier(2)
    answers = []

    def send():
        try:
            start.wait()
            answers.append(browser.post(MARKET, form))
        finally:
            connection.close()

    # when the Buy form is sent twice at the same moment
    threads = [threading.Thread(target=send) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)

    # then one order, and both answers go to its Checkout
    order = MarketOrder.objects.get(buyer=buyer)
    assert order.quantity == credits(40)
    assert [a.status_code for a in answers] == [302, 302]
    assert {a["Location"] for a in answers} == {order.checkout_url}
    assert sorted(a.get("Idempotent-Replayed", "") for a in answers) == ["", "true"]


# --- API keys -------------------------------------------------------------------------------


def test_a_key_form_sent_again_makes_no_second_key_and_shows_no_secret(client, member):
    # given an owner on the keys page
    _, org = member(Role.OWNER)
    form = drawn(client.get("/dashboard/keys"), "/dashboard/keys")
    form |= {"name": "ci", "scopes": [Scope.BILLING_READ]}

    # when the form is sent, and its answer reloaded (the browser sends the POST again)
    created, again = sent_twice(client, "/dashboard/keys", form)

    # then there is one key; the first answer showed its secret, the second does not
    key = ApiKey.objects.get(organization=org)
    assert created.status_code == 201
    secret = SECRET.search(created.content).group(1).decode()
    assert again.status_code == 302 and again["Location"] == "/dashboard/keys"
    assert secret.encode() not in again.content
    # and the page it leads to says the key was made and its secret shown once, with the
    # key in the list, and nowhere the secret
    page = client.get(again["Location"])
    assert secret.encode() not in page.content and b"data-secret" not in page.content
    assert (
        f"The key “ci” ({key.prefix}) was created when this form was first sent, and its "
        "secret was shown then, once: it cannot be shown again." in text(page)
    )
    assert f'<tr data-key="{key.prefix}">' in text(page)
    # and the database keeps no secret for the replay either
    [record] = IdempotencyRecord.objects.filter(organization=org)
    assert secret.encode() not in bytes(record.body)


def test_revoking_sent_twice_answers_as_the_first_did(client, member):
    # given an owner asked to confirm revoking a key
    _, org = member(Role.OWNER)
    key, _ = apikey_create(organization=org, name="ci", scopes=[Scope.BILLING_READ])
    asked = client.get(f"/dashboard/keys?revoke={key.pk}")
    [(target, form)] = [(a, f) for a, f in post_forms(asked) if a.endswith("/revoke")]

    # when the confirmation is sent twice
    first, second = sent_twice(client, target, form)

    # then both go back to the list (the second is no 409 "already revoked"), revoked once
    assert first.status_code == second.status_code == 302
    assert second["Location"] == "/dashboard/keys" and second["Idempotent-Replayed"] == "true"
    assert AuditEvent.objects.filter(action="api_key.revoked").count() == 1


# --- members --------------------------------------------------------------------------------


def test_an_invitation_sent_twice_is_made_and_emailed_once(client, member, commit_then_mail):
    # given an owner on the members page
    _, org = member(Role.OWNER)
    page = client.get("/dashboard/members")
    form = drawn(page, "/dashboard/members") | {"email": "zoe@example.test", "role": "admin"}

    # when the invitation's form is sent twice
    with commit_then_mail():
        first, second = sent_twice(client, "/dashboard/members", form)

    # then one invitation, one email, and the second answer is the first's (not a 409
    # "already has an open invitation")
    assert Invitation.objects.filter(organization=org).count() == 1
    assert [m.to for m in mail.outbox] == [["zoe@example.test"]]
    assert first.status_code == second.status_code == 302
    assert first["Location"] == second["Location"] == "/dashboard/members"
    assert "Invited zoe@example.test as admin" in text(client.get("/dashboard/members"))


# --- billing --------------------------------------------------------------------------------


def test_a_pack_bought_twice_opens_one_checkout(client, member, catalog):
    # given a billing member on the billing page
    _, org = member(Role.BILLING)
    form = drawn(client.get("/dashboard/billing"), pack="boost-1k")

    # when the pack's Buy is sent twice
    first, second = sent_twice(client, "/dashboard/billing", form)

    # then one Checkout, which both answers go to
    session = CheckoutSession.objects.get(organization=org)
    assert first["Location"] == second["Location"] == session.url


def test_a_plan_change_asks_each_time_and_is_confirmed_once(
    client, member, catalog, stripe_standin, deliver
):
    # given a team subscription of 5 seats
    _, org = member(Role.ADMIN)
    client.post("/dashboard/billing", {"action": "checkout", "plan": "team", "seats": "5"})
    stripe_standin.pay_checkout(CheckoutSession.objects.get(organization=org).stripe_session_id)
    deliver()
    ask = {"action": "checkout", "plan": "team", "seats": "2"}
    form = drawn(client.get("/dashboard/billing"), plan="team") | ask

    # when the change to 2 seats is sent twice, the page asks twice (asking did nothing)
    asked, asked_again = sent_twice(client, "/dashboard/billing", form)
    assert asked.status_code == asked_again.status_code == 200
    assert "Change your subscription to Team, 2 seats?" in text(asked_again)
    # and when the question's form is confirmed twice
    confirm = drawn(asked_again, confirmed="yes")
    first, second = sent_twice(client, "/dashboard/billing", confirm)
    deliver()

    # then the change is made once: the second answer says the form was already acted on
    assert first.status_code == second.status_code == 302
    assert second["Idempotent-Replayed"] == "true"
    subscription = Subscription.objects.get(organization=org)
    assert (subscription.seats, subscription.scheduled_seats) == (5, 2)
    assert "This form was already sent, and was acted on once. Your plan changes at the end" in (
        text(client.get("/dashboard/billing"))
    )


# --- a form without a token -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/dashboard/keys", {"name": "ci", "scopes": [Scope.BILLING_READ]}),
        ("/dashboard/members", {"email": "ada@example.test", "role": "member"}),
        (MARKET, {"action": "sell", "quantity": "100", "price": "2.50", "currency": "usd"}),
        ("/dashboard/billing", {"action": "checkout", "pack": "boost-1k"}),
        ("/dashboard/keys/{key}/revoke", {}),
    ],
)
def test_a_form_without_a_token_is_refused_and_does_nothing(client, member, path, form):
    # given an owner with a key and resellable credits
    _, org = member(Role.OWNER)
    key, _ = apikey_create(organization=org, name="old", scopes=[Scope.BILLING_READ])
    market_fixtures.subscription_credits(org, credits(1000))
    path = path.format(key=key.pk)
    before = (
        ledger_rows(),
        ApiKey.objects.filter(revoked_at__isnull=True).count(),
        Invitation.objects.count(),
        MarketListing.objects.count(),
        CheckoutSession.objects.count(),
    )

    # when a form drawn before forms carried a token is sent
    response = client.post(path, form, form_token=None)

    # then it is refused with a reload message, and nothing is done
    assert_refused(response, 409, "form_outdated")
    assert "Nothing was done: reload the page and send it again." in text(response)
    after = (
        ledger_rows(),
        ApiKey.objects.filter(revoked_at__isnull=True).count(),
        Invitation.objects.count(),
        MarketListing.objects.count(),
        CheckoutSession.objects.count(),
    )
    assert after == before


def test_the_test_client_draws_a_new_form_for_each_post(client, member):
    # (the other dashboard tests rely on it: each of their POSTs is a form of its own)
    _, org = member(Role.OWNER)
    client.post("/dashboard/keys", {"name": "a", "scopes": [Scope.BILLING_READ]})
    client.post("/dashboard/keys", {"name": "a", "scopes": [Scope.BILLING_READ]})
    assert ApiKey.objects.filter(organization=org).count() == 2
    assert isinstance(client, DashboardClient)
