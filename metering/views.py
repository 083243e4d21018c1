"""The dashboard's pages for credits: usage per day and model, and the ledger's activity.

Both read what the partner API reads (metering.selectors), for the organization the
member chose (accounts.dashboard.MemberPage), and are open to every role, as the
usage and ledger endpoints are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django import forms
from django.http import HttpRequest, HttpResponse
from django.utils import timezone

from accounts.dashboard import MemberPage, page_before
from metering.selectors import organization_entries, usage_by_day_and_model

DAY_CHOICES = (7, 30, 90)
DEFAULT_DAYS = 30
# What the table's last row totals over the period.
SUMMED = ("requests", "credits", "input_tokens", "cached_input_tokens", "output_tokens")

# The chart's geometry, in SVG user units; the drawing scales to the page's width.
SLOT = 24  # one day's width
BAR = 16  # a bar's width within its slot
PLOT_HEIGHT = 200
LEFT = 72  # room for the credits axis' labels
RIGHT = 16  # room for half the last day's label
TOP = 12
BOTTOM = 28  # room for the days' labels
# Okabe and Ito's palette, told apart by people with colour-blind vision; a ninth
# model takes the first colour again, and the legend and each bar's title name it.
COLOURS = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000")


class UsageQuery(forms.Form):
    days = forms.TypedChoiceField(
        choices=[(days, f"Last {days} days") for days in DAY_CHOICES],
        coerce=int,
        required=False,
        empty_value=DEFAULT_DAYS,
    )


@dataclass(frozen=True)
class Segment:
    """One model's part of one day's bar; `usage` is its row of usage_by_day_and_model."""

    usage: dict
    colour: str
    y: int
    height: int


@dataclass(frozen=True)
class DayBar:
    day: date
    x: int
    label: str  # empty on the days the axis does not name
    segments: list[Segment]

    @property
    def centre(self) -> int:
        return self.x + BAR // 2


@dataclass(frozen=True)
class UsageChart:
    days: list[DayBar]
    legend: list[tuple[str, str, int]]  # model, colour, credits over the period
    peak: int  # the busiest day's credits: the top of the axis
    width: int
    height: int

    left = LEFT
    top = TOP
    baseline = TOP + PLOT_HEIGHT
    bar_width = BAR

    @property
    def right(self) -> int:
        return self.width - RIGHT


def usage_chart(rows: list[dict], *, first: date, days: int) -> UsageChart:
    """Stacked bars of credits, a day each from `first`, a segment per model.

    Heights are whole units computed from running totals, so a day's segments
    stack without gaps and its bar's top is exactly its total on the axis.
    Amounts stay integers of micro-credits; only the drawing is scaled.
    """
    by_model: dict[str, int] = {}
    by_day: dict[date, list[dict]] = {}
    for row in rows:
        by_model[row["model_name"]] = by_model.get(row["model_name"], 0) + row["credits"]
        by_day.setdefault(row["day"].date(), []).append(row)
    # The biggest spenders first: the legend's order, and each bar's from the bottom.
    models = sorted(by_model, key=lambda model: (-by_model[model], model))
    rank = {model: i for i, model in enumerate(models)}
    colour = {model: COLOURS[i % len(COLOURS)] for model, i in rank.items()}
    peak = max((sum(r["credits"] for r in day) for day in by_day.values()), default=0)
    scale = max(peak, 1)
    label_every = max(1, days // 6)
    bars = []
    for i in range(days):
        day = first + timedelta(days=i)
        running, top, segments = 0, TOP + PLOT_HEIGHT, []
        for row in sorted(by_day.get(day, []), key=lambda r: rank[r["model_name"]]):
            running += row["credits"]
            y = TOP + PLOT_HEIGHT - running * PLOT_HEIGHT // scale
            segments.append(Segment(row, colour[row["model_name"]], y, top - y))
            top = y
        label = day.strftime("%m-%d") if (days - 1 - i) % label_every == 0 else ""
        bars.append(DayBar(day, LEFT + i * SLOT + (SLOT - BAR) // 2, label, segments))
    return UsageChart(
        days=bars,
        legend=[(model, colour[model], by_model[model]) for model in models],
        peak=peak,
        width=LEFT + days * SLOT + RIGHT,
        height=TOP + PLOT_HEIGHT + BOTTOM,
    )


class UsagePage(MemberPage):
    """Credits and tokens per day and model over the last 7, 30 or 90 days (`?days=`)."""

    template_name = "dashboard/usage.html"
    title = "Usage"
    nav = "usage"

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        query = UsageQuery(request.GET)
        if not query.is_valid():
            return self.invalid(query, name="query")
        return self.render_to_response(self.get_context_data(days=query.cleaned_data["days"]))

    def get_context_data(self, *, days: int = DEFAULT_DAYS, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        # Whole days in UTC, as the usage API groups them, today's included.
        first = timezone.now().date() - timedelta(days=days - 1)
        start = datetime.combine(first, time.min, tzinfo=UTC)
        rows = usage_by_day_and_model(
            organization=self.request.organization, start=start, end=start + timedelta(days=days)
        )
        totals = {field: sum(row[field] for row in rows) for field in SUMMED}
        context.update(
            days=days,
            day_choices=DAY_CHOICES,
            rows=rows,
            totals=totals,
            chart=usage_chart(rows, first=first, days=days) if rows else None,
        )
        return context


class ActivityQuery(forms.Form):
    before = forms.IntegerField(required=False, min_value=1, label="Cursor")


class ActivityPage(MemberPage):
    """The organization's ledger entries, newest first, a page at a time.

    Pages are cut by entry id (`?before=`), not by offset: entries are only ever
    added, so a page never repeats or skips one while new entries arrive.
    """

    template_name = "dashboard/activity.html"
    title = "Activity"
    nav = "activity"
    page_size = 50

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        query = ActivityQuery(request.GET)
        if not query.is_valid():
            return self.invalid(query, name="query")
        return self.render_to_response(self.get_context_data(before=query.cleaned_data["before"]))

    def get_context_data(self, *, before: int | None = None, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        entries, older = page_before(
            organization_entries(organization=self.request.organization),
            before=before,
            size=self.page_size,
        )
        context.update(entries=entries, older=older, first_page=before is None)
        return context
