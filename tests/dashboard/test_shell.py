"""Signing up and in, choosing the organization, roles, and the overview."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse
from django.views.debug import SafeExceptionReporterFilter

from accounts.models import Membership, Organization, Role, User
from gymbilling.market.services import listing_create
from metering.models import MICRO
from metering.services import hold_place
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def test_a_visitor_is_sent_to_sign_in_and_back(client):
    response = client.get("/dashboard/")

    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/dashboard/"


def test_signing_up_creates_the_account_its_organization_and_signs_in(client):
    response = client.post(
        "/signup/", {"email": "Ada@Example.test", "password": "a long and unusual passphrase 3"}
    )

    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    user = User.objects.get(email="ada@example.test")
    membership = Membership.objects.get(user=user)
    assert membership.role == Role.OWNER and membership.organization.personal
    page = client.get("/dashboard/")
    assert page.status_code == 200
    assert b"ada@example.test" in page.content


@pytest.mark.parametrize(
    ("email", "password", "field"),
    [
        ("not-an-email", "a long and unusual passphrase 3", b"invalid_email"),
        ("bob@example.test", "short", b"invalid_password"),
        ("bob@example.test", "12345678901", b"invalid_password"),
    ],
)
def test_a_bad_signup_is_refused_and_creates_nothing(client, email, password, field):
    response = client.post("/signup/", {"email": email, "password": password})

    assert response.status_code == 400
    assert field in response.content
    assert not User.objects.exists() and not Organization.objects.exists()


def test_a_password_like_the_address_is_refused_at_sign_up(client):
    # when someone signs up with their address's name as the password
    response = client.post(
        "/signup/", {"email": "marguerite.duchamp@example.test", "password": "marguerite.duchamp"}
    )

    # then the password validators compare it with the address, as they would with a user
    assert response.status_code == 400
    assert b'data-error-code="invalid_password"' in response.content
    assert b"too similar to the email address" in response.content
    assert not User.objects.exists()


def test_a_signed_in_user_posting_the_sign_up_form_stays_who_they_are(client, member):
    # given someone signed in
    user, _org = member(Role.OWNER)
    users_before = User.objects.count()

    # when the sign-up form is posted from their browser
    response = client.post(
        "/signup/", {"email": "second@example.test", "password": "a long passphrase, 44"}
    )

    # then they are sent to the dashboard, as the form's GET sends them, and nothing changed
    assert response.status_code == 302 and response["Location"] == reverse("dashboard")
    assert User.objects.count() == users_before
    assert client.session["_auth_user_id"] == str(user.pk)


def test_signing_up_twice_with_one_email_is_a_conflict(client):
    client.post("/signup/", {"email": "c@example.test", "password": "a long passphrase, 44"})
    client.logout()

    response = client.post("/signup/", {"email": "C@example.test", "password": "another one 55!"})

    assert response.status_code == 409
    assert b"already has an account" in response.content
    assert User.objects.count() == 1 and Organization.objects.count() == 1


def test_signing_in_through_the_form_reaches_the_page_asked_for(client):
    client.post("/signup/", {"email": "d@example.test", "password": "a long passphrase, 44"})
    client.logout()

    wrong = client.post("/login/", {"username": "d@example.test", "password": "nope"})
    right = client.post(
        "/login/",
        {"username": "d@example.test", "password": "a long passphrase, 44", "next": "/dashboard/"},
    )

    assert wrong.status_code == 200 and b"invalid_login" in wrong.content
    assert right.status_code == 302 and right["Location"] == "/dashboard/"


def test_signing_in_matches_the_address_in_any_case_as_signing_up_stores_it(client):
    # given someone who signed up with capitals in their address
    password = "a long passphrase, 44"
    client.post("/signup/", {"email": "Ada@Example.test", "password": password})

    # when they sign in with the address exactly as they typed it, or otherwise
    typed = Client().post("/login/", {"username": "Ada@Example.test", "password": password})
    other = Client().post("/login/", {"username": " ADA@example.TEST", "password": password})

    # then both sign in
    assert typed.status_code == 302 and typed["Location"] == reverse("dashboard")
    assert other.status_code == 302


def test_staff_sign_in_to_the_admin_in_any_case():
    User.objects.create_superuser("ops@example.test", "a long passphrase, 44")

    response = Client().post(
        "/admin/login/?next=/admin/",
        {"username": "Ops@Example.TEST", "password": "a long passphrase, 44", "next": "/admin/"},
    )

    assert response.status_code == 302 and response["Location"] == "/admin/"


def test_the_overview_shows_the_chosen_organizations_credits_exactly(client, member, grant):
    user, first = member(Role.MEMBER)
    second = OrganizationFactory(name="Second gym")
    Membership.objects.create(user=user, organization=second, role=Role.BILLING)
    grant(first, 5 * MICRO)
    grant(second, 1_234_567)

    before = client.get("/dashboard/")
    switched = client.post(
        "/dashboard/organization", {"organization": second.slug, "next": "/dashboard/"}
    )
    after = client.get("/dashboard/")

    assert b'data-figure="available">5<' in before.content
    assert switched.status_code == 302 and switched["Location"] == "/dashboard/"
    assert b'data-figure="available">1.234567<' in after.content
    assert b"Second gym" in after.content


def test_switching_to_someone_elses_organization_is_refused(client, member):
    member(Role.OWNER)
    stranger = OrganizationFactory()

    response = client.post("/dashboard/organization", {"organization": stranger.slug})
    page = client.get("/dashboard/")

    assert response.status_code == 404
    assert b'data-error-code="not_found"' in response.content
    assert stranger.name.encode() not in page.content


def test_the_switch_does_not_redirect_off_the_site(client, member):
    _, org = member(Role.OWNER)

    response = client.post(
        "/dashboard/organization", {"organization": org.slug, "next": "https://evil.test/"}
    )

    assert response["Location"] == "/dashboard/"


def test_a_user_in_no_organization_is_told_so(client):
    user = User.objects.create_user("lonely@example.test", "a long passphrase, 44")
    client.force_login(user)

    response = client.get("/dashboard/")

    assert response.status_code == 403
    assert b'data-error-code="no_organization"' in response.content


def test_the_switcher_on_a_refused_post_leads_back_to_a_page_not_to_the_post(client, member):
    # given a refusal drawn in answer to a POST to an address that takes POSTs only
    member(Role.OWNER)
    refusal = client.post("/dashboard/keys/999999/revoke")
    assert refusal.status_code == 404

    # then its switcher sends the user to the dashboard, not back to that address
    assert b'name="next" value=""' in refusal.content
    page = client.get("/dashboard/keys")
    assert b'name="next" value="/dashboard/keys"' in page.content


def test_the_overage_allowance_shown_is_what_of_it_is_available(client, member, grant):
    # given 5 prepaid credits and a 10-credit overage allowance (burned last), and a
    # running job holding 13 of the 15: the 5 prepaid and 8 of the allowance
    _, org = member(Role.OWNER)
    grant(org, 5 * MICRO)
    grant(org, 10 * MICRO, source="overage", paid=False, resellable=False, priority=1000)
    hold_place(organization=org, amount=13 * MICRO, key="job-overview")

    page = client.get("/dashboard/").content.decode()

    # then 2 are available, and all 2 are the allowance (not the lot's 10 left)
    assert 'data-figure="available">2<' in page
    assert "Of what is available, 2 is your plan" in page


def test_credits_in_escrow_are_marked_so_in_the_lots(client, member, grant):
    # given 100 credits of which 40 are listed on the marketplace
    _, org = member(Role.OWNER)
    grant(org, 100 * MICRO)
    listing_create(seller=org, quantity=40 * MICRO, price_per_1k=300, currency="usd")

    page = client.get("/dashboard/").content.decode()

    assert 'data-figure="available">60<' in page and 'data-figure="escrowed">40<' in page
    rows = [row for row in page.split("<tr>") if "Subscription period" in row]
    assert sorted(("in escrow" in row, ">40<" in row) for row in rows) == [
        (False, False),
        (True, True),
    ]


@pytest.mark.parametrize(
    ("role", "path"),
    [
        (Role.OWNER, "/dashboard/"),
        (Role.OWNER, "/dashboard/members"),
        (Role.MEMBER, "/dashboard/members"),  # the 403 page
        (Role.OWNER, "/dashboard/members?remove=abc"),  # a refusal
    ],
)
def test_no_dashboard_page_is_kept_by_a_browser_or_proxy(client, member, role, path):
    # given a signed-in member
    member(role)

    # when a page is drawn (a page, a refusal, a 403)
    response = client.get(path)

    # then the browser keeps no copy: after signing out, Back shows nothing
    cache_control = {part.strip() for part in response["Cache-Control"].split(",")}
    assert {"no-store", "no-cache", "must-revalidate", "private"} <= cache_control
    assert "Expires" in response


@pytest.mark.parametrize("path", ["/signup/", "/login/"])
def test_an_error_report_of_signing_up_or_in_hides_the_password(client, path):
    # when a password is posted
    response = client.post(
        path,
        {"email": "ada@example.test", "username": "ada@example.test", "password": "hunter2hunter2"},
    )

    # then what an error report would show of that request (Django's filter) hides it
    shown = SafeExceptionReporterFilter().get_post_parameters(response.wsgi_request)
    assert shown["password"] == SafeExceptionReporterFilter.cleansed_substitute
    assert "hunter2hunter2" not in repr(dict(shown))
