"""The partner REST API for credits: balance, lots, ledger entries, usage."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from accounts.api_base import (
    IdCursorPagination,
    OrgApiView,
    PagedListMixin,
    StrictSerializer,
    query_data,
)
from accounts.errors import ApplicationError
from accounts.models import Scope
from metering.selectors import (
    organization_balance,
    organization_entries,
    organization_lots,
    organization_lots_left,
    usage_aggregate,
)


class LotOutput(serializers.Serializer):
    id = serializers.IntegerField()
    source = serializers.CharField()
    paid = serializers.BooleanField()
    resellable = serializers.BooleanField()
    priority = serializers.IntegerField()
    amount = serializers.IntegerField(help_text="micro-credits granted")
    remaining = serializers.IntegerField(
        source="left",
        help_text="micro-credits left, as the expiry sweep leaves them: of an expired lot, "
        "only what running jobs placed before it expired hold of it",
    )
    expires_at = serializers.DateTimeField(allow_null=True)
    expired = serializers.BooleanField(
        source="past_expiry",
        help_text="past its expiry: what is left is held by running jobs placed before it "
        "expired, and what they do not use expires when they end (an expired lot that no "
        "job holds is not listed)",
    )
    in_escrow = serializers.SerializerMethodField()

    def get_in_escrow(self, lot) -> bool:
        return lot.account.kind == "escrow"


# The balance shows the lots that expire soonest, a page's worth: an organization may
# hold thousands. Every lot: LotListApi, a page at a time.
BALANCE_LOTS = IdCursorPagination.page_size


class BalanceApi(OrgApiView):
    required_scope = Scope.BILLING_READ

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "BalanceOutput"

        unit = serializers.CharField(help_text="All amounts are integers of micro-credits.")
        available = serializers.IntegerField()
        held = serializers.IntegerField()
        escrowed = serializers.IntegerField()
        set_aside = serializers.IntegerField(
            help_text="not available while a refunded or disputed payment, or a period's "
            "rollover cap, waits for the work that holds its credits to end (usually 0)"
        )
        total = serializers.IntegerField(
            help_text="what the wallet's lots hold: the wallet (available and set aside) and "
            "held, which the `remaining` of the lots not in escrow add up to (all of them: "
            "GET /api/v1/credits/lots)"
        )
        lots = LotOutput(
            many=True,
            help_text=f"the {BALANCE_LOTS} lots that expire soonest (never-expiring last); "
            "GET /api/v1/credits/lots lists every lot",
        )
        more_lots = serializers.BooleanField(
            help_text="the organization has more lots than `lots` shows: "
            "GET /api/v1/credits/lots lists them all, a page at a time"
        )

    @extend_schema(responses=Output, summary="Credits available, held and escrowed, with lots")
    def get(self, request):
        # One moment for both, so that a lot expiring between the two reads is left out
        # of the figures and the lots alike.
        now = timezone.now()
        balance = organization_balance(organization=request.organization, now=now)
        lots = organization_lots(organization=request.organization, now=now, limit=BALANCE_LOTS + 1)
        return Response(
            self.Output(
                {
                    "unit": "micro_credit",
                    "available": balance.available,
                    "held": balance.held,
                    "escrowed": balance.escrowed,
                    "set_aside": balance.set_aside,
                    "total": balance.total,
                    "lots": lots[:BALANCE_LOTS],
                    "more_lots": len(lots) > BALANCE_LOTS,
                }
            ).data
        )


class LotListApi(PagedListMixin, OrgApiView):
    required_scope = Scope.BILLING_READ

    @extend_schema(
        responses=LotOutput(many=True),
        summary="Every lot with credits left, newest first, as the balance's lots are shown",
    )
    def get(self, request):
        return self.page(request, organization_lots_left, LotOutput)


class EntryOutput(serializers.Serializer):
    id = serializers.IntegerField()
    account = serializers.CharField(source="account.kind")
    amount = serializers.IntegerField(help_text="micro-credits; positive adds to the account")
    balance_after = serializers.IntegerField(allow_null=True)
    transaction_id = serializers.IntegerField()
    kind = serializers.CharField(source="transaction.kind")
    memo = serializers.CharField(source="transaction.memo")
    created_at = serializers.DateTimeField()


class LedgerApi(PagedListMixin, OrgApiView):
    required_scope = Scope.BILLING_READ

    @extend_schema(responses=EntryOutput(many=True), summary="The organization's ledger entries")
    def get(self, request):
        return self.page(request, organization_entries, EntryOutput)


class UsageApi(OrgApiView):
    required_scope = Scope.BILLING_READ
    MAX_RANGE = timedelta(days=366)

    class Query(StrictSerializer):
        class Meta:
            ref_name = "UsageQuery"

        start = serializers.DateTimeField(required=False)
        end = serializers.DateTimeField(required=False)
        group_by = serializers.ChoiceField(choices=["day", "model", "key"], default="day")

    class Row(serializers.Serializer):
        class Meta:
            ref_name = "UsageRow"

        group = serializers.CharField(allow_null=True)
        requests = serializers.IntegerField()
        input_tokens = serializers.IntegerField()
        cached_input_tokens = serializers.IntegerField()
        output_tokens = serializers.IntegerField()
        credits = serializers.IntegerField()

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "UsageOutput"

        start = serializers.DateTimeField()
        end = serializers.DateTimeField()
        group_by = serializers.CharField()
        data = serializers.ListField(child=serializers.DictField())

    @extend_schema(
        parameters=[
            OpenApiParameter("start", datetime, description="inclusive; default 30 days ago"),
            OpenApiParameter("end", datetime, description="exclusive; default now"),
            OpenApiParameter("group_by", str, enum=["day", "model", "key"]),
        ],
        responses=Output,
        summary="Usage totals by day, model or key",
    )
    def get(self, request):
        query = self.Query(data=query_data(request))
        query.is_valid(raise_exception=True)
        end = query.validated_data.get("end") or timezone.now()
        try:
            start = query.validated_data.get("start") or end - timedelta(days=30)
        except OverflowError:  # an end in the calendar's first 30 days
            raise ApplicationError(
                code="invalid_request",
                message="end is too early: give a start, or a later end.",
                param="end",
            ) from None
        if start >= end or end - start > self.MAX_RANGE:
            raise ApplicationError(
                code="invalid_request",
                message="start must be before end, and the range at most 366 days.",
                param="start",
            )
        rows = usage_aggregate(
            organization=request.organization,
            start=start,
            end=end,
            group_by=query.validated_data["group_by"],
        )
        return Response(
            self.Output(
                {
                    "start": start,
                    "end": end,
                    "group_by": query.validated_data["group_by"],
                    "data": self.Row(rows, many=True).data,
                }
            ).data
        )
