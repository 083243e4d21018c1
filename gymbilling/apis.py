"""The billing API: plans (public), checkout, portal, subscription, invoices,
and the Stripe webhook receiver."""

from __future__ import annotations

from django.http import JsonResponse
from django.utils.decorators import method_decorator
from django.views import View
from django.views.decorators.csrf import csrf_exempt
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.permissions import AllowAny
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.api_base import (
    MANAGERS,
    ApiContentNegotiation,
    OrgApiView,
    PagedListMixin,
    StrictIntegerField,
    StrictSerializer,
    require_no_input,
)
from accounts.apis import OrganizationOutput
from accounts.errors import json_error_response
from accounts.models import Role, Scope
from gymbilling import stripe_client
from gymbilling.selectors import (
    catalog_items,
    organization_invoices,
    packs_offered,
    plans_offered,
)
from gymbilling.services import checkout_create, portal_create, stripe_event_record
from gymbilling.services.subscriptions import live_subscription

BILLING_ROLES = (*MANAGERS, Role.BILLING)


class PlanOutput(serializers.Serializer):
    code = serializers.CharField()
    name = serializers.CharField()
    description = serializers.CharField()
    currency = serializers.CharField()
    monthly_price = serializers.IntegerField(
        help_text="Minor units per month (per seat if seat_based)."
    )
    monthly_credits = serializers.IntegerField(
        help_text="Micro-credits per month (per seat if seat_based)."
    )
    rollover_percent = serializers.IntegerField()
    seat_based = serializers.BooleanField()
    min_seats = serializers.IntegerField()
    max_seats = serializers.IntegerField()
    model_tiers = serializers.ListField(child=serializers.CharField())
    max_priority = serializers.CharField()
    requests_per_minute = serializers.IntegerField()
    tokens_per_minute = serializers.IntegerField()
    concurrent_jobs = serializers.IntegerField()
    overage_allowed = serializers.BooleanField()
    overage_price_per_1k = serializers.IntegerField(help_text="Minor units per 1,000 credits.")
    fair_use_ceiling = serializers.IntegerField(
        help_text="Micro-credits of overage per month at most."
    )


class PackOutput(serializers.Serializer):
    code = serializers.CharField()
    name = serializers.CharField()
    credits = serializers.IntegerField(help_text="Micro-credits.")
    price = serializers.IntegerField(help_text="Minor units.")
    currency = serializers.CharField()
    validity_days = serializers.IntegerField()


class PlanListApi(APIView):
    """Public: what the gym sells."""

    authentication_classes: list = []
    permission_classes = [AllowAny]
    content_negotiation_class = ApiContentNegotiation  # no ?format= override, as the rest

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "CatalogOutput"

        plans = PlanOutput(many=True)
        packs = PackOutput(many=True)

    @extend_schema(responses=Output, summary="Plans and credit packs on sale (no authentication)")
    def get(self, request):
        return Response(self.Output({"plans": plans_offered(), "packs": packs_offered()}).data)


class CheckoutApi(OrgApiView):
    required_scope = Scope.ADMIN
    allowed_roles = BILLING_ROLES

    class Input(StrictSerializer):
        class Meta:
            ref_name = "CheckoutInput"

        plan = serializers.SlugField(
            required=False,
            help_text="A plan code from /api/v1/plans. The subscription's own plan and seats, "
            "while it is on an old price of the plan and nothing is scheduled: a move to the "
            "plan's current price.",
        )
        pack = serializers.SlugField(required=False, help_text="A pack code from /api/v1/plans.")
        # Each seat is charged for: an amount of money.
        seats = StrictIntegerField(required=False, default=1, min_value=1, max_value=10_000)

        def validate(self, attrs):
            if ("plan" in attrs) == ("pack" in attrs):
                raise serializers.ValidationError("Give exactly one of plan or pack.")
            return attrs

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "CheckoutOutput"

        url = serializers.URLField(help_text="Open it to pay (or, for a change, where to look).")
        kind = serializers.ChoiceField(
            choices=["checkout", "subscription_updated", "change_scheduled", "change_canceled"],
            help_text="checkout: pay on the page; subscription_updated: upgraded now with the "
            "card on file; change_scheduled: a downgrade taking effect at period end; "
            "change_canceled: the scheduled downgrade taken back, nothing charged. A move to "
            "the plan's current price is an upgrade or a downgrade by what it costs against "
            "what the subscription pays now.",
        )
        session_id = serializers.CharField(allow_blank=True)

    @extend_schema(
        request=Input,
        responses={200: Output},
        summary="Subscribe, change plan or seats, or buy a pack",
    )
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        plan, pack = catalog_items(
            plan=data.validated_data.get("plan"), pack=data.validated_data.get("pack")
        )
        result = checkout_create(
            organization=request.organization,
            plan=plan,
            pack=pack,
            seats=data.validated_data["seats"],
        )
        return Response(self.Output(result).data)


class PortalApi(OrgApiView):
    required_scope = Scope.ADMIN
    allowed_roles = BILLING_ROLES

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "PortalOutput"

        url = serializers.URLField()

    @extend_schema(
        request=None,
        responses={200: Output},
        summary="A Stripe customer-portal link: cards, cancel",
    )
    def post(self, request):
        require_no_input(request)
        return Response({"url": portal_create(organization=request.organization)})


class SubscriptionOutput(serializers.Serializer):
    id = serializers.CharField(source="stripe_subscription_id")
    plan = serializers.CharField(source="plan.code")
    seats = serializers.IntegerField()
    status = serializers.CharField()
    current_period_start = serializers.DateTimeField()
    current_period_end = serializers.DateTimeField()
    cancel_at_period_end = serializers.BooleanField()
    scheduled_plan = serializers.CharField(
        source="scheduled_plan.code", allow_null=True, default=None
    )
    scheduled_seats = serializers.IntegerField(allow_null=True)
    grace_until = serializers.DateTimeField(allow_null=True)


class SubscriptionApi(OrgApiView):
    required_scope = Scope.BILLING_READ

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "SubscriptionStateOutput"

        subscription = SubscriptionOutput(allow_null=True)
        entitlements = OrganizationOutput(help_text="The organization and what it may do now.")

    @extend_schema(responses=Output, summary="The live subscription (or null) and what it entitles")
    def get(self, request):
        org = request.organization
        return Response(
            self.Output({"subscription": live_subscription(org), "entitlements": org}).data
        )


class InvoiceOutput(serializers.Serializer):
    id = serializers.CharField(source="stripe_invoice_id")
    status = serializers.CharField()
    billing_reason = serializers.CharField()
    currency = serializers.CharField()
    amount_due = serializers.IntegerField(help_text="Minor units.")
    amount_paid = serializers.IntegerField(help_text="Minor units.")
    credits_granted = serializers.IntegerField(help_text="Micro-credits this invoice granted.")
    period_start = serializers.DateTimeField(allow_null=True)
    period_end = serializers.DateTimeField(allow_null=True)
    hosted_invoice_url = serializers.CharField()
    created_at = serializers.DateTimeField()
    paid_at = serializers.DateTimeField(allow_null=True)


class InvoiceListApi(PagedListMixin, OrgApiView):
    required_scope = Scope.BILLING_READ
    # As the invoices page (gymbilling.pages.billing.InvoicesPage): an invoice's amounts
    # and its hosted_invoice_url (which opens Stripe's page for it, with the customer's
    # billing details, to anyone holding it) are for those who manage billing.
    allowed_roles = BILLING_ROLES

    @extend_schema(
        responses=InvoiceOutput(many=True), summary="The organization's invoices, newest first"
    )
    def get(self, request):
        return self.page(request, organization_invoices, InvoiceOutput)


@method_decorator(csrf_exempt, name="dispatch")
class StripeWebhookView(View):
    """POST /stripe/webhook/: verify, store once, answer 2xx at once; a task does the rest.

    A bad or stale signature is 400 and stores nothing. Signature
    verification needs the exact bytes Stripe signed, so this is a plain
    Django view reading request.body, not a DRF parser.
    """

    def post(self, request):
        try:
            event = stripe_client.webhook_event_construct(
                request.body, request.headers.get("Stripe-Signature")
            )
        except stripe_client.StripeNotConfigured:
            return json_error_response(
                code="billing_not_configured",
                message="Webhooks are off: STRIPE_WEBHOOK_SECRET is not set.",
                status=503,
            )
        except stripe_client.WebhookSignatureInvalid as exc:
            return json_error_response(
                code="invalid_signature",
                message=f"The Stripe-Signature header does not verify: {exc}",
                status=400,
            )
        except stripe_client.WebhookEventInvalid as exc:
            return json_error_response(code="invalid_event", message=str(exc), status=400)
        row, created = stripe_event_record(event=event)
        return JsonResponse({"received": True, "duplicate": not created, "status": row.status})

    def http_method_not_allowed(self, request, *args, **kwargs):
        # Django's own 405 is an empty text/html body: answer in the API's shape.
        response = json_error_response(
            code="method_not_allowed",
            message=f"Method {request.method} is not allowed here; Stripe sends POST.",
            status=405,
        )
        response["Allow"] = "POST"
        return response
