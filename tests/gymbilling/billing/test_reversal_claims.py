"""Two refunds or disputes of one payment pending at once: together they claim no more than
the credits running work holds of it, however they interleave, with each other and with
the pending sweep. The wallet's claim is the sum of what they have pending throughout
(reconcile's `wallet_claim_pending`)."""

from __future__ import annotations

import threading

import pytest

from gymbilling.models import CheckoutSession, PaymentReversal
from gymbilling.services import payment_reversals_pending_settle, payments
from gymbilling.services.events import charge_refund_refresh, dispute_refresh
from metering.models import MICRO, LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place, hold_release
from tests.helpers import on_own_connection, pause_after, run_against_paused

# A 1,000-credit pack for $12.00; the member's own 500 credits never expire.
PACK, OWN = 1_000 * MICRO, 500 * MICRO


def wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


def taken_pending_lost(reversal: PaymentReversal) -> tuple[int, int, int]:
    reversal.refresh_from_db()
    return (reversal.credits_clawed_back, reversal.credits_pending, reversal.credits_lost)


def pack_a_job_holds(customer, stripe_standin, deliver, grant) -> str:
    """The pack bought, 400 of it spent and the other 600 held by a running job
    ("job-running"), beside the member's own 500; returns the pack's charge id."""
    org = customer.organization
    grant(org, OWN, source="promotion", paid=False, resellable=False, expires_at=None)
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    assert "failed" not in deliver()
    # The pack expires, the member's own do not: work burns the pack first.
    hold_place(organization=org, amount=400 * MICRO, key="job-spent")
    hold_capture(key="job-spent", amount=400 * MICRO)
    hold_place(organization=org, amount=600 * MICRO, key="job-running")
    from gymbilling import stripe_client

    intent = CheckoutSession.objects.get(organization=org).stripe_payment_intent_id
    charge = stripe_client.payment_intent_retrieve(intent)["latest_charge"]
    return charge["id"] if isinstance(charge, dict) else charge


def refund_half(stripe_sdk, charge_id: str) -> None:
    """$6.00 of the $12.00 refunded at Stripe: half the pack, 500 credits, is due back."""
    stripe_sdk.v1.refunds.create(params={"charge": charge_id, "amount": 600})


def reverse_the_other_half(kind: str, stripe_standin, stripe_sdk, charge_id: str) -> None:
    """The other $6.00 refunded too, or disputed: 500 credits more are due back."""
    if kind == "refund":
        refund_half(stripe_sdk, charge_id)
    else:
        stripe_standin.dispute(charge_id, amount=600)


@pytest.mark.django_db
@pytest.mark.parametrize("second", ["refund", "dispute"])
def test_two_reversals_of_a_payment_claim_no_more_than_the_job_holds_of_it(
    second, customer, catalog, stripe_standin, stripe_sdk, deliver, grant
):
    # given: 400 of the pack spent, its other 600 held by a running job, and half of it
    # refunded: the refund's 500 credits wait for the job, claimed
    org = customer.organization
    charge_id = pack_a_job_holds(customer, stripe_standin, deliver, grant)
    refund_half(stripe_sdk, charge_id)
    assert "failed" not in deliver()
    first = PaymentReversal.objects.get()
    assert taken_pending_lost(first) == (0, 500 * MICRO, 0)

    # when: the other half is refunded, or disputed, while the job still runs
    reverse_the_other_half(second, stripe_standin, stripe_sdk, charge_id)
    assert "failed" not in deliver()

    # then: of its 500, only the 100 the job holds beyond the first's 500 can come back:
    # 400 are lost (the spent 400), and the wallet claims the job's 600, no more
    later = PaymentReversal.objects.exclude(pk=first.pk).get()
    assert later.kind == second
    assert taken_pending_lost(later) == (0, 100 * MICRO, 400 * MICRO)
    assert wallet_claim(org) == 600 * MICRO
    assert ledger_reconcile().ok

    # when: the job ends without using them: the member's own 500 are available at once
    hold_release(key="job-running")
    balance = organization_balance(organization=org)
    assert (balance.set_aside, balance.available) == (600 * MICRO, OWN)
    hold_place(organization=org, amount=OWN, key="job-own")
    hold_release(key="job-own")

    # when: the sweep runs
    assert payment_reversals_pending_settle() == 600 * MICRO

    # then: the job's 600 came back, 400 are lost, nothing is claimed, the member's own
    # 500 are all that is left
    assert taken_pending_lost(first) == (500 * MICRO, 0, 0)
    assert taken_pending_lost(later) == (100 * MICRO, 0, 400 * MICRO)
    assert wallet_claim(org) == 0
    assert organization_balance(organization=org).total == OWN


@pytest.mark.django_db
def test_a_second_reversal_after_the_job_gave_back_does_not_leave_the_first_waiting(
    customer, catalog, stripe_standin, stripe_sdk, deliver, grant
):
    # given: half the pack refunded while a job held 600 of it (500 pending, claimed),
    # and then the job gave them all back, before the sweep ran
    org = customer.organization
    charge_id = pack_a_job_holds(customer, stripe_standin, deliver, grant)
    refund_half(stripe_sdk, charge_id)
    assert "failed" not in deliver()
    hold_release(key="job-running")

    # when: the other half is refunded
    refund_half(stripe_sdk, charge_id)
    assert "failed" not in deliver()

    # then: the first refund took its 500 back on the way, the second the last 100;
    # 400 are lost, nothing waits, nothing is claimed: the member's own 500 are free
    first, later = PaymentReversal.objects.order_by("pk")
    assert taken_pending_lost(first) == (500 * MICRO, 0, 0)
    assert taken_pending_lost(later) == (100 * MICRO, 0, 400 * MICRO)
    assert wallet_claim(org) == 0
    balance = organization_balance(organization=org)
    assert (balance.total, balance.available) == (OWN, OWN)
    assert payment_reversals_pending_settle() == 0


@pytest.mark.django_db(transaction=True)
def test_a_refund_and_a_dispute_applied_at_once_claim_no_more_than_the_job_holds(
    customer, catalog, stripe_standin, stripe_sdk, deliver, grant, monkeypatch
):
    # given: 400 of the pack spent, its other 600 held by a running job; at Stripe, half
    # of it refunded and the other half disputed (their events are not delivered: each
    # is applied below, on a connection of its own, as two workers would)
    org = customer.organization
    charge_id = pack_a_job_holds(customer, stripe_standin, deliver, grant)
    refund_half(stripe_sdk, charge_id)
    dispute = stripe_standin.dispute(charge_id, amount=600)

    # The refund is applied on a connection of its own and paused inside its
    # transaction once it has claimed; the dispute then comes on another connection.
    paused, resume = pause_after(monkeypatch, payments, "credits_claim", thread="refund")
    errors: list = []
    refund = threading.Thread(
        name="refund",
        target=on_own_connection,
        args=(lambda: charge_refund_refresh(charge_id=charge_id), errors),
    )
    refund.start()
    assert paused.wait(timeout=60)

    # when: the dispute is applied while the refund's transaction is open
    disputed = threading.Thread(
        name="dispute",
        target=on_own_connection,
        args=(lambda: dispute_refresh(dispute_id=dispute["id"]), errors),
    )
    run_against_paused(
        disputed, paused=refund, resume=resume, what="the dispute to wait for the refund"
    )

    # then: each saw the other: together they wait for the job's 600, no more, and the
    # wallet claims exactly that
    assert errors == []
    pending = sorted(PaymentReversal.objects.values_list("credits_pending", flat=True))
    assert pending == [100 * MICRO, 500 * MICRO]
    assert sum(PaymentReversal.objects.values_list("credits_lost", flat=True)) == 400 * MICRO
    assert wallet_claim(org) == 600 * MICRO
    assert ledger_reconcile().ok

    # when: the job ends without using them, and the sweep runs
    hold_release(key="job-running")
    assert payment_reversals_pending_settle() == 600 * MICRO

    # then: nothing is claimed; the member keeps their own 500
    assert wallet_claim(org) == 0
    assert organization_balance(organization=org).total == OWN
