"""The usage page: credits and tokens per day and model, drawn as an SVG chart and a table."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import Role
from tests.dashboard.conftest import assert_refused
from tests.factories import OrganizationFactory
from tests.metering.test_apis import record

pytestmark = pytest.mark.django_db


def bars(content: bytes) -> list[tuple[str, str, str]]:
    """(day, model, title) of each bar segment the chart draws."""
    html = content.decode()
    found = []
    for day, group in re.findall(r'<g class="day" data-day="([\d-]+)">(.*?)</g>', html, re.S):
        for model, title in re.findall(
            r'<rect class="bar" data-model="([^"]+)"[^>]*><title>(.*?)</title></rect>', group
        ):
            found.append((day, model, title))
    return found


def table_rows(content: bytes) -> list[list[str]]:
    body = re.search(r'<table class="usage">.*?<tbody>(.*?)</tbody>', content.decode(), re.S)
    return [
        [re.sub(r"<[^>]+>", "", cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body.group(1), re.S)
    ]


@pytest.fixture
def usage_of():
    """Two models over three days, one of them 40 days ago, for an organization."""
    now = timezone.now()

    def _usage(org):
        record(org, at=now, model="llama-8b", tokens=(100, 10, 50), charged=1_234_567)
        record(org, at=now, model="llama-70b", tokens=(200, 0, 20), charged=5_000_000)
        record(org, at=now, model="llama-8b", tokens=(1, 0, 1), charged=7)
        record(org, at=now - timedelta(days=2), model="llama-8b", tokens=(300, 30, 60), charged=2)
        record(org, at=now - timedelta(days=40), model="llama-8b", charged=900_000_000)
        return now.date().isoformat(), (now - timedelta(days=2)).date().isoformat()

    return _usage


def test_the_chart_and_table_show_each_days_credits_and_tokens_per_model(client, member, usage_of):
    # given usage on two days of the last 30, one 40 days ago, and another organization's
    _, org = member(Role.MEMBER)
    today, earlier = usage_of(org)
    record(OrganizationFactory(), at=timezone.now(), model="secret-model", charged=777_000_000)

    # when
    response = client.get("/dashboard/usage")

    # then the chart stacks a bar per model on each day, its title the day's exact figures
    assert response.status_code == 200
    assert bars(response.content) == [
        (earlier, "llama-8b", f"{earlier}, llama-8b: 0.000002 credits; 300 input tokens "
         "(30 cached), 60 output tokens; 1 request"),
        (today, "llama-70b", f"{today}, llama-70b: 5 credits; 200 input tokens (0 cached), "
         "20 output tokens; 1 request"),
        (today, "llama-8b", f"{today}, llama-8b: 1.234574 credits; 101 input tokens "
         "(10 cached), 51 output tokens; 2 requests"),
    ]  # fmt: skip
    # and the table below it gives the same numbers, with the period's total
    assert table_rows(response.content) == [
        [earlier, "llama-8b", "1", "0.000002", "300", "30", "60"],
        [today, "llama-70b", "1", "5", "200", "0", "20"],
        [today, "llama-8b", "2", "1.234574", "101", "10", "51"],
    ]
    assert b'data-figure="total-credits">6.234576<' in response.content
    assert response.content.count(b'<g class="day"') == 30
    # and nothing of the other organization's (nor of 40 days ago: the rows and total above)
    assert b"secret-model" not in response.content


def test_the_period_is_chosen_among_7_30_and_90_days(client, member, usage_of):
    # given
    _, org = member(Role.BILLING)
    usage_of(org)

    # when
    week = client.get("/dashboard/usage?days=7")
    quarter = client.get("/dashboard/usage?days=90")

    # then
    assert week.content.count(b'<g class="day"') == 7
    assert b'data-figure="total-credits">6.234576<' in week.content
    assert quarter.content.count(b'<g class="day"') == 90
    assert b'data-figure="total-credits">906.234576<' in quarter.content
    assert b'href="?days=90" aria-current="page"' in quarter.content


@pytest.mark.parametrize("days", ["14", "abc", "-1"])
def test_another_period_is_refused_on_the_page_with_the_choices(client, member, days):
    member(Role.OWNER)

    response = client.get(f"/dashboard/usage?days={days}")

    assert_refused(response, 400, "invalid_days")
    assert [int(d) for d in re.findall(rb'href="\?days=(\d+)"', response.content)] == [7, 30, 90]


def test_no_usage_says_so_without_a_chart(client, member):
    # given an organization that has used nothing (another one has)
    member(Role.OWNER)
    record(OrganizationFactory(), at=timezone.now(), model="llama-8b")

    # when
    response = client.get("/dashboard/usage")

    # then
    assert response.status_code == 200
    assert b"No usage in the last 30 days" in response.content
    assert b'<svg class="chart"' not in response.content


def test_the_page_reads_the_same_queries_however_much_usage(
    client, member, django_assert_max_num_queries
):
    # given 29 days of usage across eight models (not 30: should midnight UTC pass before
    # the page is read, its 30-day window moves a day, and all 29 are still in it)
    _, org = member(Role.MEMBER)
    now = timezone.now()
    for day in range(29):
        for model in range(8):
            record(org, at=now - timedelta(days=day), model=f"model-{model}")

    # when / then: the session, the user, the memberships and one aggregate
    with django_assert_max_num_queries(4):
        response = client.get("/dashboard/usage")
    assert len(bars(response.content)) == 29 * 8


def test_a_visitor_is_sent_to_sign_in(client):
    response = client.get("/dashboard/usage")

    assert response.status_code == 302
    assert response["Location"] == "/login/?next=/dashboard/usage"
