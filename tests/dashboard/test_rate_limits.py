"""Limits on what people do through pages: signing in and up, asking for links, and the
dashboard's POSTs, counted in Redis (the real one) as the API's limits are.

The limits are set low here (the test settings set them high, for the other tests that
sign up and in from one address); each test runs inside one rate-limit window.
"""

from __future__ import annotations

import pytest
from django.core import mail
from django.test import Client

from accounts.models import Invitation, Membership, Role, User
from accounts.services import apikey_create, user_signup
from tests.dashboard.conftest import DashboardClient, assert_refused
from tests.factories import OrganizationFactory, UserFactory

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("fresh_window")]

PASSWORD = "a long and unusual passphrase 3"


def assert_rate_limited(response, *, window: int) -> None:
    assert_refused(response, 429, "rate_limited")
    assert 1 <= int(response["Retry-After"]) <= window


def sign_in(client: Client, email: str, password: str, **extra):
    return client.post("/login/", {"username": email, "password": password}, **extra)


def signed_in(client: Client) -> bool:
    return "_auth_user_id" in client.session


def test_sign_ins_to_one_address_are_limited_whatever_its_case(client, settings):
    # given a limit of 3 sign-ins a minute per address
    settings.RATELIMIT_SIGNIN_PER_EMAIL = 3
    UserFactory(email="ada@example.test", password=PASSWORD)
    UserFactory(email="bob@example.test", password=PASSWORD)

    # when someone guesses three times, in any case, then tries the right password
    guesses = [
        sign_in(client, email, "guess")
        # (the last with a fullwidth "a", which signs in as "ada@" once NFKC-normalized)
        for email in ("ada@example.test", "ADA@example.test", " \uff41da@Example.TEST")
    ]
    right = sign_in(client, "ada@example.test", PASSWORD)

    # then the guesses are refused as wrong, and the fourth attempt is not even tried
    assert [r.status_code for r in guesses] == [200, 200, 200]
    assert_rate_limited(right, window=60)
    assert not signed_in(client)
    # while another address signs in from the same place
    assert sign_in(Client(), "bob@example.test", PASSWORD).status_code == 302


def test_sign_ins_from_one_network_address_are_limited_and_forwarded_for_is_not_believed(
    settings,
):
    # given a limit of 3 sign-ins a minute per network address
    settings.RATELIMIT_SIGNIN_PER_IP = 3
    UserFactory(email="ada@example.test", password=PASSWORD)
    here = {"REMOTE_ADDR": "203.0.113.7"}

    # when one address tries three accounts, claiming a new origin each time, then a fourth
    tries = [
        sign_in(
            Client(),
            f"user{n}@example.test",
            "guess",
            HTTP_X_FORWARDED_FOR=f"198.51.100.{n}",
            **here,
        )
        for n in range(3)
    ]
    fourth = sign_in(Client(), "ada@example.test", PASSWORD, **here)
    elsewhere = sign_in(Client(), "ada@example.test", PASSWORD, REMOTE_ADDR="203.0.113.8")

    # then the fourth is refused, and another address is not
    assert [r.status_code for r in tries] == [200, 200, 200]
    assert_rate_limited(fourth, window=60)
    assert elsewhere.status_code == 302


def test_sign_ups_from_one_network_address_are_limited(client, settings):
    # given a limit of 2 sign-ups per 10 minutes per network address
    settings.RATELIMIT_SIGNUP_PER_IP = 2

    # when three accounts are made from one address
    made = [
        Client().post("/signup/", {"email": f"new{n}@example.test", "password": PASSWORD})
        for n in range(3)
    ]

    # then the third is refused and not made
    assert [r.status_code for r in made[:2]] == [302, 302]
    assert_rate_limited(made[2], window=600)
    assert b'name="email"' in made[2].content  # the form, to try again later
    assert not User.objects.filter(email="new2@example.test").exists()


def test_sign_ups_with_a_taken_address_count_as_new_ones_do(settings):
    # given a limit of 2 sign-ups per 10 minutes per network address, and an account
    settings.RATELIMIT_SIGNUP_PER_IP = 2
    UserFactory(email="ada@example.test", password=PASSWORD)

    # when the taken address is tried twice from one network address, then a new one
    tries = [
        Client().post("/signup/", {"email": email, "password": PASSWORD})
        for email in ("ada@example.test", "ADA@example.test", "new@example.test")
    ]

    # then the taken address's tries used the limit up as new ones do: the new one is refused
    assert [r.status_code for r in tries[:2]] == [302, 302]
    assert_rate_limited(tries[2], window=600)
    assert not User.objects.filter(email="new@example.test").exists()


def test_asking_for_the_verification_link_again_is_limited(client, settings, commit_then_mail):
    # given an unverified account allowed one more link an hour
    settings.RATELIMIT_VERIFICATION_EMAILS_PER_USER = 1
    user = user_signup(email="ada@example.test", password=PASSWORD)
    client.force_login(user)

    # when it asks twice
    with commit_then_mail():
        first = client.post("/verify-email/send")
        second = client.post("/verify-email/send")

    # then one link was sent, and the second ask is refused
    assert first.status_code == 302
    assert_rate_limited(second, window=3600)
    assert len(mail.outbox) == 1


def test_dashboard_posts_count_against_each_persons_own_limit(client, member, settings):
    # given a limit of 2 dashboard changes a minute per person, and two owners of one team
    settings.RATELIMIT_DASHBOARD_PER_USER = 2
    _owner, org = member(Role.OWNER, organization=OrganizationFactory(seats=9))
    second = UserFactory()
    Membership.objects.create(user=second, organization=org, role=Role.OWNER)
    other = DashboardClient()
    other.force_login(second)

    # when the first invites three times, and the second once
    tries = [
        client.post("/dashboard/members", {"email": f"{n}@example.test", "role": "member"})
        for n in "abc"
    ]
    others = other.post("/dashboard/members", {"email": "d@example.test", "role": "member"})

    # then the first's third is over their limit: refused with the page's 429, and not
    # written; the second's is theirs to make
    assert [r.status_code for r in tries[:2]] == [302, 302]
    assert_rate_limited(tries[2], window=60)
    assert b'name="email"' in tries[2].content  # the members page, to try again later
    assert others.status_code == 302
    assert sorted(Invitation.objects.filter(organization=org).values_list("email", flat=True)) == [
        "a@example.test",
        "b@example.test",
        "d@example.test",
    ]


def test_an_api_used_up_holds_no_dashboard_back_and_the_dashboard_spends_none_of_it(client, member):
    # given an organization allowed 2 API requests a minute, a partner app's key having
    # used one
    _owner, org = member(
        Role.OWNER, organization=OrganizationFactory(requests_per_minute=2, seats=9)
    )
    _key, secret = apikey_create(organization=org, name="partner", scopes=["billing:read"])
    auth = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    assert client.get("/api/v1/credits/balance", **auth).status_code == 200

    # when its people make three changes on the dashboard
    changes = [
        client.post("/dashboard/members", {"email": f"{n}@example.test", "role": "member"})
        for n in "abc"
    ]

    # then they are all made, and the API still has its second request of the minute
    assert [r.status_code for r in changes] == [302, 302, 302]
    assert client.get("/api/v1/credits/balance", **auth).status_code == 200
    # and once the app has used the API up, the dashboard still works
    assert client.get("/api/v1/credits/balance", **auth).status_code == 429
    later = client.post("/dashboard/members", {"email": "d@example.test", "role": "member"})
    assert later.status_code == 302
    assert Invitation.objects.filter(organization=org).count() == 4


def test_revoking_a_key_is_never_held_back_by_a_limit_used_up(client, member, settings):
    # given an organization whose requests per minute a leaked key has used up, and an
    # owner who has used their dashboard changes up too
    settings.RATELIMIT_DASHBOARD_PER_USER = 1
    _owner, org = member(
        Role.OWNER, organization=OrganizationFactory(requests_per_minute=1, seats=9)
    )
    leaked, secret = apikey_create(organization=org, name="leaked", scopes=["billing:read"])
    auth = {"HTTP_AUTHORIZATION": f"Bearer {secret}"}
    assert client.get("/api/v1/credits/balance", **auth).status_code == 200
    assert client.get("/api/v1/credits/balance", **auth).status_code == 429
    invites = [
        client.post("/dashboard/members", {"email": f"{n}@example.test", "role": "member"})
        for n in "ab"
    ]
    assert [r.status_code for r in invites] == [302, 429]

    # when the owner revokes it on the dashboard
    response = client.post(f"/dashboard/keys/{leaked.pk}/revoke")

    # then it is revoked at once, and the key stops working
    assert response.status_code == 302
    leaked.refresh_from_db()
    assert leaked.revoked_at is not None
    assert client.get("/api/v1/credits/balance", **auth).status_code == 401


def test_the_admins_sign_in_is_limited_as_the_dashboards(client, settings):
    # given a limit of 2 sign-ins a minute per address, and a member of finance staff
    settings.RATELIMIT_SIGNIN_PER_EMAIL = 2
    User.objects.create_superuser("finance@example.test", PASSWORD)

    def admin_sign_in(password: str):
        return client.post(
            "/admin/login/?next=/admin/",
            {"username": "finance@example.test", "password": password},
        )

    # when two guesses at the admin's sign-in are followed by the right password
    guesses = [admin_sign_in("guess") for _ in range(2)]
    right = admin_sign_in(PASSWORD)

    # then the guesses are refused as wrong, and the third is not tried
    assert [r.status_code for r in guesses] == [200, 200]
    assert_refused(right, 429, "rate_limited")
    assert right["Retry-After"]
    assert "_auth_user_id" not in client.session
