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
        # written by people and read so before ASCII digits were required: still read
        ("+10", 10_000_000),
        (".5", 500_000),
        ("-.5", -500_000),
        ("5.", 5_000_000),
        ("007", 7_000_000),
        ("-0", 0),
        (" 250\n", 250_000_000),
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
        # no exponent is read at all.
        ("1e99999999", "is not a number"),
        ("-9e999999999", "is not a number"),
        ("1e-99999999", "is not a number"),
        ("1" * 100_000, "more credits than one movement may move"),
        # just past the bound, and a digit past what Decimal's 28 would keep: never rounded
        ("1000000000.000001", "more credits than one movement may move"),
        ("9999999999999999", "more credits than one movement may move"),
        ("1.0000000000000000000000000001", "exact to a millionth"),
    ],
)
def test_what_is_not_a_number_of_credits_is_refused_saying_why(text, why):
    with pytest.raises(ValueError, match=why):
        credits_parse(text)


@pytest.mark.parametrize(
    "text",
    [
        "\u0663",  # Arabic-Indic three: Decimal reads it as 3
        "\u0661\u0660",  # Arabic-Indic ten
        "\uff12\uff15\uff10",  # fullwidth 250
        "\u096b",  # Devanagari five
        "1_000",
        "1e3",
        "1E+2",
        "-2e0",
        "1 000",
        "1\t000",
        "- 5",
        "\u22125",  # the typographic minus sign
        "1,000",
        "1.2.3",
        ".",
        "-",
        "+",
        "",
        "   ",
        "--1",
        "+-1",
        "0x10",
        "1.5\u0663",
    ],
)
def test_only_ascii_digits_with_a_sign_and_one_point_are_credits(text):
    # given what is not plain decimal text (Decimal() alone reads the first seven)
    # when it is parsed, then it is refused with the parser's own error, saying what to write
    with pytest.raises(ValueError, match="is not a number of credits: write ASCII digits"):
        credits_parse(text)
