"""An invitation in a real browser, from the manager's form to the newcomer's first page,
following the links the emails carry, as people do.

The app server queues its emails on the broker (accounts.services.mail); the test's
`email_worker` sends them into this process's outbox, where the test reads the links.
Each test also asserts that nothing the pages loaded failed (tests/e2e/conftest.py).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import pytest
from django.core import mail

from accounts.models import Membership, Role, User
from accounts.services import organization_entitlements_set
from tests.e2e.test_dashboard import EMAIL, PASSWORD, sign_up

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

NEWCOMER = "newcomer@gym.test"


@pytest.fixture
def site(app_server) -> str:
    return app_server


def link(email_worker, site: str, *, to: str, path: str) -> str:
    """The link to `path` in the emails sent to `to`, once the emails the app server
    queued are sent, on the app server under test (the emails name SITE_URL)."""
    email_worker.work()
    found = []
    for message in mail.outbox:
        if message.to == [to]:
            found += re.findall(rf"https?://\S+{re.escape(path)}\?token=\S+", message.body)
    assert len(found) == 1, f"{len(found)} links to {path} in the emails to {to}"
    parts = urlsplit(found[0])
    return f"{site}{parts.path}?{parts.query}"


def test_an_invited_newcomer_signs_up_verifies_accepts_and_lands_in_the_organization(
    site, email_worker, visit
):
    # given a manager whose organization has a seat free
    sign_up(visit, site)
    page = visit.page
    org = Membership.objects.get(user__email=EMAIL).organization
    organization_entitlements_set(organization=org, reason="test: a team plan", seats=3)

    # when they invite a newcomer as admin, and sign out
    page.click("nav.side >> text=Members")
    page.fill("#invite-email", NEWCOMER)
    page.select_option("#invite-role", "admin")
    page.click("text=Send invitation")
    page.wait_for_selector(f"tr[data-invitation='{NEWCOMER}']")
    page.click("text=Sign out")
    page.wait_for_url("**/login/")

    # and the newcomer follows the emailed link, and signs up from it
    invitation = link(email_worker, site, to=NEWCOMER, path="/invitations/accept")
    page.goto(invitation)
    assert org.name in page.locator("main").inner_text()
    page.click("text=create an account")
    page.fill("#id_email", NEWCOMER)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")

    # then sign-up asks them to check their email (no address holds the token)
    page.wait_for_url(f"{site}/signup/done**")
    assert "token" not in page.url
    assert page.locator("[data-signup=sent]").count() == 1

    # when they verify their address with the link emailed at sign-up, and their password
    page.goto(link(email_worker, site, to=NEWCOMER, path="/verify-email"))
    page.fill("#id_password", PASSWORD)
    page.click("form[action='/verify-email'] button[type=submit]")

    # then they are signed in, back on the invitation (its page, without the token)
    page.wait_for_url(f"{site}/invitations/accept")
    assert f"{NEWCOMER} is verified" in page.locator(".messages").inner_text()

    # and accept the invitation
    page.click("form[action='/invitations/accept'] button[type=submit]")
    page.wait_for_url(f"{site}/dashboard/")

    # then they are an admin of the organization, and the dashboard acts for it
    newcomer = User.objects.get(email=NEWCOMER)
    assert newcomer.email_verified is True
    assert Membership.objects.get(organization=org, user=newcomer).role == Role.ADMIN
    switcher = page.locator("#organization-switch")
    assert switcher.input_value() == org.slug
    assert f"You joined {org.name} as admin." in page.locator(".messages").inner_text()
    assert page.locator("[data-banner='verify-email']").count() == 0
    assert visit.failures == []


def test_a_manager_revokes_an_invitation_and_its_link_then_admits_nobody(site, email_worker, visit):
    # given a manager who invited a newcomer
    sign_up(visit, site)
    page = visit.page
    page.click("nav.side >> text=Members")
    page.fill("#invite-email", NEWCOMER)
    page.click("text=Send invitation")
    row = page.locator(f"tr[data-invitation='{NEWCOMER}']")
    row.wait_for()

    # when they press Revoke on its row
    row.locator("button", has_text="Revoke").click()

    # then the page says so and no longer lists it
    page.wait_for_selector(".messages")
    assert f"Revoked the invitation to {NEWCOMER}" in page.locator(".messages").inner_text()
    assert row.count() == 0
    # and the emailed link is refused, saying so to the newcomer
    page.click("text=Sign out")
    page.wait_for_url("**/login/")
    page.goto(link(email_worker, site, to=NEWCOMER, path="/invitations/accept"))
    assert page.locator("[data-error-code='invitation_invalid']").count() == 1
    assert visit.failures == [f"404 {site}/invitations/accept"]
