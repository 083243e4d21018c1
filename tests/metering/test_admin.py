"""The ledger in the Django admin, as finance staff read it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import Scope
from accounts.services import apikey_create
from metering.models import (
    AccountKind,
    CreditLot,
    JournalTransaction,
    LedgerAccount,
    TransactionKind,
)
from metering.selectors import organization_balance
from metering.services import price_book_publish
from metering.services.usage import Usage, usage_record_create
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import changelist_column, credits, ledger_rows, system_balance

pytestmark = pytest.mark.django_db


def test_the_account_list_shows_a_system_accounts_balance_as_the_sum_of_its_entries(
    admin_client, grant, django_assert_max_num_queries
):
    # given credits granted to two organizations: the issuance (system)
    # account takes the negative of both, and keeps no cached balance
    first, second = OrganizationFactory(), OrganizationFactory()
    grant(first, credits(5))
    grant(second, credits(3))
    issuance = LedgerAccount.objects.get(kind=AccountKind.ISSUANCE, organization=None)
    wallet = LedgerAccount.objects.get(kind=AccountKind.WALLET, organization=first)
    assert issuance.balance == 0

    # when finance open the account list (its balances in the list's own query)
    with django_assert_max_num_queries(5):
        page = admin_client.get("/admin/metering/ledgeraccount/").content.decode()

    # then the issuance account shows -8 credits (its true balance), a wallet
    # its own, under a heading that says how a system account's figure is made
    shown = changelist_column(page, "true_balance")
    assert shown[str(issuance.pk)] == str(-credits(8)) == str(system_balance("issuance"))
    assert shown[str(wallet.pk)] == str(credits(5))
    assert "Balance (system: sum of entries)" in page
    # and the account's own page shows the same figure, not the unused column's 0
    detail = admin_client.get(f"/admin/metering/ledgeraccount/{issuance.pk}/change/")
    assert f'<div class="readonly">{-credits(8)}</div>' in detail.content.decode()


# --- finance's adjustments (the wallet's "Adjust credits") -------------------------------


def _adjust_url(org) -> str:
    return f"/admin/metering/ledgeraccount/adjust/{org.pk}/"


def _form(**fields) -> dict:
    return {"credits": "12.5", "reason": "Goodwill for ticket 42", "key": "k1", **fields}


def test_finance_add_credits_with_a_reason_and_the_ledger_names_them(
    admin_client, admin_user, grant
):
    # given an organization with 5 credits
    org = OrganizationFactory()
    grant(org, credits(5))
    before = organization_balance(organization=org).available

    # when finance add 12.5 credits with a reason, and the same form is sent twice
    url = _adjust_url(org)
    drawn = admin_client.get(url)
    first = admin_client.post(url, _form())
    again = admin_client.post(url, _form())

    # then the form offered what is available, and the credits were added once: a
    # free, non-resellable lot, in a journal transaction with the staff member and reason
    assert drawn.status_code == 200 and b'id="available">5<' in drawn.content
    assert first.status_code == again.status_code == 302
    assert organization_balance(organization=org).available == before + 12_500_000
    [txn] = JournalTransaction.objects.filter(kind=TransactionKind.ADJUSTMENT, organization=org)
    assert (txn.actor_id, txn.memo) == (admin_user.pk, "Goodwill for ticket 42")
    [lot] = CreditLot.objects.filter(created_by=txn)
    assert (lot.amount, lot.paid, lot.resellable) == (12_500_000, False, False)


def test_finance_remove_credits_but_never_more_than_are_free(admin_client, grant):
    # given an organization with 5 credits
    org = OrganizationFactory()
    grant(org, credits(5))
    url = _adjust_url(org)

    # when finance remove 2, then try to remove 4 more
    removed = admin_client.post(url, _form(credits="-2", key="k1", reason="Duplicate grant"))
    rows = ledger_rows()
    refused = admin_client.post(url, _form(credits="-4", key="k2", reason="Duplicate grant"))

    # then 3 are left, and the second was refused on the form, writing nothing
    assert removed.status_code == 302
    assert refused.status_code == 200
    assert "insufficient_credits" in " ".join(refused.context["form"].non_field_errors())
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == credits(3)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"credits": "abc"}, "credits"),
        ({"credits": "0"}, "credits"),
        ({"credits": "0.0000001"}, "credits"),
        ({"credits": "NaN"}, "credits"),
        ({"credits": "1e400"}, "credits"),
        ({"reason": "  "}, "reason"),
        ({"credits": "-1", "expires_at": "2099-01-01 00:00"}, "expires_at"),
        ({"key": ""}, "key"),
    ],
)
def test_a_malformed_adjustment_is_refused_on_the_form_and_writes_nothing(
    admin_client, grant, fields, field
):
    # given an organization with credits
    org = OrganizationFactory()
    grant(org, credits(5))
    rows = ledger_rows()

    # when finance send a malformed adjustment
    response = admin_client.post(_adjust_url(org), _form(**fields))

    # then the form names the field, and the ledger is as it was
    assert response.status_code == 200
    assert field in response.context["form"].errors
    assert ledger_rows() == rows


@pytest.mark.parametrize(
    "text",
    ["\u0663\u0660", "\uff12\uff15\uff10", "1_000", "1e3", "1 000", "\u22125"],
    ids=["arabic-indic-30", "fullwidth-250", "underscore", "exponent", "space", "unicode-minus"],
)
def test_credits_in_anything_but_ascii_digits_are_refused_and_nothing_is_written(
    admin_client, grant, text
):
    # given an organization with 5 credits
    org = OrganizationFactory()
    grant(org, credits(5))
    rows = ledger_rows()
    before = organization_balance(organization=org)

    # when finance type credits Decimal() alone would read (30, 250, 1000, 1000)
    response = admin_client.post(_adjust_url(org), _form(credits=text))

    # then the form says what to write, and the ledger and balance are as they were
    assert response.status_code == 200
    [error] = response.context["form"].errors["credits"]
    assert "is not a number of credits: write ASCII digits" in error
    assert ledger_rows() == rows
    assert organization_balance(organization=org) == before


def test_credits_that_expire_in_the_past_are_refused_and_nothing_is_written(admin_client):
    org = OrganizationFactory()
    rows = ledger_rows()

    response = admin_client.post(_adjust_url(org), _form(expires_at="2001-01-01 00:00"))

    assert response.status_code == 200
    assert "lot_expired" in " ".join(response.context["form"].non_field_errors())
    assert ledger_rows() == rows


def test_only_staff_allowed_to_adjust_may_and_they_are_offered_it(client, admin_client, grant):
    # given staff who may view the ledger and organizations but not adjust credits
    org = OrganizationFactory()
    grant(org, credits(5))
    viewer = UserFactory(is_staff=True)
    for codename in ("view_ledgeraccount", "view_organization"):
        viewer.user_permissions.add(Permission.objects.get(codename=codename))
    client.force_login(viewer)
    wallet = LedgerAccount.objects.get(kind=AccountKind.WALLET, organization=org)
    pages = [
        f"/admin/metering/ledgeraccount/{wallet.pk}/change/",
        f"/admin/accounts/organization/{org.pk}/change/",
    ]
    rows = ledger_rows()

    # when the viewer opens the form or posts it, and anyone adjusts a missing organization
    opened = client.get(_adjust_url(org))
    posted = client.post(_adjust_url(org), _form())
    missing = admin_client.post("/admin/metering/ledgeraccount/adjust/999999/", _form())

    # then each is refused and nothing is written; the wallet's and the organization's
    # pages offer the adjustment to staff who may make it, and only to them
    assert (opened.status_code, posted.status_code, missing.status_code) == (403, 403, 404)
    assert ledger_rows() == rows
    link = f'href="{_adjust_url(org)}"'.encode()
    for page in pages:
        viewed = client.get(page)
        assert viewed.status_code == 200 and link not in viewed.content
        assert link in admin_client.get(page).content


def test_finance_give_credits_to_an_organization_that_never_had_any(admin_client):
    # given a new organization: no ledger accounts yet
    org = OrganizationFactory()
    assert not LedgerAccount.objects.filter(organization=org).exists()

    # when finance add credits to it
    response = admin_client.post(_adjust_url(org), _form(credits="3"))

    # then its wallet is opened with them
    assert response.status_code == 302
    assert organization_balance(organization=org).available == credits(3)


# --- finance's serving cost report ------------------------------------------------------


def _usage(org, job: str, model: str, *, credits_: int, cost: int, busy_ms: int, tokens=(10, 2, 5)):
    return usage_record_create(
        organization_id=org.pk,
        job_id=job,
        model_name=model,
        priority="standard",
        usage=Usage(input_tokens=tokens[0], cached_input_tokens=tokens[1], output_tokens=tokens[2]),
        credits=credits_,
        engine_busy_ms=busy_ms,
        serving_cost=cost,
    )


def test_finance_see_what_serving_each_model_and_organization_cost(admin_client):
    # given today's usage: two jobs on one model for one gym, one on another for another
    first, second = OrganizationFactory(slug="gym-a"), OrganizationFactory(slug="gym-b")
    _usage(first, "j1", "gym-tiny", credits_=1_500, cost=30, busy_ms=1_800_000)
    _usage(first, "j2", "gym-tiny", credits_=500, cost=10, busy_ms=1_800_000)
    _usage(second, "j3", "gym-large", credits_=7_000, cost=90, busy_ms=3_600_000, tokens=(4, 0, 1))
    today = timezone.now().date().isoformat()
    url = "/admin/metering/usagerecord/report/"

    # when finance open the report by model, then by organization (and the default)
    by_model = admin_client.get(url, {"start": today, "end": today, "group_by": "model"})
    by_org = admin_client.get(url, {"start": today, "end": today, "group_by": "organization"})
    default = admin_client.get(url)

    # then each row sums its jobs, the costliest first
    rows = [
        (r["group"], r["requests"], r["input_tokens"], r["output_tokens"], r["credits"],
         r["serving_cost"], r["engine_busy_hours"])
        for r in by_model.context["rows"]
    ]  # fmt: skip
    assert rows == [
        ("gym-large", 1, 4, 1, 7_000, 90, "1.000"),
        ("gym-tiny", 2, 20, 10, 2_000, 40, "1.000"),
    ]
    assert [(r["group"], r["serving_cost"]) for r in by_org.context["rows"]] == [
        ("gym-b", 90),
        ("gym-a", 40),
    ]
    assert default.context["rows"] == by_model.context["rows"]  # this month, by model
    assert b"Revenue and cost report" in admin_client.get("/admin/metering/usagerecord/").content


def test_finance_see_who_spent_each_usage_record_and_find_a_members(admin_client):
    # given a job's usage a member sent with their dashboard session, and a key's
    org = OrganizationFactory()
    member = UserFactory(email="ana@example.test")
    key, _raw = apikey_create(organization=org, name="app", scopes=[Scope.INFERENCE])
    for job, sender in (("job-ana", {"user_id": member.pk}), ("job-app", {"api_key_id": key.pk})):
        usage_record_create(
            organization_id=org.pk,
            job_id=job,
            model_name="gym-tiny",
            priority="standard",
            usage=Usage(input_tokens=10, output_tokens=5),
            credits=100,
            **sender,
        )

    # when finance list the usage records, then search them by the member's address
    url = "/admin/metering/usagerecord/"
    listed = admin_client.get(url).content.decode()
    found = admin_client.get(url, {"q": "ana@example.test"}).content.decode()

    # then each says who sent it, and the search finds the member's only
    assert "dashboard (ana@example.test)" in listed and key.prefix in listed
    assert "job-ana" in found and "job-app" not in found


def test_finance_filter_usage_by_a_model_of_the_price_book_without_reading_every_record(
    admin_client,
):
    # given usage of two models, in books that also price a model never used (the newest
    # book prices one of them only: earlier books are kept)
    rates = {"input_rate": "1", "cached_input_rate": "1", "output_rate": "1", "minimum_charge": 0}
    price_book_publish(prices=[{**rates, "model_name": n} for n in ("gym-b", "gym-a")])
    price_book_publish(prices=[{**rates, "model_name": "gym-unused"}])
    org = OrganizationFactory()
    for job, model in (("job-a", "gym-a"), ("job-b", "gym-b")):
        usage_record_create(
            organization_id=org.pk,
            job_id=job,
            model_name=model,
            priority="standard",
            usage=Usage(input_tokens=10, output_tokens=5),
            credits=100,
        )
    url = "/admin/metering/usagerecord/"

    # when finance open the usage list, then filter it by one model
    with CaptureQueriesContext(connection) as opened:
        listed = admin_client.get(url)
    # Read now: the next request empties the log these are read from.
    distinct_usage = [
        q["sql"]
        for q in opened.captured_queries
        if "DISTINCT" in q["sql"] and "metering_usagerecord" in q["sql"]
    ]
    assert opened.captured_queries, "the page's statements were logged"
    filtered = admin_client.get(url, {"model_name": "gym-a"})

    # then the filter offers the price book's models, and finds that model's usage only
    cl = listed.context["cl"]
    [models] = [spec for spec in cl.filter_specs if spec.title == "model name"]
    assert [choice["display"] for choice in models.choices(cl)] == [
        "All",
        "gym-a",
        "gym-b",
        "gym-unused",
    ]
    assert [r.job_id for r in filtered.context["cl"].result_list] == ["job-a"]
    # and opening the list read no DISTINCT of the usage table (a scan of every record)
    assert distinct_usage == []


@pytest.mark.parametrize(
    "query",
    [
        {"start": "2026-12-05", "end": "2026-12-01", "group_by": "model"},
        {"start": "yesterday", "end": "2026-12-01", "group_by": "model"},
        {"start": "2026-12-01", "end": "2026-12-05", "group_by": "day"},
        # The day after the last day is where the report ends: past the calendar's end
        # it was an OverflowError (a 500).
        {"start": "9999-12-01", "end": "9999-12-31", "group_by": "model"},
    ],
    ids=["end-before-start", "not-a-date", "unknown-grouping", "end-on-the-calendars-last-day"],
)
def test_a_malformed_report_query_is_shown_on_the_form(admin_client, query):
    response = admin_client.get("/admin/metering/usagerecord/report/", query)

    assert response.status_code == 200
    assert response.context["form"].errors and response.context["rows"] == []


def test_only_staff_who_may_view_usage_see_the_report(client):
    staff = UserFactory(is_staff=True)
    client.force_login(staff)

    assert client.get("/admin/metering/usagerecord/report/").status_code == 403
