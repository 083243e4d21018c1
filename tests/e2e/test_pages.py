"""The pages people use, in a real browser, from the app as production serves it.

Finance staff sign in to the admin and change an organization's entitlements;
partners read the API documentation. Each test also asserts that nothing the
page loaded failed (no 4xx/5xx, no blocked request, no script error): a page
whose stylesheet or scripts did not load is a broken page even if its HTML is right.
"""

from __future__ import annotations

import pytest

from accounts.models import AuditEvent, Organization, User
from gymbilling.models import CheckoutSession, PaymentReversal
from metering.models import MICRO, JournalTransaction, TransactionKind
from metering.selectors import organization_balance
from metering.services.usage import Usage, usage_record_create
from tests.factories import OrganizationFactory
from tests.gymbilling import conftest as payment_fixtures
from tests.gymbilling.billing import conftest as billing_fixtures

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

# The billing tests' fixtures, used here as they are: a customer with an API key, the
# plans and packs synced to the Stripe stand-in, and webhook delivery.
customer, catalog = billing_fixtures.customer, billing_fixtures.catalog
deliver = payment_fixtures.deliver

STAFF_EMAIL, STAFF_PASSWORD = "finance@gym.test", "a long and unusual passphrase 9"


def _sign_in(visit, url: str) -> None:
    """Through the admin's own login form, as a person does."""
    User.objects.create_superuser(STAFF_EMAIL, STAFF_PASSWORD)
    page = visit.page
    page.goto(f"{url}/admin/")
    page.fill("#id_username", STAFF_EMAIL)
    page.fill("#id_password", STAFF_PASSWORD)
    page.click("input[type=submit]")
    page.wait_for_selector("text=Site administration")


def test_the_home_page_leads_to_api_docs_that_list_the_operations(app_server, visit):
    # given the home page
    page = visit.page
    page.goto(f"{app_server}/")

    # when a partner follows its link to the API documentation
    page.click("text=API documentation")

    # then Swagger UI renders the schema's operations, the OpenAI-compatible ones among them
    page.wait_for_selector(".opblock-summary-path")
    # (Swagger UI breaks long paths with zero-width spaces)
    paths = {
        path.replace("\u200b", "").strip()
        for path in page.locator(".opblock-summary-path").all_inner_texts()
    }
    assert {"/v1/chat/completions", "/v1/models", "/api/v1/jobs"} <= paths
    assert visit.failures == []


def test_finance_staff_sign_in_to_a_styled_admin(app_server, visit):
    # when finance staff sign in
    _sign_in(visit, app_server)

    # then the admin is drawn with its stylesheet (its header has its colour, not the
    # browser's default transparent), and every file it asked for came
    header = visit.page.evaluate(
        "getComputedStyle(document.querySelector('#header')).backgroundColor"
    )
    assert header not in ("", "rgba(0, 0, 0, 0)", "transparent")
    assert visit.failures == []


def test_finance_staff_change_an_organizations_entitlements_in_the_browser(app_server, visit):
    # given an organization on the default limits, and staff signed in
    org = OrganizationFactory(requests_per_minute=60, max_priority="standard")
    _sign_in(visit, app_server)
    page = visit.page

    # when they open it, raise its request limit and its priority, and save
    page.goto(f"{app_server}/admin/accounts/organization/{org.pk}/change/")
    offered = page.locator("#id_max_priority option").evaluate_all(
        "options => options.map(o => o.value)"
    )
    page.fill("#id_requests_per_minute", "600")
    page.select_option("#id_max_priority", "priority")
    page.click("input[name=_save]")
    page.wait_for_selector(".messagelist .success")

    # then the choice was only among the job priorities, the organization has the new
    # entitlements, and the audit log says who set them
    assert offered == ["batch", "standard", "priority"]
    org = Organization.objects.get(pk=org.pk)
    assert (org.requests_per_minute, org.max_priority) == (600, "priority")
    [event] = AuditEvent.objects.filter(
        organization=org, action="organization.entitlements_changed"
    )
    assert event.data["after"] == {"requests_per_minute": 600, "max_priority": "priority"}
    assert STAFF_EMAIL in event.target
    assert visit.failures == []


def test_finance_staff_adjust_an_organizations_credits_from_its_page(app_server, visit, grant):
    # given an organization with 5 credits, and staff signed in
    org = OrganizationFactory()
    grant(org, 5_000_000)
    _sign_in(visit, app_server)
    page = visit.page

    # when they open the organization, follow "Adjust credits", and add 12.5 with a reason
    page.goto(f"{app_server}/admin/accounts/organization/{org.pk}/change/")
    page.click("text=Adjust credits")
    shown_before = page.inner_text("#available")
    page.fill("#id_credits", "12.5")
    page.fill("#id_reason", "Goodwill for ticket 42")
    page.click("input[name=_adjust]")
    page.wait_for_selector(".messagelist .success")

    # then the form had shown the 5 available, the wallet has 17.5, and the ledger
    # names the staff member and the reason
    assert shown_before == "5"
    assert organization_balance(organization=org).available == 17_500_000
    [txn] = JournalTransaction.objects.filter(kind=TransactionKind.ADJUSTMENT, organization=org)
    assert (txn.actor.email, txn.memo) == (STAFF_EMAIL, "Goodwill for ticket 42")
    assert visit.failures == []


def test_a_refused_adjustment_is_shown_on_the_form_and_writes_nothing(app_server, visit, grant):
    # given an organization with 5 credits, and staff signed in
    org = OrganizationFactory()
    grant(org, 5_000_000)
    _sign_in(visit, app_server)
    page = visit.page
    before = JournalTransaction.objects.count()

    # when they try to remove 8
    page.goto(f"{app_server}/admin/metering/ledgeraccount/adjust/{org.pk}/")
    page.fill("#id_credits", "-8")
    page.fill("#id_reason", "Duplicate grant")
    page.click("input[name=_adjust]")

    # then the form says why, and the ledger is as it was
    assert "insufficient_credits" in page.inner_text(".errornote")
    assert JournalTransaction.objects.count() == before
    assert organization_balance(organization=org).available == 5_000_000


def test_finance_refund_a_pack_from_its_checkout_page(
    app_server, visit, customer, catalog, stripe_standin, deliver
):
    # given a 1,000-credit pack bought through Stripe Checkout, and staff signed in
    org = customer.organization
    bought = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(bought.json()["session_id"])
    deliver()
    checkout = CheckoutSession.objects.get(organization=org)
    assert organization_balance(organization=org).available == 1_000 * MICRO
    _sign_in(visit, app_server)
    page = visit.page

    # when they open the checkout, follow "Refund", give a reason and refund it all
    page.goto(f"{app_server}/admin/gymbilling/checkoutsession/{checkout.pk}/change/")
    page.click("text=Refund")
    page.fill("#id_note", "Customer asked within 14 days")
    page.click("input[name=_refund]")
    page.wait_for_selector(".messagelist .success")

    # then Stripe refunded it, and at once (no webhook delivered) the credits are gone
    reversal = PaymentReversal.objects.get(organization=org)
    assert (reversal.kind, reversal.credits_clawed_back) == ("refund", 1_000 * MICRO)
    assert organization_balance(organization=org).available == 0
    assert visit.failures == []


def test_finance_read_the_revenue_and_cost_report(app_server, visit):
    # given a job's usage today, and staff signed in
    usage_record_create(
        organization_id=OrganizationFactory().pk,
        job_id="job-e2e",
        model_name="gym-tiny",
        priority="standard",
        usage=Usage(input_tokens=10, cached_input_tokens=0, output_tokens=5),
        credits=1_500,
        engine_busy_ms=3_600_000,
        serving_cost=42,
    )
    _sign_in(visit, app_server)
    page = visit.page

    # when they go from the usage records to the report
    page.goto(f"{app_server}/admin/metering/usagerecord/")
    page.click("text=Revenue and cost report")

    # then this month's row for the model shows its engine hours and its cost (and, as
    # no lot paid for its credits, no revenue)
    header = page.locator("#report thead th").all_text_contents()  # as written, not as styled
    cells = dict(zip(header, page.locator("#report .report-row td").all_inner_texts(), strict=True))
    assert [cells["model"], cells["currency"], cells["requests"]] == ["gym-tiny", "usd", "1"]
    assert cells["engine busy hours"] == "1.000" and cells["credits consumed"] == "0.0015"
    assert cells["serving cost (minor units)"] == "42" and cells["margin (minor units)"] == "-42"
    assert visit.failures == []
