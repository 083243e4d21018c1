"""Plan and billing, and invoices: what `gymbilling.apis` offers, as pages."""

from __future__ import annotations

from typing import Any

from django import forms
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect

from accounts.dashboard import Confirmation, MemberPage
from gymbilling.apis import BILLING_ROLES
from gymbilling.currency import money_display
from gymbilling.models import StripePrice
from gymbilling.pages import ActionPage, DigitsIntegerField, cleaned
from gymbilling.selectors import (
    catalog_items,
    organization_invoices,
    organization_pack_purchases,
    organization_payment_reversals,
    packs_offered,
    plans_offered,
)
from gymbilling.services import checkout_create, portal_create
from gymbilling.services.checkout import (
    plan_change_ask,
    plan_change_price,
    plan_offers,
    plan_price_move,
)
from gymbilling.services.subscriptions import live_subscription, plan_change_is_upgrade
from metering.services.postings import amount_display

# What a plan change with the card on file did (checkout_create's `kind`).
_CHANGED = {
    "subscription_updated": "Your plan is changed. The prorated difference is invoiced to the "
    "card on file, and its credits arrive once it is paid.",
    "change_scheduled": "Your plan changes at the end of the current period; until then you "
    "keep what you paid for.",
    "change_canceled": "The scheduled change is canceled: your plan stays as it is, and "
    "nothing more is charged.",
}


class CheckoutForm(forms.Form):
    plan = forms.SlugField(required=False)
    pack = forms.SlugField(required=False)
    seats = DigitsIntegerField(required=False, min_value=1, max_value=10_000)


def _change_confirmation(
    request: HttpRequest, subscription, plan, seats: int, move: StripePrice | None
) -> Confirmation:
    """What the page asks before a change of plan or seats with the card on file; `move`:
    the move to the plan's price now that the change is (plan_change_ask)."""
    if move is not None:
        # Their own plan and seats, asked for on an old price: the move to the price now,
        # charged now or from the next period as checkout decides it (by what they pay).
        paid, currency = subscription.period_amount()
        question = f"Move your subscription to {plan.name}'s current price?"
        consequence = (
            f"It costs {money_display(move.plan_amount_for(seats), move.currency)} a period "
            f"for {amount_display(move.plan_credits_for(seats))} credits, instead of the "
            f"{money_display(paid, currency)} for "
            f"{amount_display(subscription.period_credits())} you pay now. "
            + (
                "Costing more, it starts now: the prorated difference is charged at once to "
                "the card on file."
                if plan_change_is_upgrade(subscription, move, seats)
                else "Costing less, it starts with the next period; until then you keep what "
                "you paid for."
            )
        )
        button = "Move to the current price"
    else:
        # At the price the change is made at: a member on an old price keeps it for their
        # own plan (seats changed), whatever the plan sells for now.
        at = plan_change_price(subscription=subscription, plan=plan)
        price = money_display(at.plan_amount_for(seats), at.currency)
        what = (
            f"{plan.name}, {seats} seat{'s' if seats != 1 else ''}"
            if plan.seat_based
            else plan.name
        )
        question = f"Change your subscription to {what}?"
        consequence = (
            f"It costs {price} a period. A larger plan starts now: the prorated difference "
            "is charged at once to the card on file. A smaller one starts with the next period."
        )
        button = "Change my subscription"
    return Confirmation(
        question=question,
        consequence=consequence,
        action=request.path,
        button=button,
        fields=(
            ("action", "checkout"),
            ("plan", plan.code),
            ("seats", str(seats)),
            ("confirmed", "yes"),
        ),
    )


class BillingPage(ActionPage):
    """The subscription, the plans and packs on sale, Checkout and the billing portal."""

    template_name = "dashboard/billing.html"
    title = "Plan and billing"
    nav = "billing"
    allowed_roles = action_roles = BILLING_ROLES
    actions = ("checkout", "portal")

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        subscription = live_subscription(self.request.organization)
        if subscription is not None:
            # The price the member pays, not the plan's now: a member left on an old price
            # is granted and charged what it was made for (StripePrice).
            period_price, period_currency = subscription.period_amount()
            # Offered to a member on an old price of their plan, nothing scheduled (with a
            # change scheduled, the same request would take it back), the plan's price now
            # in the currency they pay in (plan_price_move).
            move = plan_price_move(
                subscription=subscription, plan=subscription.plan, seats=subscription.seats
            )
            context.update(
                period_credits=subscription.period_credits(),
                period_price=period_price,
                period_currency=period_currency,
                price_move=move,
                price_move_amount=move.plan_amount_for(subscription.seats) if move else None,
                price_move_credits=move.plan_credits_for(subscription.seats) if move else None,
            )
        context.update(
            subscription=subscription,
            # Each at the price it is bought or changed to at; with a subscription, only in
            # the currency it is paid in (the others listed, saying why not: plan_offers).
            plans=plan_offers(plans=list(plans_offered()), subscription=subscription),
            packs=packs_offered(),
            returned=self.request.GET.get("checkout"),
        )
        return context

    def checkout(self, request: HttpRequest) -> HttpResponse:
        """Subscribe or buy a pack on Stripe's page; a plan change happens here, with the
        card on file, once the page has asked (a switch up is charged at once)."""
        data = cleaned(CheckoutForm(request.POST))
        plan, pack = catalog_items(plan=data["plan"] or None, pack=data["pack"] or None)
        seats = data["seats"] or 1
        subscription = live_subscription(request.organization)
        if plan is not None and subscription is not None and request.POST.get("confirmed") != "yes":
            # A change that can only be refused (their own plan and seats as they are,
            # nothing to move to: no_change) is refused now, as its "yes" would be, not
            # asked about; but only as Stripe has the subscription now, not from a row
            # whose webhook is late (a cancellation taken back in the portal).
            move = plan_change_ask(subscription=subscription, plan=plan, seats=seats)
            # Only asked: the question's own form (a token of its own) is the one acted on.
            self.did_nothing = True
            return self.render_to_response(
                self.get_context_data(
                    confirm=_change_confirmation(request, subscription, plan, seats, move)
                )
            )
        result = checkout_create(
            organization=request.organization, plan=plan, pack=pack, seats=seats
        )
        if result.kind == "checkout":
            return HttpResponseRedirect(result.url)
        return self.done(_CHANGED[result.kind])

    def portal(self, request: HttpRequest) -> HttpResponse:
        """Stripe's billing portal: cards, cancelation."""
        return HttpResponseRedirect(portal_create(organization=request.organization))


class InvoicesPage(MemberPage):
    """Subscription invoices (paginated, as the API lists them), packs bought, refunds."""

    template_name = "dashboard/invoices.html"
    title = "Invoices"
    nav = "invoices"
    allowed_roles = BILLING_ROLES
    per_page = 25

    def get_context_data(self, **kwargs: Any) -> dict[str, Any]:
        context = super().get_context_data(**kwargs)
        organization = self.request.organization
        invoices = Paginator(organization_invoices(organization=organization), self.per_page)
        context.update(
            invoices=invoices.get_page(self.request.GET.get("page")),
            packs=organization_pack_purchases(organization=organization)[:50],
            reversals=organization_payment_reversals(organization=organization)[:50],
        )
        return context
