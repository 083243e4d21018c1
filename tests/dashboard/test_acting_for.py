"""A dashboard form acts for the organization it was drawn for, never for the one the
session names when it is sent (accounts.dashboard.MemberPage, `acting_for`).

The forms here are the pages' own: drawn with GET, their `acting_for` read from the
page (tests.dashboard.pages.drawn_for), then sent after a switch in "another tab" (the
same session's switcher) or after the member was removed from the organization.
"""

from __future__ import annotations

import pytest

from accounts.models import ApiKey, AuditEvent, Invitation, Membership, Role, Scope
from accounts.services import apikey_create, membership_remove
from gymbilling.market.services import listing_create
from gymbilling.models import CheckoutSession, MarketListing, MarketOrder, Subscription
from metering.selectors import organization_balance
from tests.dashboard.conftest import DashboardClient, assert_refused
from tests.dashboard.pages import drawn_for, post_forms, posts_to_page, text
from tests.factories import OrganizationFactory, UserFactory
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

SWITCHER = "/dashboard/organization"


def switch(browser, organization) -> None:
    """The switcher, as another tab of the same browser uses it."""
    response = browser.post(SWITCHER, {"organization": organization.slug})
    assert response.status_code == 302, response.content


def join(user, organization, role: str = Role.OWNER) -> None:
    Membership.objects.create(user=user, organization=organization, role=role)


def assert_changed(response, *, sent: str, acting, reload: str) -> None:
    """The 409 refusal: which organization the form was for, which acts now, and the page
    to reload."""
    assert_refused(response, 409, "organization_changed")
    assert f'data-drawn-for="{sent}" data-acting-for="{acting.slug}"' in text(response)
    assert f'<a href="{reload}">Reload the page for {acting.name}</a>' in text(response)


# --- every form carries it ------------------------------------------------------------------


def test_every_form_of_every_page_names_the_organization_it_was_drawn_for(client, member, catalog):
    # given an owner of an organization with a key, a second member, a listing of its own
    _user, org = member(Role.OWNER)
    key, _ = apikey_create(organization=org, name="ci", scopes=[Scope.BILLING_READ])
    other = UserFactory()
    join(other, org, Role.MEMBER)
    theirs = Membership.objects.get(user=other, organization=org)
    market_fixtures.subscription_credits(org, credits(1000))
    listing_create(seller=org, quantity=credits(100), price_per_1k=250, currency="usd")

    # when each page that has forms is drawn (with the questions that ask before a POST)
    pages = [
        "/dashboard/keys",
        f"/dashboard/keys?revoke={key.pk}",
        "/dashboard/members",
        f"/dashboard/members?remove={theirs.pk}",
        "/dashboard/billing",
        "/dashboard/market",
        "/dashboard/playground",
    ]
    drawn = {path: client.get(path) for path in pages}

    # then every form that POSTs to a page names the organization, and only the
    # switcher's and signing out's do not
    for path, page in drawn.items():
        assert page.status_code == 200, path
        forms = post_forms(page)
        assert any(posts_to_page(action) for action, _ in forms), path
        for action, fields in forms:
            expected = org.slug if posts_to_page(action) else None
            assert fields.get("acting_for") == expected, (path, action, fields)
    assert len(post_forms(drawn["/dashboard/market"])) >= 5  # buy (book, order), sell, withdraw


# --- a form drawn for one organization, sent while another acts -----------------------------


def test_a_market_purchase_drawn_for_one_organization_is_not_made_for_the_other(
    market_stripe, seller, buyer
):
    # given a trader of two organizations with cards on file, on the market page of the
    # buyer, where 100 credits are on offer
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=250, currency="usd")
    other = market_fixtures.market_member()
    user = UserFactory()
    join(user, buyer, Role.BILLING)
    join(user, other, Role.OWNER)
    browser = DashboardClient()
    browser.force_login(user)
    switch(browser, buyer)
    page = browser.get("/dashboard/market")
    form = {
        "action": "buy",
        "quantity": "40",
        "price": "2.50",
        "currency": "usd",
        "listing_id": listing.pk,
        "acting_for": drawn_for(page),
    }
    before = (ledger_rows(), MarketOrder.objects.count(), CheckoutSession.objects.count())
    balances = [organization_balance(organization=o) for o in (seller, buyer, other)]

    # when they switch to the other organization in another tab, then press "Buy" here
    switch(browser, other)
    refused = browser.post("/dashboard/market", form, acting_for=None)

    # then nothing is bought, for either: no order, no Checkout, no credits moved
    assert_changed(refused, sent=buyer.slug, acting=other, reload="/dashboard/market")
    assert f"This form was for {buyer.name}, but you now act for {other.name}" in text(refused)
    assert (ledger_rows(), MarketOrder.objects.count(), CheckoutSession.objects.count()) == before
    assert [organization_balance(organization=o) for o in (seller, buyer, other)] == balances

    # and once back on the buyer, the same form buys for it
    switch(browser, buyer)
    bought = browser.post("/dashboard/market", form, acting_for=None)
    order = MarketOrder.objects.get()
    assert bought.status_code == 302 and bought["Location"] == order.checkout_url
    assert (order.buyer, order.quantity) == (buyer, credits(40))


def test_listing_credits_drawn_for_one_organization_lists_nothing_of_the_other(seller):
    # given an owner of two organizations with resellable credits, on the first's page
    other = OrganizationFactory()
    market_fixtures.subscription_credits(other, credits(1000))
    user = UserFactory()
    join(user, seller)
    join(user, other)
    browser = DashboardClient()
    browser.force_login(user)
    switch(browser, seller)
    sent = drawn_for(browser.get("/dashboard/market"))
    form = {"action": "sell", "quantity": "100", "price": "2.50", "currency": "usd"}

    # when the other is chosen meanwhile, and the listing sent
    switch(browser, other)
    refused = browser.post("/dashboard/market", form, acting_for=sent)

    # then neither has a listing, and the other's credits stay in its wallet
    assert_changed(refused, sent=seller.slug, acting=other, reload="/dashboard/market")
    assert not MarketListing.objects.exists()
    assert organization_balance(organization=other).escrowed == 0


def test_a_key_drawn_for_one_organization_is_not_made_in_the_other_nor_counted(
    client, member, settings, fresh_window
):
    # given an owner of one organization and a member of another, on the first's keys page,
    # with one dashboard change a minute (every POST below inside one window: fresh_window,
    # or a refusal counted in one minute would not be seen in the next)
    settings.RATELIMIT_DASHBOARD_PER_USER = 1
    user, first = member(Role.OWNER)
    second = OrganizationFactory()
    join(user, second, Role.MEMBER)
    sent = drawn_for(client.get("/dashboard/keys"))
    form = {"name": "ci", "scopes": [Scope.BILLING_READ]}

    # when the second is chosen in another tab, and the key's form is sent
    switch(client, second)
    refused = client.post("/dashboard/keys", form, acting_for=sent)

    # then no key is made: a 409 naming both (not the 403 of the member's role in the
    # second), with a way back to the first
    assert_changed(refused, sent=first.slug, acting=second, reload="/dashboard/keys")
    assert not ApiKey.objects.exists()
    assert not AuditEvent.objects.filter(action="api_key.created").exists()
    [(back, fields)] = [(a, f) for a, f in post_forms(refused) if f.get("next")]
    assert (back, fields) == (
        SWITCHER,
        {
            "csrfmiddlewaretoken": fields["csrfmiddlewaretoken"],
            "organization": first.slug,
            "next": "/dashboard/keys",
        },
    )
    # and switching back with it, the form drawn again makes the key: the refusal was
    # not counted against the one change a minute
    returned = client.post(back, fields)
    assert returned["Location"] == "/dashboard/keys"
    again = drawn_for(client.get("/dashboard/keys"))
    made = client.post("/dashboard/keys", form, acting_for=again)
    assert made.status_code == 201, made.content
    assert ApiKey.objects.get().organization == first
    # and that key was the minute's one change: one more is refused, so the limit of one
    # was in force all along, and it was the key, not the refusal, that spent it
    over = client.post("/dashboard/keys", {**form, "name": "second"}, acting_for=again)
    assert_refused(over, 429, "rate_limited")
    assert list(ApiKey.objects.values_list("name", flat=True)) == ["ci"]


def test_a_plan_change_confirmed_after_a_switch_changes_no_subscription(
    client, member, catalog, stripe_standin, deliver
):
    # given a team subscription of 5 seats, and the page asking to lower it to 2
    user, org = member(Role.OWNER)
    client.post("/dashboard/billing", {"action": "checkout", "plan": "team", "seats": "5"})
    stripe_standin.pay_checkout(CheckoutSession.objects.get(organization=org).stripe_session_id)
    deliver()
    asked = client.post("/dashboard/billing", {"action": "checkout", "plan": "team", "seats": "2"})
    [confirm] = [f for a, f in post_forms(asked) if f.get("confirmed") == "yes"]
    assert confirm["acting_for"] == org.slug
    other = OrganizationFactory()
    join(user, other)
    subscription = Subscription.objects.get(organization=org)
    before = (subscription.seats, subscription.scheduled_seats, CheckoutSession.objects.count())

    # when the other organization is chosen, and the change is confirmed
    switch(client, other)
    refused = client.post("/dashboard/billing", confirm, acting_for=None)
    deliver()

    # then nothing changed: not the subscription, nor a Checkout for the other
    assert_changed(refused, sent=org.slug, acting=other, reload="/dashboard/billing")
    subscription.refresh_from_db()
    after = (subscription.seats, subscription.scheduled_seats, CheckoutSession.objects.count())
    assert after == before
    assert not CheckoutSession.objects.filter(organization=other).exists()


@pytest.mark.parametrize("action", ["revoke", "remove"])
def test_revoking_and_removing_are_bound_too(client, member, action):
    # given an owner of two organizations, asked on the first's page to confirm
    user, first = member(Role.OWNER)
    second = OrganizationFactory()
    join(user, second)
    key, _ = apikey_create(organization=first, name="ci", scopes=[Scope.BILLING_READ])
    someone = UserFactory()
    join(someone, first, Role.MEMBER)
    theirs = Membership.objects.get(user=someone)
    page, row = ("/dashboard/keys", key) if action == "revoke" else ("/dashboard/members", theirs)
    asked = client.get(f"{page}?{action}={row.pk}")
    [(target, fields)] = [(a, f) for a, f in post_forms(asked) if a.endswith(f"/{action}")]

    # when the second is chosen, and the question confirmed
    switch(client, second)
    refused = client.post(target, fields, acting_for=None)

    # then the key still works, the member is still there; the page to reload is the
    # one that asked (the address confirmed takes POSTs only)
    assert_changed(refused, sent=first.slug, acting=second, reload=page)
    key.refresh_from_db()
    assert key.revoked_at is None
    assert Membership.objects.filter(pk=theirs.pk).exists()
    # and confirmed while the first acts, it is done
    switch(client, first)
    done = client.post(target, fields, acting_for=None)
    assert done.status_code == 302 and done["Location"] == page
    key.refresh_from_db()
    assert (
        (key.revoked_at is not None)
        if action == "revoke"
        else not Membership.objects.filter(pk=theirs.pk).exists()
    )


def test_a_member_removed_meanwhile_acts_for_no_other_organization(client, member):
    # given an admin of a team who also has a personal organization, on the team's
    # members page
    user, team = member(Role.ADMIN)
    personal = OrganizationFactory(personal=True)
    join(user, personal)
    switch(client, team)
    sent = drawn_for(client.get("/dashboard/members"))
    owner = UserFactory()
    join(owner, team)

    # when an owner removes them from the team, and they then send the invitation
    membership_remove(membership=Membership.objects.get(user=user, organization=team), actor=owner)
    refused = client.post(
        "/dashboard/members", {"email": "ada@example.test", "role": "admin"}, acting_for=sent
    )

    # then nobody is invited, not by the team nor by their personal organization
    assert_changed(refused, sent=team.slug, acting=personal, reload="/dashboard/members")
    assert f"This form was for “{team.slug}”, which is not among your organizations" in text(
        refused
    )
    assert not Invitation.objects.exists()


# --- a form that names no organization --------------------------------------------------------


def everything():
    """What the forms below may change: credits, keys, members, invitations, listings,
    checkouts, and the audit log."""
    return (
        ledger_rows(),
        ApiKey.objects.filter(revoked_at__isnull=True).count(),
        list(Membership.objects.order_by("pk").values_list("pk", "role")),
        Invitation.objects.count(),
        MarketListing.objects.count(),
        CheckoutSession.objects.count(),
        AuditEvent.objects.count(),
    )


@pytest.mark.parametrize(
    ("path", "form"),
    [
        ("/dashboard/keys", {"name": "ci", "scopes": [Scope.BILLING_READ]}),
        ("/dashboard/members", {"email": "ada@example.test", "role": "member"}),
        (
            "/dashboard/market",
            {"action": "sell", "quantity": "100", "price": "2.50", "currency": "usd"},
        ),
        ("/dashboard/billing", {"action": "checkout", "pack": "boost-1k"}),
        ("/dashboard/keys/{key}/revoke", {}),
        ("/dashboard/members/{member}/remove", {}),
        ("/dashboard/members/{member}/role", {"role": "admin"}),
    ],
)
def test_a_form_that_names_no_organization_is_refused_and_does_nothing(client, member, path, form):
    # given an owner of one organization only, with a key, a member and resellable credits
    _, org = member(Role.OWNER)
    key, _ = apikey_create(organization=org, name="old", scopes=[Scope.BILLING_READ])
    someone = UserFactory()
    join(someone, org, Role.MEMBER)
    theirs = Membership.objects.get(user=someone)
    market_fixtures.subscription_credits(org, credits(1000))
    path = path.format(key=key.pk, member=theirs.pk)
    before = everything()

    # when a form without `acting_for` is sent (a page drawn before forms carried it)
    response = client.post(path, form, acting_for=None)

    # then it is refused, for the organization that acts, and nothing is done
    assert_refused(response, 409, "organization_changed")
    assert f'data-drawn-for="" data-acting-for="{org.slug}"' in text(response)
    assert "This form does not say which organization it was for" in text(response)
    assert everything() == before


def test_the_switcher_itself_needs_no_acting_for(client, member):
    # given a member of two organizations
    user, _first = member(Role.OWNER)
    second = OrganizationFactory()
    join(user, second)

    # when they switch with the switcher's form alone (it names the one it switches to)
    response = client.post(SWITCHER, {"organization": second.slug, "next": "/dashboard/keys"})

    # then later pages act for the second
    assert response.status_code == 302 and response["Location"] == "/dashboard/keys"
    assert drawn_for(client.get("/dashboard/keys")) == second.slug
