"""The marketplace API: the order book, listings, orders; a seller's sales, earnings and
payouts.

Quantities are micro-credits, prices minor units per 1,000 credits, amounts
minor units, as everywhere in the API.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response

from accounts.api_base import (
    MANAGERS,
    OrgApiView,
    PagedListMixin,
    PageQuery,
    StrictIntegerField,
    StrictSerializer,
    query_data,
)
from accounts.errors import ApplicationError
from accounts.models import Role, Scope
from gymbilling.market import selectors, services
from gymbilling.models import OrderStatus, PayoutMethod, PayoutStatus, ProceedsState
from metering.services.postings import MAX_MOVEMENT

TRADER_ROLES = (*MANAGERS, Role.BILLING)
MAX_QUANTITY = MAX_MOVEMENT  # micro-credits, as the services check (market.services)
MAX_PRICE = 10**12
# A sale's proceeds: `none` is only a fill's that sold nothing, never a sale's.
SALE_PROCEEDS = [state for state in ProceedsState.values if state != ProceedsState.NONE]

ERRORS = {
    402: OpenApiResponse(
        description="Not enough resellable credits (`insufficient_resellable_credits`)."
    ),
    409: OpenApiResponse(
        description="A conflict: `insufficient_liquidity`, `listing_not_open`, an Idempotency-Key in use."
    ),
    429: OpenApiResponse(
        description="An abuse limit reached, nothing changed: `listing_limit_reached` "
        "(MARKET_LISTINGS_PER_DAY), `pending_order_limit_reached` "
        "(MARKET_PENDING_ORDERS_PER_BUYER orders awaiting payment)."
    ),
    503: OpenApiResponse(
        description="`payments_unavailable` or `billing_not_configured`; nothing changed."
    ),
}


class _MarketApi(OrgApiView):
    required_scope = Scope.MARKETPLACE
    write_roles = TRADER_ROLES

    def check_access(self, request, organization):
        super().check_access(request, organization)
        role = getattr(request, "membership", None) and request.membership.role
        if request.method in ("POST", "DELETE") and role and role not in self.write_roles:
            raise ApplicationError(
                code="permission_denied",
                message=f"Trading needs one of the roles: {', '.join(self.write_roles)}.",
                status=403,
            )


class _MarketListApi(PagedListMixin, _MarketApi):
    """A GET that lists the caller's own rows, newest first, a page at a time: its `Query`
    names the filters the selector takes."""


class ListingOutput(serializers.Serializer):
    id = serializers.IntegerField()
    currency = serializers.CharField()
    price_per_1k = serializers.IntegerField(help_text="Minor units per 1,000 credits.")
    available = serializers.IntegerField(help_text="Micro-credits on offer now.")
    expires_at = serializers.DateTimeField(
        source="next_expiry_at",
        allow_null=True,
        help_text="The soonest expiry of the credits on offer.",
    )


class OwnListingOutput(ListingOutput):
    quantity = serializers.IntegerField(help_text="Micro-credits listed.")
    sold = serializers.IntegerField(help_text="Micro-credits delivered to buyers.")
    status = serializers.CharField()
    created_at = serializers.DateTimeField()
    closed_at = serializers.DateTimeField(allow_null=True)


class QuoteOutput(serializers.Serializer):
    quantity = serializers.IntegerField()
    fillable = serializers.IntegerField(help_text="Micro-credits the book can fill now.")
    best_price_per_1k = serializers.IntegerField(allow_null=True)
    worst_price_per_1k = serializers.IntegerField(allow_null=True)
    amount = serializers.IntegerField(help_text="Minor units the fillable quantity costs.")
    depth = serializers.IntegerField(
        help_text="Micro-credits offered at or below max_price_per_1k."
    )


class ListingsApi(_MarketApi):
    class Query(StrictSerializer):
        class Meta:
            ref_name = "MarketBookQuery"

        currency = serializers.CharField(required=False, default="usd", max_length=3)
        quantity = StrictIntegerField(required=False, min_value=1, max_value=MAX_QUANTITY)
        max_price_per_1k = StrictIntegerField(required=False, min_value=0, max_value=MAX_PRICE)
        limit = serializers.IntegerField(required=False, default=50, min_value=1, max_value=200)

    class BookOutput(serializers.Serializer):
        currency = serializers.CharField()
        listings = ListingOutput(many=True)
        quote = QuoteOutput(allow_null=True)

    class Input(StrictSerializer):
        class Meta:
            ref_name = "MarketListingInput"

        quantity = StrictIntegerField(
            min_value=1, max_value=MAX_QUANTITY, help_text="Micro-credits to list."
        )
        price_per_1k = StrictIntegerField(
            min_value=1, max_value=MAX_PRICE, help_text="Minor units per 1,000 credits."
        )
        currency = serializers.CharField(max_length=3, default="usd")

    @extend_schema(
        parameters=[
            OpenApiParameter("currency", str, description="default usd"),
            OpenApiParameter("quantity", int, description="micro-credits to quote"),
            OpenApiParameter("max_price_per_1k", int),
            OpenApiParameter("limit", int, description="1..200, default 50"),
        ],
        responses=BookOutput,
        summary="The order book: open offers, cheapest first, and a quote for a quantity",
    )
    def get(self, request):
        query = self.Query(data=query_data(request))
        query.is_valid(raise_exception=True)
        data = query.validated_data
        currency = data["currency"].lower()
        quote = None
        if "quantity" in data:
            quote = selectors.order_book_quote(
                currency=currency,
                quantity=data["quantity"],
                max_price_per_1k=data.get("max_price_per_1k"),
                exclude=request.organization,
            )
        book = selectors.order_book(currency=currency, limit=data["limit"])
        return Response(
            self.BookOutput({"currency": currency, "listings": book, "quote": quote}).data
        )

    @extend_schema(
        request=Input,
        responses={201: OwnListingOutput, **ERRORS},
        summary="List resellable credits: they move into escrow",
    )
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        listing = services.listing_create(seller=request.organization, **data.validated_data)
        listing = selectors.organization_listing(
            organization=request.organization, listing_id=listing.pk
        )
        return Response(OwnListingOutput(listing).data, status=201)


class ListingDetailApi(_MarketApi):
    def _own(self, request, listing_id):
        listing = selectors.organization_listing(
            organization=request.organization, listing_id=listing_id
        )
        if listing is None:
            raise ApplicationError(
                code="not_found",
                message="No such listing among yours.",
                status=404,
                param="listing_id",
            )
        return listing

    @extend_schema(responses=OwnListingOutput, summary="One of your listings")
    def get(self, request, listing_id: int):
        return Response(OwnListingOutput(self._own(request, listing_id)).data)

    @extend_schema(
        responses={200: OwnListingOutput, **ERRORS},
        summary="Cancel the unsold part of a listing: it returns to your wallet unless expired",
    )
    def delete(self, request, listing_id: int):
        services.listing_cancel(seller=request.organization, listing_id=listing_id)
        return Response(OwnListingOutput(self._own(request, listing_id)).data)


class FillOutput(serializers.Serializer):
    listing = serializers.IntegerField(source="listing_id")
    price_per_1k = serializers.IntegerField()
    quantity = serializers.IntegerField(help_text="Micro-credits reserved.")
    amount = serializers.IntegerField(help_text="Minor units.")
    status = serializers.CharField()
    delivered_quantity = serializers.IntegerField()


class OrderOutput(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    failure_code = serializers.CharField()
    currency = serializers.CharField()
    quantity_requested = serializers.IntegerField()
    max_price_per_1k = serializers.IntegerField()
    quantity = serializers.IntegerField(help_text="Micro-credits reserved.")
    amount_total = serializers.IntegerField(help_text="Minor units to pay.")
    shortfall_amount = serializers.IntegerField(help_text="Paid, not delivered, refunded.")
    checkout_url = serializers.CharField()
    expires_at = serializers.DateTimeField(help_text="The reservation is released after this.")
    created_at = serializers.DateTimeField()
    fills = FillOutput(many=True)


class OrdersApi(_MarketListApi):
    class Input(StrictSerializer):
        class Meta:
            ref_name = "MarketOrderInput"

        quantity = StrictIntegerField(
            min_value=1, max_value=MAX_QUANTITY, help_text="Micro-credits to buy."
        )
        max_price_per_1k = StrictIntegerField(
            min_value=1,
            max_value=MAX_PRICE,
            help_text="Highest price per 1,000 credits, minor units.",
        )
        currency = serializers.CharField(max_length=3, default="usd")
        listing = serializers.IntegerField(
            required=False, min_value=1, help_text="Buy from this listing only."
        )
        allow_partial = serializers.BooleanField(
            default=False, help_text="Reserve what is offered when less than quantity is."
        )

    class Query(PageQuery):
        class Meta:
            ref_name = "MarketOrderListQuery"

        status = serializers.ChoiceField(choices=OrderStatus.values, required=False)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "status", str, enum=OrderStatus.values, description="only orders in it"
            )
        ],
        responses=OrderOutput(many=True),
        summary="List your marketplace orders, newest first",
    )
    def get(self, request):
        return self.page(request, selectors.organization_orders, OrderOutput)

    @extend_schema(
        request=Input,
        responses={201: OrderOutput, **ERRORS},
        summary="Reserve the cheapest offers and get a Checkout URL to pay",
    )
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        params = dict(data.validated_data)
        order = services.order_create(
            buyer=request.organization, listing_id=params.pop("listing", None), **params
        )
        order = selectors.organization_order(organization=request.organization, order_id=order.pk)
        return Response(OrderOutput(order).data, status=201)


class OrderDetailApi(_MarketApi):
    @extend_schema(responses=OrderOutput, summary="One of your marketplace orders")
    def get(self, request, order_id: int):
        order = selectors.organization_order(organization=request.organization, order_id=order_id)
        if order is None:
            raise ApplicationError(
                code="not_found", message="No such order among yours.", status=404, param="order_id"
            )
        return Response(OrderOutput(order).data)


# --- a seller's side ----------------------------------------------------------------------


class SaleOutput(serializers.Serializer):
    id = serializers.IntegerField(help_text="The fill: one listing's part of a buyer's order.")
    listing = serializers.IntegerField(source="listing_id")
    currency = serializers.CharField()
    price_per_1k = serializers.IntegerField(help_text="Minor units per 1,000 credits.")
    quantity = serializers.IntegerField(
        source="delivered_quantity", help_text="Micro-credits delivered to the buyer."
    )
    gross = serializers.IntegerField(help_text="Minor units the buyer paid.")
    fee = serializers.IntegerField(help_text="The platform's fee on it, minor units.")
    net = serializers.IntegerField(help_text="gross - fee: your share of the sale.")
    refunded = serializers.IntegerField(help_text="Of gross, refunded or disputed by the buyer.")
    seller_reversed = serializers.IntegerField(
        help_text="Of net, taken back by refunds and disputes before it was paid out."
    )
    earned = serializers.IntegerField(help_text="net - seller_reversed: yours.")
    unpaid = serializers.IntegerField(
        help_text="Of earned, not paid out yet (pending or available); 0 once paid out."
    )
    proceeds = serializers.ChoiceField(
        choices=SALE_PROCEEDS,
        help_text="pending (holding period), available (next payout), paid_out.",
    )
    available_at = serializers.DateTimeField(help_text="When the holding period ends.")
    payout = serializers.IntegerField(
        source="payout_id", allow_null=True, help_text="The payout that paid it."
    )
    sold_at = serializers.DateTimeField(source="settled_at")


class SalesApi(_MarketListApi):
    class Query(PageQuery):
        class Meta:
            ref_name = "MarketSaleListQuery"

        proceeds = serializers.ChoiceField(choices=SALE_PROCEEDS, required=False)

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "proceeds",
                str,
                enum=SALE_PROCEEDS,
                description="only sales whose proceeds are in this state",
            )
        ],
        responses=SaleOutput(many=True),
        summary="List your sales (credits of your listings bought and paid for), newest first",
    )
    def get(self, request):
        return self.page(request, selectors.organization_sales, SaleOutput)


class EarningsOutput(serializers.Serializer):
    currency = serializers.CharField()
    sales = serializers.IntegerField(help_text="Sales made.")
    sold_quantity = serializers.IntegerField(help_text="Micro-credits sold.")
    gross = serializers.IntegerField(help_text="Minor units buyers paid.")
    fees = serializers.IntegerField(help_text="The platform's fees on it.")
    reversed = serializers.IntegerField(
        help_text="Taken back by refunds and disputes before payout."
    )
    earned = serializers.IntegerField(
        help_text="gross - fees - reversed = pending + available + in_transit + paid_out."
    )
    pending = serializers.IntegerField(help_text="In the holding period.")
    available = serializers.IntegerField(help_text="Past it, for the next payout.")
    in_transit = serializers.IntegerField(help_text="In payouts being sent.")
    paid_out = serializers.IntegerField(help_text="In payouts sent.")
    next_available_at = serializers.DateTimeField(
        allow_null=True, help_text="When the soonest pending proceeds become available."
    )


class EarningsSummaryOutput(serializers.Serializer):
    earnings = EarningsOutput(many=True, help_text="One per currency, by currency.")


class EarningsApi(_MarketApi):
    @extend_schema(
        responses=EarningsSummaryOutput,
        summary="Your marketplace earnings per currency: pending, available, paid out",
    )
    def get(self, request):
        earnings = selectors.organization_earnings(organization=request.organization)
        return Response(EarningsSummaryOutput({"earnings": earnings}).data)


class PayoutOutput(serializers.Serializer):
    id = serializers.IntegerField()
    currency = serializers.CharField()
    amount = serializers.IntegerField(help_text="Minor units.")
    method = serializers.ChoiceField(
        choices=PayoutMethod.values,
        help_text="transfer (Stripe Connect) or invoice_credit (off your next invoice).",
    )
    status = serializers.ChoiceField(
        choices=PayoutStatus.values,
        help_text="pending (being sent), sent, failed (refused: back to available), "
        "customer_deleted (not sent: your Stripe customer was deleted; back to available, "
        "paid to your new customer once you have one), or seller_frozen (not sent: your "
        "reselling was frozen by a refund or dispute; back to available, paid once it is "
        "lifted).",
    )
    created_at = serializers.DateTimeField()
    sent_at = serializers.DateTimeField(allow_null=True)


class PayoutsApi(_MarketListApi):
    @extend_schema(responses=PayoutOutput(many=True), summary="List your payouts, newest first")
    def get(self, request):
        return self.page(request, selectors.organization_payouts, PayoutOutput)
