"""The marketplace's services end to end in one process: credits and money.

Stripe is the fake at the client module (conftest.py); every outcome is
asserted on rows and balances, and the autouse reconcile fixture checks every
ledger invariant (credits, escrow attribution, proceeds) after each test.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import Standing
from gymbilling import stripe_client
from gymbilling.market.rules import fill_amount, platform_fee, refund_split, split_pro_rata
from gymbilling.market.selectors import (
    organization_earnings,
    organization_listing,
    organization_sales,
)
from gymbilling.market.services import (
    listing_cancel,
    listing_create,
    listings_expire,
    market_checkout_handle,
    market_reversal_handle,
    market_reversals_pending_settle,
    order_create,
    orders_expire,
    payouts_run,
)
from gymbilling.models import (
    BillingCustomer,
    CheckoutSession,
    FillStatus,
    ListingStatus,
    MarketFill,
    MarketListing,
    MarketOrder,
    MarketPayout,
    MarketReversal,
    OrderStatus,
    PayoutMethod,
    PayoutStatus,
)
from gymbilling.selectors import reversals_by_customer
from gymbilling.services.events import charge_refund_refresh, checkout_session_refresh
from metering.models import MICRO, CreditLot, LedgerAccount, LotSource
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import credits_grant, hold_capture, hold_place
from metering.services.postings import MAX_MOVEMENT
from tests.factories import OrganizationFactory
from tests.gymbilling.market.conftest import (
    charge_for,
    dispute_at_stripe,
    market_member,
    money,
    paid_session,
    refund,
    roll,
    rollover_member,
    sold,
    subscription_credits,
    subscription_credits_owned,
)
from tests.helpers import credits, ledger_rows, system_balance

pytestmark = pytest.mark.django_db


# --- rules -----------------------------------------------------------------------------


def test_fill_amount_rounds_up_to_the_minor_unit():
    # 1,000 credits at 250 -> exactly 250; one micro-credit more costs one more cent.
    assert fill_amount(quantity=credits(1000), price_per_1k=250) == 250
    assert fill_amount(quantity=credits(1000) + 1, price_per_1k=250) == 251
    assert fill_amount(quantity=credits(1), price_per_1k=250) == 1  # 0.25 -> 1
    assert fill_amount(quantity=credits(4), price_per_1k=250) == 1  # exactly 1.0


def test_platform_fee_rounds_half_up():
    assert platform_fee(gross=1000, fee_bps=1000) == 100
    assert platform_fee(gross=5, fee_bps=1000) == 1  # 0.5 -> 1
    assert platform_fee(gross=4, fee_bps=1000) == 0  # 0.4 -> 0
    assert platform_fee(gross=15, fee_bps=1000) == 2  # 1.5 -> 2
    assert platform_fee(gross=14, fee_bps=1000) == 1  # 1.4 -> 1


def test_split_pro_rata_gives_the_units_left_to_the_largest_remainders_and_adds_up():
    # 100 over 100:150:200 is 22.2, 33.3 and 44.4: the cent left goes to .44
    assert split_pro_rata(100, [100, 150, 200]) == [22, 33, 45]
    # equal remainders: the earlier part first
    assert split_pro_rata(2, [1, 1, 1]) == [1, 1, 0]
    assert split_pro_rata(0, [5, 7]) == [0, 0]
    with pytest.raises(ValueError):
        split_pro_rata(13, [5, 7])  # more than there is to split


def test_refund_split_counts_earlier_refunds_and_never_takes_more_than_a_fill_has_left():
    # given: fills of 100, 150 and 200, of which a first refund of 100 took 22, 33 and 45
    fills = [(100, 22), (150, 33), (200, 45)]
    # when: 100 more is refunded (200 in all: 44.4, 66.7 and 88.9 exactly)
    # then: each ends at its exact share of the 200, rounded: 44, 67 and 89
    assert refund_split(amount=100, fills=fills) == [22, 34, 44]
    # and the rest, or more than the rest, takes exactly what each has left
    assert refund_split(amount=350, fills=fills) == [78, 117, 155]
    assert refund_split(amount=999, fills=fills) == [78, 117, 155]


# --- listing ---------------------------------------------------------------------------


def test_listing_moves_resellable_credits_into_escrow_keeping_their_expiry(seller):
    # given: the seller's subscription lot
    wallet_lot = CreditLot.objects.get(organization=seller, account__kind="wallet")
    # when
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    # then
    balance = organization_balance(organization=seller)
    assert (balance.available, balance.escrowed) == (credits(900), credits(100))
    escrow_lot = CreditLot.objects.get(organization=seller, account__kind="escrow")
    assert escrow_lot.expires_at == wallet_lot.expires_at == listing.expires_at
    assert escrow_lot.source == LotSource.SUBSCRIPTION and escrow_lot.remaining == credits(100)


@pytest.mark.parametrize(
    "source,paid,resellable",
    [("pack", True, False), ("promotion", False, False), ("marketplace", True, False)],
)
def test_only_paid_subscription_credits_can_be_listed(source, paid, resellable, buyer):
    # given: credits that are not resellable
    credits_grant(
        organization=buyer,
        amount=credits(500),
        source=source,
        paid=paid,
        resellable=resellable,
        key=f"not-resellable-{source}",
        expires_at=timezone.now() + timedelta(days=30),
    )
    before = ledger_rows()
    # when / then
    with pytest.raises(ApplicationError) as exc:
        listing_create(seller=buyer, quantity=credits(100), price_per_1k=300, currency="usd")
    assert exc.value.code == "insufficient_resellable_credits" and exc.value.status == 402
    assert ledger_rows() == before and not MarketListing.objects.exists()


@pytest.mark.parametrize("why", ["past_due", "suspended", "frozen"])
def test_an_organization_not_in_good_standing_cannot_list(seller, why):
    if why == "frozen":
        BillingCustomer.objects.filter(organization=seller).update(
            resale_frozen_at=timezone.now(), resale_frozen_reason="dispute"
        )
    else:
        seller.standing = Standing.PAST_DUE if why == "past_due" else Standing.SUSPENDED
        seller.save(update_fields=["standing"])
    before = ledger_rows()
    with pytest.raises(ApplicationError) as exc:
        listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    assert exc.value.code == "resale_not_allowed" and exc.value.status == 403
    assert ledger_rows() == before


def test_listing_limits(seller, settings):
    settings.MARKET_LISTINGS_PER_DAY = 2
    for code, kwargs in [
        ("price_out_of_bounds", {"quantity": credits(100), "price_per_1k": 0}),
        ("price_out_of_bounds", {"quantity": credits(100), "price_per_1k": 100_001}),
        ("quantity_below_minimum", {"quantity": credits(9), "price_per_1k": 300}),
        ("invalid_quantity", {"quantity": -5, "price_per_1k": 300}),
        (
            "unsupported_currency",
            {"quantity": credits(100), "price_per_1k": 300, "currency": "xxx"},
        ),
    ]:
        kwargs.setdefault("currency", "usd")
        with pytest.raises(ApplicationError) as exc:
            listing_create(seller=seller, **kwargs)
        assert exc.value.code == code, kwargs
    listing_create(seller=seller, quantity=credits(10), price_per_1k=300, currency="usd")
    listing_create(seller=seller, quantity=credits(10), price_per_1k=300, currency="usd")
    with pytest.raises(ApplicationError) as exc:
        listing_create(seller=seller, quantity=credits(10), price_per_1k=300, currency="usd")
    assert exc.value.code == "listing_limit_reached" and exc.value.status == 429


# --- orders, payment -----------------------------------------------------------------------


def test_partial_fills_across_three_listings_fill_cheapest_first_and_charge_the_exact_total(
    market_stripe, buyer
):
    # given: three sellers at three prices (the cheapest listed last)
    sellers = [OrganizationFactory() for _ in range(3)]
    for org in sellers:
        subscription_credits(org, credits(1000))
    expensive = listing_create(
        seller=sellers[0], quantity=credits(100), price_per_1k=777, currency="usd"
    )
    middle = listing_create(
        seller=sellers[1], quantity=credits(100), price_per_1k=333, currency="usd"
    )
    cheap = listing_create(
        seller=sellers[2], quantity=credits(100), price_per_1k=111, currency="usd"
    )
    # when: 250.5 credits at up to 800 per 1,000
    order = order_create(
        buyer=buyer, quantity=credits("250.5"), max_price_per_1k=800, currency="usd"
    )
    # then: 100 @111 + 100 @333 + 50.5 @777, each rounded up: 11.1->12, 33.3->34, 39.2385->40
    fills = {f.listing_id: f for f in order.fills.all()}
    assert [fills[cheap.pk].quantity, fills[middle.pk].quantity, fills[expensive.pk].quantity] == [
        credits(100),
        credits(100),
        credits("50.5"),
    ]
    assert [fills[cheap.pk].amount, fills[middle.pk].amount, fills[expensive.pk].amount] == [
        12,
        34,
        40,
    ]
    assert order.amount_total == 86
    session = market_stripe.session(order.checkout.stripe_session_id)
    assert session["amount_total"] == 86
    assert order.checkout_url.startswith(market_stripe.standin.api_base + "/checkout/")
    assert organization_balance(organization=buyer).escrowed == credits("250.5")
    # when: paid
    market_checkout_handle(order.checkout, paid_session(market_stripe, order))
    # then: delivered as marketplace lots, same expiry, paid, not resellable
    order.refresh_from_db()
    assert order.status == OrderStatus.PAID and order.shortfall_amount == 0
    balance = organization_balance(organization=buyer)
    assert (balance.available, balance.escrowed) == (credits("250.5"), 0)
    lots = CreditLot.objects.filter(organization=buyer, account__kind="wallet")
    assert {(lot.source, lot.paid, lot.resellable) for lot in lots} == {
        ("marketplace", True, False)
    }
    assert {lot.expires_at for lot in lots} == {
        cheap.expires_at,
        middle.expires_at,
        expensive.expires_at,
    }
    # money: buyers paid 86; fees 10% half up per fill: 1.2->1, 3.4->3, 4.0->4
    assert money("buyer_clearing") == -86
    assert money("platform_fees") == 8
    assert money("seller_pending", organization=sellers[2]) == 11
    assert money("seller_pending", organization=sellers[1]) == 31
    assert money("seller_pending", organization=sellers[0]) == 36
    cheap.refresh_from_db()
    assert cheap.status == ListingStatus.SOLD_OUT and cheap.sold == credits(100)
    # a second delivery of the same event changes nothing
    market_checkout_handle(order.checkout, market_stripe.session(order.checkout.stripe_session_id))
    assert organization_balance(organization=buyer).available == credits("250.5")


def test_not_enough_liquidity_is_refused_and_changes_nothing(market_stripe, seller, buyer):
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    before = ledger_rows(), MarketOrder.objects.count()
    with pytest.raises(ApplicationError) as exc:
        order_create(buyer=buyer, quantity=credits(101), max_price_per_1k=300, currency="usd")
    assert exc.value.code == "insufficient_liquidity" and exc.value.status == 409
    assert exc.value.extra["available"] == credits(100)
    with pytest.raises(ApplicationError) as exc:
        order_create(buyer=buyer, quantity=credits(10), max_price_per_1k=299, currency="usd")
    assert exc.value.code == "insufficient_liquidity"
    assert (ledger_rows(), MarketOrder.objects.count()) == before
    # allow_partial takes what there is
    order = order_create(
        buyer=buyer, quantity=credits(150), max_price_per_1k=300, currency="usd", allow_partial=True
    )
    assert order.quantity == credits(100) and order.quantity_requested == credits(150)


def test_listings_reserved_to_the_last_credit_do_not_hide_the_offers_behind_them(
    market_stripe, buyer, settings
):
    # given: an order takes from at most 2 listings; the two cheapest are wholly
    # reserved by another buyer's pending order, a third offers 100 credits
    settings.MARKET_ORDER_MAX_LISTINGS = 2
    sellers = [market_member(credits_amount=credits(1000)) for _ in range(3)]
    for org, price in zip(sellers, (100, 200, 300), strict=True):
        listing_create(seller=org, quantity=credits(100), price_per_1k=price, currency="usd")
    first = order_create(
        buyer=market_member(), quantity=credits(200), max_price_per_1k=200, currency="usd"
    )
    assert first.quantity == credits(200)
    third = MarketListing.objects.get(seller=sellers[2])

    # when: the buyer orders 100 at up to 300
    order = order_create(buyer=buyer, quantity=credits(100), max_price_per_1k=300, currency="usd")

    # then: filled from the third listing, the one with credits on offer
    assert order.quantity == credits(100) and order.amount_total == 30
    assert [fill.listing_id for fill in order.fills.all()] == [third.pk]
    assert organization_balance(organization=buyer).escrowed == credits(100)
    assert organization_balance(organization=sellers[2]).escrowed == 0


@pytest.mark.parametrize("service", ["order", "listing"])
def test_a_quantity_past_what_the_ledger_moves_is_refused_by_the_service(
    market_stripe, seller, buyer, service
):
    # given an open listing (an order taking what is offered would have reached the database)
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    before = ledger_rows(), MarketOrder.objects.count(), MarketListing.objects.count()

    # when a caller other than the API (a page, a task) asks past the ledger's bound
    with pytest.raises(ApplicationError) as exc:
        if service == "order":
            order_create(
                buyer=buyer,
                quantity=MAX_MOVEMENT + 1,
                max_price_per_1k=300,
                currency="usd",
                allow_partial=True,
            )
        else:
            listing_create(
                seller=seller, quantity=MAX_MOVEMENT + 1, price_per_1k=300, currency="usd"
            )

    # then the service refuses it (it was a BIGINT overflow, a 500), and nothing changed
    assert (exc.value.code, exc.value.status) == ("invalid_quantity", 400)
    assert (ledger_rows(), MarketOrder.objects.count(), MarketListing.objects.count()) == before


def test_buying_your_own_listing_is_refused(market_stripe, seller):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    before = ledger_rows()
    with pytest.raises(ApplicationError) as exc:
        order_create(
            buyer=seller,
            quantity=credits(10),
            max_price_per_1k=300,
            currency="usd",
            listing_id=listing.pk,
        )
    assert exc.value.code == "own_listing" and exc.value.status == 400
    # without naming it, one's own offers are simply not matched
    with pytest.raises(ApplicationError) as exc:
        order_create(buyer=seller, quantity=credits(10), max_price_per_1k=300, currency="usd")
    assert exc.value.code == "insufficient_liquidity"
    assert ledger_rows() == before


def test_payment_failure_releases_the_reservation(market_stripe, seller, buyer):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(60), max_price_per_1k=300, currency="usd")
    assert organization_balance(organization=seller).escrowed == credits(40)
    # when: the session expires unpaid (the card was declined and the buyer gave up)
    session = market_stripe.expire(order.checkout.stripe_session_id)
    market_checkout_handle(order.checkout, session)
    # then
    order.refresh_from_db()
    assert order.status == OrderStatus.EXPIRED
    assert {f.status for f in order.fills.all()} == {FillStatus.RELEASED}
    assert organization_balance(organization=seller).escrowed == credits(100)
    assert organization_balance(organization=buyer).escrowed == 0
    # the credits are for sale again
    again = order_create(buyer=buyer, quantity=credits(100), max_price_per_1k=300, currency="usd")
    assert again.fills.get().listing_id == listing.pk


def test_reservation_timeout_expires_the_checkout_and_releases(market_stripe, seller, buyer):
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(60), max_price_per_1k=300, currency="usd")
    # not yet due
    assert orders_expire(now=timezone.now()) == 0
    later = timezone.now() + timedelta(minutes=16)
    # Stripe down: the reservation is kept, and retried next run
    market_stripe.down = True
    assert orders_expire(now=later) == 0
    assert MarketOrder.objects.get(pk=order.pk).status == OrderStatus.PENDING
    market_stripe.down = False
    assert orders_expire(now=later) == 1
    order.refresh_from_db()
    assert order.status == OrderStatus.EXPIRED and order.failure_code == "reservation_timeout"
    assert market_stripe.session(order.checkout.stripe_session_id)["status"] == "expired"
    assert organization_balance(organization=seller).escrowed == credits(100)


def test_an_order_whose_checkout_stripe_cannot_find_is_released_with_the_others(
    market_stripe, seller, buyer, caplog
):
    # given: two reservations past their hold time; Stripe knows nothing of the first's
    # checkout (it answers 404 to expiring and to reading it: the Stripe account or its
    # key changed since the order was made)
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    lost = order_create(buyer=buyer, quantity=credits(40), max_price_per_1k=300, currency="usd")
    CheckoutSession.objects.filter(pk=lost.checkout_id).update(stripe_session_id="cs_unknown")
    other_buyer = market_member()
    other = order_create(
        buyer=other_buyer, quantity=credits(60), max_price_per_1k=300, currency="usd"
    )
    assert organization_balance(organization=seller).escrowed == 0
    caplog.set_level(logging.WARNING, logger="gymbilling.market.services")

    # when: the sweep runs
    released = orders_expire(now=timezone.now() + timedelta(minutes=16))

    # then: both are released, the first as a checkout Stripe cannot find (logged, naming
    # it): nobody can pay it, so its credits are on the listing again, the seller's
    assert released == 2
    lost.refresh_from_db()
    other.refresh_from_db()
    assert (lost.status, lost.failure_code) == (OrderStatus.EXPIRED, "checkout_not_found")
    assert (other.status, other.failure_code) == (OrderStatus.EXPIRED, "reservation_timeout")
    assert {f.status for f in lost.fills.all()} == {FillStatus.RELEASED}
    assert organization_listing(organization=seller, listing_id=listing.pk).available == credits(
        100
    )
    assert organization_balance(organization=seller).escrowed == credits(100)
    assert organization_balance(organization=seller).available == credits(900)
    assert organization_balance(organization=buyer).escrowed == 0
    assert organization_balance(organization=other_buyer).escrowed == 0
    assert any(
        f"market order {lost.pk}: Stripe has no checkout session cs_unknown" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING
    )
    # and the next sweep has nothing left to do; the credits sell again
    assert orders_expire(now=timezone.now() + timedelta(minutes=32)) == 0
    again = order_create(buyer=buyer, quantity=credits(100), max_price_per_1k=300, currency="usd")
    assert again.fills.get().listing_id == listing.pk


def test_a_checkout_stripe_could_not_find_paid_after_all_is_refunded_not_delivered(
    market_stripe, seller, buyer, deliver
):
    # given: a reservation whose checkout Stripe could not find when it was due (the
    # Stripe key changed): released, its credits back on the listing
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(40), max_price_per_1k=300, currency="usd")
    session_id = order.checkout.stripe_session_id
    CheckoutSession.objects.filter(pk=order.checkout_id).update(stripe_session_id="cs_unknown")
    assert orders_expire(now=timezone.now() + timedelta(minutes=16)) == 1

    # when: the session turns up after all (the old key back), paid, and its webhook is
    # processed; then the sweep runs
    CheckoutSession.objects.filter(pk=order.checkout_id).update(stripe_session_id=session_id)
    intent = market_stripe.pay(session_id)["payment_intent"]
    deliver()
    orders_expire()

    # then: as any payment of a released order: nothing delivered, no sale booked, the
    # buyer refunded all 12 they paid; the listing still offers all 100
    order.refresh_from_db()
    assert (order.status, order.failure_code) == (OrderStatus.EXPIRED, "checkout_not_found")
    assert (order.amount_total, order.shortfall_amount) == (12, 12)
    assert order.shortfall_refunded_at is not None
    assert market_stripe.refunded(intent) == 12
    assert organization_balance(organization=buyer).available == 0
    assert money("seller_pending", organization=seller) == 0
    assert organization_listing(organization=seller, listing_id=listing.pk).available == credits(
        100
    )


def test_a_session_paid_at_the_last_moment_is_delivered_not_released(market_stripe, seller, buyer):
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(60), max_price_per_1k=300, currency="usd")
    paid_session(market_stripe, order)  # paid, the webhook not yet processed
    orders_expire(now=timezone.now() + timedelta(minutes=16))
    order.refresh_from_db()
    assert order.status == OrderStatus.PAID
    assert organization_balance(organization=buyer).available == credits(60)


def test_stripe_down_when_ordering_answers_503_and_undoes_the_reservation(
    market_stripe, seller, buyer
):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    market_stripe.down = True
    with pytest.raises(ApplicationError) as exc:
        order_create(buyer=buyer, quantity=credits(60), max_price_per_1k=300, currency="usd")
    assert exc.value.code == "payments_unavailable" and exc.value.status == 503
    order = MarketOrder.objects.get()
    assert order.status == OrderStatus.FAILED and order.checkout is None
    assert organization_balance(organization=seller).escrowed == credits(100)
    assert organization_balance(organization=buyer).escrowed == 0
    listing.refresh_from_db()
    assert listing.status == ListingStatus.OPEN


def test_an_unexpected_error_opening_the_checkout_releases_the_reservation(
    market_stripe, seller, buyer, monkeypatch
):
    # given: 100 credits listed, and a checkout call that fails as nothing should.
    # Mocked at the client module: the stand-in answers what it is asked, so it
    # cannot make the SDK crash (a bug of ours, a response nobody can read).
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    before = organization_balance(organization=seller), organization_balance(organization=buyer)

    def crash(**params):
        raise RuntimeError("unreadable response")

    monkeypatch.setattr(stripe_client, "checkout_session_create", crash)

    # when
    with pytest.raises(RuntimeError):
        order_create(buyer=buyer, quantity=credits(60), max_price_per_1k=300, currency="usd")

    # then: the order failed at once, its reservation released, not left to orders_expire
    order = MarketOrder.objects.get()
    assert (order.status, order.failure_code, order.checkout) == (
        OrderStatus.FAILED,
        "checkout_failed",
        None,
    )
    assert {f.status for f in order.fills.all()} == {FillStatus.RELEASED}
    # the listing offers its 100 again, and every credit is where it was
    offered = organization_listing(organization=seller, listing_id=listing.pk).available
    assert offered == credits(100)
    assert (
        organization_balance(organization=seller),
        organization_balance(organization=buyer),
    ) == before


def test_cancel_while_a_payment_is_in_flight_cannot_sell_a_credit_twice(
    market_stripe, seller, buyer
):
    # given: 60 of 100 reserved by a buyer who is paying
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(60), max_price_per_1k=300, currency="usd")
    # when: the seller cancels
    listing_cancel(seller=seller, listing_id=listing.pk)
    # then: only the unreserved 40 return
    assert organization_balance(organization=seller).available == credits(940)
    # and the payment still delivers the 60 reserved
    market_checkout_handle(order.checkout, paid_session(market_stripe, order))
    assert organization_balance(organization=buyer).available == credits(60)
    assert organization_balance(organization=seller).available == credits(940)
    assert organization_balance(organization=seller).escrowed == 0
    listing.refresh_from_db()
    assert listing.status == ListingStatus.CANCELED and listing.sold == credits(60)
    # cancel again -> 409; nothing else to buy
    with pytest.raises(ApplicationError) as exc:
        listing_cancel(seller=seller, listing_id=listing.pk)
    assert exc.value.code == "listing_not_open"


def test_cancel_then_payment_fails_returns_reserved_credits_to_the_sellers_wallet(
    market_stripe, seller, buyer
):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(60), max_price_per_1k=300, currency="usd")
    listing_cancel(seller=seller, listing_id=listing.pk)
    orders_expire(now=timezone.now() + timedelta(minutes=16))
    assert organization_balance(organization=seller).available == credits(1000)
    assert organization_balance(organization=buyer).escrowed == 0
    assert MarketOrder.objects.get(pk=order.pk).status == OrderStatus.EXPIRED


def test_other_organizations_listing_cannot_be_canceled(seller, buyer):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    before = ledger_rows()
    with pytest.raises(ApplicationError) as exc:
        listing_cancel(seller=buyer, listing_id=listing.pk)
    assert exc.value.code == "not_found" and exc.value.status == 404
    assert ledger_rows() == before


# --- expiry -----------------------------------------------------------------------------------


def test_credits_expiring_in_escrow_go_to_the_expiry_account_and_end_the_listing(seller):
    # given: a listing of credits expiring in 2 days
    short = OrganizationFactory()
    subscription_credits(short, credits(100), days=2)
    listing = listing_create(seller=short, quantity=credits(100), price_per_1k=300, currency="usd")
    expiry_before = system_balance("expiry")
    # when: three days later
    assert listings_expire(now=timezone.now() + timedelta(days=3)) == 1
    # then
    listing.refresh_from_db()
    assert listing.status == ListingStatus.EXPIRED
    balance = organization_balance(organization=short)
    assert (balance.available, balance.escrowed) == (0, 0)
    assert system_balance("expiry") - expiry_before == credits(100)


def test_cancel_after_expiry_returns_nothing_expired(seller):
    short = OrganizationFactory()
    subscription_credits(short, credits(100), days=2)
    subscription_credits(short, credits(100), days=30)
    # burn order takes the soonest-expiring lot first: 100 expiring in 2 days + 20 of the other
    listing = listing_create(seller=short, quantity=credits(120), price_per_1k=300, currency="usd")
    listing_cancel(seller=short, listing_id=listing.pk, now=timezone.now() + timedelta(days=3))
    balance = organization_balance(organization=short)
    assert (balance.available, balance.escrowed) == (credits(100), 0)


# --- the rollover cap ---------------------------------------------------------------------------


def test_listed_credits_count_toward_the_rollover_cap(market_stripe):
    # given: 1,000 subscription credits (the cap keeps 100), 900 listed at a price nobody pays
    org, stripe_sub, granted = rollover_member()
    listing = listing_create(
        seller=org, quantity=credits(900), price_per_1k=100_000, currency="usd"
    )
    expiry_before = system_balance("expiry")

    # when: the period rolls over
    roll(stripe_sub)

    # then: 900 expired, the wallet's 100 first, then 800 of the listing's 900
    assert system_balance("expiry") - expiry_before == credits(900)
    assert organization_balance(organization=org).available == 0
    assert organization_listing(organization=org, listing_id=listing.pk).available == credits(100)

    # when: the seller cancels the listing
    listing_cancel(seller=org, listing_id=listing.pk)

    # then: the organization keeps the cap, no more
    balance = organization_balance(organization=org)
    assert (balance.available, balance.escrowed) == (credits(100), 0)
    assert system_balance("expiry") - expiry_before == credits(900)
    # and what came back kept its lot's expiry (a period past the one that ended, as the
    # 10% that rolls over has): cancelling a listing never renews credits
    [back] = CreditLot.objects.filter(organization=org, account__kind="wallet", remaining__gt=0)
    assert back.expires_at == granted.expires_at
    listing.refresh_from_db()
    assert listing.status == ListingStatus.CANCELED and listing.sold == 0
    assert ledger_reconcile().ok


def test_the_rollover_shrinks_listings_but_not_what_a_pending_order_reserved(market_stripe, buyer):
    # given: 900 of 1,000 listed, 500 of them reserved by a buyer who is paying
    org, stripe_sub, _ = rollover_member()
    listing = listing_create(seller=org, quantity=credits(900), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(500), max_price_per_1k=300, currency="usd")

    # when: the period rolls over
    roll(stripe_sub)

    # then: the wallet's 100 and 300 of the listing's unreserved 400 expired; the
    # listing still offers 100 (the cap), the order's 500 stay reserved
    assert organization_balance(organization=org).available == 0
    assert subscription_credits_owned(org) == credits(100)
    assert organization_listing(organization=org, listing_id=listing.pk).available == credits(100)
    assert organization_balance(organization=buyer).escrowed == credits(500)

    # when: the buyer pays
    market_checkout_handle(order.checkout, paid_session(market_stripe, order))

    # then: the 500 are delivered, and the listing goes on with its 100
    assert organization_balance(organization=buyer).available == credits(500)
    listing.refresh_from_db()
    assert listing.status == ListingStatus.OPEN and listing.sold == credits(500)
    assert ledger_reconcile().ok


def test_credits_reserved_at_the_rollover_and_released_after_it_are_capped(market_stripe, buyer):
    # given: 900 of 1,000 listed, 500 of them reserved by a buyer's checkout when the
    # period rolls over: the cap (100) is met by the wallet's and the listing's
    org, stripe_sub, _ = rollover_member()
    listing = listing_create(seller=org, quantity=credits(900), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(500), max_price_per_1k=300, currency="usd")
    expiry_before = system_balance("expiry")
    roll(stripe_sub)
    assert subscription_credits_owned(org) == credits(100)

    # when: the buyer abandons the checkout, and its expiry releases the reservation
    session = market_stripe.expire(order.checkout.stripe_session_id)
    market_checkout_handle(order.checkout, session)

    # then: the 500 come back past a rollover that left nothing of its cap: all expire
    # on their way, and the seller keeps the cap, no more
    order.refresh_from_db()
    assert order.status == OrderStatus.EXPIRED
    assert subscription_credits_owned(org) == credits(100)
    assert organization_listing(organization=org, listing_id=listing.pk).available == credits(100)
    assert organization_balance(organization=buyer).escrowed == 0
    assert system_balance("expiry") - expiry_before == credits(400 + 500)
    assert ledger_reconcile().ok

    # when: the expiry is processed again (a webhook twice)
    rows = ledger_rows()
    market_checkout_handle(order.checkout, session)

    # then: nothing more moved
    assert ledger_rows() == rows
    assert subscription_credits_owned(org) == credits(100)


def test_released_credits_fill_what_the_rollover_left_of_its_cap_and_no_more(market_stripe, buyer):
    # given: 1,000 credits, 50 spent, 900 listed and all of it reserved by two orders
    # (400 and 500): the rollover counts the wallet's 50, trims nothing, leaves 50 of
    # its cap of 100 unused
    from gymbilling.market.services import order_release
    from gymbilling.models import RolloverCarry
    from metering.services import credits_adjust

    org, stripe_sub, _ = rollover_member()
    credits_adjust(organization=org, amount=-credits(50), reason="spent", key=f"spend-{org.pk}")
    listing = listing_create(seller=org, quantity=credits(900), price_per_1k=300, currency="usd")
    first = order_create(buyer=buyer, quantity=credits(400), max_price_per_1k=300, currency="usd")
    second = order_create(buyer=buyer, quantity=credits(500), max_price_per_1k=300, currency="usd")
    expiry_before = system_balance("expiry")
    roll(stripe_sub)
    assert system_balance("expiry") == expiry_before
    assert RolloverCarry.objects.get(organization=org).headroom == credits(50)
    # and the seller ends the listing: what comes back now goes to the wallet
    listing_cancel(seller=org, listing_id=listing.pk)

    # when: the first order is paid, the second released
    market_checkout_handle(first.checkout, paid_session(market_stripe, first))
    assert order_release(order_id=second.pk, status=OrderStatus.EXPIRED, code="reservation_timeout")

    # then: the sold 400 are the buyer's; of the 500 released, 50 fill the cap and 450
    # expire: the seller holds 100, the cap, as if the 500 had been home at the rollover
    assert organization_balance(organization=buyer).available == credits(400)
    assert organization_balance(organization=org).available == credits(100)
    assert subscription_credits_owned(org) == credits(100)
    assert system_balance("expiry") - expiry_before == credits(450)
    assert RolloverCarry.objects.get(organization=org).headroom == 0
    assert ledger_reconcile().ok

    # when: the release runs again
    rows = ledger_rows()
    assert not order_release(
        order_id=second.pk, status=OrderStatus.EXPIRED, code="reservation_timeout"
    )

    # then: nothing more moved
    assert ledger_rows() == rows


def test_a_reservation_pending_through_three_rollovers_comes_back_capped_by_each(
    market_stripe, buyer
):
    # given: a member of a plan of 1,000 credits a month that rolls 100 over; 600 of the
    # first period's spent and the other 400 listed, all reserved by a buyer's checkout,
    # which stays pending through the next three period changes
    from gymbilling.market.services import order_release
    from gymbilling.models import RolloverCarry
    from metering.services import credits_adjust

    org, stripe_sub, _ = rollover_member()
    expiry_before = system_balance("expiry")

    def spend(amount: int, period: int) -> None:
        credits_adjust(organization=org, amount=-amount, reason="used", key=f"spend-{period}")

    def next_period(stripe_sub: dict, *, period: int, spent: int) -> dict:
        """The period rolls over into `period`, whose invoice grants 1,000 credits (expiring
        a period after it ends); the member then spends `spent` in it."""
        renewed = roll(stripe_sub)
        subscription_credits(org, credits(1000), days=31 + 30 * (period - 1))
        spend(credits(spent), period)
        return renewed

    def carried() -> list[int]:
        return list(
            RolloverCarry.objects.filter(organization=org)
            .order_by("pk")
            .values_list("headroom", flat=True)
        )

    spend(credits(600), 1)
    listing = listing_create(seller=org, quantity=credits(400), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(400), max_price_per_1k=300, currency="usd")
    [fill] = order.fills.all()

    # when: the first period ends, the member holding none of its credits (then they
    # spend 970 of the second's 1,000)
    stripe_sub = next_period(stripe_sub, period=2, spent=970)

    # then: nothing to trim; the rollover leaves all its cap (100) to what was away
    assert carried() == [credits(100)]
    assert system_balance("expiry") == expiry_before
    assert ledger_reconcile().ok

    # when: the second period ends, the member holding 30 (then they spend 950 more, the
    # second period's 30 first, as they expire soonest: 80 of the third's are left)
    stripe_sub = next_period(stripe_sub, period=3, spent=950)

    # then: still nothing to trim; this rollover leaves 70 of its cap
    assert carried() == [credits(100), credits(70)]
    assert system_balance("expiry") == expiry_before
    assert ledger_reconcile().ok

    # when: the third period ends, the member holding 80 (then they spend the fourth's
    # 1,000 worth: 80 are left)
    next_period(stripe_sub, period=4, spent=1000)

    # then: this one leaves 20 of its cap; each missed the same reservation, still pending
    assert carried() == [credits(100), credits(70), credits(20)]
    assert set(RolloverCarry.objects.filter(fills=fill).values_list("headroom", flat=True)) == {
        credits(100),
        credits(70),
        credits(20),
    }
    assert organization_balance(organization=buyer).escrowed == credits(400)
    assert system_balance("expiry") == expiry_before
    assert subscription_credits_owned(org) == credits(80)
    assert ledger_reconcile().ok

    # when: the buyer's checkout is abandoned and the reservation released
    assert order_release(order_id=order.pk, status=OrderStatus.EXPIRED, code="checkout_expired")

    # then: of the 400, what passes every cap it missed comes back: 100 past the first,
    # 70 of those past the second, 20 of those past the third; 380 expire on the way
    # and the member holds the cap (their 80 and the 20 back on the listing), no more
    assert carried() == [0, 0, 0]
    assert system_balance("expiry") - expiry_before == credits(380)
    assert organization_listing(organization=org, listing_id=listing.pk).available == credits(20)
    assert subscription_credits_owned(org) == credits(100)
    assert organization_balance(organization=buyer).escrowed == 0
    assert ledger_reconcile().ok

    # when: the release runs again
    rows = ledger_rows()
    assert not order_release(order_id=order.pk, status=OrderStatus.EXPIRED, code="again")

    # then: nothing more moved
    assert ledger_rows() == rows
    assert carried() == [0, 0, 0]


def test_reserved_credits_that_expire_are_not_delivered_and_the_buyer_is_refunded(
    market_stripe, buyer, django_capture_on_commit_callbacks
):
    short = OrganizationFactory()
    subscription_credits(short, credits(100), days=2)
    listing_create(seller=short, quantity=credits(100), price_per_1k=300, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(100), max_price_per_1k=300, currency="usd")
    # when: the payment is applied after the credits expired
    from gymbilling.market.services import order_pay

    intent = market_stripe.pay(order.checkout.stripe_session_id)["payment_intent"]
    with django_capture_on_commit_callbacks(execute=True):
        order_pay(
            order_id=order.pk, payment_intent_id=intent, now=timezone.now() + timedelta(days=3)
        )
    # then: nothing delivered, all refunded, no proceeds
    order.refresh_from_db()
    assert order.shortfall_amount == order.amount_total == 30
    assert organization_balance(organization=buyer).available == 0
    assert market_stripe.refunded(intent) == 30
    assert money("buyer_clearing") == 0


# --- payouts, fees, reversals -----------------------------------------------------------------


def test_payout_after_the_holding_period_by_invoice_credit_or_connect_transfer(
    market_stripe, seller, buyer
):
    # given: 100 credits sold at 12.34 per 1,000 -> 124 (123.4 rounded up), fee 12 (12.4)
    order = sold(market_stripe, seller, buyer)
    assert order.amount_total == 124
    fill = order.fills.get()
    assert (fill.gross, fill.fee) == (124, 12)
    # not before 7 days
    assert payouts_run(now=timezone.now() + timedelta(days=6)) == 0
    assert money("seller_pending", organization=seller) == 112
    # when: after
    assert payouts_run(now=timezone.now() + timedelta(days=8)) == 1
    # then: no Connect account -> a credit on the next invoice
    payout = MarketPayout.objects.get()
    assert (payout.method, payout.amount, payout.status) == (
        PayoutMethod.INVOICE_CREDIT,
        112,
        PayoutStatus.SENT,
    )
    assert [t["amount"] for t in market_stripe.balance_credits(seller)] == [-112]
    assert (
        money("seller_pending", organization=seller)
        == money("seller_available", organization=seller)
        == 0
    )
    assert money("payouts") == 112
    # a second run pays nothing more
    assert payouts_run(now=timezone.now() + timedelta(days=9)) == 0
    # a seller with a Connect account is paid by transfer
    other = market_member(credits_amount=credits(100))
    account = market_stripe.connect_account(other)
    sold(market_stripe, other, buyer, price=500)
    payouts_run(now=timezone.now() + timedelta(days=8))
    assert [t["amount"] for t in market_stripe.transfers(account)] == [45]  # 50 - 5


def test_payout_refused_returns_the_proceeds_to_available_and_stripe_down_retries(
    market_stripe, seller, buyer
):
    # given: the seller's Connect account is one Stripe does not have (closed)
    account = market_stripe.connect_account(seller)
    BillingCustomer.objects.filter(organization=seller).update(
        stripe_connect_account_id="acct_gone"
    )
    sold(market_stripe, seller, buyer)
    later = timezone.now() + timedelta(days=8)
    # Stripe down: the payout is recorded and waits
    market_stripe.down = True
    assert payouts_run(now=later) == 0
    assert MarketPayout.objects.get().status == PayoutStatus.PENDING
    # Stripe back: the transfer to the missing account is refused
    market_stripe.down = False
    assert payouts_run(now=later) == 0
    assert MarketPayout.objects.filter(status=PayoutStatus.FAILED).count() == 1
    # the next run records a new payout; with the account back it works
    BillingCustomer.objects.filter(organization=seller).update(stripe_connect_account_id=account)
    assert payouts_run(now=later) == 1
    assert money("seller_available", organization=seller) == 0
    assert money("payouts") == 112


def _refund_in_full(order) -> bool:
    """The whole 124 charge of `_sold`'s order refunded."""
    return refund(order, 124)


def test_a_refund_while_a_payout_is_pending_then_refused_pays_the_seller_only_what_is_left(
    market_stripe, seller, buyer
):
    # given: a sale (124, fee 12, seller 112) whose payout is recorded while Stripe
    # is down, to a Connect account Stripe no longer has
    account = market_stripe.connect_account(seller)
    BillingCustomer.objects.filter(organization=seller).update(
        stripe_connect_account_id="acct_gone"
    )
    order = sold(market_stripe, seller, buyer)
    later = timezone.now() + timedelta(days=8)
    market_stripe.down = True
    assert payouts_run(now=later) == 0
    assert MarketPayout.objects.get().status == PayoutStatus.PENDING
    # and half the charge is refunded meanwhile: fee share 6, seller share 56,
    # booked as a loss since the fill is being paid out
    market_stripe.down = False
    refund(order, 62)
    assert money("losses") == -56

    # when: Stripe refuses the transfer, then the seller's account is fixed and payouts run again
    assert payouts_run(now=later) == 0
    assert MarketPayout.objects.get().status == PayoutStatus.FAILED
    BillingCustomer.objects.filter(organization=seller).update(stripe_connect_account_id=account)
    assert payouts_run(now=later) == 1

    # then: the seller got gross - fee - the refunded seller share (124 - 12 - 56),
    # the loss was recovered, and every account balances the 62 still charged
    assert [t["amount"] for t in market_stripe.transfers(account)] == [56]
    reversal = MarketReversal.objects.get()
    assert (reversal.fee_reversed, reversal.seller_reversed, reversal.loss) == (6, 56, 0)
    assert money("losses") == 0
    assert money("payouts") == 56
    assert money("platform_fees") == 6
    assert money("buyer_clearing") == -62
    assert money("seller_available", organization=seller) == 0
    # a later run pays nothing more
    assert payouts_run(now=later) == 0


def assert_reversed_in_full(seller, buyer) -> None:
    """`_sold`'s sale undone: fee and proceeds back, no loss, the buyer's credits taken back."""
    reversal = MarketReversal.objects.get()
    assert (reversal.amount, reversal.fee_reversed, reversal.seller_reversed, reversal.loss) == (
        124,
        12,
        112,
        0,
    )
    assert reversal.credits_clawed_back == credits(100)
    assert money("seller_pending", organization=seller) == 0
    assert money("platform_fees") == 0 and money("buyer_clearing") == 0 and money("losses") == 0
    assert organization_balance(organization=buyer).available == 0


def test_refund_before_payout_reverses_proceeds_fee_and_credits(market_stripe, seller, buyer):
    order = sold(market_stripe, seller, buyer)  # 124 paid, fee 12, seller 112
    # when: the whole charge is refunded
    assert _refund_in_full(order)
    # then: everything reversed, no loss, the buyer's credits taken back
    assert_reversed_in_full(seller, buyer)
    assert BillingCustomer.objects.get(organization=buyer).resale_frozen_at is not None
    # replayed event: nothing more
    _refund_in_full(order)
    assert MarketReversal.objects.count() == 1
    # nothing left to pay out
    assert payouts_run(now=timezone.now() + timedelta(days=8)) == 0


def test_a_partial_refund_of_a_three_seller_order_is_split_pro_rata_to_each_fill_s_gross(
    market_stripe, buyer
):
    # given: 300 credits bought from three sellers, 100 from each at $1.00, $1.50 and
    # $2.00: fills of 100, 150 and 200 (fees 10, 15 and 20), $4.50 in all
    sellers = [market_member(credits_amount=credits(100)) for _ in range(3)]
    for seller, price in zip(sellers, (1000, 1500, 2000), strict=True):
        listing_create(seller=seller, quantity=credits(100), price_per_1k=price, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(300), max_price_per_1k=2000, currency="usd")
    market_checkout_handle(order.checkout, paid_session(market_stripe, order))
    fills = list(MarketFill.objects.filter(order=order).order_by("pk"))
    assert [(f.seller_id, f.gross, f.fee) for f in fills] == [
        (sellers[0].pk, 100, 10),
        (sellers[1].pk, 150, 15),
        (sellers[2].pk, 200, 20),
    ]

    # when: $1.00 of the $4.50 is refunded (22.2, 33.3 and 44.4 of it exactly)
    assert refund(order, 100)

    # then: each fill gives back its share, rounded by largest remainder (22, 33, 45:
    # the cent left goes to the largest remainder, .44), adding up to the refund; of
    # each, the platform's fee share (rounded down) and the seller's unpaid proceeds
    parts = [(f.refunded, f.refunded - f.seller_reversed, f.seller_reversed) for f in _fresh(fills)]
    assert parts == [(22, 2, 20), (33, 3, 30), (45, 4, 41)]
    reversal = MarketReversal.objects.get()
    assert (reversal.amount, reversal.fee_reversed, reversal.seller_reversed, reversal.loss) == (
        100,
        9,
        91,
        0,
    )
    # the money ledger books the same, seller by seller, and the sellers read it so
    assert money("buyer_clearing") == -(450 - 100)
    assert money("platform_fees") == 45 - 9
    for seller, refunded, reversed_, earned in zip(
        sellers, (22, 33, 45), (20, 30, 41), (90 - 20, 135 - 30, 180 - 41), strict=True
    ):
        assert money("seller_pending", organization=seller) == earned
        [earnings] = organization_earnings(organization=seller)
        assert (earnings.reversed, earnings.earned, earnings.pending) == (reversed_, earned, earned)
        [sale] = organization_sales(organization=seller)
        assert (sale.refunded, sale.seller_reversed, sale.earned) == (refunded, reversed_, earned)
    # and the buyer's credits of each share come back: 22, 22 and 22.5 of each 100
    assert organization_balance(organization=buyer).available == credits(300) - (
        credits(22) + credits(22) + credits(22) + credits(1) // 2
    )

    # when: the rest is refunded
    assert refund(order, 450)

    # then: every fill is refunded whole, whatever the first refund's rounding
    assert [(f.refunded, f.seller_reversed) for f in _fresh(fills)] == [
        (100, 90),
        (150, 135),
        (200, 180),
    ]
    assert money("platform_fees") == 0 and money("buyer_clearing") == 0
    assert organization_balance(organization=buyer).total == 0


def _fresh(fills: list[MarketFill]) -> list[MarketFill]:
    return [MarketFill.objects.get(pk=f.pk) for f in fills]


def wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


def test_a_partial_refunds_pending_credits_are_taken_from_each_fill_s_own_lots_only(
    market_stripe, buyer
):
    # given: 200 credits bought from two sellers, 100 for $1.00 (expiring first) and
    # 100 for $2.00, and a running job of the buyer holding 100 (found by the review
    # of the pending marketplace reversals)
    cheap, dear = market_member(), market_member()
    subscription_credits(cheap, credits(100), days=10)
    subscription_credits(dear, credits(100), days=30)
    listing_create(seller=cheap, quantity=credits(100), price_per_1k=1000, currency="usd")
    listing_create(seller=dear, quantity=credits(100), price_per_1k=2000, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(200), max_price_per_1k=2000, currency="usd")
    market_checkout_handle(order.checkout, paid_session(market_stripe, order))
    first, second = MarketFill.objects.filter(order=order).order_by("pk")
    assert (first.gross, second.gross) == (100, 200)
    hold_place(organization=buyer, amount=credits(100), key="job-running")

    # when: $1.00 of the $3.00 is refunded (pro rata: 33 of the first fill, 67 of the
    # second, so 33 and 33.5 of their credits), the job then spends its 100 (the first
    # fill's credits, which expire first), and the sweep runs
    assert market_reversal_handle(
        kind="refund",
        key=f"refund:ch_{order.pk}:100",
        charge=charge_for(order, amount_refunded=100),
        amount=100,
        cumulative=True,
    )
    reversal = MarketReversal.objects.get()
    # the second fill's share came back at once; the first's waits for the job
    assert (reversal.credits_clawed_back, reversal.pending_by_fill) == (
        credits(33) + credits(1) // 2,
        {str(first.pk): credits(33)},
    )
    hold_capture(key="job-running", amount=credits(100))
    market_reversals_pending_settle()

    # then: the first fill's share was spent, a loss, not made up from the second
    # fill's credits: of those, the 66.5 paid for and never refunded are the buyer's
    reversal.refresh_from_db()
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (
        credits(33) + credits(1) // 2,
        credits(33),
    )
    assert (reversal.credits_pending, reversal.pending_by_fill) == (0, {})
    assert organization_balance(organization=buyer).available == credits(66) + credits(1) // 2
    assert wallet_claim(buyer) == 0


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_a_refund_waits_for_the_bought_credits_the_buyer_s_running_job_holds(
    market_stripe, seller, buyer, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the placement statement and post() agree
    # given: 100 credits bought, 60 of them held by the buyer's running job
    order = sold(market_stripe, seller, buyer)
    hold_place(organization=buyer, amount=credits(60), key="job-running")

    # when: the whole charge is refunded
    assert _refund_in_full(order)

    # then: the 40 free credits came back, the job's 60 are pending, not lost,
    # and claimed on the buyer's wallet
    reversal = MarketReversal.objects.get()
    assert (reversal.credits_clawed_back, reversal.credits_pending, reversal.credits_lost) == (
        credits(40),
        credits(60),
        0,
    )
    assert wallet_claim(buyer) == credits(60)

    # when: the job uses 20 and gives 40 back
    hold_capture(key="job-running", amount=credits(20))

    # then: before the sweep, no new hold (nor anything else the buyer
    # starts) can take the 40, even with reselling allowed again
    rows = ledger_rows()
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=buyer, amount=credits(40), key="job-after")
    assert (refused.value.code, refused.value.status) == ("insufficient_credits", 402)
    BillingCustomer.objects.filter(organization=buyer).update(resale_frozen_at=None)
    subscription_credits(buyer, credits(10))
    with pytest.raises(ApplicationError) as listed:
        listing_create(seller=buyer, quantity=credits(10), price_per_1k=1000, currency="usd")
    assert listed.value.code == "insufficient_credits"
    assert ledger_rows()[:2] == (rows[0] + 1, rows[1] + 2)  # the 10 credits' grant only
    assert ledger_reconcile().ok

    # when: the sweep runs
    taken = market_reversals_pending_settle()

    # then: the 40 came back, the 20 the job used are lost, nothing is claimed
    reversal.refresh_from_db()
    assert taken == credits(40)
    assert (reversal.credits_clawed_back, reversal.credits_pending, reversal.credits_lost) == (
        credits(80),
        0,
        credits(20),
    )
    assert wallet_claim(buyer) == 0
    assert organization_balance(organization=buyer).total == credits(10)
    assert market_reversals_pending_settle() == 0


def _dispute_the_rest(order) -> bool:
    """The 62 of `_sold`'s 124 that the first 62 refunded left, disputed (dp_1)."""
    return market_reversal_handle(
        kind="dispute",
        key="dispute:dp_1",
        charge=charge_for(order, amount_refunded=62),
        amount=62,
        cumulative=False,
    )


def taken_pending_lost(reversal: MarketReversal) -> tuple[int, int, int]:
    reversal.refresh_from_db()
    return (reversal.credits_clawed_back, reversal.credits_pending, reversal.credits_lost)


def half_refunded_while_a_job_holds_the_rest(market_stripe, seller, buyer) -> MarketOrder:
    """100 credits bought (124), 40 of them spent and the other 60 held by the buyer's
    running job ("job-running"); then half the charge refunded: its 50 credits wait."""
    from metering.services import credits_adjust

    order = sold(market_stripe, seller, buyer)
    credits_adjust(organization=buyer, amount=-credits(40), reason="spent", key="spend-40")
    hold_place(organization=buyer, amount=credits(60), key="job-running")
    refund(order, 62)
    assert taken_pending_lost(MarketReversal.objects.get()) == (0, credits(50), 0)
    return order


@pytest.mark.parametrize("second", ["refund", "dispute"])
def test_two_reversals_of_an_order_claim_no_more_than_the_buyer_s_job_holds_of_it(
    market_stripe, seller, buyer, second
):
    # given: half of a 100-credit purchase refunded while the buyer's job holds the 60
    # left of it (40 spent): 50 pending, claimed; and 30 credits of the buyer's own
    from metering.services import hold_release

    order = half_refunded_while_a_job_holds_the_rest(market_stripe, seller, buyer)
    first = MarketReversal.objects.get()
    subscription_credits(buyer, credits(30))

    # when: the other half is refunded too, or disputed, while the job still runs
    if second == "refund":
        _refund_in_full(order)
    else:
        _dispute_the_rest(order)

    # then: of its 50, only the 10 the job holds beyond the first's 50 can come back,
    # 40 are lost (the spent 40), and the buyer's wallet claims the job's 60, no more
    later = MarketReversal.objects.exclude(pk=first.pk).get()
    assert taken_pending_lost(later) == (0, credits(10), credits(40))
    assert later.pending_by_fill == {str(order.fills.get().pk): credits(10)}
    assert wallet_claim(buyer) == credits(60)
    assert ledger_reconcile().ok

    # when: the job ends without using them: the buyer's own 30 are available at once
    hold_release(key="job-running")
    balance = organization_balance(organization=buyer)
    assert (balance.set_aside, balance.available) == (credits(60), credits(30))

    # when: the sweep runs
    assert market_reversals_pending_settle() == credits(60)

    # then: the job's 60 came back, the spent 40 are lost, nothing is claimed
    assert taken_pending_lost(first) == (credits(50), 0, 0)
    assert taken_pending_lost(later) == (credits(10), 0, credits(40))
    assert wallet_claim(buyer) == 0
    assert organization_balance(organization=buyer).total == credits(30)


def test_a_second_order_reversal_after_the_job_gave_back_does_not_leave_the_first_waiting(
    market_stripe, seller, buyer
):
    # given: half of a 100-credit purchase refunded while the buyer's job held the 60
    # left of it (50 pending, claimed); then the job gave all back, before the sweep ran
    from metering.services import hold_release

    order = half_refunded_while_a_job_holds_the_rest(market_stripe, seller, buyer)
    hold_release(key="job-running")

    # when: the rest is refunded
    _refund_in_full(order)

    # then: the first refund took its 50 back on the way, the second the last 10; the
    # spent 40 are lost, nothing waits, nothing is claimed
    first, later = MarketReversal.objects.order_by("pk")
    assert taken_pending_lost(first) == (credits(50), 0, 0)
    assert taken_pending_lost(later) == (credits(10), 0, credits(40))
    assert wallet_claim(buyer) == 0
    assert organization_balance(organization=buyer).total == 0
    assert market_reversals_pending_settle() == 0


def test_claims_repair_marks_the_bought_lots_a_marketplace_refund_waits_on(
    market_stripe, seller, buyer
):
    # given: half of a 100-credit purchase refunded while the buyer's job holds the 60
    # left of it (50 pending); then, as old code left it, no claim and no lot marked
    from gymbilling.reconcile import wallet_claims_repair

    order = half_refunded_while_a_job_holds_the_rest(market_stripe, seller, buyer)
    reversal = MarketReversal.objects.get()
    bought = CreditLot.objects.filter(
        created_by_id=order.fills.get().settle_transaction_id, account__kind="wallet"
    )
    LedgerAccount.objects.filter(organization=buyer, kind="wallet").update(claimed=0)
    bought.update(claimed_at=None)

    # when: the repair runs
    repaired = wallet_claims_repair()

    # then: the claim is the reversal's 50 again, and the bought lot is marked with the
    # refund's time, as the refund's own claim marked it
    assert repaired == [{"organization_id": buyer.pk, "before": 0, "after": credits(50)}]
    assert wallet_claim(buyer) == credits(50)
    assert [lot.claimed_at for lot in bought] == [reversal.created_at]


def test_a_refund_processed_before_the_order_s_payment_reverses_the_sale(
    market_stripe, seller, buyer
):
    # given: an order paid at Stripe (124, fee 12), then refunded in full there,
    # before its checkout.session.completed was processed
    listing_create(seller=seller, quantity=100 * MICRO, price_per_1k=1234, currency="usd")
    order = order_create(buyer=buyer, quantity=100 * MICRO, max_price_per_1k=1234, currency="usd")
    intent = paid_session(market_stripe, order)["payment_intent"]
    stripe_client.refund_create(key=f"test-refund:{order.pk}", payment_intent=intent)

    # when: the refund's event is processed first (no order has the payment yet), then the checkout's
    assert (
        charge_refund_refresh(charge_id=stripe_client.payment_intent_charge(intent)["id"]) is False
    )
    assert checkout_session_refresh(session_id=order.checkout.stripe_session_id)

    # then: the order was delivered, then reversed whole, and the seller is paid nothing for it
    order.refresh_from_db()
    assert order.status == OrderStatus.PAID
    assert_reversed_in_full(seller, buyer)
    assert payouts_run(now=timezone.now() + timedelta(days=8)) == 0


def test_a_refunded_buyer_s_own_listings_end_with_the_resale_freeze(market_stripe, seller):
    # given: a buyer who also sells credits of their own, with a listing open
    buyer = market_member(credits_amount=credits(500))
    own = listing_create(seller=buyer, quantity=200 * MICRO, price_per_1k=5000, currency="usd")
    order = sold(market_stripe, seller, buyer)

    # when: the buyer's marketplace payment is refunded
    assert _refund_in_full(order)

    # then: reselling is frozen and the open listing ended, its credits home
    assert BillingCustomer.objects.get(organization=buyer).resale_frozen_at is not None
    own.refresh_from_db()
    assert own.status != ListingStatus.OPEN
    assert organization_balance(organization=buyer).escrowed == 0
    assert organization_balance(organization=buyer).available == credits(500)


def test_a_refund_delivered_again_after_a_crash_still_ends_the_frozen_buyer_s_listings(
    market_stripe, seller
):
    # given: a buyer with a listing of their own open; the refund of their payment was
    # applied (the reversal booked, reselling frozen, committed), then the worker died
    # before it ended the buyer's listings
    from gymbilling.market.services import _reversal_apply

    buyer = market_member(credits_amount=credits(500))
    own = listing_create(seller=buyer, quantity=200 * MICRO, price_per_1k=5000, currency="usd")
    order = sold(market_stripe, seller, buyer)
    assert _reversal_apply(
        order_id=order.pk,
        kind="refund",
        key=f"refund:ch_{order.pk}:124",
        charge=charge_for(order, amount_refunded=124),
        amount=124,
        cumulative=True,
    )
    assert MarketListing.objects.get(pk=own.pk).status == ListingStatus.OPEN

    # when: Stripe delivers the event again
    assert _refund_in_full(order)

    # then: applied once, and the frozen buyer's listing ended, its credits home
    assert MarketReversal.objects.count() == 1
    assert MarketListing.objects.get(pk=own.pk).status == ListingStatus.CANCELED
    assert organization_balance(organization=buyer).escrowed == 0
    assert organization_balance(organization=buyer).available == credits(500)


def test_partial_refund_then_dispute_after_payout_records_the_loss(market_stripe, seller, buyer):
    order = sold(market_stripe, seller, buyer)  # 124, fee 12, net 112
    # the buyer spends 30 credits
    from metering.services import credits_adjust

    credits_adjust(organization=buyer, amount=-credits(30), reason="spent", key="spend-30")
    # given: a partial refund of 62 before payout
    refund(order, 62)
    first = MarketReversal.objects.get()
    assert (first.fee_reversed, first.seller_reversed, first.loss) == (6, 56, 0)
    assert first.credits_clawed_back == credits(50)
    # payout of what remains: 112 - 56
    payouts_run(now=timezone.now() + timedelta(days=8))
    assert MarketPayout.objects.get().amount == 56
    # when: the rest is disputed after payout
    _dispute_the_rest(order)
    # then: the fee share comes back, the seller's paid-out share is a loss, credits: 20 left
    second = MarketReversal.objects.get(key="dispute:dp_1")
    assert (second.fee_reversed, second.seller_reversed, second.loss) == (6, 0, 56)
    assert (second.credits_clawed_back, second.credits_lost) == (credits(20), credits(30))
    assert money("losses") == -56
    assert money("buyer_clearing") == 0  # all 124 went back to the buyer
    assert money("platform_fees") == 0
    assert money("payouts") == 56


def _market_reversals_today(buyer) -> dict:
    """Finance's revenue report row of the buyer's marketplace refunds and disputes today."""
    start, end = timezone.now() - timedelta(days=1), timezone.now() + timedelta(days=1)
    [row] = [r for r in reversals_by_customer(start=start, end=end) if r["customer"] == buyer.slug]
    return {key: row[key] for key in ("market_reversed", "market_unapplied")}


def test_a_dispute_of_money_already_refunded_records_what_it_took_of_the_sale_and_the_rest(
    market_stripe, seller, buyer, deliver, caplog
):
    # given: a sale (124: fee 12, the seller's 112), half refunded at Stripe (62: the
    # fee's 6 and the seller's 56 taken back)
    order = sold(market_stripe, seller, buyer)
    deliver()
    stripe_client.refund_create(
        key=f"half:{order.pk}", payment_intent=order.stripe_payment_intent_id, amount=62
    )
    deliver()

    # when: the buyer disputes the whole charge, the half refunded included
    caplog.set_level(logging.ERROR, logger="gymbilling.market.services")
    dispute_at_stripe(market_stripe, order)
    deliver()

    # then: the dispute records the 62 it took of the sale, as the ledger moved them;
    # the other 62 (refunded before) beside them, moved nowhere, and logged for finance
    dispute = MarketReversal.objects.get(kind="dispute")
    assert (dispute.amount, dispute.unapplied) == (62, 62)
    assert (dispute.fee_reversed, dispute.seller_reversed, dispute.loss) == (6, 56, 0)
    assert (money("buyer_clearing"), money("platform_fees"), money("losses")) == (0, 0, 0)
    assert money("seller_pending", organization=seller) == 0
    assert any(
        f"market order {order.pk}: dispute" in r.getMessage() and "returned 62 more" in r.message
        for r in caplog.records
    )
    # and finance's report: the 124 the sale gave back, and the 62 beyond it
    assert _market_reversals_today(buyer) == {"market_reversed": 124, "market_unapplied": 62}


def test_a_refund_by_hand_of_an_unrefunded_shortfall_is_recorded_beyond_the_sale(
    market_stripe, unrefunded_shortfall, buyer, deliver
):
    # given: an order that delivered nothing of the 30 paid, its shortfall refund not made
    order, intent = unrefunded_shortfall

    # when: finance refunds the whole charge by hand, in Stripe's dashboard
    stripe_client.refund_create(key=f"dashboard:{order.pk}", payment_intent=intent)
    deliver()

    # then: no sale to take back and none taken; the 30 returned are on the record,
    # beyond the sale, and the buyer (who did nothing) may still resell
    reversal = MarketReversal.objects.get()
    assert (reversal.amount, reversal.unapplied) == (0, 30)
    assert (reversal.fee_reversed, reversal.seller_reversed, reversal.loss) == (0, 0, 0)
    assert money("buyer_clearing") == 0
    assert not BillingCustomer.objects.filter(
        organization=buyer, resale_frozen_at__isnull=False
    ).exists()
    assert _market_reversals_today(buyer) == {"market_reversed": 0, "market_unapplied": 30}
