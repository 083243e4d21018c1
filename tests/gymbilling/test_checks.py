"""The billing and marketplace system checks (gymbilling/checks.py), as `manage.py check`
runs them, and the per-currency minimum order they guard."""

from __future__ import annotations

import json
import os

from django.core.checks import run_checks

from tests.helpers import settings_in_a_fresh_process


def _gymbilling_messages() -> list:
    return [m for m in run_checks() if m.id.startswith("gymbilling.")]


def test_the_default_currencies_pass():
    assert _gymbilling_messages() == []


def test_a_traded_currency_without_a_minimum_order_is_an_error(settings):
    # given a currency Stripe's table does not list (Chilean pesos)
    settings.MARKET_CURRENCIES = ["usd", "clp"]

    [error] = _gymbilling_messages()

    assert (error.id, error.is_serious()) == ("gymbilling.E001", True)
    assert "'clp'" in error.msg and "MARKET_MIN_ORDER_AMOUNTS=clp=N" in error.hint


def test_a_minimum_over_the_maximum_is_an_error(settings):
    settings.MARKET_MIN_ORDER_AMOUNTS = {"usd": 500}
    settings.MARKET_MAX_ORDER_AMOUNT = 499

    [error] = _gymbilling_messages()

    assert error.id == "gymbilling.E002" and "every order would be refused" in error.msg


def test_the_environment_overrides_a_minimum_per_currency_in_any_case():
    # given an operator who trades dollars and Chilean pesos, raises the
    # dollar's minimum to $1 and sets the peso's, in upper case, in a process of
    # its own (the settings are read as it starts)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
    env.update(
        DJANGO_SETTINGS_MODULE="gymbilling.settings.base",
        MARKET_CURRENCIES="USD,CLP",
        MARKET_MIN_ORDER_AMOUNTS="USD=100,clp=500",
    )
    report = """
import json
from django.conf import settings
from django.core.checks import run_checks

from tests.helpers import settings_in_a_fresh_process
print(json.dumps({
    "currencies": settings.MARKET_CURRENCIES,
    "minimums": {c: settings.MARKET_MIN_ORDER_AMOUNTS[c] for c in ("usd", "clp", "gbp")},
    "checks": [m.id for m in run_checks() if m.id.startswith("gymbilling.")],
}))
"""
    done = settings_in_a_fresh_process(report, env=env)
    assert done.returncode == 0, done.stderr

    # then both are traded in lower case, each at its own minimum, the others
    # at Stripe's, and the checks pass
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "currencies": ["usd", "clp"],
        "minimums": {"usd": 100, "clp": 500, "gbp": 30},
        "checks": [],
    }


def test_a_malformed_minimum_stops_the_process_with_what_to_write():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MARKET_")}
    env.update(DJANGO_SETTINGS_MODULE="gymbilling.settings.base", MARKET_MIN_ORDER_AMOUNTS="usd")

    done = settings_in_a_fresh_process("", env=env)

    assert done.returncode != 0
    assert "MARKET_MIN_ORDER_AMOUNTS: 'usd' is not currency=minor-units" in done.stderr
