"""Money as text: minor units by the currency's exponent, both ways, exactly."""

from __future__ import annotations

import re

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
        # no exponent is read at all (expanding these took minutes)
        ("1e99999999", "usd", "is not an amount of money"),
        ("1e999990", "usd", "is not an amount of money"),
        ("1e-99999999", "usd", "is not an amount of money"),
        ("9" * 100_000, "usd", "too large"),
        # a digit past the 28 Decimal keeps in a product: refused, not rounded to 2.50
        ("2.5000000000000000000000000001", "usd", "at most 2 decimal places"),
    ],
)
def test_what_is_not_an_exact_amount_is_refused_never_rounded(text, currency, why):
    with pytest.raises(ValueError, match=why):
        money_parse(text, currency)


@pytest.mark.parametrize(
    ("text", "currency", "amount"),
    [
        # forms read before ASCII digits were required: still read
        ("+2.50", "usd", 250),
        (".5", "usd", 50),
        ("-.05", "usd", -5),
        ("12.", "jpy", 12),
        ("0012.345", "kwd", 12345),
        (" 3\n", "eur", 300),
    ],
)
def test_plain_decimal_text_is_still_read(text, currency, amount):
    assert money_parse(text, currency) == amount


@pytest.mark.parametrize(
    "text",
    [
        "\u0663",  # Arabic-Indic three: Decimal reads it as 3
        "\uff12.\uff15\uff10",  # fullwidth 2.50
        "1\u096b",  # a Devanagari five after a one
        "1_000",
        "1e3",
        "25E-1",
        "1 000",
        "2 .50",
        "\u22122.50",  # the typographic minus sign
        "2,50",
        "2.5.0",
        ".",
        "",
        "+-2",
        "NaN",
        "Infinity",
    ],
)
def test_only_ascii_digits_with_a_sign_and_one_point_are_money(text):
    # given what is not plain decimal text (Decimal() alone reads the first six)
    # when it is parsed, then it is refused with the parser's own error, saying what to write
    with pytest.raises(ValueError, match="is not an amount of money: write ASCII digits"):
        money_parse(text, "usd")


def test_a_refusal_says_how_many_decimals_the_currency_has():
    with pytest.raises(ValueError, match="no decimal places, such as 1250"):
        money_parse("1_250", "jpy")
    with pytest.raises(
        ValueError, match=re.escape("at most 3 decimal places after a '.', such as 1.250")
    ):
        money_parse("1e3", "kwd")
