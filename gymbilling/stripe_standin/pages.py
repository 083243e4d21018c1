"""Minimal HTML for the stand-in's own pages (Checkout, billing portal, onboarding)."""

from __future__ import annotations

from html import escape

from aiohttp import web

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 40rem; margin: 2rem auto; padding: 0 1rem; }
.banner { background: #fff3cd; padding: .5rem 1rem; border-radius: .3rem; }
.error { color: #b00020; font-weight: bold; }
table { border-collapse: collapse; width: 100%; } td, th { border-bottom: 1px solid #ddd; padding: .3rem; text-align: left; }
input[name=card] { font-family: monospace; width: 16rem; }
"""


def page(title: str, body_html: str, *, status: int = 200) -> web.Response:
    """`body_html` must already be escaped; use `e()` for every value inserted."""
    html = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{escape(title)}</title>"
        f"<style>{STYLE}</style></head><body>"
        "<p class='banner'>Stripe stand-in (development only): no real money moves.</p>"
        f"<h1>{escape(title)}</h1>{body_html}</body></html>"
    )
    return web.Response(text=html, content_type="text/html", status=status)


def e(value: object) -> str:
    return escape(str(value), quote=True)


def money(amount: int, currency: str) -> str:
    return f"{amount / 100:.2f} {currency.upper()}"


def card_form(action: str, *, button: str, error: str | None = None) -> str:
    error_html = f"<p class='error' role='alert'>{e(error)}</p>" if error else ""
    return (
        f"{error_html}<form method='post' action='{e(action)}'>"
        "<label>Card number <input name='card' value='4242424242424242' autocomplete='off'></label> "
        f"<button type='submit'>{e(button)}</button></form>"
        "<p><small>4242424242424242 succeeds · 4000000000000002 is declined · "
        "4000000000000341 pays now, later renewals fail</small></p>"
    )
