"""Reading what a dashboard page shows, by the data- attributes its templates put on it."""

from __future__ import annotations

import re
from html import unescape


def text(response) -> str:
    return response.content.decode()


def figure(response, name: str) -> str:
    """The text of the element marked `data-figure="name"` (a figure, not nested markup)."""
    found = re.search(rf'data-figure="{re.escape(name)}"[^>]*>([^<]*)<', text(response))
    assert found, f"no figure {name!r} on the page"
    return unescape(found[1]).strip()


def row(response, attribute: str, key) -> dict[str, str]:
    """The cells marked `data-col` of the table row `<tr data-attribute="key">`, by column."""
    found = re.search(rf'<tr {attribute}="{key}">(.*?)</tr>', text(response), re.S)
    assert found, f"no row {attribute}={key!r} on the page"
    cells = re.findall(r'data-col="([^"]+)">([^<]*)<', found[1])
    return {column: unescape(value).strip() for column, value in cells}


def rows(response, attribute: str) -> list[str]:
    """The keys of the table rows marked `data-attribute`, in the page's order."""
    return re.findall(rf'<tr {attribute}="([^"]*)">', text(response))


def refused(response, status: int, code: str) -> bool:
    """The page drawn again with the refusal: its status, and its code for scripts."""
    return response.status_code == status and f'data-error-code="{code}"' in text(response)


def post_forms(response) -> list[tuple[str, dict[str, str]]]:
    """Each POST form of the page: its action ("" for the page's own address) and its
    hidden fields, by name."""
    forms = re.findall(r"<form\b([^>]*)>(.*?)</form>", text(response), re.S)
    found = []
    for attributes, body in forms:
        if 'method="post"' not in attributes:
            continue
        action = re.search(r'action="([^"]*)"', attributes)
        hidden = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', body)
        found.append((unescape(action[1]) if action else "", dict(hidden)))
    return found


def drawn_for(response) -> str:
    """The organization (its slug) the page's forms act for: each form that POSTs to a
    dashboard page sends it as `acting_for`, the same for all."""
    slugs = {
        fields.get("acting_for") for action, fields in post_forms(response) if posts_to_page(action)
    }
    assert len(slugs) == 1, f"the page's forms act for {slugs}"
    return slugs.pop()


# Where the dashboard's pages' forms POST that is no page of an organization: the
# switcher (which changes the acting organization), signing out, the verification email.
NOT_PAGES = ("/dashboard/organization", "/logout/", "/verify-email/send")


def posts_to_page(action: str) -> bool:
    return action not in NOT_PAGES
