"""Finance's view of the ledger: everything readable, nothing editable in place.

The ledger is append-only, so these admins refuse add, change and delete;
corrections go through the services (adjustments, reversals).
"""

import csv
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Case, F, Model, OuterRef, Subquery, Sum, When
from django.db.models.functions import Coalesce
from django.http import Http404, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils import timezone
from django.utils.http import urlencode

from accounts.admin import ReadOnlyAdmin, sent_by
from accounts.errors import ApplicationError
from accounts.models import Organization
from metering.models import (
    CreditLot,
    Hold,
    JournalTransaction,
    LedgerAccount,
    LedgerEntry,
    ModelPrice,
    PriceBook,
    UsageRecord,
)
from metering.selectors import (
    credits_removable,
    report_totals,
    usage_margin_report,
)
from metering.services import credits_adjust
from metering.services.postings import MAX_MOVEMENT, amount_display, credits_parse


class AccountBalanceAdmin(ReadOnlyAdmin):
    """Accounts with their true balance, for credits (LedgerAccount) and money (MoneyAccount).

    A system account (no organization) keeps no cached balance, by design: every
    settlement touches it, so a cache would be one hot row serializing them all. Its
    `balance` column stays 0 and its balance is the sum of its entries, which the list
    adds in the same query (the SUM runs for system rows only); an organization's
    account shows its cache.
    """

    entry_model: type[Model]  # the account's entries: an `account` and an `amount`
    exclude = ["balance"]  # 0 for a system account: shown as true_balance instead
    readonly_fields = ["true_balance"]

    def get_queryset(self, request):
        summed = (
            self.entry_model.objects.filter(account=OuterRef("pk"))
            .order_by()
            .values("account")
            .annotate(total=Sum("amount"))
            .values("total")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(
                _true_balance=Case(
                    When(organization__isnull=True, then=Coalesce(Subquery(summed), 0)),
                    default=F("balance"),
                )
            )
        )

    @admin.display(description="balance (system: sum of entries)", ordering="_true_balance")
    def true_balance(self, account) -> int:
        return account._true_balance


class EntryInline(admin.TabularInline):
    model = LedgerEntry
    fields = ["account", "amount", "balance_after"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class AdjustCreditsForm(forms.Form):
    credits = forms.CharField(
        max_length=40,
        help_text="Credits to add, or to remove with a minus sign: 250, 0.5, -10 "
        "(exact to a millionth).",
    )
    reason = forms.CharField(
        max_length=500,
        widget=forms.Textarea(attrs={"rows": 3}),
        help_text="Why, for whoever reads the ledger later (a ticket, an incident).",
    )
    expires_at = forms.DateTimeField(
        required=False,
        help_text="Added credits only: when they expire (YYYY-MM-DD HH:MM, UTC); blank: never.",
    )
    # Drawn with the form: submitting the same form twice (a double click, the
    # browser's back and resend) adjusts once (credits_adjust is idempotent).
    key = forms.CharField(widget=forms.HiddenInput, max_length=64)

    def clean_credits(self) -> int:
        try:
            micro = credits_parse(self.cleaned_data["credits"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        if micro == 0:
            raise forms.ValidationError("An adjustment moves some credits: not 0.")
        if abs(micro) > MAX_MOVEMENT:
            raise forms.ValidationError(
                f"At most {amount_display(MAX_MOVEMENT)} credits in one adjustment."
            )
        return micro

    def clean(self):
        data = super().clean()
        if data.get("expires_at") and data.get("credits", 0) < 0:
            self.add_error("expires_at", "Removed credits have no expiry: leave it blank.")
        return data


@admin.register(LedgerAccount)
class LedgerAccountAdmin(AccountBalanceAdmin):
    entry_model = LedgerEntry
    list_display = ["id", "organization", "kind", "true_balance", "next_expiry_at"]
    list_filter = ["kind"]
    search_fields = ["organization__slug"]
    list_select_related = ["organization"]
    change_form_template = "admin/metering/ledgeraccount/change_form.html"

    def get_urls(self):
        # By organization, not by wallet: a new organization has no wallet until
        # its first credits (accounts are opened then), and finance may give them.
        adjust = path(
            "adjust/<int:organization_id>/",
            self.admin_site.admin_view(self.adjust_view),
            name="metering_ledgeraccount_adjust",
        )
        return [adjust, *super().get_urls()]

    def adjust_view(self, request, organization_id: int):
        """Finance's correction of an organization's credits (DESIGN: "adjustments"):
        credits_adjust, with the staff member as its actor and their reason as its memo.
        Linked from the organization's page and its wallet's."""
        if not request.user.has_perm("metering.adjust_credits"):
            raise PermissionDenied
        organization = Organization.objects.filter(pk=organization_id).first()
        if organization is None:
            raise Http404("No such organization.")
        back = reverse("admin:accounts_organization_change", args=[organization.pk])
        if request.method == "POST":
            form = AdjustCreditsForm(request.POST)
            if form.is_valid():
                data = form.cleaned_data
                try:
                    txn = credits_adjust(
                        organization=organization,
                        amount=data["credits"],
                        reason=data["reason"],
                        key=f"admin:{data['key']}",
                        actor=request.user,
                        expires_at=data["expires_at"],
                    )
                except ApplicationError as exc:
                    form.add_error(None, f"{exc.message} ({exc.code})")
                else:
                    self.message_user(
                        request,
                        f"{amount_display(data['credits'])} credits for {organization.slug}: "
                        f"journal transaction {txn.pk}.",
                        messages.SUCCESS,
                    )
                    return HttpResponseRedirect(back)
        else:
            form = AdjustCreditsForm(initial={"key": uuid.uuid4().hex})
        context = {
            **self.admin_site.each_context(request),
            "title": f"Adjust the credits of {organization.slug}",
            "opts": self.model._meta,
            "organization": organization,
            "back_label": organization.slug,
            "action": "Adjust credits",
            "form": form,
            # What a debit may take, which is what finance need to know here: not the
            # member's available credits, which count a plan's overage allowance.
            "available": amount_display(credits_removable(organization=organization)),
            "back": back,
        }
        return TemplateResponse(request, "admin/metering/ledgeraccount/adjust.html", context)


@admin.register(JournalTransaction)
class JournalTransactionAdmin(ReadOnlyAdmin):
    list_display = ["id", "kind", "organization", "idempotency_key", "memo", "created_at"]
    list_filter = ["kind"]
    search_fields = ["idempotency_key", "organization__slug", "memo"]
    list_select_related = ["organization"]
    inlines = [EntryInline]


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["id", "transaction", "account", "amount", "balance_after", "created_at"]
    list_select_related = ["transaction", "account", "account__organization"]
    search_fields = ["account__organization__slug", "transaction__idempotency_key"]


@admin.register(CreditLot)
class CreditLotAdmin(ReadOnlyAdmin):
    list_display = [
        "id",
        "organization",
        "account",
        "source",
        "paid",
        "resellable",
        "priority",
        "amount",
        "remaining",
        "expires_at",
        "origin",
        "revenue",
        "revenue_currency",
    ]
    list_filter = ["source", "paid", "resellable"]
    search_fields = ["organization__slug"]
    list_select_related = ["organization", "account", "account__organization"]


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = ["key", "organization", "status", "amount", "captured", "expires_at"]
    list_filter = ["status"]
    search_fields = ["key", "organization__slug"]
    list_select_related = ["organization"]


class ModelPriceInline(admin.TabularInline):
    model = ModelPrice
    extra = 0
    can_delete = False
    readonly_fields = [
        "model_name",
        "input_rate",
        "cached_input_rate",
        "output_rate",
        "minimum_charge",
    ]

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(PriceBook)
class PriceBookAdmin(ReadOnlyAdmin):
    list_display = ["version", "effective_at", "notes"]
    inlines = [ModelPriceInline]


REPORT_GROUPING_LABELS = {"model": "model", "plan": "plan", "organization": "customer"}


class UsageMarginForm(forms.Form):
    start = forms.DateField(help_text="First day, UTC (YYYY-MM-DD).")
    end = forms.DateField(help_text="Last day, UTC, included.")
    group_by = forms.ChoiceField(
        choices=list(REPORT_GROUPING_LABELS.items()),
        help_text="A job that burned credits of two plans counts in both, each with its "
        "share of the job's cost.",
    )

    def clean(self):
        data = super().clean()
        start, end = data.get("start"), data.get("end")
        if start and end and end < start:
            self.add_error("end", "The last day comes after the first.")
        elif end == date.max:
            # The report runs to the midnight after its last day, which this one has not.
            self.add_error("end", f"The last day must be before {date.max.isoformat()}.")
        return data


@dataclass(frozen=True)
class ReportTable:
    """One table of the report page, drawn and exported to CSV from the same cells: each
    row is a dict of figures with its display `cells`, in the order of `columns`."""

    key: str  # its CSV export's name (?export=<key>)
    title: str
    columns: list[str]
    rows: list[dict]
    totals: list[dict]
    empty: str = "Nothing in these days."


def report_table(
    *,
    key: str,
    title: str,
    columns: list[tuple[str, Callable[[dict], str]]],
    rows: list[dict],
    totals: list[dict],
    empty: str,
) -> ReportTable:
    """The table of these rows and totals, each given its `cells`: each column's display
    function (`columns`: name and function) applied to it."""
    for row in [*rows, *totals]:
        row["cells"] = [show(row) for _, show in columns]
    return ReportTable(
        key=key,
        title=title,
        columns=[name for name, _ in columns],
        rows=rows,
        totals=totals,
        empty=empty,
    )


def credits_cell(name: str) -> Callable[[dict], str]:
    return lambda row: amount_display(row[name])


def number_cell(name: str) -> Callable[[dict], str]:
    return lambda row: str(row[name])


def _margin_percent(row: dict) -> str:
    """Margin over what the gym earned (revenue and breakage), for display only (the
    figures are the integers beside it)."""
    earned = row["revenue"] + row["breakage"]
    if row["margin"] is None or earned == 0:
        return NOT_APPLICABLE
    percent = Decimal(row["margin"] * 100) / Decimal(earned)
    return f"{percent.quantize(Decimal('0.1'), rounding=ROUND_HALF_UP)}%"


def _engine_busy_hours(row: dict) -> str:
    return str((Decimal(row["engine_busy_ms"]) / 3_600_000).quantize(Decimal("0.001")))


NOT_APPLICABLE = "n/a"
_USAGE_COLUMNS = [
    ("requests", number_cell("requests")),
    ("input tokens", number_cell("input_tokens")),
    ("cached input tokens", number_cell("cached_input_tokens")),
    ("output tokens", number_cell("output_tokens")),
    ("engine busy hours", _engine_busy_hours),
]
_MARGIN_COLUMNS = [
    ("credits consumed", credits_cell("credits")),
    ("of which free", credits_cell("free_credits")),
    ("of which without a known price", credits_cell("unpriced_credits")),
    ("revenue (minor units)", number_cell("revenue")),
    ("breakage (minor units)", number_cell("breakage")),
    ("taken back by refunds (minor units)", number_cell("taken_back")),
    ("serving cost (minor units)", number_cell("serving_cost")),
    (
        "margin (minor units)",
        lambda row: NOT_APPLICABLE if row["margin"] is None else str(row["margin"]),
    ),
    ("margin %", _margin_percent),
]


def usage_margin_table(*, start: datetime, end: datetime, group_by: str) -> ReportTable:
    """The report's main table: usage_margin_report's rows, and their totals per currency."""
    label = REPORT_GROUPING_LABELS[group_by]
    columns = [
        (label, lambda row: row["group"]),
        ("currency", lambda row: row["currency"]),
        ("cost currency", lambda row: row["cost_currency"]),
        *(_USAGE_COLUMNS if group_by != "plan" else []),
        *_MARGIN_COLUMNS,
    ]
    rows = usage_margin_report(start=start, end=end, group_by=group_by)
    totals = report_totals(rows)
    for row in rows:  # for those who read the rows (tests, a later API)
        row["credits_display"] = amount_display(row["credits"])
        row["engine_busy_hours"] = _engine_busy_hours(row)
    return report_table(
        key=group_by,
        title=f"Usage, revenue and margin per {label}",
        columns=columns,
        rows=rows,
        totals=totals,
        empty="No usage in these days.",
    )


def report_csv(table: ReportTable, *, start, end) -> HttpResponse:
    """The table as the page shows it, its totals last: the same cells, comma-separated."""
    response = HttpResponse(content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = (
        f'attachment; filename="{table.key}-{start.isoformat()}-{end.isoformat()}.csv"'
    )
    writer = csv.writer(response)
    writer.writerow(table.columns)
    for row in [*table.rows, *table.totals]:
        writer.writerow(row["cells"])
    return response


class _ModelNameFilter(admin.SimpleListFilter):
    """The models usage is recorded for, listed from the price book rather than by a
    DISTINCT over the whole usage table (Django's default for a field without choices, run
    on every load of the list). Every job is priced before it runs (model_not_priced), and
    books are never edited, so every model a record names is in one."""

    title = "model name"
    parameter_name = "model_name"

    def lookups(self, request, model_admin):
        names = ModelPrice.objects.order_by("model_name").values_list("model_name", flat=True)
        return [(name, name) for name in names.distinct()]

    def queryset(self, request, queryset):
        return queryset.filter(model_name=self.value()) if self.value() else queryset


@admin.register(UsageRecord)
class UsageRecordAdmin(ReadOnlyAdmin):
    """Every job's usage and serving cost; the "Revenue and cost report" sums them for
    finance, with what the credits they burned were sold for."""

    list_display = [
        "job_id",
        "organization",
        "model_name",
        "input_tokens",
        "cached_input_tokens",
        "output_tokens",
        "engine_busy_ms",
        "credits",
        "serving_cost",
        "currency",
        sent_by,
        "created_at",
    ]
    list_filter = [_ModelNameFilter, "priority"]
    search_fields = ["job_id", "organization__slug", "user__email"]
    list_select_related = ["organization", "api_key", "user"]
    change_list_template = "admin/metering/usagerecord/change_list.html"

    def get_urls(self):
        report = path(
            "report/",
            self.admin_site.admin_view(self.report_view),
            name="metering_usagerecord_report",
        )
        return [report, *super().get_urls()]

    def report_tables(self, *, start: datetime, end: datetime, group_by: str) -> list[ReportTable]:
        """The page's tables over [start, end): usage, revenue and margin per `group_by`.
        gymbilling's admin adds what only it knows (refunds and disputes per customer, the
        marketplace's fee income): metering knows nothing of payments."""
        return [usage_margin_table(start=start, end=end, group_by=group_by)]

    def report_view(self, request):
        """Usage, revenue, serving cost and margin per model, plan or organization over
        days (UTC) staff choose, this month so far by default; each table also as CSV
        (?export=<table>). Anyone who may view usage records may see it."""
        if not self.has_view_permission(request):
            raise PermissionDenied
        today = timezone.now().date()
        query = request.GET.copy()
        export = query.pop("export", [None])[-1]
        form = UsageMarginForm(
            query or {"start": today.replace(day=1), "end": today, "group_by": "model"}
        )
        tables: list[ReportTable] = []
        shown = ""
        if form.is_valid():
            data = form.cleaned_data
            shown = urlencode({name: data[name] for name in ("start", "end", "group_by")})
            try:
                tables = self.report_tables(
                    start=datetime.combine(data["start"], time.min, tzinfo=UTC),
                    end=datetime.combine(data["end"] + timedelta(days=1), time.min, tzinfo=UTC),
                    group_by=data["group_by"],
                )
            except ApplicationError as exc:  # figures SQLite cannot hold (report_sums)
                form.add_error(None, f"{exc.message} ({exc.code})")
            for table in tables:
                if table.key == export:
                    return report_csv(table, start=data["start"], end=data["end"])
            if export is not None:
                raise Http404(f"No table {export!r} in this report.")
        context = {
            **self.admin_site.each_context(request),
            "title": "Revenue and cost report",
            "opts": self.model._meta,
            "form": form,
            "tables": tables,
            "rows": tables[0].rows if tables else [],
            "shown": shown,  # the query of the tables shown, for their CSV links
            "action": "Revenue and cost report",
        }
        return TemplateResponse(request, "admin/metering/usagerecord/report.html", context)
