"""The marketplace: the order book, buying, and the organization's own listings,
as `gymbilling.market_apis` offers them."""

from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

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


class MarketPage(ActionPage):
    """Everyone in the organization sees the book and its listings; traders act."""

    template_name = "dashboard/market.html"
    title = "Marketplace"
    nav = "market"
    action_roles = TRADER_ROLES
    actions = ("buy", "sell", "withdraw")

    def currency(self) -> str:
        asked = self.request.GET.get("currency", "").lower()
        return asked if asked in settings.MARKET_CURRENCIES else settings.MARKET_CURRENCIES[0]

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
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
