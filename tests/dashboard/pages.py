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
