"""`{% form_tokens %}`: what every form of a dashboard page sends besides its own fields.

Used in place of `{% csrf_token %}` in the forms that POST to a page
(accounts.dashboard.MemberPage): the CSRF token; `acting_for`, the slug of the
organization the page was drawn for, which MemberPage checks against the one acting
when the form is sent; and `form_token`, a random value of this one form, drawn anew
each time the form is, under which MemberPage acts on the form once however often it
is sent (a double click, a reload of the answer). The organization switcher's form, signing out and the emailed
links' pages are no MemberPage: their forms keep `{% csrf_token %}` alone.
"""

from __future__ import annotations

import secrets
from typing import Any

from django import template
from django.template.defaulttags import CsrfTokenNode
from django.utils.html import format_html

from accounts.dashboard import ACTING_FOR, FORM_TOKEN

register = template.Library()


@register.simple_tag(takes_context=True)
def form_tokens(context: template.Context) -> str:
    request = context["request"]
    organization: Any = getattr(request, "organization", None)
    if organization is None:
        # A form drawn outside a MemberPage would be refused by the page it is sent to:
        # say so where it is written, not to the person who sends it.
        raise template.TemplateSyntaxError(
            "{% form_tokens %} is for the forms of a dashboard page (MemberPage), which "
            "acts for an organization; use {% csrf_token %} elsewhere."
        )
    bound = format_html(
        '<input type="hidden" name="{}" value="{}"><input type="hidden" name="{}" value="{}">',
        ACTING_FOR,
        organization.slug,
        FORM_TOKEN,
        # Per form, not per page: each of a page's forms (a Buy per listing) is its own.
        secrets.token_urlsafe(16),
    )
    return CsrfTokenNode().render(context) + bound
