"""Small helpers shared by tests."""

from decimal import Decimal

MICRO = 1_000_000


def credits(n: int | str) -> int:
    """Credits (an int or a decimal string such as "0.5") to micro-credits."""
    value = Decimal(str(n)) * MICRO
    assert value == value.to_integral_value(), f"{n} is finer than a micro-credit"
    return int(value)
