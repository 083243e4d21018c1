"""The SQL fast path writes exactly what the ORM path writes.

Every other ledger test runs with the fast path on (the default); here one
scenario runs through each path and the rows are compared field by field.
"""

from datetime import timedelta

import pytest
from django.utils import timezone

from metering.models import (
    CreditLot,
    Hold,
    JournalTransaction,
    LedgerEntry,
    LotMovement,
    UsageRecord,
)
from metering.selectors import organization_balance
from metering.services import credits_grant, hold_capture, hold_place, hold_release
from metering.services.usage import UsageDraft
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import credits, usage_draft

pytestmark = pytest.mark.django_db


def _draft(org, job_id: str, charged: int, *, user_id: int | None = None) -> UsageDraft:
    return usage_draft(
        org,
        job_id,
        charged,
        model_name="llama-test",
        engine_busy_ms=17,
        serving_cost=3,
        user_id=user_id,
    )


def run_scenario(tag: str) -> dict:
    org = OrganizationFactory()
    soon = timezone.now() + timedelta(days=3)
    later = timezone.now() + timedelta(days=30)
    credits_grant(
        organization=org, amount=credits(5), source="promotion", paid=False,
        resellable=False, key=f"{tag}-promo", expires_at=soon, priority=50,
    )  # fmt: skip
    credits_grant(
        organization=org, amount=credits(20), source="subscription", paid=True,
        resellable=True, key=f"{tag}-sub", expires_at=later,
    )  # fmt: skip
    hold_place(organization=org, amount=credits(8), key=f"{tag}-a")
    hold_place(organization=org, amount=credits(3), key=f"{tag}-b")
    hold_place(organization=org, amount=credits(2), key=f"{tag}-c")
    # burns the promotion first, then paid; its usage record written with it,
    # naming the member who sent it with their dashboard session
    member = UserFactory(email=f"member-{tag}@example.test")
    hold_capture(
        key=f"{tag}-a",
        amount=credits(7),
        usage=_draft(org, f"{tag}-a", credits(7), user_id=member.pk),
    )
    hold_capture(key=f"{tag}-b", amount=credits(3))  # a full capture: nothing goes back
    hold_release(key=f"{tag}-c", usage=_draft(org, f"{tag}-c", 0))

    entries = [
        (e.transaction.kind, e.account.kind, e.amount, e.balance_after)
        for e in LedgerEntry.objects.filter(transaction__organization=org)
        .select_related("transaction", "account")
        .order_by("transaction_id", "account__kind")
    ]
    holds = [
        (h.key.removeprefix(f"{tag}-"), h.amount, h.captured, h.status, h.settle_transaction.kind)
        for h in Hold.objects.filter(organization=org).select_related("settle_transaction")
    ]
    lots = sorted(
        (lot.source, lot.amount, lot.remaining)
        for lot in CreditLot.objects.filter(organization=org)
    )
    movements = sorted(
        (m.transaction.kind, m.lot.source, m.amount)
        for m in LotMovement.objects.filter(lot__organization=org).select_related(
            "transaction", "lot"
        )
    )
    keys = sorted(
        k.removeprefix("grant:").replace(tag, "T")
        for k in JournalTransaction.objects.filter(organization=org).values_list(
            "idempotency_key", flat=True
        )
    )
    usage = sorted(
        (
            u.job_id.removeprefix(f"{tag}-"),
            u.hold.key.removeprefix(f"{tag}-"),
            u.model_name,
            u.priority,
            u.input_tokens,
            u.cached_input_tokens,
            u.output_tokens,
            u.engine_busy_ms,
            u.credits,
            u.serving_cost,
            u.currency,
            u.api_key_id,
            u.user.email.replace(tag, "T") if u.user_id else None,
        )
        for u in UsageRecord.objects.filter(organization=org).select_related("hold", "user")
    )
    return {
        "usage": usage,
        "balance": organization_balance(organization=org),
        "entries": entries,
        "holds": sorted(holds),
        "lots": lots,
        "movements": movements,
        "keys": keys,
    }


def test_the_fast_path_and_the_orm_path_write_the_same_rows(settings):
    # given the same scenario through each path
    settings.METERING_FAST_PATH = False
    orm = run_scenario("orm")
    settings.METERING_FAST_PATH = True
    fast = run_scenario("fast")

    # then every row matches, and the scenario did what it says
    assert fast == orm
    assert [(u[0], u[1], u[8]) for u in fast["usage"]] == [("a", "a", credits(7)), ("c", "c", 0)]
    assert [u[-1] for u in fast["usage"]] == ["member-T@example.test", None]
    assert fast["balance"].available == credits(25) - credits(10)
    assert fast["lots"] == [
        ("promotion", credits(5), 0),
        ("subscription", credits(20), credits(15)),
    ]
    # the full capture gave nothing back: only capture "a" returned credits to the wallet
    wallet_returns = [e for e in fast["entries"] if e[:2] == ("hold_capture", "wallet")]
    assert [e[2] for e in wallet_returns] == [credits(1)]


def test_the_fast_path_falls_back_for_everything_unusual(settings, org, grant):
    # given the fast path on, and a wallet that is short
    settings.METERING_FAST_PATH = True
    grant(org, credits(1))

    # when a hold asks for more, the ORM path gives the typed error
    from accounts.errors import ApplicationError

    with pytest.raises(ApplicationError) as short:
        hold_place(organization=org, amount=credits(2), key="too-big")

    # and a replayed placement, and a second settlement, are answered as before
    first = hold_place(organization=org, amount=credits(1), key="job")
    again = hold_place(organization=org, amount=credits(1), key="job")
    captured = hold_capture(key="job", amount=credits(1))
    with pytest.raises(ApplicationError) as settled:
        hold_capture(key="job", amount=0)

    # then
    assert short.value.code == "insufficient_credits"
    assert again.pk == first.pk
    assert captured.status == "captured"
    assert settled.value.code == "hold_already_settled"
    assert Hold.objects.filter(organization=org).count() == 1


def test_a_usage_record_already_written_is_replayed_not_doubled(settings, org, grant):
    # given a job whose usage was recorded already (a settlement retried after
    # its record was written by hand, say), and its hold still pending
    settings.METERING_FAST_PATH = True
    grant(org, credits(10))
    hold_place(organization=org, amount=credits(2), key="job-dup")
    _draft(org, "job-dup", credits(1)).write(hold=None)

    # when the hold is captured with the same record
    hold = hold_capture(key="job-dup", amount=credits(1), usage=_draft(org, "job-dup", credits(1)))

    # then the fast path stepped aside, the ORM path settled the hold once
    # and returned the record already there: one record, one capture
    assert (hold.status, hold.captured) == ("captured", credits(1))
    assert UsageRecord.objects.filter(job_id="job-dup").count() == 1
    assert organization_balance(organization=org).available == credits(9)


def test_the_fast_path_writes_the_usage_record_in_its_own_statements(settings, org, grant):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    # given a pending hold, after a first settlement opened the system
    # accounts (until then the fast path steps aside: "not set up")
    settings.METERING_FAST_PATH = True
    grant(org, credits(10))
    hold_place(organization=org, amount=credits(1), key="job-first")
    hold_capture(key="job-first", amount=credits(1))
    hold_place(organization=org, amount=credits(2), key="job-fast")

    # when it is captured with its usage record
    with CaptureQueriesContext(connection) as queries:
        hold_capture(key="job-fast", amount=credits(1), usage=_draft(org, "job-fast", credits(1)))

    # then no ORM statement ran (the fast path's own run on a raw cursor), not
    # even a savepoint (the server-side function has its own), and the record
    # is there, linked to the hold
    assert queries.captured_queries == []
    record = UsageRecord.objects.select_related("hold").get(job_id="job-fast")
    assert (record.hold.key, record.credits) == ("job-fast", credits(1))


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "orm path"])
def test_a_usage_record_that_disagrees_with_the_capture_is_refused(settings, org, grant, fast):
    from accounts.errors import ApplicationError
    from tests.helpers import ledger_rows

    # given a pending hold
    settings.METERING_FAST_PATH = fast
    grant(org, credits(10))
    hold_place(organization=org, amount=credits(2), key="job-mismatch")
    before = ledger_rows()

    # when it is captured with a record that charges something else
    with pytest.raises(ApplicationError) as refused:
        hold_capture(
            key="job-mismatch", amount=credits(1), usage=_draft(org, "job-mismatch", credits(2))
        )

    # then nothing was written: the hold still pending, no record
    assert refused.value.code == "invalid_usage"
    assert ledger_rows() == before
    assert Hold.objects.get(key="job-mismatch").status == "pending"
    assert not UsageRecord.objects.filter(job_id="job-mismatch").exists()


@pytest.mark.parametrize("fast", [True, False], ids=["fast path", "orm path"])
def test_lots_that_cannot_cover_a_capture_stop_it_and_write_nothing(settings, org, grant, fast):
    from django.db import connection, transaction
    from django.test.utils import CaptureQueriesContext

    from metering.services.lots import LedgerInconsistent
    from tests.helpers import ledger_rows

    # given a pending hold, after a first settlement opened the system
    # accounts, and then the wallet's lots emptied behind the ledger's back
    # (no service does that: this is the corruption the check is there for)
    settings.METERING_FAST_PATH = fast
    grant(org, credits(10))
    hold_place(organization=org, amount=credits(1), key="job-first")
    hold_capture(key="job-first", amount=credits(1))
    hold_place(organization=org, amount=credits(2), key="job-short")
    corrupt = "UPDATE metering_creditlot SET remaining = remaining + %s WHERE organization_id = %s"
    with connection.cursor() as cursor:
        cursor.execute(corrupt, [-credits(9), org.pk])
    before = ledger_rows()
    balance = organization_balance(organization=org)

    # when the hold is captured by a caller with its own transaction (the
    # error ends it: the fast path's statement fails as a whole)
    with (
        CaptureQueriesContext(connection) as queries,
        pytest.raises(LedgerInconsistent) as short,
        transaction.atomic(),
    ):
        hold_capture(key="job-short", amount=credits(1))

    # then the capture is refused as an inconsistency, and nothing was written
    assert "to burn" in str(short.value)
    # and on the fast path it was the server-side function that found it,
    # not the ORM path after it (which would have locked the hold itself)
    orm_ran = any("FOR UPDATE" in q["sql"] for q in queries.captured_queries)
    assert orm_ran is not fast
    assert ledger_rows() == before
    assert organization_balance(organization=org) == balance
    assert Hold.objects.get(key="job-short").status == "pending"
    with connection.cursor() as cursor:  # repaired, for the suite's reconcile check
        cursor.execute(corrupt, [credits(9), org.pk])


def _org_with_ten_credits():
    """An organization granted 10 credits (a paid, resellable subscription lot)."""
    org = OrganizationFactory()
    credits_grant(
        organization=org, amount=credits(10), source="subscription", paid=True,
        resellable=True, key=f"grant-{org.pk}", expires_at=timezone.now() + timedelta(days=30),
    )  # fmt: skip
    return org


@pytest.mark.django_db(transaction=True)
def test_outside_a_transaction_each_call_commits_on_its_own(settings):
    import psycopg
    from django.db import connection

    # given the fast path on, and no transaction open (as the benchmark and
    # any caller of the services alone: each statement is its own transaction)
    settings.METERING_FAST_PATH = True
    org = _org_with_ten_credits()
    hold_place(organization=org, amount=credits(1), key="auto-first")
    hold_capture(key="auto-first", amount=credits(1))

    # when a hold is placed, placed again with its key, and captured
    assert not connection.in_atomic_block
    first = hold_place(organization=org, amount=credits(3), key="auto-job")
    again = hold_place(organization=org, amount=credits(3), key="auto-job")
    captured = hold_capture(key="auto-job", amount=credits(2))

    # then another connection sees each committed: one hold, captured, and
    # the wallet charged once
    params = connection.get_connection_params()
    with psycopg.connect(**params) as other:
        status, amount_captured = other.execute(
            "SELECT status, captured FROM metering_hold WHERE key = 'auto-job'"
        ).fetchone()
        holds = other.execute(
            "SELECT count(*) FROM metering_hold WHERE organization_id = %s", [org.pk]
        ).fetchone()[0]
    assert again.pk == first.pk
    assert (captured.status, status, amount_captured) == ("captured", "captured", credits(2))
    assert holds == 2
    assert organization_balance(organization=org).available == credits(10) - credits(3)


@pytest.mark.django_db(transaction=True)
def test_a_hold_placed_without_waiting_for_the_disk_is_committed_all_the_same(settings):
    import psycopg
    from django.db import connection

    from tests.helpers import StatementLog

    # given the fast path on and no transaction open
    settings.METERING_FAST_PATH = True
    org = _org_with_ten_credits()

    # when a hold is placed without waiting for its WAL flush (no row of its own)
    statements = StatementLog()
    with connection.execute_wrapper(statements):
        hold_place(organization=org, amount=credits(3), key="unflushed", durable=False)

    # then its one statement asked for that, for its own transaction only
    [placement] = [s for s in statements.sql if "INSERT INTO metering_hold" in s]
    assert "set_config('synchronous_commit', 'off', true)" in placement
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
    # and it is committed: another connection sees the hold and the wallet charged
    with psycopg.connect(**connection.get_connection_params()) as other:
        status = other.execute("SELECT status FROM metering_hold WHERE key = 'unflushed'")
        assert status.fetchone()[0] == "pending"
    assert organization_balance(organization=org).available == credits(10) - credits(3)
    # and it settles as any other
    assert hold_capture(key="unflushed", amount=credits(2)).status == "captured"
