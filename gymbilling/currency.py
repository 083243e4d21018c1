"""Money as people read and write it: integers of minor units <-> "12.50 USD".

Amounts are integers in the currency's minor unit, as Stripe counts them
(DESIGN.md); how many of those make one unit is the currency's exponent:
2 for most, 0 for Stripe's zero-decimal currencies (1200 JPY is 1200 yen),
3 for the three-decimal ones. Only these two functions cross between the
integer and its decimal text, with Decimal, never float.
"""

from __future__ import annotations

from decimal import ROUND_DOWN, Decimal

from metering.services.postings import decimal_text_parse

# https://docs.stripe.com/currencies#zero-decimal and #three-decimal
ZERO_DECIMAL = frozenset(
    {"bif", "clp", "djf", "gnf", "jpy", "kmf", "krw", "mga", "pyg", "rwf", "ugx", "vnd", "vuv"}
    | {"xaf", "xof", "xpf"}
)
THREE_DECIMAL = frozenset({"bhd", "jod", "kwd", "omr", "tnd"})
# Far above any price or charge (Stripe's is 8 digits), far below what int() chokes on.
_TOO_LARGE = Decimal(10) ** 18


def currency_exponent(currency: str) -> int:
    code = currency.lower()
    if code in ZERO_DECIMAL:
        return 0
    return 3 if code in THREE_DECIMAL else 2


def money_display(amount: int, currency: str, *, code: bool = True) -> str:
    """`1250, "usd"` as "12.50 USD" (`code=False`: "12.50"); every minor unit shown."""
    exponent = currency_exponent(currency)
    sign = "-" if amount < 0 else ""
    whole, fraction = divmod(abs(int(amount)), 10**exponent)
    text = f"{sign}{whole}" + (f".{fraction:0{exponent}d}" if exponent else "")
    return f"{text} {currency.upper()}" if code else text


def money_parse(text: str, currency: str) -> int:
    """A person's "12.5" in `currency` as minor units (1250 for usd), exactly, or
    ValueError saying why not: nothing finer than the minor unit is rounded away. Only
    plain decimal text is read (decimal_text_parse): no exponent, no other script's digits.
    """
    places = currency_exponent(currency)
    number = decimal_text_parse(str(text))
    if number is None:
        example = money_display(1250, currency, code=False)
        shape = f"at most {places} decimal places after a '.'" if places else "no decimal places"
        raise ValueError(
            f"{text!r} is not an amount of money: write ASCII digits, {shape}, such as {example}."
        )
    # Bounded on its count of digits before anything is multiplied out or quantized (which
    # then fits Decimal's 28 digits, so nothing below is rounded).
    if number.adjusted() >= 18 or abs(number).scaleb(places) >= _TOO_LARGE:
        raise ValueError(f"{text!r} is too large an amount.")
    if number != number.quantize(Decimal(1).scaleb(-places), rounding=ROUND_DOWN):
        raise ValueError(f"{currency.upper()} amounts have at most {places} decimal places.")
    return int(number.scaleb(places))
