"""The API keys page in a real browser, served as production serves it.

Each test also asserts that nothing the page loaded failed (tests/e2e/conftest.py).
"""

from __future__ import annotations

import pytest
import requests

from accounts.models import ApiKey, Membership
from metering.models import MICRO
from tests.e2e.test_dashboard import EMAIL, sign_up

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_a_customer_creates_a_key_uses_it_and_revokes_it(app_server, visit, grant):
    # given a new customer with 3 credits
    sign_up(visit, app_server)
    page = visit.page
    grant(Membership.objects.get(user__email=EMAIL).organization, 3 * MICRO)

    # when they create a key that reads billing, from the menu
    page.click("nav.side >> text=API keys")
    page.fill("#id_name", "my laptop")
    page.check("text=Billing (read)")
    page.click("text=Create key")
    secret = page.locator("[data-secret]").inner_text()

    # then the key read off the page works against the API
    balance = requests.get(
        f"{app_server}/api/v1/credits/balance",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=10,
    )
    assert balance.status_code == 200 and balance.json()["available"] == 3 * MICRO
    # and once they move on, the page no longer shows it
    page.click("text=Done")
    page.wait_for_selector(f"tr[data-key='{ApiKey.objects.get().prefix}']")
    assert page.locator("[data-secret]").count() == 0
    assert secret not in page.content()

    # when they revoke it, confirming
    page.click("text=Revoke…")
    page.click("text=Revoke the key")
    page.wait_for_selector(".message.success")

    # then it no longer works
    refused = requests.get(
        f"{app_server}/api/v1/credits/balance",
        headers={"Authorization": f"Bearer {secret}"},
        timeout=10,
    )
    assert refused.status_code == 401
    assert "revoked" in page.locator("[data-status]").inner_text()
    assert visit.failures == []
