"""`{{ micro|credits }}`: micro-credits as credits, exactly (no floats), for the dashboard."""

from django import template

from metering.services.postings import amount_display

register = template.Library()


@register.filter
def credits(micro: int | None) -> str:
    return "" if micro is None else amount_display(int(micro))
