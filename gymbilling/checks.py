"""System checks of the billing and marketplace settings (`python manage.py check`; migrate
and runserver run them too)."""

from __future__ import annotations

from django.conf import settings
from django.core.checks import Error, Tags, register


@register(Tags.compatibility)
def market_order_bounds_check(app_configs, **kwargs) -> list:
    """Every traded currency needs a minimum order: without one an order under Stripe's
    minimum charge would be reserved and then fail at Stripe, which no retry fixes."""
    minimums = settings.MARKET_MIN_ORDER_AMOUNTS
    errors = []
    for currency in settings.MARKET_CURRENCIES:
        low = minimums.get(currency)
        if not isinstance(low, int) or low < 1:
            errors.append(
                Error(
                    f"MARKET_CURRENCIES trades {currency!r}, which has no minimum order "
                    f"amount (got {low!r}).",
                    hint=f"Set MARKET_MIN_ORDER_AMOUNTS={currency}=N: N is Stripe's minimum "
                    "charge in that currency's minor units "
                    "(https://docs.stripe.com/currencies#minimum-and-maximum-charge-amounts).",
                    id="gymbilling.E001",
                )
            )
        elif low > settings.MARKET_MAX_ORDER_AMOUNT:
            errors.append(
                Error(
                    f"The minimum order in {currency} ({low}) is over MARKET_MAX_ORDER_AMOUNT "
                    f"({settings.MARKET_MAX_ORDER_AMOUNT}): every order would be refused.",
                    hint="Lower MARKET_MIN_ORDER_AMOUNTS for it or raise MARKET_MAX_ORDER_AMOUNT.",
                    id="gymbilling.E002",
                )
            )
    return errors
