"""The ledger's indexes serve the queries that run against them.

Jobs, holds, journal transactions and usage records are written on every
inference request, so each index on them is paid for per request; these
check that the ones kept for a query are the ones that query uses.
"""

import pytest
from django.db import connection
from django.utils import timezone

from metering.models import JournalTransaction, LedgerAccount

pytestmark = pytest.mark.django_db


def _plan(queryset) -> str:
    sql, params = queryset.query.sql_with_params()
    with connection.cursor() as cursor:
        # Small test tables: only with sequential scans off does the plan show
        # which index PostgreSQL can use at all.
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
        return "\n".join(row[0] for row in cursor.fetchall())


def test_the_reconciliation_prefix_query_uses_the_prefix_index():
    # the Stripe reconciliation reads every invoice grant by its key's prefix
    grants = JournalTransaction.objects.filter(idempotency_key__startswith="grant:invoice:")
    assert "journal_key_prefix" in _plan(grants.values_list("idempotency_key", flat=True))


def test_the_sweep_finds_accounts_whose_next_expiry_has_come_by_the_index():
    # the minute's sweep (credits_expire) reads the accounts due, not every account
    due = LedgerAccount.objects.filter(next_expiry_at__lte=timezone.now())
    assert "ledger_account_next_expiry" in _plan(due.values_list("pk", flat=True))
