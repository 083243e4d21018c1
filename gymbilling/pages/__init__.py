"""The customer dashboard's billing and marketplace pages (accounts.dashboard.MemberPage).

A page reads through the selectors the API reads through. Its forms POST back
to it, each naming its `action`; an action is a thin step: its form turns what
a person typed into the integers the API takes, one service does the work as
it does for the API, and the page answers with `done(...)`, or, for a payment,
sends the browser to Stripe's page, as Stripe Checkout works. A refusal is the
page again, with the service's status and code (MemberPage).
"""

from __future__ import annotations

import re
from typing import Any

from django import forms
from django.http import HttpRequest, HttpResponse

from accounts.api_base import ALL_ROLES
from accounts.dashboard import MemberPage, form_refusal
from accounts.errors import ApplicationError
from gymbilling.currency import money_parse
from metering.services.postings import credits_parse

# What a person writes for credits or money here: digits, maybe a decimal part; the
# parsers then refuse what is too large or too fine. They read only ASCII digits too
# (metering.services.postings.decimal_text_parse), but take a sign, for staff's
# adjustments: no amount a member buys, sells or pays here has one.
_PLAIN_NUMBER = re.compile(r"[0-9]{1,30}(\.[0-9]{1,30})?")


class DigitsIntegerField(forms.IntegerField):
    """A whole number typed as ASCII digits only, as the API's StrictIntegerField reads it.

    Django's IntegerField drops a zero fraction ("2.0" is 2) and takes "+2", "1_200"
    and every script's digits (Arabic-Indic, full-width): a page would accept what
    the API refuses. Anything but plain digits is refused, not guessed at.
    """

    default_error_messages = {"invalid": "Enter a whole number in digits 0-9, such as 3."}

    def to_python(self, value):
        if value in self.empty_values:
            return None
        # [0-9], not \d or str.isdigit(): those take every script's digits.
        if not re.fullmatch(r"[0-9]+", str(value).strip()):
            raise forms.ValidationError(self.error_messages["invalid"], code="invalid")
        return super().to_python(value)


class CreditsField(forms.CharField):
    """Credits as a person writes them ("250", "0.5"): micro-credits, exactly."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(max_length=64, **kwargs)

    def clean(self, value: Any) -> int:
        text = super().clean(value)
        if not _PLAIN_NUMBER.fullmatch(text):
            raise forms.ValidationError("Write a number of credits, such as 250 or 0.5.")
        try:
            return credits_parse(text)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None


class PricedForm(forms.Form):
    """A form with a `price` per 1,000 credits in its `currency`: in minor units, under
    `price_key` (the name the service takes it by)."""

    price = forms.CharField(max_length=64)
    currency = forms.CharField(max_length=3)
    price_key = "price_per_1k"

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if "price" not in data or "currency" not in data:
            return data
        text = data.pop("price").strip()
        try:
            if not _PLAIN_NUMBER.fullmatch(text):
                raise ValueError(f"Write a price such as 2.50 {data['currency'].upper()}.")
            data[self.price_key] = money_parse(text, data["currency"])
        except ValueError as exc:
            self.add_error("price", str(exc))
        return data


def cleaned(form: forms.Form) -> dict[str, Any]:
    """The form's values, or its refusal (accounts.dashboard.form_refusal)."""
    if form.is_valid():
        return form.cleaned_data
    raise form_refusal(form)


class ActionPage(MemberPage):
    """A page whose forms POST back to it, each with an `action` among `actions`
    (its name: the method that does it). `action_roles` may act; reading the
    page may be open to more roles (`allowed_roles`), as in the API."""

    actions: tuple[str, ...] = ()
    action_roles: tuple[str, ...] = ALL_ROLES

    def post(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.membership.role not in self.action_roles:
            raise ApplicationError(
                code="permission_denied",
                message=f"This needs one of the roles: {', '.join(self.action_roles)}.",
                status=403,
            )
        action = request.POST.get("action", "")
        if action not in self.actions:
            raise ApplicationError(
                code="invalid_request",
                message=f"Unknown action {action!r}; reload the page and try again.",
                param="action",
            )
        return getattr(self, action)(request)
