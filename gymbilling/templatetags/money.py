"""`{{ amount|money:currency }}`: minor units as "12.50 USD", exactly (no floats).

`{{ amount|money_amount:currency }}` is the number alone ("12.50"), as a
form's field takes it back (gymbilling.currency.money_parse).
"""

from django import template

from gymbilling.currency import money_display

register = template.Library()


@register.filter
def money(amount: int | None, currency: str) -> str:
    return "" if amount is None else money_display(int(amount), currency)


@register.filter
def money_amount(amount: int | None, currency: str) -> str:
    return "" if amount is None else money_display(int(amount), currency, code=False)
