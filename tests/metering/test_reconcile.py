"""ledger_reconcile finds every kind of corruption; each test rolls its corruption back."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction
from django.db.utils import IntegrityError

from metering.models import AccountKind, LedgerAccount
from metering.reconcile import CHECKS, ledger_reconcile
from metering.services import (
    credits_adjust,
    credits_transfer,
    hold_capture,
    hold_place,
    transaction_reverse,
)
from tests.helpers import credits

pytestmark = pytest.mark.django_db


class Rollback(Exception):
    """Raised at the end of a corruption block so that it never outlives the test."""


@pytest.fixture
def busy_ledger(org, other_org, grant):
    """Every kind of transaction, so the checks run over real rows."""
    grant(org, credits(100))
    grant(other_org, credits(10), expires_at=None)
    hold_place(organization=org, amount=credits(30), key="job-1")
    hold_capture(key="job-1", amount=credits(12))
    hold_place(organization=org, amount=credits(5), key="job-2")
    transfer = credits_transfer(source=org, destination=other_org, amount=credits(7), key="t-1")
    credits_transfer(
        source=org,
        destination=org,
        amount=credits(3),
        key="listing-1",
        destination_kind=AccountKind.ESCROW,
    )
    credits_adjust(organization=org, amount=-credits(1), reason="correction", key="a-1")
    transaction_reverse(original=transfer, reason="sent to the wrong team")
    return org


def execute(sql: str, params: list) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


def test_a_healthy_ledger_reconciles(busy_ledger):
    # given: the ledger built by the fixture

    # when
    report = ledger_reconcile()

    # then
    assert report.ok, report.violations
    assert report.checked[: len(CHECKS)] == [name for name, _, _ in CHECKS]


def test_the_command_says_so_on_a_healthy_ledger(busy_ledger):
    # given
    out = StringIO()

    # when
    call_command("ledger_reconcile", stdout=out)

    # then
    assert f"All {len(ledger_reconcile().checked)} invariants hold." in out.getvalue()


def test_the_command_reports_json(busy_ledger):
    # given
    out = StringIO()

    # when
    call_command("ledger_reconcile", "--json", stdout=out)

    # then
    body = json.loads(out.getvalue())
    assert body["ok"] is True
    assert body["violations"] == []


def test_a_corrupted_cached_balance_is_found(busy_ledger):
    # given
    wallet = LedgerAccount.objects.get(organization=busy_ledger, kind=AccountKind.WALLET)

    with pytest.raises(Rollback), transaction.atomic():
        execute(
            "UPDATE metering_ledgeraccount SET balance = balance + 1 WHERE id = %s", [wallet.pk]
        )

        # when
        report = ledger_reconcile()
        out = StringIO()
        with pytest.raises(CommandError) as exc:
            call_command("ledger_reconcile", stdout=out)

        # then
        violations = {v.check: v for v in report.violations}
        assert "cached_balance" in violations
        assert violations["cached_balance"].rows == [
            {
                "id": wallet.pk,
                "kind": AccountKind.WALLET,
                "organization_id": busy_ledger.pk,
                "balance": wallet.balance + 1,
                "entries": wallet.balance,
            }
        ]
        assert "lots_cover_wallet" in violations
        assert "ledger invariants do not hold" in str(exc.value)
        assert "cached_balance               FAILED (1 rows)" in out.getvalue()
        raise Rollback

    # and the corruption is gone with the rollback
    assert ledger_reconcile().ok


def test_a_lot_out_of_step_with_its_movements_is_found(busy_ledger):
    # given
    lot = busy_ledger.credit_lots.filter(remaining__gt=0).order_by("pk").first()

    with pytest.raises(Rollback), transaction.atomic():
        execute("UPDATE metering_creditlot SET remaining = remaining - 1 WHERE id = %s", [lot.pk])

        # when
        report = ledger_reconcile()

        # then
        checks = {v.check for v in report.violations}
        assert {"lot_movements", "lots_cover_wallet"} <= checks
        raise Rollback


def test_an_unbalanced_transaction_is_found(busy_ledger):
    # given: an extra entry appended to an existing transaction (inserts are allowed)
    wallet = LedgerAccount.objects.get(organization=busy_ledger, kind=AccountKind.WALLET)
    txn_id = wallet.entries.order_by("pk").first().transaction_id

    with pytest.raises(Rollback), transaction.atomic():
        execute(
            "INSERT INTO metering_ledgerentry (transaction_id, account_id, amount, created_at)"
            " VALUES (%s, %s, 5, now())",
            [txn_id, wallet.pk],
        )

        # when
        report = ledger_reconcile()

        # then
        checks = {v.check for v in report.violations}
        assert {"transaction_balanced", "cached_balance"} <= checks
        raise Rollback


def test_a_pending_hold_missing_from_the_holds_account_is_found(busy_ledger):
    # given
    with pytest.raises(Rollback), transaction.atomic():
        execute("UPDATE metering_hold SET amount = amount + 1 WHERE key = %s", ["job-2"])

        # when
        report = ledger_reconcile()

        # then
        assert "holds_account" in {v.check for v in report.violations}
        raise Rollback


def test_a_capture_that_disagrees_with_its_consumption_is_found(busy_ledger):
    # given
    with pytest.raises(Rollback), transaction.atomic():
        execute("UPDATE metering_hold SET captured = captured - 1 WHERE key = %s", ["job-1"])

        # when
        report = ledger_reconcile()

        # then
        assert "hold_capture_matches" in {v.check for v in report.violations}
        raise Rollback


def test_a_negative_cached_balance_is_refused_by_the_database(busy_ledger):
    # given
    escrow = LedgerAccount.objects.get(organization=busy_ledger, kind=AccountKind.ESCROW)

    # when / then
    with pytest.raises(IntegrityError), transaction.atomic():
        execute("UPDATE metering_ledgeraccount SET balance = -1 WHERE id = %s", [escrow.pk])
    assert ledger_reconcile().ok


def test_expired_credits_the_sweep_left_behind_are_found(busy_ledger):
    # given: the wallet's and the escrow's lots expired an hour ago, and no sweep since
    # (beat stopped, or the sweep fails on these accounts); the wallet's pending hold was
    # placed after they expired, so none of it may burn them
    accounts = {
        a.kind: a
        for a in LedgerAccount.objects.filter(
            organization=busy_ledger, kind__in=[AccountKind.WALLET, AccountKind.ESCROW]
        )
    }
    lots = {
        kind: sum(account.lots.values_list("remaining", flat=True))
        for kind, account in accounts.items()
    }

    with pytest.raises(Rollback), transaction.atomic():
        execute(
            "UPDATE metering_creditlot SET expires_at = now() - interval '1 hour'"
            " WHERE organization_id = %s AND remaining > 0",
            [busy_ledger.pk],
        )

        # when
        report = ledger_reconcile()

        # then: both accounts are named, with what their expired lots still hold
        violations = {v.check: v for v in report.violations}
        assert set(violations) == {"expired_lots_swept"}
        assert {
            (row["account_id"], row["expired"], row["pending_holds"])
            for row in violations["expired_lots_swept"].rows
        } == {
            (accounts[AccountKind.WALLET].pk, lots[AccountKind.WALLET], 0),
            (accounts[AccountKind.ESCROW].pk, lots[AccountKind.ESCROW], 0),
        }
        raise Rollback


def test_expired_credits_a_pending_hold_may_burn_or_the_sweep_has_yet_to_reach_reconcile(
    org, grant
):
    # given: 10 credits a job held two hours ago, expired an hour ago (the job runs on,
    # and keeps them), and 5 credits that expired a minute ago (the next sweep's)
    held = grant(org, credits(10))
    hold_place(organization=org, amount=credits(10), key="job-long")
    due = grant(org, credits(5))

    with pytest.raises(Rollback), transaction.atomic():
        execute(
            "UPDATE metering_hold SET created_at = now() - interval '2 hours' WHERE key = %s",
            ["job-long"],
        )
        execute(
            "UPDATE metering_creditlot SET expires_at = now() - interval '1 hour' WHERE id = %s",
            [held.pk],
        )
        execute(
            "UPDATE metering_creditlot SET expires_at = now() - interval '1 minute' WHERE id = %s",
            [due.pk],
        )

        # when
        report = ledger_reconcile()

        # then
        assert report.ok, report.violations
        raise Rollback


def test_a_lot_of_another_organization_s_account_is_found(busy_ledger, other_org):
    # given: a lot whose organization is not its account's
    lot = busy_ledger.credit_lots.filter(remaining__gt=0).order_by("pk").first()

    with pytest.raises(Rollback), transaction.atomic():
        execute(
            "UPDATE metering_creditlot SET organization_id = %s WHERE id = %s",
            [other_org.pk, lot.pk],
        )

        # when
        report = ledger_reconcile()

        # then
        violations = {v.check: v for v in report.violations}
        assert set(violations) == {"lot_organization"}
        assert violations["lot_organization"].rows == [
            {
                "id": lot.pk,
                "account_id": lot.account_id,
                "organization_id": other_org.pk,
                "account_organization_id": busy_ledger.pk,
            }
        ]
        raise Rollback
