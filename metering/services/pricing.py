"""The price book: what a usage costs in credits, and publishing new rates.

Rates are credits per million tokens, which is exactly micro-credits per
token, so the arithmetic below is already in micro-credits. Rates and
multipliers are Decimals; the one conversion to an integer amount is
`round_charge`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal

from django.db import IntegrityError, transaction
from django.db.models import Max
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import Priority
from metering.models import ModelPrice, PriceBook
from metering.services.postings import decimal_text_parse


@dataclass(frozen=True)
class Usage:
    input_tokens: int  # every prompt token, cached ones included
    output_tokens: int
    cached_input_tokens: int = 0  # the part of input_tokens served from a prefix cache

    def __post_init__(self) -> None:
        for name in ("input_tokens", "output_tokens", "cached_input_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ApplicationError(
                    code="invalid_usage",
                    message=f"{name} must be a non-negative integer; got {value!r}.",
                    param=name,
                )
        if self.cached_input_tokens > self.input_tokens:
            raise ApplicationError(
                code="invalid_usage",
                message="cached_input_tokens cannot exceed input_tokens.",
                param="cached_input_tokens",
            )


@dataclass(frozen=True)
class Rates:
    input_rate: Decimal
    cached_input_rate: Decimal
    output_rate: Decimal
    minimum_charge: int
    multiplier: Decimal

    @classmethod
    def of(cls, price: ModelPrice, priority: str) -> Rates:
        book = price.price_book
        multiplier = {
            Priority.BATCH: book.batch_multiplier,
            Priority.STANDARD: book.standard_multiplier,
            Priority.PRIORITY: book.priority_multiplier,
        }.get(priority)
        if multiplier is None:
            raise ApplicationError(
                code="invalid_priority",
                message=f"Unknown priority {priority!r}; use one of {', '.join(Priority.values)}.",
                param="priority",
            )
        return cls(
            input_rate=price.input_rate,
            cached_input_rate=price.cached_input_rate,
            output_rate=price.output_rate,
            minimum_charge=price.minimum_charge,
            multiplier=multiplier,
        )


def round_charge(value: Decimal) -> int:
    """The only rounding of a charge: up, to the next whole micro-credit.

    Up, so that the platform never serves work it does not charge for; the
    member pays at most one micro-credit (a millionth of a credit) more per
    request than the exact product.
    """
    return int(value.to_integral_value(rounding=ROUND_CEILING))


def credits_for_usage(*, rates: Rates, usage: Usage) -> int:
    """Micro-credits for a usage at the given rates. Pure: no database, no clock."""
    uncached = usage.input_tokens - usage.cached_input_tokens
    exact = (
        uncached * rates.input_rate
        + usage.cached_input_tokens * rates.cached_input_rate
        + usage.output_tokens * rates.output_rate
    ) * rates.multiplier
    return max(round_charge(exact), rates.minimum_charge)


def credits_worst_case(*, rates: Rates, prompt_tokens: int, max_output_tokens: int) -> int:
    """The most a request can cost: what a hold must reserve before the work starts.

    No prompt token is assumed cached unless caching is the dearer rate.
    """
    cached = prompt_tokens if rates.cached_input_rate > rates.input_rate else 0
    return credits_for_usage(
        rates=rates,
        usage=Usage(
            input_tokens=prompt_tokens,
            output_tokens=max_output_tokens,
            cached_input_tokens=cached,
        ),
    )


def _price_book_number(value: object, *, model: type, field: str, what: str) -> Decimal:
    """A rate or multiplier given to price_book_publish, exactly as its column stores it, or
    `invalid_price_book`.

    Text is read by decimal_text_parse only (ASCII digits, at most one '.'): bare Decimal()
    also takes "1e3", "1_000" and other scripts' digits ("٣" is 3), and a price book is
    immutable, so a rate published from a typo would price every request until the next
    version. A Decimal (or int) is taken as the number it is, if finite; a float is not a
    price (rates are never floats). Nothing is rounded: more places than the column keeps would be
    rounded by PostgreSQL without a word, and more digits would fail the insert.
    """
    column = model._meta.get_field(field)
    if isinstance(value, Decimal):
        value = format(value, "f")  # NaN and Infinity stay words, refused below
    elif isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    number = decimal_text_parse(value)
    if number is None:
        raise ApplicationError(
            code="invalid_price_book",
            message=f"{what} is {value!r}, not a number: write ASCII digits with at most one "
            "'.', such as 0.15.",
        )
    places = column.decimal_places
    if number.adjusted() >= column.max_digits - places or number != number.quantize(
        Decimal(1).scaleb(-places)
    ):
        raise ApplicationError(
            code="invalid_price_book",
            message=f"{what} is {value!r}: it takes at most {column.max_digits - places} "
            f"digits before the '.' and {places} after.",
        )
    return number


def price_book_publish(
    *,
    prices: list[dict],
    effective_at: datetime | None = None,
    batch_multiplier: Decimal = Decimal("1"),
    standard_multiplier: Decimal = Decimal("1"),
    priority_multiplier: Decimal = Decimal("1"),
    notes: str = "",
) -> PriceBook:
    """Publish the next price-book version. Earlier versions are never edited.

    `prices` holds one dict per model: model_name, input_rate,
    cached_input_rate, output_rate (Decimals or strings, credits per million
    tokens) and an optional minimum_charge in micro-credits.
    """
    if not prices:
        raise ApplicationError(code="invalid_price_book", message="A price book needs prices.")
    names = [p["model_name"] for p in prices]
    if len(set(names)) != len(names):
        raise ApplicationError(
            code="invalid_price_book", message="Each model may appear once in a price book."
        )
    multipliers = {
        field: _price_book_number(value, model=PriceBook, field=field, what=f"The {field}")
        for field, value in (
            ("batch_multiplier", batch_multiplier),
            ("standard_multiplier", standard_multiplier),
            ("priority_multiplier", priority_multiplier),
        )
    }
    if any(multiplier <= 0 for multiplier in multipliers.values()):
        raise ApplicationError(
            code="invalid_price_book", message="Priority multipliers must be positive."
        )
    rows = []
    for p in prices:
        missing = [k for k in ("input_rate", "cached_input_rate", "output_rate") if k not in p]
        if missing:
            raise ApplicationError(
                code="invalid_price_book",
                message=f"Bad rate for {p.get('model_name')!r}: {', '.join(missing)} missing.",
            )
        rates = [
            _price_book_number(
                p[k], model=ModelPrice, field=k, what=f"The {k} of {p['model_name']!r}"
            )
            for k in ("input_rate", "cached_input_rate", "output_rate")
        ]
        minimum = p.get("minimum_charge", 0)
        if any(r < 0 for r in rates) or not isinstance(minimum, int) or minimum < 0:
            raise ApplicationError(
                code="invalid_price_book",
                message=f"Rates and minimum charge of {p['model_name']!r} must not be negative.",
            )
        rows.append((p["model_name"], rates, minimum))

    for _attempt in range(3):
        try:
            with transaction.atomic():
                latest = PriceBook.objects.aggregate(v=Max("version"))["v"] or 0
                book = PriceBook.objects.create(
                    version=latest + 1,
                    effective_at=effective_at or timezone.now(),
                    **multipliers,
                    notes=notes,
                )
                ModelPrice.objects.bulk_create(
                    ModelPrice(
                        price_book=book,
                        model_name=name,
                        input_rate=rates[0],
                        cached_input_rate=rates[1],
                        output_rate=rates[2],
                        minimum_charge=minimum,
                    )
                    for name, rates, minimum in rows
                )
                return book
        except IntegrityError:
            continue  # another publisher took this version number: take the next
    raise ApplicationError(
        code="conflict", message="Could not publish the price book; try again.", status=409
    )
