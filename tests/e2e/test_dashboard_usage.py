"""The usage page in a real browser, served as production serves it.

Each test also asserts that nothing the page loaded failed (tests/e2e/conftest.py).
"""

from __future__ import annotations

import pytest

from accounts.models import Membership
from metering.services.usage import Usage, usage_record_create
from tests.e2e.test_dashboard import EMAIL, sign_up

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def test_the_usage_page_draws_a_bar_per_model_for_recorded_usage(app_server, visit):
    # given a customer whose jobs ran on two models today
    sign_up(visit, app_server)
    page = visit.page
    org = Membership.objects.get(user__email=EMAIL).organization
    for job, model, charged in [("a", "gym-tiny", 1_500_000), ("b", "gym-large", 4_500_000)]:
        usage_record_create(
            organization_id=org.pk,
            job_id=f"job-e2e-{job}",
            model_name=model,
            priority="standard",
            usage=Usage(input_tokens=10, cached_input_tokens=2, output_tokens=5),
            credits=charged,
        )

    # when they open the usage page from the menu
    page.click("nav.side >> text=Usage")
    page.wait_for_selector("svg.chart")

    # then today's bar stacks the two models, the larger below, each drawn with its height
    bars = page.locator("svg.chart rect.bar")
    assert bars.count() == 2
    assert bars.evaluate_all("rs => rs.map(r => r.dataset.model)") == ["gym-large", "gym-tiny"]
    heights = bars.evaluate_all("rs => rs.map(r => r.getBoundingClientRect().height)")
    assert heights[0] > heights[1] > 0
    assert "gym-tiny: 1.5 credits" in bars.nth(1).locator("title").text_content()
    assert page.locator("svg.chart g.day").count() == 30
    # and the table under it gives the same numbers
    assert page.locator("[data-figure=total-credits]").inner_text() == "6"
    assert page.locator("table.usage tbody tr").count() == 2
    assert visit.failures == []
