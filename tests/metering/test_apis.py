"""The credits API: balance with lots, the ledger by cursor, usage totals."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import Role, Scope
from accounts.redis import get_redis
from accounts.services import apikey_create, membership_add
from metering.apis import BALANCE_LOTS
from metering.models import CreditLot, LedgerEntry, LotSource, UsageRecord
from metering.services import (
    credits_expire,
    hold_place,
    usage_record_create,
)
from metering.services.pricing import Usage
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import credits, expire_now, listed, lots_due_while_a_job_runs

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _clean_rate_limits():
    # Keys of a fresh test database reuse ids: start without old rate-limit windows.
    get_redis().flushdb()


def client_for(organization, scopes=(Scope.BILLING_READ,)) -> APIClient:
    _key, raw = apikey_create(organization=organization, name="reader", scopes=list(scopes))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert {"type", "code", "message", "param"} <= set(error)
    assert error["code"] == code
    return error


# --- balance -------------------------------------------------------------------------------


def test_balance_shows_available_held_escrowed_and_the_lots(org, grant):
    # given
    expiry = (timezone.now() + timedelta(days=30)).replace(microsecond=0)
    subscription = grant(org, credits(100), source=LotSource.SUBSCRIPTION, expires_at=expiry)
    promotion = grant(
        org, credits(50), source=LotSource.PROMOTION, paid=False, resellable=False, expires_at=None
    )
    hold_place(organization=org, amount=credits(30), key=f"job-{uuid.uuid4()}")
    listed(org, credits(20))
    grant(OrganizationFactory(), credits(999))  # another organization's credits

    # when
    response = client_for(org).get("/api/v1/credits/balance")

    # then
    assert response.status_code == 200
    body = response.json()
    assert body["unit"] == "micro_credit"
    assert (body["available"], body["held"], body["escrowed"]) == (
        credits(100),
        credits(30),
        credits(20),
    )
    assert body["total"] == credits(130)
    lots = {lot["id"]: lot for lot in body["lots"]}
    assert lots[subscription.pk]["source"] == "subscription"
    assert lots[subscription.pk]["paid"] is True
    assert lots[subscription.pk]["remaining"] == credits(80)  # 20 moved to escrow
    assert lots[subscription.pk]["amount"] == credits(100)
    assert datetime.fromisoformat(lots[subscription.pk]["expires_at"]) == expiry
    assert lots[subscription.pk]["in_escrow"] is False
    assert lots[promotion.pk]["source"] == "promotion"
    assert lots[promotion.pk]["expires_at"] is None
    assert lots[promotion.pk]["paid"] is False
    [escrow_lot] = [lot for lot in body["lots"] if lot["in_escrow"]]
    assert escrow_lot["remaining"] == credits(20)
    assert escrow_lot["expires_at"] == lots[subscription.pk]["expires_at"]
    assert len(body["lots"]) == 3
    # The wallet's lots back what is available and what is held.
    wallet_lots = sum(lot["remaining"] for lot in body["lots"] if not lot["in_escrow"])
    assert wallet_lots == body["total"]


def test_the_lots_are_shown_as_the_sweep_leaves_them_and_add_up_to_the_figures(org, grant):
    # given: 5 listed credits past their expiry, and in the wallet, past theirs too (the
    # sweep has not run): 10 a running job holds 4 of, 10 nothing holds; 100 never expire
    pack = grant(org, credits(5), source=LotSource.PACK)
    listed(org, credits(5))
    expire_now(CreditLot.objects.get(parent=pack))
    held, _gone, forever = lots_due_while_a_job_runs(org, grant)
    client = client_for(org)

    # when: read before the sweep, and after it
    before = client.get("/api/v1/credits/balance").json()
    credits_expire(now=timezone.now())
    after = client.get("/api/v1/credits/balance").json()

    # then: only what the job holds of the expired lots is listed, marked expired; the
    # rest is the sweep's, in no figure and no lot, before the sweep as after it
    assert (before["available"], before["held"], before["escrowed"], before["total"]) == (
        credits(100),
        credits(4),
        0,
        credits(104),
    )
    lots = {lot["id"]: (lot["remaining"], lot["expired"]) for lot in before["lots"]}
    assert lots == {held.pk: (credits(4), True), forever.pk: (credits(100), False)}
    assert sum(remaining for remaining, _ in lots.values()) == before["total"]
    assert after == before


def read_every_page(client, path: str, limit: int) -> list[list[dict]]:
    """The pages of a list, following `next` from the first."""
    pages, response = [], client.get(path, {"limit": limit})
    while True:
        assert response.status_code == 200, response.content
        pages.append(response.json()["results"])
        if response.json()["next"] is None:
            return pages
        response = client.get(response.json()["next"])


def test_the_balance_shows_a_page_of_lots_and_the_lots_list_pages_through_them_all(org, grant):
    # given: more lots than a page, expiring one day after another, and one that never does
    now = timezone.now()
    dated = [
        grant(org, credits(1 + day), expires_at=now + timedelta(days=1 + day))
        for day in range(BALANCE_LOTS + 4)
    ]
    forever = grant(org, credits(7), expires_at=None)
    client = client_for(org)

    # when
    balance = client.get("/api/v1/credits/balance")
    pages = read_every_page(client, "/api/v1/credits/lots", limit=20)

    # then: the figures count every lot, the balance lists the soonest to expire, a page's
    # worth, and says there are more
    assert balance.status_code == 200, balance.content
    body = balance.json()
    total = sum(credits(1 + day) for day in range(BALANCE_LOTS + 4)) + credits(7)
    assert (body["available"], body["held"], body["escrowed"], body["total"]) == (
        total,
        0,
        0,
        total,
    )
    assert [lot["id"] for lot in body["lots"]] == [lot.pk for lot in dated[:BALANCE_LOTS]]
    assert body["more_lots"] is True
    # and the list holds each lot once, newest first, in pages of the size asked for,
    # and they add up to the total
    assert [len(page) for page in pages] == [20, 20, 15]
    listed_lots = [lot for page in pages for lot in page]
    assert [lot["id"] for lot in listed_lots] == [
        lot.pk for lot in sorted([*dated, forever], key=lambda lot: -lot.pk)
    ]
    assert sum(lot["remaining"] for lot in listed_lots) == body["total"]


def test_the_lots_list_shows_them_as_the_sweep_leaves_them(org, grant):
    # given: lots past their expiry the sweep has not moved: 10 a running job holds 4 of,
    # and 10 nothing holds; and 100 that never expire
    held, _gone, forever = lots_due_while_a_job_runs(org, grant)
    client = client_for(org)

    # when
    lots = client.get("/api/v1/credits/lots")
    balance = client.get("/api/v1/credits/balance").json()

    # then: as the balance shows them, and adding up to its total
    assert lots.status_code == 200, lots.content
    rows = {lot["id"]: (lot["remaining"], lot["expired"]) for lot in lots.json()["results"]}
    assert rows == {held.pk: (credits(4), True), forever.pk: (credits(100), False)}
    assert sum(remaining for remaining, _ in rows.values()) == balance["total"]
    assert balance["more_lots"] is False
    assert_error(
        client_for(org, scopes=[Scope.INFERENCE]).get("/api/v1/credits/lots"),
        403,
        "permission_denied",
    )


def test_a_new_organization_has_an_empty_balance(org):
    # when
    body = client_for(org).get("/api/v1/credits/balance").json()

    # then
    assert (body["available"], body["held"], body["escrowed"], body["total"]) == (0, 0, 0, 0)
    assert body["lots"] == []
    assert body["more_lots"] is False


def test_balance_needs_the_billing_read_scope(org):
    # when
    response = client_for(org, scopes=[Scope.INFERENCE]).get("/api/v1/credits/balance")

    # then
    assert_error(response, 403, "permission_denied")


# --- ledger ------------------------------------------------------------------------------------


def test_the_ledger_pages_through_every_entry_once_by_cursor(org, other_org, grant):
    # given: 3 grants (3 wallet entries) and 2 holds (2 entries each) here; noise elsewhere
    for n in range(3):
        grant(org, credits(10 + n))
        grant(other_org, credits(1))
    for _ in range(2):
        hold_place(organization=org, amount=credits(1), key=f"job-{uuid.uuid4()}")
    client = client_for(org)
    expected = list(
        LedgerEntry.objects.filter(account__organization=org)
        .order_by("-pk")
        .values_list("pk", flat=True)
    )
    assert len(expected) == 7

    # when
    pages, url = [], "/api/v1/credits/ledger?limit=2"
    while url:
        response = client.get(url)
        assert response.status_code == 200
        pages.append(response.json())
        url = response.json()["next"]

    # then
    ids = [row["id"] for page in pages for row in page["results"]]
    assert [len(page["results"]) for page in pages] == [2, 2, 2, 1]
    assert ids == expected  # newest first, no duplicates, nothing missing
    assert pages[0]["previous"] is None
    assert all(page["previous"] for page in pages[1:])
    other_ids = set(
        LedgerEntry.objects.filter(account__organization=other_org).values_list("pk", flat=True)
    )
    assert not other_ids & set(ids)
    first = pages[-1]["results"][-1]
    assert first["account"] == "wallet"
    assert first["kind"] == "grant"
    assert first["amount"] == credits(10)
    assert first["balance_after"] == credits(10)


def test_the_ledger_cursor_is_stable_while_new_entries_arrive(org, grant):
    # given: a client part way through the ledger
    for n in range(4):
        grant(org, credits(n + 1))
    client = client_for(org)
    page_one = client.get("/api/v1/credits/ledger?limit=2").json()

    # when: new entries arrive before it asks for the next page
    grant(org, credits(100))
    page_two = client.get(page_one["next"]).json()

    # then: it carries on where it was, neither skipping nor repeating
    assert [r["amount"] for r in page_one["results"] + page_two["results"]] == [
        credits(4),
        credits(3),
        credits(2),
        credits(1),
    ]
    assert page_two["next"] is None


# --- usage ---------------------------------------------------------------------------------------

DAY_1 = datetime(2025, 3, 1, 10, 0, tzinfo=UTC)
DAY_2 = datetime(2025, 3, 2, 23, 59, tzinfo=UTC)
OUTSIDE = datetime(2025, 3, 5, 12, 0, tzinfo=UTC)


def record(
    org, *, at: datetime, model: str, key=None, user=None, tokens=(100, 10, 50), charged=1_000
):
    input_tokens, cached, output_tokens = tokens
    row = usage_record_create(
        organization_id=org.pk,
        job_id=f"job-{uuid.uuid4()}",
        model_name=model,
        priority="standard",
        usage=Usage(
            input_tokens=input_tokens, cached_input_tokens=cached, output_tokens=output_tokens
        ),
        credits=charged,
        api_key_id=key.pk if key else None,
        user_id=user.pk if user else None,
    )
    # Records are stamped when written; move this one to the day it stands for.
    UsageRecord.objects.filter(pk=row.pk).update(created_at=at)
    return row


@pytest.fixture
def usage(org, other_org):
    key_a, _ = apikey_create(organization=org, name="a", scopes=[Scope.INFERENCE])
    key_b, _ = apikey_create(organization=org, name="b", scopes=[Scope.INFERENCE])
    record(org, at=DAY_1, model="llama-8b", key=key_a, tokens=(100, 10, 50), charged=1_000)
    record(org, at=DAY_1, model="llama-70b", key=key_b, tokens=(200, 0, 20), charged=5_000)
    record(org, at=DAY_2, model="llama-8b", key=key_a, tokens=(300, 30, 60), charged=2_000)
    record(org, at=DAY_2, model="llama-8b", key=None, tokens=(1, 0, 1), charged=7)
    record(org, at=OUTSIDE, model="llama-8b", key=key_a, charged=100_000)
    record(other_org, at=DAY_1, model="llama-8b", charged=900_000)
    return key_a, key_b


RANGE = {"start": "2025-03-01T00:00:00Z", "end": "2025-03-03T00:00:00Z"}


def test_usage_by_day_over_a_range(org, usage):
    # when
    response = client_for(org).get("/api/v1/usage", {**RANGE, "group_by": "day"})

    # then
    assert response.status_code == 200
    body = response.json()
    assert body["group_by"] == "day"
    assert datetime.fromisoformat(body["start"]) == datetime(2025, 3, 1, tzinfo=UTC)
    assert datetime.fromisoformat(body["end"]) == datetime(2025, 3, 3, tzinfo=UTC)
    rows = [
        (
            datetime.fromisoformat(r["group"]).date().isoformat(),
            r["requests"],
            r["input_tokens"],
            r["cached_input_tokens"],
            r["output_tokens"],
            r["credits"],
        )
        for r in body["data"]
    ]
    assert rows == [
        ("2025-03-01", 2, 300, 10, 70, 6_000),
        ("2025-03-02", 2, 301, 30, 61, 2_007),
    ]


def test_usage_by_model(org, usage):
    # when
    body = client_for(org).get("/api/v1/usage", {**RANGE, "group_by": "model"}).json()

    # then
    assert [(r["group"], r["requests"], r["credits"]) for r in body["data"]] == [
        ("llama-70b", 1, 5_000),
        ("llama-8b", 3, 3_007),
    ]


def test_usage_by_key(org, usage):
    # given
    key_a, key_b = usage

    # when
    body = client_for(org).get("/api/v1/usage", {**RANGE, "group_by": "key"}).json()

    # then
    by_key = {r["group"]: (r["requests"], r["input_tokens"], r["credits"]) for r in body["data"]}
    assert by_key == {
        key_a.public_id: (2, 400, 3_000),
        key_b.public_id: (1, 200, 5_000),
        None: (1, 1, 7),
    }


def test_usage_by_key_shows_what_members_sent_from_the_dashboard_per_member(org, usage):
    # given, beside the keys' usage, what two members sent with their dashboard
    # session (the playground), which no key sent
    key_a, key_b = usage
    ana, ben = UserFactory(email="ana@example.test"), UserFactory(email="ben@example.test")
    record(org, at=DAY_1, model="llama-8b", user=ana, tokens=(10, 0, 5), charged=300)
    record(org, at=DAY_2, model="llama-8b", user=ana, tokens=(20, 0, 5), charged=400)
    record(org, at=DAY_2, model="llama-70b", user=ben, tokens=(30, 0, 5), charged=500)

    # when
    body = client_for(org).get("/api/v1/usage", {**RANGE, "group_by": "key"}).json()

    # then each member has a row of their own, named by their id (not their
    # address: a key reads addresses only with the admin scope), and
    # what neither a key nor a member sent (an operator's) stays apart
    by_key = {r["group"]: (r["requests"], r["input_tokens"], r["credits"]) for r in body["data"]}
    assert by_key == {
        key_a.public_id: (2, 400, 3_000),
        key_b.public_id: (1, 200, 5_000),
        f"user:{ana.pk}": (2, 30, 700),
        f"user:{ben.pk}": (1, 30, 500),
        None: (1, 1, 7),
    }


def test_a_member_named_in_usage_by_key_is_found_in_the_members_list(org, usage):
    # given people who are no members here (so that user and membership ids differ),
    # then a member who used the playground
    UserFactory.create_batch(3)
    ana = UserFactory(email="ana@example.test")
    membership_add(organization=org, user=ana, role=Role.BILLING)
    record(org, at=DAY_1, model="llama-8b", user=ana, tokens=(10, 0, 5), charged=300)

    # when finance reads usage by key, and an admin key the members list
    by_key = client_for(org).get("/api/v1/usage", {**RANGE, "group_by": "key"}).json()
    members = client_for(org, scopes=[Scope.ADMIN]).get(f"/api/v1/orgs/{org.pk}/members").json()

    # then the member's row names an id the members list gives her, with her address
    [member_group] = [r["group"] for r in by_key["data"] if (r["group"] or "").startswith("user:")]
    named = {f"user:{m['user_id']}": m["email"] for m in members["results"]}
    assert named[member_group] == "ana@example.test"


def test_usage_range_start_is_inclusive_and_end_exclusive(org, usage):
    # when
    body = (
        client_for(org)
        .get(
            "/api/v1/usage",
            {"start": DAY_1.isoformat(), "end": DAY_2.isoformat(), "group_by": "model"},
        )
        .json()
    )

    # then: both DAY_1 records, none of DAY_2's
    assert sum(r["requests"] for r in body["data"]) == 2


def test_usage_defaults_to_the_last_30_days_by_day(org):
    # given
    usage_record_create(
        organization_id=org.pk,
        job_id="job-now",
        model_name="llama-8b",
        priority="standard",
        usage=Usage(input_tokens=5, output_tokens=5),
        credits=42,
    )

    # when
    body = client_for(org).get("/api/v1/usage").json()

    # then
    assert body["group_by"] == "day"
    span = datetime.fromisoformat(body["end"]) - datetime.fromisoformat(body["start"])
    assert span == timedelta(days=30)
    assert [(r["requests"], r["credits"]) for r in body["data"]] == [(1, 42)]


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"group_by": "week"}, "group_by"),
        ({"group_by": ""}, "group_by"),
        ({"start": "yesterday"}, "start"),
        ({"start": "2025-03-03T00:00:00Z", "end": "2025-03-01T00:00:00Z"}, "start"),
        ({"start": "2020-01-01T00:00:00Z", "end": "2025-01-01T00:00:00Z"}, "start"),
        ({"limit": "5"}, "limit"),
        # 30 days before it (the default start) is before the calendar's first day
        ({"end": "0001-01-10T00:00:00Z"}, "end"),
    ],
    ids=[
        "unknown-grouping",
        "empty-grouping",
        "bad-date",
        "reversed",
        "over-a-year",
        "unknown",
        "end-at-the-calendar-start",
    ],
)
def test_usage_refuses_a_bad_query(org, query, param):
    # when
    response = client_for(org).get("/api/v1/usage", query)

    # then
    error = assert_error(response, 400, "invalid_request")
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
