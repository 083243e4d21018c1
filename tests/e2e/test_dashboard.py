"""The customer dashboard in a real browser, served as production serves it.

Each test also asserts that nothing the page loaded failed (tests/e2e/conftest.py).
"""

from __future__ import annotations

import pytest

from accounts.models import Membership, User
from accounts.services.email_verification import user_email_mark_verified
from metering.models import MICRO

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EMAIL, PASSWORD = "member@gym.test", "a long and unusual passphrase 7"


def sign_up(visit, url: str, email: str = EMAIL) -> None:
    """Through the sign-up form, as a customer does, then signed in through the sign-in
    form once the address is verified; lands on the overview.

    The address is verified here as the emailed link verifies it (user_email_mark_verified):
    following the link itself, from the app server's mail, is
    test_dashboard_invitations's.
    """
    page = visit.page
    page.goto(f"{url}/dashboard/")
    page.wait_for_url("**/login/?next=/dashboard/")
    page.click("text=Create an account")
    page.fill("#id_email", email)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/signup/done?next=%2Fdashboard%2F")
    user = User.objects.get(email=email)
    user_email_mark_verified(user=user, email=user.email)
    page.click("main a[href^='/login/']")
    page.fill("#id_username", email)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/dashboard/")


def test_a_customer_signs_up_and_sees_their_credits(app_server, visit, grant):
    # given a new customer signed up through the form
    sign_up(visit, app_server)
    page = visit.page
    assert page.locator("[data-figure=available]").inner_text() == "0"

    # when credits arrive and they reload
    org = Membership.objects.get(user__email=EMAIL).organization
    grant(org, 12 * MICRO + 500_000)
    page.reload()

    # then the overview shows them exactly, in the styled page, and nothing failed to load
    assert page.locator("[data-figure=available]").inner_text() == "12.5"
    assert page.locator("table.lots tbody tr").count() == 1
    nav = page.evaluate("getComputedStyle(document.querySelector('nav.side')).borderRightStyle")
    assert nav == "solid"
    assert visit.failures == []


def test_signing_out_ends_the_session(app_server, visit):
    sign_up(visit, app_server)
    page = visit.page

    page.click("text=Sign out")
    page.wait_for_url("**/login/")
    page.goto(f"{app_server}/dashboard/")

    assert "/login/" in page.url
    assert User.objects.filter(email=EMAIL).exists()
    assert visit.failures == []
