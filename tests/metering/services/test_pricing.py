"""Pricing: Decimal rates, one rounding (up), minimum charges, priorities and price books."""

from __future__ import annotations

import itertools
from datetime import timedelta
from decimal import Decimal

import pytest
from django.db.models import Max
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import Priority
from metering.models import ModelPrice, PriceBook
from metering.selectors import model_price
from metering.services import (
    Rates,
    Usage,
    credits_for_usage,
    credits_worst_case,
    price_book_publish,
    round_charge,
)


def rates(
    input_rate: str = "0.15",
    cached_input_rate: str = "0.075",
    output_rate: str = "0.6",
    minimum_charge: int = 0,
    multiplier: str = "1",
) -> Rates:
    return Rates(
        input_rate=Decimal(input_rate),
        cached_input_rate=Decimal(cached_input_rate),
        output_rate=Decimal(output_rate),
        minimum_charge=minimum_charge,
        multiplier=Decimal(multiplier),
    )


def price(model_name: str, **overrides) -> dict:
    row = {
        "model_name": model_name,
        "input_rate": "0.15",
        "cached_input_rate": "0.075",
        "output_rate": "0.6",
    }
    row.update(overrides)
    return row


# --- rounding ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (Decimal("0"), 0),
        (Decimal("5"), 5),
        (Decimal("5.000000"), 5),
        (Decimal("5.0000000001"), 6),
        (Decimal("0.0000001"), 1),
        (Decimal("652.5"), 653),
        (Decimal("999999999999.1"), 1_000_000_000_000),
    ],
)
def test_round_charge_rounds_up_to_a_whole_micro_credit(value, expected):
    # given / when
    result = round_charge(value)

    # then
    assert result == expected
    assert type(result) is int


# --- credits_for_usage ----------------------------------------------------------


def test_charge_is_the_exact_sum_of_uncached_cached_and_output_tokens():
    # given: 800 uncached, 200 cached, 500 output tokens
    usage = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=200)

    # when
    charge = credits_for_usage(rates=rates(), usage=usage)

    # then: 800 * 0.15 + 200 * 0.075 + 500 * 0.6
    assert charge == 120 + 15 + 300


def test_decimal_rates_do_not_pick_up_float_error():
    # given: 30 * 0.1 is 3.0000000000000004 in binary floating point
    usage = Usage(input_tokens=30, output_tokens=0)

    # when
    charge = credits_for_usage(rates=rates(input_rate="0.1"), usage=usage)

    # then
    assert charge == 3


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (Usage(input_tokens=1, output_tokens=0), 1),  # 0.15 -> 1
        (Usage(input_tokens=7, output_tokens=3), 3),  # 1.05 + 1.8 = 2.85 -> 3
        (Usage(input_tokens=20, output_tokens=0), 3),  # exactly 3
        (Usage(input_tokens=2, output_tokens=0, cached_input_tokens=2), 1),  # 0.15 -> 1
        (Usage(input_tokens=0, output_tokens=0), 0),
    ],
)
def test_the_total_is_rounded_up_once(usage, expected):
    # given / when
    charge = credits_for_usage(rates=rates(), usage=usage)

    # then
    assert charge == expected


def test_rounding_happens_on_the_total_not_per_token_kind():
    # given: each part alone would round up, the sum is whole
    usage = Usage(input_tokens=11, output_tokens=1, cached_input_tokens=1)
    exact = Decimal(10) * Decimal("0.15") + Decimal("0.075") * 1 + Decimal("0.425")

    # when
    charge = credits_for_usage(rates=rates(output_rate="0.425"), usage=usage)

    # then: 1.5 + 0.075 + 0.425 = 2 exactly
    assert exact == 2
    assert charge == 2


def test_a_minimum_charge_applies_to_small_requests_only():
    # given
    small = Usage(input_tokens=10, output_tokens=10)  # 1.5 + 6 = 7.5 -> 8
    large = Usage(input_tokens=10_000, output_tokens=10_000)  # 1500 + 6000

    # when
    small_charge = credits_for_usage(rates=rates(minimum_charge=100), usage=small)
    large_charge = credits_for_usage(rates=rates(minimum_charge=100), usage=large)
    empty_charge = credits_for_usage(
        rates=rates(minimum_charge=100), usage=Usage(input_tokens=0, output_tokens=0)
    )

    # then
    assert small_charge == 100
    assert large_charge == 7500
    assert empty_charge == 100


@pytest.mark.parametrize(
    ("multiplier", "expected"),
    [("1", 435), ("1.5", 653), ("0.5", 218), ("2", 870), ("0.3333", 145)],
)
def test_the_priority_multiplier_applies_before_rounding(multiplier, expected):
    # given: 435 micro-credits at multiplier 1
    usage = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=200)

    # when
    charge = credits_for_usage(rates=rates(multiplier=multiplier), usage=usage)

    # then: 652.5 -> 653, 217.5 -> 218, 144.9855 -> 145
    assert charge == expected


def test_large_usage_stays_exact():
    # given: a long context at an expensive rate
    usage = Usage(input_tokens=2_000_000, output_tokens=1_000_000, cached_input_tokens=1_000_001)

    # when
    charge = credits_for_usage(
        rates=rates(input_rate="3.000001", cached_input_rate="0.3", output_rate="15.000003"),
        usage=usage,
    )

    # then: 2_999_997.999999 + 300_000.3 + 15_000_003 = 18_300_001.299999, rounded up
    assert charge == 18_300_002


# --- credits_worst_case -----------------------------------------------------------


def test_worst_case_assumes_no_cached_tokens_when_caching_is_cheaper():
    # given / when
    worst = credits_worst_case(rates=rates(), prompt_tokens=1000, max_output_tokens=500)

    # then: 1000 * 0.15 + 500 * 0.6
    assert worst == 450


def test_worst_case_assumes_every_prompt_token_cached_when_caching_is_dearer():
    # given
    dear_cache = rates(cached_input_rate="0.2")

    # when
    worst = credits_worst_case(rates=dear_cache, prompt_tokens=1000, max_output_tokens=500)

    # then: 1000 * 0.2 + 500 * 0.6
    assert worst == 500


def test_worst_case_includes_multiplier_and_minimum():
    # given / when
    with_multiplier = credits_worst_case(
        rates=rates(multiplier="1.5"), prompt_tokens=1000, max_output_tokens=500
    )
    with_minimum = credits_worst_case(
        rates=rates(minimum_charge=10_000), prompt_tokens=1, max_output_tokens=1
    )

    # then
    assert with_multiplier == 675
    assert with_minimum == 10_000


@pytest.mark.parametrize("cached_rate", ["0.075", "0.15", "0.2"])
def test_no_usage_within_the_request_costs_more_than_its_worst_case(cached_rate):
    # given
    r = rates(cached_input_rate=cached_rate, multiplier="1.25", minimum_charge=50)
    prompt, max_output = 37, 23
    worst = credits_worst_case(rates=r, prompt_tokens=prompt, max_output_tokens=max_output)

    # when
    charges = [
        credits_for_usage(
            rates=r,
            usage=Usage(input_tokens=inp, output_tokens=out, cached_input_tokens=cached),
        )
        for inp, out in itertools.product(range(prompt + 1), range(0, max_output + 1, 11))
        for cached in (0, inp // 2, inp)
    ]

    # then
    assert max(charges) <= worst
    assert (
        credits_for_usage(rates=r, usage=Usage(input_tokens=prompt, output_tokens=max_output))
        <= worst
    )


# --- Usage ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"input_tokens": -1, "output_tokens": 0}, "input_tokens"),
        ({"input_tokens": 0, "output_tokens": -1}, "output_tokens"),
        ({"input_tokens": 5, "output_tokens": 0, "cached_input_tokens": -1}, "cached_input_tokens"),
        ({"input_tokens": 1.0, "output_tokens": 0}, "input_tokens"),
        ({"input_tokens": True, "output_tokens": 0}, "input_tokens"),
        ({"input_tokens": "5", "output_tokens": 0}, "input_tokens"),
        ({"input_tokens": 5, "output_tokens": None}, "output_tokens"),
        ({"input_tokens": 5, "output_tokens": 0, "cached_input_tokens": 6}, "cached_input_tokens"),
    ],
)
def test_invalid_usage_is_refused(kwargs, param):
    # given / when
    with pytest.raises(ApplicationError) as exc:
        Usage(**kwargs)

    # then
    assert exc.value.code == "invalid_usage"
    assert exc.value.param == param
    assert exc.value.status == 400


# --- price books ---------------------------------------------------------------------


@pytest.mark.django_db
def test_publishing_creates_the_next_version_and_keeps_the_old_one():
    # given
    latest = PriceBook.objects.aggregate(v=Max("version"))["v"] or 0
    v1 = price_book_publish(
        prices=[price("pricing-test-a", minimum_charge=7), price("pricing-test-b")],
        notes="launch",
    )

    # when
    v2 = price_book_publish(
        prices=[price("pricing-test-a", input_rate="0.2", output_rate=Decimal("0.8"))],
        priority_multiplier=Decimal("1.5"),
        batch_multiplier=Decimal("0.5"),
    )

    # then
    assert (v1.version, v2.version) == (latest + 1, latest + 2)
    assert v1.notes == "launch"
    old = ModelPrice.objects.get(price_book=v1, model_name="pricing-test-a")
    assert (old.input_rate, old.cached_input_rate, old.output_rate, old.minimum_charge) == (
        Decimal("0.15"),
        Decimal("0.075"),
        Decimal("0.6"),
        7,
    )
    assert ModelPrice.objects.filter(price_book=v1).count() == 2
    new = ModelPrice.objects.get(price_book=v2, model_name="pricing-test-a")
    assert (new.input_rate, new.output_rate, new.minimum_charge) == (
        Decimal("0.2"),
        Decimal("0.8"),
        0,
    )
    v2.refresh_from_db()
    assert (v2.batch_multiplier, v2.standard_multiplier, v2.priority_multiplier) == (
        Decimal("0.5"),
        Decimal("1"),
        Decimal("1.5"),
    )


@pytest.mark.django_db
def test_publishing_without_effective_at_takes_effect_now():
    # given
    before = timezone.now()

    # when
    book = price_book_publish(prices=[price("pricing-test-now")])

    # then
    assert before <= book.effective_at <= timezone.now()
    assert model_price(model_name="pricing-test-now").price_book == book


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kwargs", "prices"),
    [
        ({}, []),
        ({}, [price("pricing-dup"), price("pricing-dup")]),
        ({"priority_multiplier": Decimal("0")}, [price("pricing-x")]),
        ({"batch_multiplier": Decimal("-1")}, [price("pricing-x")]),
        ({}, [price("pricing-x", input_rate="-0.1")]),
        ({}, [price("pricing-x", output_rate="not a number")]),
        ({}, [price("pricing-x", minimum_charge=-1)]),
        ({}, [price("pricing-x", minimum_charge=1.5)]),
        ({}, [{"model_name": "pricing-x", "input_rate": "1", "output_rate": "1"}]),
        # What bare Decimal() reads and a person did not mean: an exponent, another
        # script's digits (Arabic-Indic three), a digit separator, words
        ({}, [price("pricing-x", input_rate="1e3")]),
        ({}, [price("pricing-x", output_rate="٣")]),
        ({}, [price("pricing-x", cached_input_rate="1_000")]),
        ({}, [price("pricing-x", input_rate="NaN")]),
        ({}, [price("pricing-x", output_rate=Decimal("Infinity"))]),
        ({}, [price("pricing-x", input_rate=0.15)]),
        ({"priority_multiplier": "1e1"}, [price("pricing-x")]),
        # More than the column keeps: rounded, or refused by the database, unsaid
        ({}, [price("pricing-x", input_rate="0.0000001")]),
        ({}, [price("pricing-x", output_rate="1000000000000")]),
        ({"batch_multiplier": Decimal("0.12345")}, [price("pricing-x")]),
    ],
    ids=[
        "empty",
        "duplicate",
        "zero-multiplier",
        "negative-multiplier",
        "negative-rate",
        "not-a-number",
        "negative-minimum",
        "float-minimum",
        "missing-rate",
        "exponent",
        "other-script-digits",
        "digit-separator",
        "nan",
        "infinity",
        "float-rate",
        "exponent-multiplier",
        "too-many-places",
        "too-many-digits",
        "multiplier-too-many-places",
    ],
)
def test_a_bad_price_book_is_refused_and_nothing_is_published(kwargs, prices):
    # given
    books = PriceBook.objects.count()
    model_prices = ModelPrice.objects.count()

    # when
    with pytest.raises(ApplicationError) as exc:
        price_book_publish(prices=prices, **kwargs)

    # then
    assert exc.value.code == "invalid_price_book"
    assert PriceBook.objects.count() == books
    assert ModelPrice.objects.count() == model_prices


@pytest.mark.django_db
def test_model_price_picks_the_book_in_force_at_a_moment():
    # given: a past book, a current one, and one that takes effect next week
    now = timezone.now()
    past = price_book_publish(
        prices=[price("pricing-timeline", input_rate="1")], effective_at=now - timedelta(days=30)
    )
    current = price_book_publish(
        prices=[price("pricing-timeline", input_rate="2")], effective_at=now - timedelta(days=1)
    )
    future = price_book_publish(
        prices=[price("pricing-timeline", input_rate="3")], effective_at=now + timedelta(days=7)
    )

    # when
    at_past = model_price(model_name="pricing-timeline", at=now - timedelta(days=10))
    at_now = model_price(model_name="pricing-timeline")
    at_future = model_price(model_name="pricing-timeline", at=now + timedelta(days=8))
    at_boundary = model_price(model_name="pricing-timeline", at=now + timedelta(days=7))

    # then
    assert at_past.price_book == past
    assert at_past.input_rate == Decimal("1")
    assert at_now.price_book == current
    assert at_future.price_book == future
    assert at_boundary.price_book == future


@pytest.mark.django_db
def test_model_price_prefers_the_later_effective_date_over_the_higher_version():
    # given: a backdated book published after the current one
    now = timezone.now()
    current = price_book_publish(
        prices=[price("pricing-backdated", input_rate="2")], effective_at=now - timedelta(days=1)
    )
    price_book_publish(
        prices=[price("pricing-backdated", input_rate="9")], effective_at=now - timedelta(days=5)
    )

    # when
    found = model_price(model_name="pricing-backdated", at=now)

    # then
    assert found.price_book == current


@pytest.mark.django_db
def test_model_price_breaks_a_tie_in_effective_date_by_the_higher_version():
    # given
    when = timezone.now() - timedelta(hours=1)
    price_book_publish(prices=[price("pricing-tie", input_rate="1")], effective_at=when)
    later = price_book_publish(prices=[price("pricing-tie", input_rate="2")], effective_at=when)

    # when
    found = model_price(model_name="pricing-tie")

    # then
    assert found.price_book == later


@pytest.mark.django_db
def test_an_unpriced_model_or_moment_is_404():
    # given
    price_book_publish(
        prices=[price("pricing-late")], effective_at=timezone.now() + timedelta(days=1)
    )

    # when
    with pytest.raises(ApplicationError) as unknown:
        model_price(model_name="pricing-never-heard-of")
    with pytest.raises(ApplicationError) as too_early:
        model_price(model_name="pricing-late")

    # then
    assert (unknown.value.code, unknown.value.status, unknown.value.param) == (
        "model_not_priced",
        404,
        "model",
    )
    assert too_early.value.code == "model_not_priced"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("priority", "expected"),
    [(Priority.BATCH, 218), (Priority.STANDARD, 435), (Priority.PRIORITY, 653)],
)
def test_rates_of_a_price_take_the_books_multiplier_for_the_priority(priority, expected):
    # given
    price_book_publish(
        prices=[price("pricing-mult")],
        batch_multiplier=Decimal("0.5"),
        priority_multiplier=Decimal("1.5"),
    )
    usage = Usage(input_tokens=1000, output_tokens=500, cached_input_tokens=200)

    # when
    charge = credits_for_usage(
        rates=Rates.of(model_price(model_name="pricing-mult"), priority), usage=usage
    )

    # then
    assert charge == expected


@pytest.mark.django_db
def test_an_unknown_priority_is_refused():
    # given
    price_book_publish(prices=[price("pricing-prio")])

    # when
    with pytest.raises(ApplicationError) as exc:
        Rates.of(model_price(model_name="pricing-prio"), "urgent")

    # then
    assert exc.value.code == "invalid_priority"
    assert exc.value.param == "priority"
