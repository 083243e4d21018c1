"""Refunds applied before b2882f7 recorded the charge's running total of refunds as their
amount; gymbilling/0018 gives each row the money its own refund returned, from its key
(`refund:<charge>:<total>`), and leaves rows that hold it already as they are.

The refunds are made at the Stripe stand-in and applied by the real services; the rows of
"before b2882f7" are then given the amounts that code wrote (its running total, the
key's: the credits it took were right, so only the amount differs), and the database is
migrated back to before 0018 and forward again.
"""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.models import CheckoutSession, PaymentReversal
from gymbilling.selectors import reversals_by_customer
from tests.factories import OrganizationFactory
from tests.helpers import migrate, migrate_to_latest

BEFORE = [("gymbilling", "0017_marketpayout_retry_allowed_at")]


@pytest.fixture
def member(buy, stripe_sdk, stripe_standin, deliver):
    """A member who bought a 1,000-credit pack for $12.00; returns (organization, refund,
    dispute): refund(cents) refunds that much at Stripe, dispute(cents) disputes it, and
    both apply it unless told `applied=False`."""

    def _member(slug: str):
        org = OrganizationFactory(slug=slug)
        buy(org, pack="boost-1k")
        intent = CheckoutSession.objects.get(organization=org).stripe_payment_intent_id
        charge = stripe_client.payment_intent_retrieve(intent)["latest_charge"]
        charge_id = charge["id"] if isinstance(charge, dict) else charge

        def refund(cents: int, *, applied: bool = True):
            made = stripe_sdk.v1.refunds.create(params={"charge": charge_id, "amount": cents})
            if applied:
                assert "failed" not in deliver()
            return made

        def dispute(cents: int) -> None:
            stripe_standin.dispute(charge_id, amount=cents)
            assert "failed" not in deliver()

        return org, refund, dispute

    return _member


def as_before_b2882f7(org) -> None:
    """The amounts that code wrote for the organization's refunds: the running total."""
    for row in PaymentReversal.objects.filter(organization=org, kind="refund"):
        PaymentReversal.objects.filter(pk=row.pk).update(amount=int(row.key.rsplit(":", 1)[1]))


def amounts(org) -> list[tuple[str, int]]:
    rows = PaymentReversal.objects.filter(organization=org).order_by("pk")
    return [(row.kind, row.amount) for row in rows]


def report() -> dict[str, tuple[int, int]]:
    """Finance's reversals report of today: (refunded, disputed) per customer."""
    now = timezone.now()
    rows = reversals_by_customer(start=now - timedelta(days=1), end=now + timedelta(days=1))
    return {row["customer"]: (row["refunded"], row["disputed"]) for row in rows}


def test_refunds_recorded_as_running_totals_get_their_own_amounts(
    transactional_db, member, stripe_standin, deliver, migrated_back_and_forth, monkeypatch
):
    # given: before b2882f7, one member was refunded $3.00, $3.00 and $4.00 (rows of $3,
    # $6, $10), another $3.00, disputed $5.00, then refunded $3.00 more (rows $3, $5, $6)
    three, refund_three, _ = member("three")
    for cents in (300, 300, 400):
        refund_three(cents)
    disputed, refund_disputed, dispute = member("disputed")
    refund_disputed(300)
    dispute(500)
    refund_disputed(300)
    as_before_b2882f7(three)
    as_before_b2882f7(disputed)
    # and since: a member refunded $3.00, then $6.00 that failed before it was applied,
    # then $2.00 (its row $2.00, keyed by the $11.00 made: right), and one refunded once
    failed, refund_failed, _ = member("failed")
    refund_failed(300)
    stripe_standin.fail_refund(refund_failed(600, applied=False).id)
    assert "failed" not in deliver()
    refund_failed(200)
    once, refund_once, _ = member("once")
    refund_once(700)
    assert amounts(three) == [("refund", 300), ("refund", 600), ("refund", 1_000)]
    assert amounts(disputed) == [("refund", 300), ("dispute", 500), ("refund", 600)]
    assert report() == {
        "three": (1_900, 0),
        "disputed": (900, 500),
        "failed": (500, 0),
        "once": (700, 0),
    }

    # when: the database is migrated back to before 0018 and forward, two rows a batch
    # (so that a charge's refunds are in different batches)
    monkeypatch.setattr(
        importlib.import_module("gymbilling.migrations.0018_payment_reversal_refund_own_amount"),
        "BATCH",
        2,
    )
    migrated_back_and_forth(BEFORE)

    # then: each refund holds what it returned; the rows that did already, and the
    # dispute, are as they were; the report says what was refunded
    assert amounts(three) == [("refund", 300), ("refund", 300), ("refund", 400)]
    assert amounts(disputed) == [("refund", 300), ("dispute", 500), ("refund", 300)]
    assert amounts(failed) == [("refund", 300), ("refund", 200)]
    assert amounts(once) == [("refund", 700)]
    expected = {"three": (1_000, 0), "disputed": (600, 500), "failed": (500, 0), "once": (700, 0)}
    assert report() == expected

    # when: it runs again (back is a no-op: the rows keep their own amounts; read as rows,
    # not through the report, whose later columns the schema before 0018 lacks)
    migrate(BEFORE)
    assert amounts(three) == [("refund", 300), ("refund", 300), ("refund", 400)]
    assert amounts(disputed) == [("refund", 300), ("dispute", 500), ("refund", 300)]
    migrate_to_latest()

    # then: nothing changes
    assert amounts(three) == [("refund", 300), ("refund", 300), ("refund", 400)]
    assert amounts(disputed) == [("refund", 300), ("dispute", 500), ("refund", 300)]
    assert report() == expected

    # when: the disputed member is refunded the last $1.00 of the charge
    refund_disputed(100)

    # then: it records its $1.00, not the running total less the old $3 + $6 (nothing)
    assert amounts(disputed)[-1] == ("refund", 100)
    assert report()["disputed"] == (700, 500)
