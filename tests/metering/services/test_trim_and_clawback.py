"""credits_trim (the rollover cap) and lot_clawback (refunds): take only what is
free to take, once per key."""

from __future__ import annotations

import pytest

from accounts.errors import ApplicationError
from metering.models import CreditLot
from metering.selectors import organization_balance
from metering.services import (
    clawbacks_reverse,
    credits_trim,
    hold_capture,
    hold_place,
    hold_release,
    lot_clawback,
)
from tests.helpers import credits, ledger_rows, system_balance

pytestmark = pytest.mark.django_db


def test_trim_keeps_the_cap_and_expires_the_rest_once(org, grant):
    # given: 100 subscription credits and 50 from a pack
    grant(org, credits(100), source="subscription")
    grant(org, credits(50), source="pack", resellable=False)

    # when: the rollover cap is 25
    expired = credits_trim(
        organization=org, source="subscription", keep=credits(25), key="p1", memo="cap"
    )
    again = credits_trim(
        organization=org, source="subscription", keep=credits(25), key="p1", memo="cap"
    )

    # then
    assert (expired, again) == (credits(75), 0)
    assert organization_balance(organization=org).available == credits(75)
    assert system_balance("expiry") == credits(75)


def test_trim_leaves_the_credits_a_pending_hold_needs(org, grant):
    """Otherwise the hold's capture would burn the paid pack in their place."""
    # given: 100 subscription credits (burned first), a pack of 50, a hold of 100
    grant(org, credits(100), source="subscription", priority=10)
    pack = grant(org, credits(50), source="pack", resellable=False, priority=20)
    hold_place(organization=org, amount=credits(100), key="job")

    # when: the cap would keep nothing
    assert credits_trim(organization=org, source="subscription", keep=0, key="p1", memo="cap") == 0
    hold_capture(key="job", amount=credits(100))

    # then: the pack is untouched
    pack.refresh_from_db()
    assert pack.remaining == credits(50)


def test_clawback_takes_what_is_left_of_the_lot_and_nothing_else(org, grant):
    lot = grant(org, credits(100), source="pack", resellable=False)
    grant(org, credits(30), source="promotion", paid=False, resellable=False, priority=200)
    hold_place(organization=org, amount=credits(60), key="job")
    hold_capture(key="job", amount=credits(60))

    taken = lot_clawback(lot=lot, amount=credits(100), key="refund-1", memo="refund")

    assert taken == credits(40)
    assert CreditLot.objects.get(pk=lot.pk).remaining == 0
    assert organization_balance(organization=org).available == credits(30)


def test_clawbacks_reverse_gives_back_to_the_same_lots_once(org, grant):
    # given: a 100-credit lot of which 30 were taken back, then 20 more under a
    # follow-up key, and 10 under another event's key
    lot = grant(org, credits(100))
    lot_clawback(lot=lot, amount=credits(30), key="dispute:d1", memo="dispute")
    lot_clawback(lot=lot, amount=credits(20), key="dispute:d1:pending:1", memo="dispute")
    lot_clawback(lot=lot, amount=credits(10), key="dispute:d10", memo="another dispute")

    # when: the first event is undone, twice
    undo = {"key": "dispute:d1", "reason": "dispute won", "organization": org}
    given_back = clawbacks_reverse(**undo)
    rows = ledger_rows()
    again = clawbacks_reverse(**undo)

    # then: its 50 credits are back in the lot they came from, once; the other's 10 stay taken
    assert (given_back, again) == (credits(50), credits(50))
    assert ledger_rows() == rows
    assert list(CreditLot.objects.filter(organization=org).values_list("pk", "remaining")) == [
        (lot.pk, credits(90))
    ]
    assert organization_balance(organization=org).available == credits(90)
    assert system_balance("adjustments") == credits(10)


def test_a_clawback_takes_the_lot_a_pending_hold_will_not_burn(org, grant):
    # given: a paid pack of 100 and 1,000 promotional credits burned before
    # it, and a running job holding 500
    promo = grant(org, credits(1000), source="adjustment", paid=False, resellable=False, priority=1)
    pack = grant(org, credits(100), source="pack", resellable=False, priority=20)
    hold_place(organization=org, amount=credits(500), key="job-running")

    # when: the pack's payment is refunded
    taken = lot_clawback(lot=pack, amount=credits(100), key="refund-1", memo="refund")

    # then: the whole pack comes back (the job will burn promotional credits),
    # and the job's capture still has its credits
    assert taken == credits(100)
    hold_capture(key="job-running", amount=credits(500))
    assert [CreditLot.objects.get(pk=lot.pk).remaining for lot in (promo, pack)] == [
        credits(500),
        0,
    ]
    assert organization_balance(organization=org).available == credits(500)


def test_a_trim_takes_only_what_pending_holds_will_not_burn(org, grant):
    # given: 100 subscription credits burned after 1,000 promotional ones,
    # and a job holding 500
    grant(org, credits(1000), source="adjustment", paid=False, resellable=False, priority=1)
    grant(org, credits(100), source="subscription", priority=20)
    hold_place(organization=org, amount=credits(500), key="job-running")

    # when: the rollover cap is 0
    expired = credits_trim(organization=org, source="subscription", keep=0, key="p1", memo="cap")

    # then: all 100 expire; the job's 500 are promotional credits
    assert expired == credits(100)
    hold_release(key="job-running")
    assert organization_balance(organization=org).available == credits(1000)


def test_bad_input_changes_nothing(org, grant):
    lot = grant(org, credits(10))
    before = ledger_rows()
    with pytest.raises(ApplicationError):
        lot_clawback(lot=lot, amount=0, key="r", memo="x")
    with pytest.raises(ApplicationError):
        credits_trim(organization=org, source="subscription", keep=-1, key="t", memo="x")
    assert ledger_rows() == before


def test_a_trim_key_reused_for_another_cap_is_refused(org, grant):
    # given: a trim applied under a key
    grant(org, credits(100), source="subscription")
    credits_trim(organization=org, source="subscription", keep=credits(25), key="p2", memo="cap")

    # when the same key comes with another cap
    with pytest.raises(ApplicationError) as refused:
        credits_trim(
            organization=org, source="subscription", keep=credits(10), key="p2", memo="cap"
        )

    # then it is refused, and nothing more was taken
    assert refused.value.code == "idempotency_conflict"
    assert organization_balance(organization=org).available == credits(25)
