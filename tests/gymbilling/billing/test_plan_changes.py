"""Changes of a live subscription's plan: one at a time per organization, each decided
from what the previous one did at Stripe (not from a row its webhook has yet to
update), and an upgrade interrupted between its two Stripe calls keeps the scheduled
downgrade it lifted."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest
import requests
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.celery import app as celery_app
from gymbilling.models import StripePrice, Subscription
from gymbilling.services import subscription_downgrade_restore, subscriptions_downgrade_restore
from gymbilling.services.checkout import LIFTED
from tests.gymbilling.billing.conftest import stripe_holds_next_update, subscription_state
from tests.helpers import ledger_rows

pytestmark = pytest.mark.django_db


def _price(code: str) -> str:
    return StripePrice.objects.get(plan__code=code, kind="plan", current=True).stripe_price_id


def _change(customer, plan: str) -> dict:
    response = customer.client.post("/api/v1/billing/checkout", {"plan": plan}, format="json")
    assert response.status_code == 200, response.content
    return response.json()


def _pro_with_basic_scheduled(customer, subscribed, deliver):
    """A subscription to Pro, paid for this period, with a downgrade to Basic scheduled."""
    sub = subscribed("pro")
    _change(customer, "basic")
    deliver()
    return sub


def _update_invoices(stripe_sdk, sub) -> list:
    invoices = stripe_sdk.v1.invoices.list(params={"subscription": sub.stripe_subscription_id})
    return [i for i in invoices.data if i.billing_reason == "subscription_update"]


def _minute_passed(sub) -> None:
    """The delay after an interrupted upgrade before its lifted downgrade is put back has
    passed (the lost upgrade would have landed by now)."""
    Subscription.objects.filter(pk=sub.pk).update(
        downgrade_restore_due_at=timezone.now() - timedelta(seconds=1)
    )


def _run(queued, monkeypatch) -> None:
    """Run what a change left queued on commit, its tasks in this process."""
    monkeypatch.setitem(celery_app.conf, "task_always_eager", True)
    for callback in queued:
        callback()


def stripe_down_after_next_update(monkeypatch, market_stripe) -> None:
    """Stripe stops answering right after the next subscription update it applies (the
    stand-in cannot fail between two calls by itself: its client module's call is wrapped,
    and calls through). `monkeypatch.undo()` ends the wrapping."""
    real_update = stripe_client.subscription_update

    def update_then_down(*args, **params):
        answer = real_update(*args, **params)
        market_stripe.down = True
        return answer

    monkeypatch.setattr(stripe_client, "subscription_update", update_then_down)


@pytest.mark.django_db(transaction=True)
def test_two_upgrades_at_once_while_a_downgrade_is_scheduled_charge_once(
    live_server, customer, subscribed, stripe_sdk, deliver, monkeypatch
):
    """A double click (two tabs, the API and the dashboard) gets what two requests one
    after the other get: one upgrade, charged once, and `no_change` for the other."""
    # given: Pro, paid for this period, with a downgrade to Basic scheduled
    sub = subscribed("pro")
    assert _change(customer, "basic")["kind"] == "change_scheduled"
    deliver()
    # and Stripe's answer to each request's read of the subscription comes once both
    # requests have read it (or after 2 seconds, when one waits for the other, as it
    # must); the later of the two a second after the earlier, so that the earlier's
    # Stripe calls are all done first (two requests that read at once, one slower)
    both_there = threading.Barrier(2)
    real_retrieve = stripe_client.subscription_retrieve

    def retrieve_when_both_there(subscription_id):
        answer = real_retrieve(subscription_id)
        try:
            later = both_there.wait(timeout=2) == 1
        except threading.BrokenBarrierError:
            later = False
        if later:
            time.sleep(1)
        return answer

    monkeypatch.setattr(stripe_client, "subscription_retrieve", retrieve_when_both_there)

    # when: Enterprise is asked for twice at once
    answers: list[requests.Response] = []

    def ask() -> None:
        answers.append(
            requests.post(
                f"{live_server.url}/api/v1/billing/checkout",
                json={"plan": "enterprise"},
                headers={"Authorization": f"Bearer {customer.key}"},
                timeout=30,
            )
        )

    tabs = [threading.Thread(target=ask) for _ in range(2)]
    for tab in tabs:
        tab.start()
    for tab in tabs:
        tab.join()
    monkeypatch.undo()
    deliver()

    # then: one upgrade, and the other finds it made
    outcomes = sorted(
        (a.status_code, a.json().get("kind") or a.json()["error"]["code"]) for a in answers
    )
    assert outcomes == [(200, "subscription_updated"), (409, "no_change")]
    # charged once, from Pro (paid for), not again (the later request's Stripe calls
    # put the item back to Pro and prorated Pro to Enterprise a second time)
    [update] = _update_invoices(stripe_sdk, sub)
    assert update.amount_paid > 0
    assert update.lines.data[0].pricing.price_details.price == _price("pro")
    # and Stripe and here agree: Enterprise, nothing scheduled, credits granted once
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == _price("enterprise")
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan) == ("enterprise", None)
    assert sub.invoices.filter(billing_reason="subscription_update").count() == 1


def test_changes_made_before_the_previous_one_s_webhook_decide_from_what_it_did(
    customer, subscribed, stripe_sdk, deliver
):
    # given: Basic, paid
    sub = subscribed("basic")

    # when: up to Enterprise, then down to Basic, then Pro, one after the other, before
    # any of their webhooks is applied (our row still says Basic throughout)
    kinds = [_change(customer, plan)["kind"] for plan in ("enterprise", "basic", "pro")]

    # then: Enterprise is an upgrade, charged now; Basic and then Pro are downgrades from
    # Enterprise, which this period is paid at: scheduled, and nothing charged for them
    # (from Basic, Pro would have been an upgrade, prorated from a period paid at Basic)
    assert kinds == ["subscription_updated", "change_scheduled", "change_scheduled"]
    [update] = _update_invoices(stripe_sdk, sub)
    assert update.lines.data[-1].pricing.price_details.price == _price("enterprise")
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == _price("pro")
    # and here, once the webhooks arrive: Enterprise now, Pro from the next period
    deliver()
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan.code) == ("enterprise", "pro")
    assert sub.invoices.filter(billing_reason="subscription_update").count() == 1


def test_an_upgrade_stripe_stops_answering_during_keeps_the_scheduled_downgrade(
    customer,
    subscribed,
    stripe_sdk,
    market_stripe,
    deliver,
    monkeypatch,
    django_capture_on_commit_callbacks,
):
    # given: Pro, paid for this period, with a downgrade to Basic scheduled
    sub = _pro_with_basic_scheduled(customer, subscribed, deliver)
    before = ledger_rows()
    # and Stripe stops answering after the first of the upgrade's two calls (the one that
    # puts the item back at Pro, so that the upgrade is prorated from what was paid)
    stripe_down_after_next_update(monkeypatch, market_stripe)

    # when: Enterprise is asked for
    with django_capture_on_commit_callbacks(execute=False) as queued:
        response = customer.client.post(
            "/api/v1/billing/checkout", {"plan": "enterprise"}, format="json"
        )
    monkeypatch.undo()

    # then: a 503 that says the downgrade is kept
    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert error["code"] == "payments_unavailable"
    assert "your scheduled change to Basic is kept" in error["message"]
    assert not _update_invoices(stripe_sdk, sub)

    # when: Stripe answers again, and what the change left queued runs (in this process,
    # once its minute has passed: a worker runs it then, or retries until Stripe answers)
    market_stripe.down = False
    _minute_passed(sub)
    _run(queued, monkeypatch)

    # then: the downgrade is back at Stripe, nothing was charged or granted, and here it
    # is Pro now, Basic from the next period, as before the upgrade was asked for
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == _price("basic")
    deliver()
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan.code) == ("pro", "basic")
    assert not _update_invoices(stripe_sdk, sub)
    assert ledger_rows() == before

    # and the member trying again is charged once, from Pro
    assert _change(customer, "enterprise")["kind"] == "subscription_updated"
    [update] = _update_invoices(stripe_sdk, sub)
    assert update.lines.data[0].pricing.price_details.price == _price("pro")
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == _price("enterprise")


def test_a_change_resent_while_an_interrupted_upgrade_may_still_land_is_refused(
    customer, subscribed, stripe_sdk, market_stripe, deliver, monkeypatch
):
    # given: Pro, paid for this period, with a downgrade to Basic scheduled, and an
    # upgrade to Enterprise that Stripe stopped answering after its first call (the
    # item lifted back to Pro, the marker set); the upgrade itself may still land
    sub = _pro_with_basic_scheduled(customer, subscribed, deliver)
    stripe_down_after_next_update(monkeypatch, market_stripe)
    first = customer.client.post("/api/v1/billing/checkout", {"plan": "enterprise"}, format="json")
    monkeypatch.undo()
    assert first.status_code == 503, first.content
    market_stripe.down = False

    # when: the member sends it again at once (the 503 freed its key)
    again = customer.client.post("/api/v1/billing/checkout", {"plan": "enterprise"}, format="json")

    # then: refused, nothing done: the item is still as the lift left it, the marker
    # still there, nothing charged (putting Basic back now would race the lost upgrade)
    assert again.status_code == 409, again.content
    assert again.json()["error"]["code"] == "change_pending"
    assert 1 <= int(again["Retry-After"]) <= 60
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == _price("pro")
    assert at_stripe.metadata[LIFTED]
    assert not _update_invoices(stripe_sdk, sub)

    # when: its minute has passed (the lost upgrade would have landed by now)
    _minute_passed(sub)

    # then: the change runs, the downgrade put back first, and is charged once, from Pro
    assert _change(customer, "enterprise")["kind"] == "subscription_updated"
    [update] = _update_invoices(stripe_sdk, sub)
    assert update.lines.data[0].pricing.price_details.price == _price("pro")
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == _price("enterprise")
    assert not at_stripe.metadata.to_dict().get(LIFTED)


def test_an_upgrade_whose_answer_stripe_lost_does_not_say_nothing_was_charged(
    customer, subscribed, stripe_sdk, monkeypatch
):
    # given: Basic, paid for this period
    sub = subscribed("basic")
    # and Stripe applies the upgrade (and charges it) but its answer never comes back: a
    # timeout after the request reached Stripe. The stand-in cannot lose an answer by
    # itself, so the client module, where the timeout surfaces, raises after the call.
    real_update = stripe_client.subscription_update

    def applied_then_lost(*args, **params):
        real_update(*args, **params)
        raise stripe_client.StripeUnavailable("Request timed out")

    monkeypatch.setattr(stripe_client, "subscription_update", applied_then_lost)

    # when: Pro is asked for
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: a 503 that says the change may have gone through and been charged, and to
    # reload before trying again, not that nothing was charged
    assert response.status_code == 503, response.content
    error = response.json()["error"]
    assert error["code"] == "payments_unavailable"
    assert "nothing was charged" not in error["message"]
    assert "could not confirm the change" in error["message"]
    assert "if it went through, it was charged" in error["message"]
    assert "Reload the subscription before trying again" in error["message"]
    # and Stripe did charge it: the message was true
    assert len(_update_invoices(stripe_sdk, sub)) == 1


def test_a_stripe_outage_before_the_change_is_sent_still_says_nothing_was_charged(
    customer, subscribed, market_stripe
):
    # given: a live subscription, and Stripe down before anything of the change is sent
    subscribed("basic")
    market_stripe.down = True

    # when: Pro is asked for
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: nothing could have been charged, and the member is told so
    assert response.status_code == 503, response.content
    assert "nothing was charged" in response.json()["error"]["message"]


def test_a_lifted_downgrade_whose_task_gave_up_is_put_back_by_the_sweep(
    customer,
    subscribed,
    stripe_sdk,
    market_stripe,
    deliver,
    monkeypatch,
    django_capture_on_commit_callbacks,
):
    # given: Pro, paid for this period, with a downgrade to Basic scheduled
    sub = _pro_with_basic_scheduled(customer, subscribed, deliver)
    # and an upgrade to Enterprise Stripe stopped answering after its lift (the item back
    # at Pro, the marker set), whose restore task never put it back (it gave up while
    # Stripe stayed down: here it is simply never run)
    stripe_down_after_next_update(monkeypatch, market_stripe)
    with django_capture_on_commit_callbacks(execute=False):
        response = customer.client.post(
            "/api/v1/billing/checkout", {"plan": "enterprise"}, format="json"
        )
    monkeypatch.undo()
    assert response.status_code == 503, response.content
    later = timezone.now() + timedelta(minutes=2)

    # when: the sweep runs while Stripe is still down
    assert subscriptions_downgrade_restore(now=later) == 0
    # then: it is still due, for the next run
    assert Subscription.objects.get(pk=sub.pk).downgrade_restore_due_at is not None

    # when: Stripe answers again, and the sweep runs before the lift's delay is over
    market_stripe.down = False
    assert subscriptions_downgrade_restore() == 0
    # then: nothing is put back yet (the upgrade's lost request may still be applied)
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == _price("pro")

    # when: the sweep runs once it is due
    assert subscriptions_downgrade_restore(now=later) == 1

    # then: the downgrade is back at Stripe, its marker cleared, and here it is Pro now,
    # Basic from the next period, with nothing left due and nothing charged
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe["items"].data[0].price.id == _price("basic")
    assert not at_stripe.metadata.to_dict().get(LIFTED)
    deliver()
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan.code) == ("pro", "basic")
    assert sub.downgrade_restore_due_at is None
    assert not _update_invoices(stripe_sdk, sub)
    # and the next run has nothing to do
    assert subscriptions_downgrade_restore(now=later) == 0


@pytest.fixture
def interrupted_upgrade(customer, market_stripe, monkeypatch, django_capture_on_commit_callbacks):
    """Ask for Enterprise while Stripe stops answering after the upgrade's lift (the item
    back at Pro, the marker set); returns what the change left queued, not run."""

    def _ask() -> list:
        stripe_down_after_next_update(monkeypatch, market_stripe)
        with django_capture_on_commit_callbacks(execute=False) as queued:
            response = customer.client.post(
                "/api/v1/billing/checkout", {"plan": "enterprise"}, format="json"
            )
        monkeypatch.undo()
        market_stripe.down = False
        assert response.status_code == 503, response.content
        return queued

    return _ask


def _at_stripe(stripe_sdk, sub) -> tuple[str, str]:
    """The plan price of Stripe's item, and the lifted-downgrade marker ("" when none)."""
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    return at_stripe["items"].data[0].price.id, at_stripe.metadata.to_dict().get(LIFTED) or ""


def test_a_change_that_goes_through_leaves_nothing_due_and_the_lifted_downgrade_gone(
    customer, subscribed, stripe_sdk, deliver, monkeypatch, interrupted_upgrade
):
    # given: Pro with Basic scheduled, an upgrade to Enterprise interrupted after its lift
    # (its task queued, not run yet), and its minute passed
    sub = _pro_with_basic_scheduled(customer, subscribed, deliver)
    queued = interrupted_upgrade()
    _minute_passed(sub)

    # when: the member takes the scheduled downgrade back, and it goes through
    assert _change(customer, "pro")["kind"] == "change_canceled"

    # then: nothing is left due, so the sweep has nothing to read Stripe for
    assert Subscription.objects.get(pk=sub.pk).downgrade_restore_due_at is None
    assert subscriptions_downgrade_restore(now=timezone.now() + timedelta(minutes=2)) == 0

    # when: the interrupted upgrade's task runs after all
    _run(queued, monkeypatch)

    # then: it put nothing back: Pro at Stripe and here, nothing scheduled, no marker
    assert _at_stripe(stripe_sdk, sub) == (_price("pro"), "")
    deliver()
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan, sub.downgrade_restore_due_at) == ("pro", None, None)
    assert not _update_invoices(stripe_sdk, sub)


def test_an_earlier_upgrade_s_task_leaves_a_later_lift_to_its_own_delay(
    customer, subscribed, stripe_sdk, deliver, monkeypatch, interrupted_upgrade
):
    # given: Pro with Basic scheduled, and an upgrade to Enterprise interrupted after its
    # lift whose task has not run yet (a worker behind); past its minute the sweep put
    # Basic back
    sub = _pro_with_basic_scheduled(customer, subscribed, deliver)
    first = interrupted_upgrade()
    assert subscriptions_downgrade_restore(now=timezone.now() + timedelta(minutes=2)) == 1
    # and the member asks again, interrupted in the same way: lifted again, and this
    # upgrade's lost request may still land at Stripe for a minute
    second = interrupted_upgrade()

    # when: the first upgrade's task runs now
    _run(first, monkeypatch)

    # then: it leaves the second lift as it is, not due yet: Basic put back now would be
    # what the lost upgrade is prorated from, if it lands
    price, marker = _at_stripe(stripe_sdk, sub)
    assert (price, bool(marker)) == (_price("pro"), True)
    assert Subscription.objects.get(pk=sub.pk).downgrade_restore_due_at > timezone.now()

    # when: the second one's minute has passed, and its own task runs
    _minute_passed(sub)
    _run(second, monkeypatch)

    # then: Basic is back, nothing left due, nothing charged
    assert _at_stripe(stripe_sdk, sub) == (_price("basic"), "")
    assert Subscription.objects.get(pk=sub.pk).downgrade_restore_due_at is None
    assert not _update_invoices(stripe_sdk, sub)


def _due_passed() -> datetime:
    """A time past the minute after an unconfirmed change (the restore's `now`)."""
    return timezone.now() + timedelta(minutes=2)


def test_a_change_within_the_minute_after_a_lift_stripe_did_not_answer_is_refused(
    customer, subscribed, stripe_sdk, deliver, monkeypatch, django_capture_on_commit_callbacks
):
    # given: Pro, paid for this period, with a downgrade to Basic scheduled, and an upgrade
    # to Enterprise whose first request (the lift back to Pro) got no answer: nothing of it
    # shows at Stripe yet (no marker), but it may still land there
    sub = _pro_with_basic_scheduled(customer, subscribed, deliver)
    land_lift = stripe_holds_next_update(monkeypatch)
    with django_capture_on_commit_callbacks(execute=False):
        first = customer.client.post(
            "/api/v1/billing/checkout", {"plan": "enterprise"}, format="json"
        )
    assert first.status_code == 503, first.content
    assert _at_stripe(stripe_sdk, sub) == (_price("basic"), "")
    before = subscription_state(stripe_sdk, sub)

    # when: the member sends a change within the minute (taking the downgrade back)
    again = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: refused, saying when to try again, and nothing sent to Stripe or written here
    # (run, it would be overridden by the lift landing late: Pro, marked, then Basic put
    # back by the restore, the member's choice lost)
    assert again.status_code == 409, again.content
    error = again.json()["error"]
    assert error["code"] == "change_pending"
    assert 1 <= int(again["Retry-After"]) <= 60
    assert f"try again in {again['Retry-After']} seconds" in error["message"]
    assert subscription_state(stripe_sdk, sub) == before

    # when: the lift lands at Stripe late, within its minute, and the restore runs once due
    land_lift()
    assert subscription_downgrade_restore(subscription_pk=sub.pk, now=_due_passed())

    # then: Basic is back at Stripe, nothing due, nothing charged
    assert _at_stripe(stripe_sdk, sub) == (_price("basic"), "")
    assert Subscription.objects.get(pk=sub.pk).downgrade_restore_due_at is None
    assert not _update_invoices(stripe_sdk, sub)

    # and the same change goes through: the downgrade taken back, nothing charged
    assert _change(customer, "pro")["kind"] == "change_canceled"
    assert _at_stripe(stripe_sdk, sub) == (_price("pro"), "")
    deliver()
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan) == ("pro", None)
    assert not _update_invoices(stripe_sdk, sub)


@pytest.mark.parametrize(
    "paid, lost, charged_from",
    [
        # An upgrade to Pro (nothing scheduled: one request): run before it landed,
        # Enterprise would be charged from Basic, and the upgrade landing after it would
        # take Enterprise back to Pro. Landed, each is charged from the plan it left.
        ("basic", "pro", ["basic", "pro"]),
        # A downgrade to Basic: landing after Enterprise, it would set the item paid for
        # the period back to Basic's price. Landed, it is lifted first: Enterprise is
        # charged from Pro, the plan paid for this period.
        ("pro", "basic", ["pro"]),
    ],
)
def test_a_change_within_the_minute_after_a_change_stripe_did_not_answer_is_refused(
    customer,
    subscribed,
    stripe_sdk,
    monkeypatch,
    django_capture_on_commit_callbacks,
    paid,
    lost,
    charged_from,
):
    # given: a plan paid for this period, and a change to another that got no answer and
    # has not landed at Stripe yet
    sub = subscribed(paid)
    land = stripe_holds_next_update(monkeypatch)
    with django_capture_on_commit_callbacks(execute=False):
        first = customer.client.post("/api/v1/billing/checkout", {"plan": lost}, format="json")
    assert first.status_code == 503, first.content
    before = subscription_state(stripe_sdk, sub)

    # when: the member asks for Enterprise within the minute
    again = customer.client.post("/api/v1/billing/checkout", {"plan": "enterprise"}, format="json")

    # then: refused, nothing sent or written
    assert again.status_code == 409, again.content
    assert again.json()["error"]["code"] == "change_pending"
    assert subscription_state(stripe_sdk, sub) == before

    # when: the lost change lands late, and the restore runs once due (nothing to put back)
    land()
    assert not subscription_downgrade_restore(subscription_pk=sub.pk, now=_due_passed())

    # then: Enterprise goes through, charged as the parameters say, and the item is
    # Enterprise's (each update invoice's first line is the unused time of the price it
    # left)
    assert _change(customer, "enterprise")["kind"] == "subscription_updated"
    assert sorted(
        i.lines.data[0].pricing.price_details.price for i in _update_invoices(stripe_sdk, sub)
    ) == sorted(_price(plan) for plan in charged_from)
    assert _at_stripe(stripe_sdk, sub) == (_price("enterprise"), "")
