"""Two tabs of one browser on two organizations: a form acts for the organization its
page was drawn for (accounts.dashboard.MemberPage, `acting_for`)."""

from __future__ import annotations

import pytest

from accounts.models import ApiKey, Membership, Role, User
from tests.e2e.test_dashboard import EMAIL, sign_up
from tests.factories import OrganizationFactory

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_a_form_drawn_before_a_switch_in_another_tab_acts_for_nobody_else(app_server, visit):
    # given a customer who also owns a second organization, on their own keys page
    sign_up(visit, app_server)
    user = User.objects.get(email=EMAIL)
    personal = Membership.objects.get(user=user).organization
    team = OrganizationFactory(name="Lifting Club")
    Membership.objects.create(user=user, organization=team, role=Role.OWNER)
    page = visit.page
    page.goto(f"{app_server}/dashboard/keys")
    page.fill("#id_name", "my laptop")
    page.check("text=Billing (read)")

    # when they switch to the team in another tab, then create the key in the first
    other = page.context.new_page()
    other.goto(f"{app_server}/dashboard/keys")
    with other.expect_navigation():
        other.select_option("#organization-switch", team.slug)
    page.click("text=Create key")

    # then no key is made, for either: the page says the form was for their own
    # organization, while the team acts now
    refusal = page.locator("[data-error-code='organization_changed']")
    assert f"This form was for {personal.name}, but you now act for {team.name}" in (
        refusal.inner_text()
    )
    assert not ApiKey.objects.exists()
    assert visit.failures == [f"409 {app_server}/dashboard/keys"]

    # and switching back from there, the form drawn again makes the key for their own
    page.click(f"text=or switch back to {personal.name}")
    page.wait_for_url(f"{app_server}/dashboard/keys")
    page.fill("#id_name", "my laptop")
    page.check("text=Billing (read)")
    page.click("text=Create key")
    page.wait_for_selector("[data-secret]")
    assert ApiKey.objects.get().organization == personal
