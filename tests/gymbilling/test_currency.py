"""Money as text: minor units by the currency's exponent, both ways, exactly."""

from __future__ import annotations

import pytest
from django.template import Context, Template

from gymbilling.currency import money_display, money_parse


@pytest.mark.parametrize(
    ("amount", "currency", "shown"),
    [
        (1250, "usd", "12.50 USD"),
        (5, "eur", "0.05 EUR"),
        (0, "gbp", "0.00 GBP"),
        (-1999, "usd", "-19.99 USD"),
        (1200, "jpy", "1200 JPY"),
        (12345, "kwd", "12.345 KWD"),
        (99_999_999, "USD", "999999.99 USD"),
    ],
)
def test_amounts_are_shown_in_the_currencys_own_decimals(amount, currency, shown):
    assert money_display(amount, currency) == shown
    assert money_parse(shown.split()[0], currency) == amount


def test_the_template_filters_show_an_amount_with_and_without_its_code():
    template = Template("{% load money %}{{ a|money:c }}|{{ a|money_amount:c }}|{{ none|money:c }}")

    assert template.render(Context({"a": 250, "c": "usd", "none": None})) == "2.50 USD|2.50|"


@pytest.mark.parametrize(
    ("text", "currency", "why"),
    [
        ("2.555", "usd", "at most 2 decimal places"),
        ("12.5", "jpy", "at most 0 decimal places"),
        ("two", "usd", "is not an amount of money"),
        ("", "usd", "is not an amount of money"),
        ("NaN", "usd", "is not an amount of money"),
        ("1e99999999", "usd", "too large"),
        ("1e999990", "usd", "too large"),
        ("1e-99999999", "usd", "at most 2 decimal places"),
        # a digit past the 28 Decimal keeps in a product: refused, not rounded to 2.50
        ("2.5000000000000000000000000001", "usd", "at most 2 decimal places"),
    ],
)
def test_what_is_not_an_exact_amount_is_refused_never_rounded(text, currency, why):
    with pytest.raises(ValueError, match=why):
        money_parse(text, currency)
