"""The refund of what a paid order could not deliver (its shortfall), when Stripe will not
take it: retried while Stripe is unreachable, left to finance once Stripe refuses it.

Stripe is the stand-in over HTTP; "finance refunded it in the dashboard" is a
refund made at the stand-in under a key of the test's own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta
from html import escape

import pytest
from django.contrib.admin.helpers import ACTION_CHECKBOX_NAME
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import AuditEvent, User
from gymbilling import stripe_client
from gymbilling.market.services import (
    SHORTFALL_REASON,
    SHORTFALL_SEND_CLAIM_LASTS,
    _shortfall_refund_claim,
    order_shortfall_refund_resolve,
    order_shortfall_refund_retry,
    orders_expire,
)
from gymbilling.models import MarketOrder
from tests.gymbilling.market.conftest import (
    refused_for_a_cause_finance_can_fix,
    shortfall_unrefunded,
)
from tests.gymbilling.test_admin import offered_actions, run_action, staff_with

CHANGELIST = "/admin/gymbilling/marketorder/"


def _refused_logs(caplog, order: MarketOrder) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and f"market order {order.pk}: shortfall refund" in r.message
    ]


def made_with_answer_lost(order: MarketOrder, intent: str, *, amount: int) -> dict:
    """A refund of `amount` marked as the order's shortfall refund, as a send of ours whose
    answer was lost made it, its key long forgotten at Stripe (a day on): made at the
    stand-in directly, with the metadata our send carries."""
    return stripe_client.refund_create(
        key=f"lost-answer:{order.pk}",
        payment_intent=intent,
        amount=amount,
        metadata={"market_order": str(order.pk), "reason": SHORTFALL_REASON},
    )


def assert_recorded(order: MarketOrder, refund: dict) -> None:
    """The order's shortfall is refunded, by `refund`, and nothing of it is left to finance."""
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert order.shortfall_refund_id == refund["id"]
    assert (order.shortfall_refund_refused_at, order.shortfall_refund_error) == (None, "")


def test_a_shortfall_refund_stripe_refuses_is_left_to_finance_not_retried_every_minute(
    market_stripe, unrefunded_shortfall, caplog
):
    # given: finance refunded the whole charge in Stripe's dashboard meanwhile
    order, intent = unrefunded_shortfall
    stripe_client.refund_create(key=f"dashboard:{order.pk}", payment_intent=intent)
    assert market_stripe.refunded(intent) == 30

    # when: the sweep tries the shortfall refund, and runs again a minute later
    caplog.set_level(logging.ERROR, logger="gymbilling.market.services")
    orders_expire()
    order.refresh_from_db()
    refused_at = order.shortfall_refund_refused_at
    orders_expire(now=timezone.now() + timedelta(minutes=1))

    # then: Stripe's refusal is recorded on the order for finance, logged once with the
    # order's id, and not sent again; nothing more was refunded
    order.refresh_from_db()
    assert refused_at is not None and order.shortfall_refund_refused_at == refused_at
    assert order.shortfall_refunded_at is None
    assert order.shortfall_refund_error.startswith("charge_already_refunded:")
    [logged] = _refused_logs(caplog, order)
    assert "charge_already_refunded" in logged
    assert market_stripe.refunded(intent) == 30
    # and finance finds it in the admin's list of refused shortfall refunds
    assert list(
        MarketOrder.objects.filter(
            shortfall_refund_refused_at__isnull=False, shortfall_refunded_at__isnull=True
        )
    ) == [order]


def test_a_shortfall_refund_stripe_cannot_be_reached_for_is_retried_until_taken(
    market_stripe, unrefunded_shortfall
):
    order, intent = unrefunded_shortfall
    # when: Stripe is still down at the next run, then back
    market_stripe.down = True
    orders_expire()
    order.refresh_from_db()
    assert (order.shortfall_refunded_at, order.shortfall_refund_refused_at) == (None, None)
    market_stripe.down = False
    orders_expire()

    # then: refunded once it could be
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert order.shortfall_refund_refused_at is None
    assert market_stripe.refunded(intent) == 30


def test_finance_retries_a_refused_shortfall_refund_from_the_admin(
    market_stripe, unrefunded_shortfall, admin_client
):
    # given: a shortfall refund Stripe refused (more than is left to refund: finance
    # refunded 20 of the 30 by hand), no longer retried by the sweep
    order, intent = unrefunded_shortfall
    stripe_client.refund_create(key=f"dashboard:{order.pk}", payment_intent=intent, amount=20)
    orders_expire()
    order.refresh_from_db()
    assert order.shortfall_refund_error.startswith("amount_too_large:")
    listed = admin_client.get(CHANGELIST, {"shortfall_refund": "refused"})
    assert [o.pk for o in listed.context["cl"].result_list] == [order.pk]
    # staff who may only view orders are not offered the retry
    assert "retry_shortfall_refund" not in offered_actions(
        staff_with("view_marketorder"), CHANGELIST
    )

    # when: finance retries it from the admin as it is
    response = run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)

    # then: it was sent again and Stripe refused it again: recorded anew, still in the
    # admin's list, and nothing refunded beyond the 20
    assert response.status_code == 302
    again = MarketOrder.objects.get(pk=order.pk)
    assert again.shortfall_refund_refused_at > order.shortfall_refund_refused_at
    assert again.shortfall_refunded_at is None
    assert again.shortfall_refund_error.startswith("amount_too_large:")
    listed = admin_client.get(CHANGELIST, {"shortfall_refund": "refused"})
    assert [o.pk for o in listed.context["cl"].result_list] == [order.pk]
    assert market_stripe.refunded(intent) == 20


def test_a_refused_shortfall_refund_finance_retries_once_its_cause_is_fixed_is_refunded(
    market_stripe, unrefunded_shortfall, admin_client
):
    # given: Stripe refused the shortfall refund for a cause finance can fix (the
    # platform's balance could not cover it), so the sweep left it to finance
    order, intent = unrefunded_shortfall
    refused_for_a_cause_finance_can_fix(market_stripe, order)

    # when: finance fixed the cause (refunds are taken again), and retries it from the
    # admin the same day (Stripe still keeps the refused request's idempotency key)
    response = run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)

    # then: it is refunded, not the first refusal replayed
    assert response.status_code == 302
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert order.shortfall_refund_refused_at is None
    assert market_stripe.refunded(intent) == 30
    # and nothing refunds it again
    orders_expire()
    run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)
    assert market_stripe.refunded(intent) == 30


def test_a_shortfall_refund_stripe_made_but_whose_answer_was_lost_is_recorded_not_made_again(
    market_stripe, unrefunded_shortfall
):
    # given: an earlier send of the shortfall refund reached Stripe and made it, but its
    # answer was lost, and its idempotency key is long forgotten at Stripe (a day on)
    order, intent = unrefunded_shortfall
    lost = made_with_answer_lost(order, intent, amount=30)

    # when: the retry runs
    orders_expire()

    # then: the refund Stripe holds is recorded as the order's, and no other is made
    assert_recorded(order, lost)
    assert market_stripe.refunded(intent) == 30
    assert [r["id"] for r in stripe_client.refunds_list(payment_intent=intent)] == [lost["id"]]


def test_a_shortfall_refund_stripe_lists_past_its_first_page_is_found_not_made_again(
    market_stripe, seller, buyer, django_capture_on_commit_callbacks
):
    # given: an order paid 154 that delivered 124 and not the other 30; its shortfall
    # refund made at Stripe, the answer lost; then 100 refunds more of the charge (1 each,
    # by hand): Stripe lists refunds newest first, 100 a page, the shortfall's on the second
    order, intent = shortfall_unrefunded(
        market_stripe, buyer, django_capture_on_commit_callbacks, seller=seller
    )
    assert order.amount_total == 154
    lost = made_with_answer_lost(order, intent, amount=30)
    for n in range(100):
        stripe_client.refund_create(key=f"by-hand:{order.pk}:{n}", payment_intent=intent, amount=1)

    # when: the retry runs
    orders_expire()

    # then: it found the shortfall's refund and recorded it; none other was made
    assert_recorded(order, lost)
    assert market_stripe.refunded(intent) == 130
    # and the client lists every refund, oldest first
    refunds = stripe_client.refunds_list(payment_intent=intent)
    assert (len(refunds), refunds[0]["id"]) == (101, lost["id"])


def test_a_shortfall_refund_found_at_stripe_for_another_amount_goes_to_finance_not_recorded(
    market_stripe, unrefunded_shortfall, caplog, admin_client
):
    # given: a refund of 20 at Stripe marked as the order's shortfall refund (made by hand
    # with our metadata), where the order is owed 30
    order, intent = unrefunded_shortfall
    other = made_with_answer_lost(order, intent, amount=20)

    # when: the retry runs
    caplog.set_level(logging.ERROR, logger="gymbilling.market.services")
    orders_expire()

    # then: not recorded as the shortfall's refund, and none other made: the order is in
    # finance's list of refused shortfall refunds, saying which refund and why, and logged
    order.refresh_from_db()
    assert (order.shortfall_refunded_at, order.shortfall_refund_id) == (None, "")
    assert order.shortfall_refund_refused_at is not None
    assert order.shortfall_refund_error.startswith(
        f"refund {other['id']} at Stripe is marked as this shortfall's refund, but of 20 usd, "
        "not the shortfall's 30"
    )
    assert any(
        f"market order {order.pk}: shortfall refund not recorded" in r.getMessage()
        for r in caplog.records
    )
    assert market_stripe.refunded(intent) == 20
    listed = admin_client.get(CHANGELIST, {"shortfall_refund": "refused"})
    assert [o.pk for o in listed.context["cl"].result_list] == [order.pk]

    # and a retry from the admin, while that refund stands, refunds nothing more
    run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)
    order.refresh_from_db()
    assert order.shortfall_refunded_at is None
    assert market_stripe.refunded(intent) == 20


# --- finance's refund by hand: "Mark resolved (refunded by hand)" ------------------------

RESOLVE = "resolve_shortfall_refund"
FINANCE = ("view_marketorder", "change_marketorder", "refund_payment")


def refused_listed(client) -> list[int]:
    listed = client.get(CHANGELIST, {"shortfall_refund": "refused"})
    return [o.pk for o in listed.context["cl"].result_list]


def note_sent(client, order: MarketOrder, note: str):
    """The action's page sent with `note`: the list page it comes back to (its messages),
    or the note's page again."""
    return client.post(
        CHANGELIST,
        {"action": RESOLVE, ACTION_CHECKBOX_NAME: [order.pk], "note": note, "_resolve": "1"},
        follow=True,
    )


def resolve(client, order: MarketOrder, note: str):
    """Finance's two steps: the action's page asking for a note, then the note sent."""
    asked = run_action(client, CHANGELIST, RESOLVE, order.pk)
    page = asked.content.decode()
    assert asked.status_code == 200 and f"<td>{order.pk}</td>" in page
    # and it tells finance what a refund made in Stripe's dashboard must carry
    assert "<code>market_order</code>" in page and "<code>not_delivered</code>" in page
    return note_sent(client, order, note)


def shown(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


@pytest.fixture
def refused_shortfall(market_stripe, unrefunded_shortfall):
    """`unrefunded_shortfall`, its refund refused by Stripe for a cause fixed since: on
    finance's refused list, and a retry would refund it."""
    order, intent = unrefunded_shortfall
    refused_for_a_cause_finance_can_fix(market_stripe, order)
    return order, intent


def test_finance_marks_a_shortfall_refund_they_refunded_by_hand_resolved(
    market_stripe, unrefunded_shortfall
):
    # given: finance refunded the whole charge in Stripe's dashboard, then the sweep's
    # shortfall refund was refused for it, and the order went on the refused list
    order, intent = unrefunded_shortfall
    stripe_client.refund_create(key=f"dashboard:{order.pk}", payment_intent=intent)
    orders_expire()
    finance = staff_with(*FINANCE)
    assert refused_listed(finance) == [order.pk]

    # when: finance marks it resolved, saying how it was refunded
    note = "Refunded in full in Stripe's dashboard, ticket 42"
    response = resolve(finance, order, f"  {note} ")

    # then: off the refused list, on the resolved one, with who, when and the note
    assert shown(response) == [f"order {order.pk}: resolved"]
    assert refused_listed(finance) == []
    resolved = finance.get(CHANGELIST, {"shortfall_refund": "resolved"})
    assert [o.pk for o in resolved.context["cl"].result_list] == [order.pk]
    order.refresh_from_db()
    user = User.objects.get(pk=finance.session["_auth_user_id"])
    assert order.shortfall_refund_resolved_by == user
    assert order.shortfall_refund_resolved_at is not None
    assert order.shortfall_refund_resolved_note == note  # its spaces trimmed
    # and the buyer's audit log records it, as finance's refunds are
    [event] = AuditEvent.objects.filter(
        organization=order.buyer, action="market.shortfall_refund_resolved"
    )
    assert (event.actor_user, event.target) == (user, f"market order {order.pk}")
    assert event.data == {"order": order.pk, "amount": 30, "currency": "usd", "note": note}
    # and the order's page shows the resolution
    page = finance.get(f"{CHANGELIST}{order.pk}/change/").content.decode()
    at = order.shortfall_refund_resolved_at.isoformat(timespec="seconds")
    assert f"resolved by hand by {user.email} at {at}: {escape(note)}" in page
    # and nothing more was refunded at Stripe than finance's own refund
    assert market_stripe.refunded(intent) == 30
    assert order.shortfall_refunded_at is None


def test_a_shortfall_refund_resolved_by_hand_is_never_sent_again(market_stripe, refused_shortfall):
    # given: a refused shortfall refund that Stripe would take now, which finance refunded
    # by bank transfer and marked resolved
    order, intent = refused_shortfall
    finance = staff_with(*FINANCE)
    resolve(finance, order, "Refunded by bank transfer, ref BT-7")

    # when: the sweep runs, a retry comes through the service, and finance retries it
    orders_expire(now=timezone.now() + timedelta(minutes=1))
    order_shortfall_refund_retry(order_id=order.pk)
    response = run_action(finance, CHANGELIST, "retry_shortfall_refund", order.pk)

    # then: nothing is refunded at Stripe, and the retry says why it sent nothing
    assert market_stripe.refunded(intent) == 0
    [message] = shown(finance.get(response.url))
    assert message.startswith(f"order {order.pk}: not sent, resolved by hand by ")
    assert message.endswith(": Refunded by bank transfer, ref BT-7")
    order.refresh_from_db()
    assert order.shortfall_refunded_at is None
    assert refused_listed(finance) == []


@pytest.mark.parametrize(
    "codenames",
    [
        ("view_marketorder", "change_marketorder"),  # may retry, may not refund
        ("view_marketorder", "refund_payment"),  # may refund, may not change orders
    ],
)
def test_only_staff_who_may_refund_and_change_orders_may_mark_one_resolved(
    refused_shortfall, codenames
):
    # given: a refused shortfall refund, and staff without one of the two permissions
    order, _ = refused_shortfall
    staff = staff_with(*codenames)

    # when: they look for the action, and post it with a note all the same
    offered = offered_actions(staff, CHANGELIST)
    note_sent(staff, order, "by hand")

    # then: not offered, and nothing changed: still on the refused list, nothing recorded
    assert RESOLVE not in offered
    order.refresh_from_db()
    assert (order.shortfall_refund_resolved_at, order.shortfall_refund_resolved_note) == (None, "")
    assert refused_listed(staff) == [order.pk]
    assert not AuditEvent.objects.filter(action="market.shortfall_refund_resolved").exists()


def test_marking_resolved_needs_a_note_and_a_refund_stripe_refused(
    market_stripe, refused_shortfall
):
    # given: a refused shortfall refund
    order, intent = refused_shortfall
    finance = staff_with(*FINANCE)
    user = User.objects.get(pk=finance.session["_auth_user_id"])

    # when: finance sends the note blank
    response = resolve(finance, order, "   ")

    # then: the page asks again, and nothing changed
    assert response.status_code == 200 and "This field is required." in response.content.decode()
    assert refused_listed(finance) == [order.pk]
    with pytest.raises(ApplicationError) as blank:
        order_shortfall_refund_resolve(order_id=order.pk, note=" ", actor=user)
    assert blank.value.code == "reason_required"

    # and once refunded by Stripe (finance's retry went through), it cannot be resolved
    order_shortfall_refund_retry(order_id=order.pk)
    assert market_stripe.refunded(intent) == 30
    with pytest.raises(ApplicationError) as refunded:
        order_shortfall_refund_resolve(order_id=order.pk, note="by hand", actor=user)
    assert (refunded.value.code, refunded.value.status) == ("shortfall_refund_not_refused", 409)
    order.refresh_from_db()
    assert order.shortfall_refund_resolved_at is None
    assert not AuditEvent.objects.filter(action="market.shortfall_refund_resolved").exists()


def test_a_shortfall_refund_resolved_twice_keeps_the_first_resolution(refused_shortfall):
    # given: a refused shortfall refund finance marked resolved
    order, _ = refused_shortfall
    resolve(staff_with(*FINANCE), order, "Refunded by bank transfer, ref BT-7")
    order.refresh_from_db()

    # when: a colleague marks it resolved again (the form sent twice, an old page)
    response = note_sent(staff_with(*FINANCE), order, "again")

    # then: told it was resolved already, by whom; the first resolution stands, once
    [message] = shown(response)
    assert message.startswith(f"order {order.pk}: Already resolved by hand by ")
    assert message.endswith("(shortfall_refund_resolved)")
    again = MarketOrder.objects.get(pk=order.pk)
    assert (again.shortfall_refund_resolved_at, again.shortfall_refund_resolved_note) == (
        order.shortfall_refund_resolved_at,
        "Refunded by bank transfer, ref BT-7",
    )
    assert AuditEvent.objects.filter(action="market.shortfall_refund_resolved").count() == 1


# --- a resolution racing finance's retry of the same refund ------------------------------


def at_stripe_meanwhile(monkeypatch, during: Callable[[], object]) -> list:
    """While the next shortfall refund is at Stripe (sent, not yet answered), `during` runs;
    then Stripe takes the refund. The stand-in cannot hold a request by itself: the client
    module's call is wrapped, the held one sent through afterwards as it was. Returns what
    `during` returned or raised (once it has run)."""
    real_refund_create = stripe_client.refund_create
    outcome: list = []

    def held(**params):
        if outcome:  # `during`'s own sends go straight through
            return real_refund_create(**params)
        try:
            outcome.append(during())
        except ApplicationError as exc:
            outcome.append(exc)
        return real_refund_create(**params)

    monkeypatch.setattr(stripe_client, "refund_create", held)
    return outcome


def test_a_refund_being_retried_cannot_be_marked_resolved_until_stripe_answers(
    monkeypatch, market_stripe, refused_shortfall
):
    # given: a refused shortfall refund, and finance marking it resolved (refunded by hand)
    # while a colleague's retry of it is at Stripe, which takes it
    order, intent = refused_shortfall
    finance = staff_with(*FINANCE)
    meanwhile = at_stripe_meanwhile(
        monkeypatch, lambda: note_sent(finance, order, "Refunded by bank transfer")
    )

    # when: the retry runs
    refunded = order_shortfall_refund_retry(order_id=order.pk)

    # then: the resolution was refused, saying a retry was at Stripe; the buyer has the
    # shortfall back once, by Stripe, and nothing says it was refunded by hand
    assert refunded
    [message] = shown(meanwhile[0])
    assert message.startswith(f"order {order.pk}: A retry has been sending this shortfall")
    assert message.endswith("(shortfall_refund_sending)")
    assert market_stripe.refunded(intent) == 30
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None and order.shortfall_refund_sending_at is None
    assert (order.shortfall_refund_resolved_at, order.shortfall_refund_resolved_note) == (None, "")
    assert not AuditEvent.objects.filter(action="market.shortfall_refund_resolved").exists()
    # and resolving it now is refused as refunded by Stripe
    user = User.objects.get(pk=finance.session["_auth_user_id"])
    with pytest.raises(ApplicationError) as late:
        order_shortfall_refund_resolve(order_id=order.pk, note="by hand", actor=user)
    assert late.value.code == "shortfall_refund_not_refused"


def test_a_retry_that_died_at_stripe_holds_off_resolution_until_retried(
    market_stripe, refused_shortfall
):
    # given: a retry of a refused shortfall refund claimed the order and reached Stripe,
    # which took it, and its process died before the answer came back
    order, intent = refused_shortfall
    assert _shortfall_refund_claim(order) is not None
    taken = made_with_answer_lost(order, intent, amount=30)
    user = User.objects.get(pk=staff_with(*FINANCE).session["_auth_user_id"])

    # when: finance marks it resolved, and, told to, retries it at once
    with pytest.raises(ApplicationError) as sending:
        order_shortfall_refund_resolve(order_id=order.pk, note="by hand", actor=user)
    assert not order_shortfall_refund_retry(order_id=order.pk)

    # then: the resolution was refused (409), saying from when a retry may take over; the
    # retry sent nothing while the claim might still be a send at Stripe
    claimed_at = MarketOrder.objects.get(pk=order.pk).shortfall_refund_sending_at
    lapses = (claimed_at + SHORTFALL_SEND_CLAIM_LASTS).isoformat(timespec="seconds")
    assert (sending.value.code, sending.value.status) == ("shortfall_refund_sending", 409)
    assert f"retry it from {lapses}" in sending.value.message
    assert market_stripe.refunded(intent) == 30
    assert MarketOrder.objects.get(pk=order.pk).shortfall_refunded_at is None

    # when: it is retried once the claim has outlived any send
    MarketOrder.objects.filter(pk=order.pk).update(
        shortfall_refund_sending_at=claimed_at - SHORTFALL_SEND_CLAIM_LASTS
    )
    order_shortfall_refund_retry(order_id=order.pk)

    # then: the retry recorded the refund Stripe took, made no other, and left no claim
    assert_recorded(order, taken)
    assert order.shortfall_refund_sending_at is None and order.shortfall_refund_resolved_at is None
    assert market_stripe.refunded(intent) == 30


def test_a_second_retry_while_one_is_at_stripe_sends_nothing_and_lets_no_resolution_in(
    monkeypatch, market_stripe, refused_shortfall
):
    # given: two finance staff retry one refused shortfall refund at once: the second
    # retries, then marks it resolved, while the first is at Stripe, which takes it
    order, intent = refused_shortfall
    finance = staff_with(*FINANCE)

    def second_retry_then_resolution():
        retried = finance.post(
            CHANGELIST,
            {"action": "retry_shortfall_refund", ACTION_CHECKBOX_NAME: [order.pk]},
            follow=True,
        )
        return shown(retried) + shown(note_sent(finance, order, "Refunded by bank transfer"))

    meanwhile = at_stripe_meanwhile(monkeypatch, second_retry_then_resolution)

    # when: Stripe takes the first retry's refund
    assert order_shortfall_refund_retry(order_id=order.pk)

    # then: the second retry sent nothing, saying another is at Stripe; the resolution
    # was refused; the buyer has the shortfall back once, by Stripe
    retry_said, resolve_said = meanwhile[0]
    assert retry_said.startswith(
        f"order {order.pk}: not sent: another retry has been sending it to Stripe since "
    )
    assert resolve_said.endswith("(shortfall_refund_sending)")
    assert market_stripe.refunded(intent) == 30
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None and order.shortfall_refund_sending_at is None
    assert (order.shortfall_refund_resolved_at, order.shortfall_refund_resolved_note) == (None, "")
    assert len(stripe_client.refunds_list(payment_intent=intent)) == 1


def test_a_shortfall_refunded_by_stripe_after_finance_resolved_it_is_flagged_refunded_twice(
    monkeypatch, caplog, market_stripe, refused_shortfall, buyer, django_capture_on_commit_callbacks
):
    # given: a retry of one refused shortfall refund at Stripe for longer than any send
    # lasts (so its claim reads as a dead process's), a second retry taking it over and
    # failing to reach Stripe, and finance then marking it resolved; and another order's
    # shortfall refunded by Stripe alone
    order, intent = refused_shortfall
    other, _ = shortfall_unrefunded(market_stripe, buyer, django_capture_on_commit_callbacks)
    orders_expire()
    assert MarketOrder.objects.get(pk=other.pk).shortfall_refunded_at is not None
    finance = staff_with(*FINANCE)

    def second_retry_then_resolution():
        MarketOrder.objects.filter(pk=order.pk).update(
            shortfall_refund_sending_at=timezone.now() - SHORTFALL_SEND_CLAIM_LASTS
        )
        market_stripe.down = True
        order_shortfall_refund_retry(order_id=order.pk)
        market_stripe.down = False
        return note_sent(finance, order, "Refunded by bank transfer, ref BT-9")

    meanwhile = at_stripe_meanwhile(monkeypatch, second_retry_then_resolution)

    # when: Stripe takes the first retry's refund
    with caplog.at_level(logging.ERROR):
        order_shortfall_refund_retry(order_id=order.pk)

    # then: the buyer had it twice, and finance is told: the error log names both refunds,
    # the admin lists the order as refunded twice, and its page shows both
    assert shown(meanwhile[0]) == [f"order {order.pk}: resolved"]
    assert market_stripe.refunded(intent) == 30
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None and order.shortfall_refund_resolved_at
    [logged] = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR and "twice" in r.message
    ]
    assert logged.startswith(
        f"market order {order.pk}: shortfall of 30 usd refunded twice: by Stripe "
        f"(refund {order.shortfall_refund_id}) and resolved by hand by "
    )
    assert logged.endswith(": Refunded by bank transfer, ref BT-9")
    twice = finance.get(CHANGELIST, {"shortfall_refund": "twice"})
    assert [o.pk for o in twice.context["cl"].result_list] == [order.pk]  # not `other`
    page = finance.get(f"{CHANGELIST}{order.pk}/change/").content.decode()
    assert order.shortfall_refund_id in page and "Refunded by bank transfer, ref BT-9" in page


def test_a_retry_whose_answer_was_lost_cannot_be_marked_resolved_but_is_recorded(
    monkeypatch, market_stripe, refused_shortfall
):
    # given: finance's retry of a refused shortfall refund reached Stripe, which took it,
    # and its answer was lost (a timeout): the order is still on the refused list
    order, intent = refused_shortfall
    real_refund_create = stripe_client.refund_create

    def answer_lost(**params):
        real_refund_create(**params)
        raise stripe_client.StripeUnavailable("Request timed out")

    monkeypatch.setattr(stripe_client, "refund_create", answer_lost)
    assert not order_shortfall_refund_retry(order_id=order.pk)
    monkeypatch.setattr(stripe_client, "refund_create", real_refund_create)
    finance = staff_with(*FINANCE)
    assert refused_listed(finance) == [order.pk]
    order.refresh_from_db()
    assert order.shortfall_refund_error.startswith("no answer from Stripe (it may have taken it)")

    # when: finance, reading it as not sent, refunds the buyer by hand and marks it resolved
    response = resolve(finance, order, "Refunded by bank transfer, ref BT-7")

    # then: refused, naming the refund Stripe holds; nothing resolved, nothing audited
    [refund] = stripe_client.refunds_list(payment_intent=intent)
    [message] = shown(response)
    assert message.startswith(f"order {order.pk}: Stripe holds refund {refund['id']} of 30 usd")
    assert message.endswith("(shortfall_refund_at_stripe)")
    order.refresh_from_db()
    assert (order.shortfall_refund_resolved_at, order.shortfall_refund_resolved_note) == (None, "")
    assert not AuditEvent.objects.filter(action="market.shortfall_refund_resolved").exists()

    # when: finance retries it instead, as told
    assert order_shortfall_refund_retry(order_id=order.pk)

    # then: the refund Stripe took is recorded, no other made: the buyer has it once
    assert_recorded(order, refund)
    assert market_stripe.refunded(intent) == 30
    assert refused_listed(finance) == []


def test_marking_resolved_while_stripe_cannot_be_asked_resolves_nothing(
    market_stripe, refused_shortfall
):
    # given: a refused shortfall refund, and Stripe unreachable
    order, _ = refused_shortfall
    user = User.objects.get(pk=staff_with(*FINANCE).session["_auth_user_id"])
    market_stripe.down = True

    # when: finance marks it resolved
    with pytest.raises(ApplicationError) as refused:
        order_shortfall_refund_resolve(order_id=order.pk, note="by hand", actor=user)

    # then: 503, and the order is still finance's refused one, unresolved
    assert (refused.value.code, refused.value.status) == ("payments_unavailable", 503)
    order.refresh_from_db()
    assert order.shortfall_refund_resolved_at is None
    assert order.shortfall_refund_refused_at is not None
