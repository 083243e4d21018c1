"""The settlement functions in the database: one signature each, the one the code calls.

metering/0017 and inference/0010 added each function's signature with the record's
user beside the old one, for the processes of the release before them while it was
deployed; metering/0020 and inference/0011 drop the old ones, and re-create them
when migrated back.
"""

from __future__ import annotations

import re

import pytest
from django.db import connection

from inference.services import jobs
from metering.services import fastpath
from tests.helpers import migrate, migrate_to_latest

pytestmark = pytest.mark.django_db(transaction=True)

# Each function, and the statement the code calls it with.
CALLED = {
    "metering_hold_settle": fastpath._SETTLE,
    "inference_job_settle": jobs._SETTLE_IN_ONE_CALL,
}
BEFORE_THE_DROPS = [
    ("metering", "0019_ledgeraccount_next_expiry_index"),
    ("inference", "0010_job_settle_with_usage_user"),
]


def _in_database(name: str) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT oid::regprocedure::text FROM pg_proc WHERE proname = %s ORDER BY 1", [name]
        )
        return [row[0] for row in cursor.fetchall()]


def _called(name: str) -> str:
    """The signature the code's statement calls `name` with: its arguments' casts."""
    casts = re.findall(r"\)s::([a-z]+(?:\[\])?)", CALLED[name])
    with connection.cursor() as cursor:
        cursor.execute("SELECT to_regprocedure(%s)::text", [f"{name}({', '.join(casts)})"])
        return cursor.fetchone()[0]


@pytest.fixture
def migrates_forward_after():
    """Forward to the latest again whatever happens, for the next test's schema."""
    yield
    migrate_to_latest()


def _old(name: str) -> list[str]:
    """The function's signatures other than the one the code calls."""
    return [signature for signature in _in_database(name) if signature != _called(name)]


@pytest.mark.parametrize(
    "name, arguments", [("metering_hold_settle", 21), ("inference_job_settle", 37)]
)
def test_each_settlement_function_has_only_the_signature_the_code_calls(name, arguments):
    # given the database migrated to the latest (the test database)

    # then the function has one signature, the one the code calls it with (the user last)
    called = _called(name)
    assert _in_database(name) == [called]
    assert called.count(",") + 1 == arguments and called.endswith(",bigint)")


def test_migrating_back_re_creates_the_old_signatures_as_they_were(migrates_forward_after):
    # given the database migrated to the latest

    # when it is migrated back to before the drops
    migrate(BEFORE_THE_DROPS)

    # then each function has its old signature again beside the new one (one argument
    # fewer), the ledger's as metering/0018 left it: it reports nothing while its
    # wallet has a lot due
    for name in CALLED:
        assert [old.count(",") for old in _old(name)] == [_called(name).count(",") - 1]
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT prosrc FROM pg_proc WHERE oid = %s::regprocedure",
            _old("metering_hold_settle"),
        )
        assert "w.next_expiry_at > p_now" in cursor.fetchone()[0]

    # and when migrated forward again, only the new ones are left
    migrate_to_latest()
    for name in CALLED:
        assert _in_database(name) == [_called(name)]
