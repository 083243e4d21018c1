"""The activity page: the organization's ledger entries, newest first, a page at a time."""

from __future__ import annotations

import re
import uuid

import pytest

from accounts.models import Role
from metering.services import hold_capture, hold_place
from metering.views import ActivityPage
from tests.dashboard.conftest import assert_refused
from tests.factories import OrganizationFactory
from tests.helpers import credits

pytestmark = pytest.mark.django_db


def entries(content: bytes) -> list[list[str]]:
    """Each entry's cells: when, kind, account, credits, balance after, memo."""
    body = re.search(r'<table class="entries">.*?<tbody>(.*?)</tbody>', content.decode(), re.S)
    return [
        [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr data-entry=\"\d+\">(.*?)</tr>", body.group(1), re.S)
    ]


def test_entries_show_kind_signed_amount_and_memo_newest_first(client, member, grant):
    # given credits granted, then a job that held 2 and spent 0.75 of them
    _, org = member(Role.MEMBER)
    grant(org, credits(5), memo="Monthly credits")
    job = f"job-{uuid.uuid4()}"
    hold_place(organization=org, amount=credits(2), key=job, memo="a job")
    hold_capture(key=job, amount=credits("0.75"))
    grant(OrganizationFactory(), credits(99), memo="Someone else's grant")

    # when
    response = client.get("/dashboard/activity")

    # then every entry of the organization's accounts, newest first, amounts exact and signed
    assert response.status_code == 200
    rows = [row[1:5] for row in entries(response.content)]
    # (the capture's two entries are one transaction: their order is the ledger's own)
    assert sorted(rows[:2]) == [
        ["Hold captured", "Holds", "-2", "0"],
        ["Hold captured", "Wallet", "+1.25", "4.25"],
    ]
    assert rows[2:] == [
        ["Hold placed", "Holds", "+2", "2"],
        ["Hold placed", "Wallet", "-2", "3"],
        ["Grant", "Wallet", "+5", "5"],
    ]
    assert entries(response.content)[-1][5] == "Monthly credits"
    # and none of the other organization's
    assert b"Someone else" not in response.content


def test_pages_follow_the_cursor_without_repeating_or_skipping(client, member, grant, monkeypatch):
    # given five grants and pages of two
    monkeypatch.setattr(ActivityPage, "page_size", 2)
    _, org = member(Role.BILLING)
    for n in range(1, 6):
        grant(org, credits(n))

    # when the member follows "Older entries" to the end
    seen, url = [], "/dashboard/activity"
    while url:
        response = client.get(url)
        assert response.status_code == 200
        seen.append([row[3] for row in entries(response.content)])
        older = re.search(rb'href="(\?before=\d+)" rel="next"', response.content)
        url = "/dashboard/activity" + older.group(1).decode() if older else None

    # then
    assert seen == [["+5", "+4"], ["+3", "+2"], ["+1"]]


@pytest.mark.parametrize("before", ["abc", "0", "-3"])
def test_a_bad_cursor_is_refused_and_the_newest_entries_shown(client, member, grant, before):
    _, org = member(Role.OWNER)
    grant(org, credits(7))

    response = client.get(f"/dashboard/activity?before={before}")

    assert_refused(response, 400, "invalid_before")
    assert [row[3] for row in entries(response.content)] == ["+7"]


def test_no_activity_says_so(client, member):
    member(Role.OWNER)

    response = client.get("/dashboard/activity")

    assert response.status_code == 200
    assert b"No activity yet" in response.content


def test_a_page_reads_the_same_queries_however_many_entries(
    client, member, grant, django_assert_max_num_queries
):
    # given a full page of entries
    _, org = member(Role.MEMBER)
    for _ in range(ActivityPage.page_size + 5):
        grant(org, credits(1))

    # when / then: the session, the user, the memberships and one page of entries, joined
    with django_assert_max_num_queries(4):
        response = client.get("/dashboard/activity")
    assert len(entries(response.content)) == ActivityPage.page_size
