"""The marketplace: the order book, buying, and the organization's own listings, orders,
sales, earnings and payouts, as `gymbilling.market_apis` offers them."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

from accounts.dashboard import page_before
from gymbilling.market import selectors, services
from gymbilling.market_apis import TRADER_ROLES
from gymbilling.pages import ActionPage, CreditsField, PricedForm, cleaned
from metering.services.postings import amount_display

# Each form's values are the keyword arguments of its service, as the API's serializers'.


class ListingForm(PricedForm):
    quantity = CreditsField(label="Credits")
    price = forms.CharField(max_length=64, label="Price per 1,000 credits")


class OrderForm(PricedForm):
    quantity = CreditsField(label="Credits")
    price = forms.CharField(max_length=64, label="Highest price per 1,000 credits")
    price_key = "max_price_per_1k"
    listing_id = forms.IntegerField(required=False, min_value=1, label="Listing")
    allow_partial = forms.BooleanField(required=False)


class WithdrawForm(forms.Form):
    listing = forms.IntegerField(min_value=1)


class HistoryQuery(forms.Form):
    """Which page of the organization's orders and of its sales: each cut by id, as the
    activity page's entries are (`?orders_before=`, `?sales_before=`)."""

    orders_before = forms.IntegerField(required=False, min_value=1, max_value=2**63 - 1)
    sales_before = forms.IntegerField(required=False, min_value=1, max_value=2**63 - 1)


class MarketPage(ActionPage):
    """Everyone in the organization sees the book and its listings; traders act."""

    template_name = "dashboard/market.html"
    title = "Marketplace"
    nav = "market"
    action_roles = TRADER_ROLES
    actions = ("buy", "sell", "withdraw")

    orders_per_page = 20
    sales_per_page = 20
    # Older payouts than these are listed by the payouts API (paginated).
    recent_payouts = 10

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        query = HistoryQuery(request.GET)
        if not query.is_valid():
            return self.invalid(query, name="query")
        return self.render_to_response(self.get_context_data(**query.cleaned_data))

    def _page_query(self, name: str, before: int | None) -> str:
        """The query string of a page of one list (`before` None: its newest), keeping
        the others' pages and the currency."""
        params = self.request.GET.copy()
        for once in ("order", "checkout"):  # the one-off "your order is paid" message
            params.pop(once, None)
        params.pop(name, None)
        if before is not None:
            params[name] = str(before)
        return params.urlencode()

    def _history(self, *, orders_before: int | None, sales_before: int | None) -> dict[str, Any]:
        organization = self.request.organization
        orders, older_orders = page_before(
            selectors.organization_orders(organization=organization),
            before=orders_before,
            size=self.orders_per_page,
        )
        sales, older_sales = page_before(
            selectors.organization_sales(organization=organization),
            before=sales_before,
            size=self.sales_per_page,
        )
        return {
            "orders": orders,
            "orders_pages": self._pages("orders_before", before=orders_before, older=older_orders),
            "earnings": selectors.organization_earnings(organization=organization),
            "sales": sales,
            "sales_pages": self._pages("sales_before", before=sales_before, older=older_sales),
            "payouts": selectors.organization_payouts(organization=organization)[
                : self.recent_payouts
            ],
            "recent_payouts": self.recent_payouts,
            "holding_days": settings.MARKET_PAYOUT_HOLDING.days,
        }

    def _pages(self, name: str, *, before: int | None, older: int | None) -> dict[str, Any]:
        return {
            "first": before is None,
            "newest": None if before is None else self._page_query(name, None),
            "older": None if older is None else self._page_query(name, older),
        }

    def currency(self) -> str:
        asked = self.request.GET.get("currency", "").lower()
        return asked if asked in settings.MARKET_CURRENCIES else settings.MARKET_CURRENCIES[0]

    def get_context_data(
        self,
        *,
        orders_before: int | None = None,
        sales_before: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        organization = self.request.organization
        currency = self.currency()
        order_id = self.request.GET.get("order", "")
        context.update(
            currency=currency,
            currencies=settings.MARKET_CURRENCIES,
            book=selectors.order_book(currency=currency),
            listings=selectors.organization_listings(organization=organization)[:50],
            order=(
                selectors.organization_order(organization=organization, order_id=int(order_id))
                if order_id.isascii() and order_id.isdigit() and len(order_id) < 19
                else None
            ),
            returned=self.request.GET.get("checkout"),
            trader=self.request.membership.role in TRADER_ROLES,
            min_listing=settings.MARKET_MIN_LISTING_QUANTITY,
            **self._history(orders_before=orders_before, sales_before=sales_before),
        )
        return context

    def buy(self, request: HttpRequest) -> HttpResponse:
        """Reserve the cheapest offers (or one listing's) and pay for them on Stripe's page."""
        order = services.order_create(
            buyer=request.organization, **cleaned(OrderForm(request.POST))
        )
        return HttpResponseRedirect(order.checkout_url)

    def sell(self, request: HttpRequest) -> HttpResponse:
        """Offer resellable credits: they move from the wallet into escrow."""
        data = cleaned(ListingForm(request.POST))
        listing = services.listing_create(seller=request.organization, **data)
        return self.done(
            f"Listed {amount_display(listing.quantity)} credits (listing #{listing.pk}); "
            "they are in escrow until sold or withdrawn."
        )

    def withdraw(self, request: HttpRequest) -> HttpResponse:
        """End one of the organization's listings: its unsold credits go back to the wallet."""
        data = cleaned(WithdrawForm(request.POST))
        services.listing_cancel(seller=request.organization, listing_id=data["listing"])
        return self.done(
            f"Listing #{data['listing']} withdrawn: what was unsold and unexpired is back in "
            "your wallet."
        )
