"""Races on real PostgreSQL connections: 20 buyers for a listing that can fill 5 of
them; a resale freeze against a listing being created; a period rollover against
a listing of the same seller, and against the minute's expiry sweep; orders of the
same two sellers, filled in opposite orders, reserved, released and paid at once."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import Sum
from django.utils import timezone

from accounts.errors import ApplicationError
from gymbilling.market import services as market_services
from gymbilling.market.money import money_account
from gymbilling.market.selectors import organization_listing
from gymbilling.market.services import (
    credits_trim_with_listings,
    listing_create,
    listings_withdraw_all,
    order_create,
    order_pay,
    order_release,
    order_reserve,
)
from gymbilling.models import (
    SELLER_KINDS,
    ListingStatus,
    MarketFill,
    MarketListing,
    MarketOrder,
    MoneyAccountKind,
    OrderStatus,
)
from gymbilling.services import resale_freeze, subscriptions
from metering.models import AccountKind, CreditLot
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import credits_expire, credits_grant, hold_place
from metering.services.postings import accounts_for
from tests.factories import OrganizationFactory
from tests.gymbilling.market.conftest import (
    market_member,
    money,
    roll,
    rollover_member,
    subscription_credits,
    subscription_credits_owned,
)
from tests.helpers import (
    credits,
    lock_waiters,
    no_deadlock_retries,
    on_own_connection,
    pause_after,
    run_against_paused,
    system_balance,
    wait_until,
)


@pytest.mark.django_db(transaction=True)
def test_twenty_buyers_race_for_five_fills(market_stripe):
    # given: 100 credits listed; each buyer wants 20
    seller = OrganizationFactory()
    subscription_credits(seller, credits(100))
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    buyers = [market_member() for _ in range(20)]
    barrier = threading.Barrier(len(buyers))
    outcomes: dict[int, str] = {}

    def buy(org):
        try:
            barrier.wait()
            order_create(buyer=org, quantity=credits(20), max_price_per_1k=300, currency="usd")
            outcomes[org.pk] = "filled"
        except ApplicationError as exc:
            outcomes[org.pk] = exc.code
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=buy, args=(org,)) for org in buyers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then: exactly 5 fills, 15 clear refusals
    assert sorted(outcomes.values()).count("filled") == 5
    assert sorted(outcomes.values()).count("insufficient_liquidity") == 15
    assert MarketFill.objects.filter(listing=listing).count() == 5
    assert MarketOrder.objects.count() == 5
    assert organization_balance(organization=seller).escrowed == 0
    assert sum(organization_balance(organization=b).escrowed for b in buyers) == credits(100)
    assert ledger_reconcile().ok


# --- a resale freeze against a listing being created ----------------------------------------
#
# A refund or dispute freezes the seller's reselling, then withdraws their open
# listings so the clawback can reach the credits. A listing created meanwhile
# must not stay open. The two tests below place the freeze at each point of a
# listing_create in flight; a hook on a lock call only decides when the other
# connection runs (nothing is mocked), so the outcome does not hang on timing.


def _freeze_and_withdraw(seller, errors: list) -> None:
    """What a refund does to the seller, on its own connection (payments.payment_reversal_apply)."""
    try:
        resale_freeze(organization=seller, reason="refund of ch_test")
        listings_withdraw_all(seller=seller)
    except Exception as exc:  # surfaced by the test's assertion
        errors.append(exc)
    finally:
        connection.close()


def _advisory_lock_waiters() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_a_freeze_committed_before_a_listing_takes_its_lock_refuses_the_listing(
    market_stripe, monkeypatch
):
    # given: a seller starting a listing; just before it takes its lock, a refund
    # freezes reselling and withdraws the seller's listings, and commits
    seller = market_member(credits_amount=credits(1000))
    errors: list = []
    real_lock = market_services.seller_lock
    refunded = threading.Event()

    def refund_first(org):
        if not refunded.is_set():
            refunded.set()
            refund = threading.Thread(target=_freeze_and_withdraw, args=(seller, errors))
            refund.start()
            refund.join()
        real_lock(org)

    monkeypatch.setattr(market_services, "seller_lock", refund_first)

    # when
    with pytest.raises(ApplicationError) as exc:
        listing_create(seller=seller, quantity=credits(900), price_per_1k=300, currency="usd")

    # then: refused, nothing listed, every credit in the wallet where the clawback reaches it
    assert errors == []
    assert exc.value.code == "resale_not_allowed" and exc.value.status == 403
    assert not MarketListing.objects.filter(seller=seller).exists()
    balance = organization_balance(organization=seller)
    assert (balance.available, balance.escrowed) == (credits(1000), 0)
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_a_freeze_while_a_listing_is_being_created_ends_that_listing(market_stripe, monkeypatch):
    # given: a seller's listing_create past its checks, holding its lock, paused
    seller = market_member(credits_amount=credits(1000))
    errors: list = []
    paused, resume = pause_after(monkeypatch, market_services, "accounts_lock")

    def create() -> None:
        listing_create(seller=seller, quantity=credits(900), price_per_1k=300, currency="usd")

    creating = threading.Thread(target=on_own_connection, args=(create, errors))
    creating.start()
    assert paused.wait(timeout=60)

    # when: a refund freezes reselling and withdraws the listings meanwhile
    refund = threading.Thread(target=_freeze_and_withdraw, args=(seller, errors))
    refund.start()
    # the withdrawal either waits for the listing in flight, or is over before it
    wait_until(
        lambda: not refund.is_alive() or _advisory_lock_waiters() > 0,
        what="the withdrawal to finish or wait for the seller's lock",
    )
    resume.set()
    creating.join()
    refund.join()

    # then: the listing was created, and ended by the withdrawal: its credits are home
    assert errors == []
    listing = MarketListing.objects.get(seller=seller)
    assert listing.status == ListingStatus.CANCELED
    balance = organization_balance(organization=seller)
    assert (balance.available, balance.escrowed) == (credits(1000), 0)
    assert ledger_reconcile().ok


# --- the period rollover against the seller's own listing and the expiry sweep ----------------
#
# As above, a hook on a call the code makes anyway only decides when the other
# connection runs; the test then waits for a state PostgreSQL reports (a lock
# waited for, a thread done), never for a length of time.


@pytest.mark.django_db(transaction=True)
def test_a_rollover_and_a_listing_of_the_same_seller_neither_deadlock_nor_dodge_the_cap(
    market_stripe, monkeypatch
):
    # given: a member whose 1,000 plan credits roll 100 over, listing 900 of them; the
    # listing holds the seller's lock and is paused just before it writes its rows
    org, stripe_sub, _ = rollover_member()
    errors: list = []
    no_deadlock_retries(monkeypatch)
    paused, resume = pause_after(monkeypatch, market_services, "accounts_lock", thread="listing")
    listing = threading.Thread(
        name="listing",
        target=on_own_connection,
        args=(
            lambda: listing_create(
                seller=org, quantity=credits(900), price_per_1k=300, currency="usd"
            ),
            errors,
        ),
    )
    listing.start()
    assert paused.wait(timeout=60)

    # when: the period rolls over meanwhile (the subscription's sync, on its own connection)
    rollover = threading.Thread(
        name="rollover", target=on_own_connection, args=(lambda: roll(stripe_sub), errors)
    )
    # it waits for the listing (or, in a wrong lock order, holds what the listing needs next)
    run_against_paused(
        rollover,
        paused=listing,
        resume=resume,
        what="the rollover to wait for the seller's listing",
    )

    # then: both completed, with no deadlock (none is retried here); the listing
    # was committed first, so the rollover counted it: the cap is exact
    assert errors == []
    [created] = MarketListing.objects.filter(seller=org)
    assert subscription_credits_owned(org) == credits(100)
    assert organization_balance(organization=org).available == 0
    assert organization_listing(organization=org, listing_id=created.pk).available == credits(100)
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_the_rollovers_listing_trim_and_the_expiry_sweep_never_take_the_same_credits(
    market_stripe, monkeypatch
):
    # given: a seller whose cap keeps 100; 500 plan credits in the wallet and 500 listed:
    # 450 of them from a lot that expires in ten minutes, 50 from one that lasts
    seller = market_member()
    soon = credits_grant(
        organization=seller,
        amount=credits(450),
        source="subscription",
        paid=True,
        resellable=True,
        key=f"soon-{seller.pk}",
        expires_at=timezone.now() + timedelta(minutes=10),
    )
    subscription_credits(seller, credits(550))
    listing = listing_create(seller=seller, quantity=credits(500), price_per_1k=300, currency="usd")
    # The expiry account exists, as it does in production (not created inside the race).
    accounts_for(seller, AccountKind.EXPIRY)
    assert CreditLot.objects.get(parent=soon, remaining__gt=0).remaining == credits(450)
    rollover_at = timezone.now()
    sweep_at = rollover_at + timedelta(minutes=20)  # the minute's sweep, once the lot is due
    errors: list = []
    no_deadlock_retries(monkeypatch)
    # The rollover has counted the listed credits and is about to trim them: the
    # sweep comes now, and either runs or waits for what the rollover holds.
    swept = _sweep_when_called(
        monkeypatch, market_services, "credits_expire_early", now=sweep_at, errors=errors
    )
    expiry_before = system_balance("expiry")

    # when: the rollover's cap (keep 100) runs, with the sweep in the middle
    trimmed = credits_trim_with_listings(
        seller=seller,
        keep=credits(100),
        key=f"rollover:race:{seller.pk}",
        memo="cap",
        now=rollover_at,
    )
    swept.join(timeout=120)

    # then: as if one ran before the other, never both on the same credits: the cap
    # counted the soon-expiring lot as the seller's and trimmed it first (400 of its 450),
    # so the sweep expired only its last 50 and the lasting lot keeps its 50; the seller
    # never ends below what the cap left, less what then expired on its date
    assert errors == []
    assert trimmed == credits(500 + 400)
    assert system_balance("expiry") - expiry_before == credits(500 + 450)
    owned_later = CreditLot.objects.filter(
        organization=seller, source="subscription", remaining__gt=0, expires_at__gt=sweep_at
    ).aggregate(s=Sum("remaining"))["s"]
    assert owned_later == credits(50)
    assert organization_listing(organization=seller, listing_id=listing.pk).available == credits(50)
    assert ledger_reconcile().ok


def _sweep_when_called(monkeypatch, module, name: str, *, now, errors: list) -> threading.Thread:
    """Make `module.name`'s call start the minute's expiry sweep (at `now`) on a connection
    of its own, and go on once the sweep has run or waits for a lock the caller holds;
    returns the sweep's thread, for the test to join."""
    real = getattr(module, name)
    swept = threading.Thread(
        name="sweep", target=lambda: on_own_connection(lambda: credits_expire(now=now), errors)
    )

    def sweep_first(**kwargs):
        swept.start()
        wait_until(
            lambda: not swept.is_alive() or lock_waiters() > 0,
            what="the sweep to run or wait for the rollover",
        )
        return real(**kwargs)

    monkeypatch.setattr(module, name, sweep_first)
    return swept


@pytest.mark.django_db(transaction=True)
def test_the_subscriptions_rollover_and_the_expiry_sweep_of_its_escrow_do_not_deadlock(
    market_stripe, monkeypatch
):
    # given: a member whose plan rolls 100 over, with 500 listed: 450 from a lot that
    # expires in ten minutes; the subscription's sync of the new period holds the
    # organization's row (its entitlements) when the minute's sweep comes for that lot
    org, stripe_sub, _ = rollover_member()
    credits_grant(
        organization=org,
        amount=credits(450),
        source="subscription",
        paid=True,
        resellable=True,
        key=f"soon-{org.pk}",
        expires_at=timezone.now() + timedelta(minutes=10),
    )
    listing_create(seller=org, quantity=credits(500), price_per_1k=300, currency="usd")
    accounts_for(org, AccountKind.EXPIRY)
    sweep_at = timezone.now() + timedelta(minutes=20)
    errors: list = []
    no_deadlock_retries(monkeypatch)
    swept = _sweep_when_called(
        monkeypatch, subscriptions, "credits_trim_with_listings", now=sweep_at, errors=errors
    )

    # when: the period rolls over (the sweep expires the escrow lot meanwhile: it locks the
    # escrow, and its expiry's foreign key to the organization is checked at COMMIT)
    try:
        roll(stripe_sub)
    except Exception as exc:
        errors.append(exc)
    swept.join(timeout=120)

    # then: no deadlock: the sweep did its work (it logs and skips an account that fails),
    # then the rollover capped what was left at 100
    assert errors == []
    assert not CreditLot.objects.filter(
        organization=org, remaining__gt=0, expires_at__lte=sweep_at, account__kind="escrow"
    ).exists()
    assert CreditLot.objects.filter(
        organization=org, source="subscription", remaining__gt=0, expires_at__gt=sweep_at
    ).aggregate(s=Sum("remaining"))["s"] == credits(100)
    assert ledger_reconcile().ok


# --- the marketplace against the member's own metering ---------------------------------------


@pytest.mark.django_db(transaction=True)
def test_paying_an_order_neither_blocks_nor_deadlocks_with_the_buyer_s_inference(
    market_stripe, monkeypatch
):
    # given: an order reserved for a buyer who also runs inference; its payment has
    # locked the order's rows (listings, order, fills) and is paused there
    seller = market_member(credits_amount=credits(1000))
    buyer = market_member(credits_amount=credits(50))
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(100), max_price_per_1k=300, currency="usd")
    errors: list = []
    no_deadlock_retries(monkeypatch)
    paused, resume = pause_after(monkeypatch, market_services, "_order_locked", thread="pay")
    paying = threading.Thread(
        name="pay",
        target=on_own_connection,
        args=(
            lambda: market_services.order_pay(order_id=order.pk, payment_intent_id="pi_race"),
            errors,
        ),
    )
    paying.start()
    assert paused.wait(timeout=60)

    # when: the buyer's job places its hold meanwhile (it locks the buyer's wallet; its
    # rows' foreign keys to the organization are checked at COMMIT)
    job = threading.Thread(
        name="job",
        target=on_own_connection,
        args=(lambda: hold_place(organization=buyer, amount=credits(5), key="job-race"), errors),
    )
    job.start()
    wait_until(
        lambda: not job.is_alive() or lock_waiters() > 0,
        what="the hold to be placed or to wait for the payment",
    )
    waited = job.is_alive()
    resume.set()
    paying.join(timeout=120)
    job.join(timeout=120)

    # then: the hold never waited for the marketplace (the payment locks its own rows,
    # not the organizations'), and both went through, without a deadlock
    assert errors == []
    assert not waited
    order.refresh_from_db()
    assert order.status == OrderStatus.PAID
    balance = organization_balance(organization=buyer)
    assert (balance.available, balance.held) == (credits(145), credits(5))
    assert ledger_reconcile().ok


# --- orders of the same sellers, filled in opposite orders ---------------------------------
#
# Fills come in price order, so one order can take seller 1 then seller 2 and another
# seller 2 then seller 1. Each posting locks its own accounts in primary-key order; a
# transaction posting fill by fill used to lock the sellers' accounts in fill order, and
# two such transactions deadlocked (each waits a second for PostgreSQL to notice, and is
# retried; five in a row were a 500).


def reserve(buyer, *, max_price: int) -> MarketOrder:
    return order_reserve(
        buyer=buyer, quantity=credits(200), max_price_per_1k=max_price, currency="usd"
    )


def fill_sellers(order: MarketOrder) -> list[int]:
    return list(
        MarketFill.objects.filter(order=order).order_by("pk").values_list("seller_id", flat=True)
    )


@pytest.mark.django_db(transaction=True)
def test_a_reservation_and_a_release_taking_two_sellers_in_opposite_orders_do_not_deadlock(
    monkeypatch,
):
    # given: one order reserved seller 1's 100 at 300, then seller 2's 100 at 400; then
    # seller 2 lists 100 at 200 and seller 1 100 at 350
    s1, s2 = OrganizationFactory(), OrganizationFactory()
    for seller in (s1, s2):
        subscription_credits(seller, credits(1000))
    listing_create(seller=s1, quantity=credits(100), price_per_1k=300, currency="usd")
    listing_create(seller=s2, quantity=credits(100), price_per_1k=400, currency="usd")
    first = reserve(OrganizationFactory(), max_price=400)
    assert fill_sellers(first) == [s1.pk, s2.pk]
    listing_create(seller=s2, quantity=credits(100), price_per_1k=200, currency="usd")
    listing_create(seller=s1, quantity=credits(100), price_per_1k=350, currency="usd")
    buyer = OrganizationFactory()
    errors: list = []
    no_deadlock_retries(monkeypatch)

    # when: another buyer reserves 200 up to 350 (seller 2's, then seller 1's), paused
    # once it has moved its first fill's credits
    paused, resume = pause_after(monkeypatch, market_services, "credits_move", thread="reserve")
    reserving = threading.Thread(
        name="reserve",
        target=on_own_connection,
        args=(lambda: reserve(buyer, max_price=350), errors),
    )
    reserving.start()
    assert paused.wait(timeout=60)
    # and the first order is released meanwhile, on its own connection
    releasing = threading.Thread(
        name="release",
        target=on_own_connection,
        args=(
            lambda: order_release(order_id=first.pk, status=OrderStatus.FAILED, code="test"),
            errors,
        ),
    )
    run_against_paused(
        releasing, paused=reserving, resume=resume, what="the release to wait for the reservation"
    )

    # then: both went through, without a deadlock (none is retried here)
    assert errors == []
    first.refresh_from_db()
    assert first.status == OrderStatus.FAILED
    [second] = MarketOrder.objects.filter(buyer=buyer)
    assert fill_sellers(second) == [s2.pk, s1.pk]
    assert organization_balance(organization=buyer).escrowed == credits(200)
    # the first order's 200 back on its two listings
    assert organization_balance(organization=s1).escrowed == credits(100)
    assert organization_balance(organization=s2).escrowed == credits(100)
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_two_payments_of_orders_filled_by_two_sellers_in_opposite_orders_do_not_deadlock(
    monkeypatch,
):
    # given: one order of seller 1's 100 at 300 and seller 2's 100 at 400, another of
    # seller 2's 100 at 200 and seller 1's 100 at 350, both reserved; the money accounts
    # open (earlier sales), so that neither payment waits for the other's insert of one
    s1, s2 = OrganizationFactory(), OrganizationFactory()
    for kind in MoneyAccountKind:
        if kind not in SELLER_KINDS:
            money_account(kind=kind, currency="usd")
    for seller in (s1, s2):
        subscription_credits(seller, credits(1000))
        money_account(kind=MoneyAccountKind.SELLER_PENDING, currency="usd", organization=seller)
    listing_create(seller=s1, quantity=credits(100), price_per_1k=300, currency="usd")
    listing_create(seller=s2, quantity=credits(100), price_per_1k=400, currency="usd")
    first = reserve(OrganizationFactory(), max_price=400)
    listing_create(seller=s2, quantity=credits(100), price_per_1k=200, currency="usd")
    listing_create(seller=s1, quantity=credits(100), price_per_1k=350, currency="usd")
    second = reserve(OrganizationFactory(), max_price=350)
    assert (fill_sellers(first), fill_sellers(second)) == ([s1.pk, s2.pk], [s2.pk, s1.pk])
    errors: list = []
    no_deadlock_retries(monkeypatch)

    # when: the first is paid, paused once it has booked its first sale
    paused, resume = pause_after(monkeypatch, market_services, "money_post", thread="first")
    paying = threading.Thread(
        name="first",
        target=on_own_connection,
        args=(lambda: order_pay(order_id=first.pk, payment_intent_id="pi_first"), errors),
    )
    paying.start()
    assert paused.wait(timeout=60)
    # and the second is paid meanwhile, on its own connection
    other = threading.Thread(
        name="second",
        target=on_own_connection,
        args=(lambda: order_pay(order_id=second.pk, payment_intent_id="pi_second"), errors),
    )
    run_against_paused(
        other, paused=paying, resume=resume, what="the second payment to wait for the first"
    )

    # then: both went through, without a deadlock (none is retried here); each seller's
    # pending proceeds hold both sales, less the 10% fee, rounded half up (30 + 35, 40 + 20)
    assert errors == []
    for order in (first, second):
        order.refresh_from_db()
        assert order.status == OrderStatus.PAID
        assert organization_balance(organization=order.buyer).total == credits(200)
    assert money("seller_pending", organization=s1) == 27 + 31
    assert money("seller_pending", organization=s2) == 36 + 18
    assert ledger_reconcile().ok
