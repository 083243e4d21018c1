"""`credits_parse`: credits as a person writes them, to micro-credits, exactly."""

from __future__ import annotations

import pytest

from metering.services.postings import credits_parse


@pytest.mark.parametrize(
    ("text", "micro"),
    [
        ("250", 250_000_000),
        ("0.5", 500_000),
        ("-10", -10_000_000),
        ("0.000001", 1),
        ("0", 0),
        ("0.5000000", 500_000),
        # the most one movement of the ledger may move (MAX_MOVEMENT), either way
        ("1000000000", 10**15),
        ("-1000000000", -(10**15)),
    ],
)
def test_credits_are_read_exactly(text, micro):
    assert credits_parse(text) == micro


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("ten", "is not a number"),
        ("NaN", "is not a number"),
        ("Infinity", "is not a number"),
        ("0.0000001", "exact to a millionth"),
        # Expanding these to an int took minutes (an admin's form, a command's argument):
        # they are refused on their exponent before anything is expanded.
        ("1e99999999", "more credits than one movement may move"),
        ("-9e999999999", "more credits than one movement may move"),
        ("1e-99999999", "exact to a millionth"),
        # just past the bound, and a digit past what Decimal's 28 would keep: never rounded
        ("1000000000.000001", "more credits than one movement may move"),
        ("9999999999999999", "more credits than one movement may move"),
        ("1.0000000000000000000000000001", "exact to a millionth"),
    ],
)
def test_what_is_not_a_number_of_credits_is_refused_saying_why(text, why):
    with pytest.raises(ValueError, match=why):
        credits_parse(text)
