"""What the periodic sweeps of billing share."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

logger = logging.getLogger(__name__)


def each_isolated(
    pks: Iterable[int],
    work: Callable[[int], int],
    *,
    what: str,
    then: str = "the next run tries again",
) -> int:
    """`work(pk)` for each row, summed; a row whose work raises is logged and left for the
    sweep's next run (`then` says who tries it again), and the rest still go (as the
    credits' expiry sweep does per account): one broken reversal must not hold back every
    other refund's credits. Inside a transaction, `work` must run in a savepoint of its
    own, so that what it wrote goes with it and the transaction stays usable."""
    total = 0
    for pk in pks:
        try:
            total += work(pk)
        except Exception:
            logger.exception("%s %s failed; %s", what, pk, then)
    return total
