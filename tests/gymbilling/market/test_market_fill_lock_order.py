"""One lock order across a whole multi-fill marketplace transaction (gymbilling.market.services):
ledger accounts in primary-key order, then money accounts in primary-key order, whatever
order the fills come in. Each posting (metering's `post`, `money_post`) only orders the
accounts of its own fill; a transaction that posts fill by fill, with the fills' sellers'
accounts in descending order, locked them in descending order, and two such transactions
deadlocked (tests/gymbilling/market/test_market_race.py has the races themselves).

Here: an order whose first fill's seller has the higher account ids, and the row locks
each service takes, read from the SQL it sends (row locks and balance updates of
`metering_ledgeraccount` and `gymbilling_moneyaccount`, in the order first taken)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from gymbilling.market.money import money_account
from gymbilling.market.services import (
    listing_create,
    market_reinstatement_handle,
    order_pay,
    order_release,
    order_reserve,
)
from gymbilling.models import (
    MarketFill,
    MarketOrder,
    MarketReversal,
    MoneyAccountKind,
    OrderStatus,
)
from metering.models import AccountKind
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services.ledger import organization_account
from metering.services.postings import accounts_for
from tests.factories import OrganizationFactory
from tests.gymbilling.market.conftest import money, refund, subscription_credits
from tests.helpers import credits

LEDGER, MONEY = "metering_ledgeraccount", "gymbilling_moneyaccount"
_TABLES = f"{LEDGER}|{MONEY}"
_UPDATE = re.compile(rf'^\s*UPDATE\s+"?({_TABLES})"?\s', re.I)
_SELECT_LOCKING = re.compile(
    rf'\bFROM\s+"?({_TABLES})"?\s.*\bFOR\s+(NO\s+KEY\s+)?UPDATE\b', re.I | re.S
)
_IDS = re.compile(r'(?:"?\w+"?\.)?"?id"?\s*(?:=\s*(\d+)|IN\s*\(([\d,\s]+)\))', re.I)


def first_locks(queries) -> list[tuple[str, int]]:
    """(table, id) of every ledger or money account row the queries locked, in the order
    each was first locked. One statement locking several rows (`ORDER BY id`) takes them
    in primary-key order."""
    seen: list[tuple[str, int]] = []
    for query in queries:
        sql = query["sql"]
        match = _UPDATE.match(sql) or _SELECT_LOCKING.search(sql)
        if match is None:
            continue
        where = sql[sql.upper().index(" WHERE ") :]
        ids: set[int] = set()
        for one, many in _IDS.findall(where):
            ids.update([int(one)] if one else (int(each) for each in many.split(",")))
        assert ids, f"a lock of {match.group(1)} without an id this test can read: {sql}"
        for pk in sorted(ids):
            if (match.group(1), pk) not in seen:
                seen.append((match.group(1), pk))
    return seen


def assert_locked_in_order(queries, *accounts: tuple[str, int]) -> None:
    """The queries locked `accounts` and no other, in the module's order: ledger accounts
    (primary key), then money accounts (primary key)."""
    locks = first_locks(queries)
    assert set(locks) == set(accounts), locks
    rank = {LEDGER: 0, MONEY: 1}
    assert locks == sorted(locks, key=lambda lock: (rank[lock[0]], lock[1])), locks


@dataclass
class Market:
    high: object  # the first fill's seller: the higher account ids
    low: object
    buyer: object

    def ledger(self, org, kind: str) -> tuple[str, int]:
        return (LEDGER, organization_account(org, kind).pk)

    def pending(self, org) -> tuple[str, int]:
        account = money_account(
            kind=MoneyAccountKind.SELLER_PENDING, currency="usd", organization=org
        )
        return (MONEY, account.pk)


def proceeds_pending(market: Market) -> tuple[int, int]:
    """The sellers' pending proceeds, `high`'s and `low`'s."""
    return tuple(money("seller_pending", organization=org) for org in (market.high, market.low))


@pytest.fixture
def market(db) -> Market:
    """100 credits listed at 300 by `high`, 100 at 400 by `low`: an order of 200 fills
    `high` first. `low`'s ledger and money accounts were opened before `high`'s."""
    low = OrganizationFactory()
    subscription_credits(low, credits(1000))
    high = OrganizationFactory()
    subscription_credits(high, credits(1000))
    buyer = OrganizationFactory()
    accounts_for(buyer)
    for org in (low, high):
        money_account(kind=MoneyAccountKind.SELLER_PENDING, currency="usd", organization=org)
    listing_create(seller=high, quantity=credits(100), price_per_1k=300, currency="usd")
    listing_create(seller=low, quantity=credits(100), price_per_1k=400, currency="usd")
    market = Market(high=high, low=low, buyer=buyer)
    assert market.ledger(high, AccountKind.ESCROW) > market.ledger(low, AccountKind.ESCROW)
    assert market.pending(high) > market.pending(low)
    return market


def reserved(market: Market) -> MarketOrder:
    order = order_reserve(
        buyer=market.buyer, quantity=credits(200), max_price_per_1k=400, currency="usd"
    )
    fills = list(MarketFill.objects.filter(order=order).order_by("pk"))
    assert [fill.seller_id for fill in fills] == [market.high.pk, market.low.pk]
    return order


def paid(market: Market) -> MarketOrder:
    order = reserved(market)
    return order_pay(order_id=order.pk, payment_intent_id=f"pi_{order.pk}")


def test_reserving_locks_every_seller_s_escrow_in_primary_key_order(market):
    # when
    with CaptureQueriesContext(connection) as queries:
        order = reserved(market)

    # then: the buyer's and both sellers' escrow accounts, in primary-key order, though
    # the first fill is the higher one's
    assert_locked_in_order(
        queries,
        market.ledger(market.buyer, AccountKind.ESCROW),
        market.ledger(market.high, AccountKind.ESCROW),
        market.ledger(market.low, AccountKind.ESCROW),
    )
    assert order.quantity == credits(200)
    assert organization_balance(organization=market.buyer).total == 0
    assert ledger_reconcile().ok


def test_releasing_locks_every_seller_s_escrow_in_primary_key_order(market):
    # given
    order = reserved(market)

    # when
    with CaptureQueriesContext(connection) as queries:
        assert order_release(order_id=order.pk, status=OrderStatus.FAILED, code="test")

    # then: the credits went back to both listings, the accounts locked in primary-key order
    assert_locked_in_order(
        queries,
        market.ledger(market.buyer, AccountKind.ESCROW),
        market.ledger(market.high, AccountKind.ESCROW),
        market.ledger(market.low, AccountKind.ESCROW),
    )
    for seller in (market.high, market.low):
        assert organization_account(seller, AccountKind.ESCROW).balance == credits(100)
    assert organization_account(market.buyer, AccountKind.ESCROW).balance == 0
    assert ledger_reconcile().ok


def test_paying_locks_the_buyer_s_accounts_then_every_seller_s_money_in_primary_key_order(
    market,
):
    # given
    order = reserved(market)

    # when
    with CaptureQueriesContext(connection) as queries:
        order_pay(order_id=order.pk, payment_intent_id="pi_order")

    # then: the buyer's escrow and wallet and the open listings' sellers' escrow (closing
    # a listing sweeps it), then both sellers' pending proceeds, each in primary-key
    # order, though the first fill is the higher one's
    assert_locked_in_order(
        queries,
        market.ledger(market.buyer, AccountKind.ESCROW),
        market.ledger(market.buyer, AccountKind.WALLET),
        market.ledger(market.high, AccountKind.ESCROW),
        market.ledger(market.low, AccountKind.ESCROW),
        market.pending(market.high),
        market.pending(market.low),
    )
    assert organization_balance(organization=market.buyer).total == credits(200)
    # 30 and 40 for 100 credits each, less the 10% fee
    assert proceeds_pending(market) == (27, 36)
    assert ledger_reconcile().ok


def test_a_refund_locks_the_buyer_s_wallet_then_every_seller_s_money_in_primary_key_order(
    market,
):
    # given: the order paid (70)
    order = paid(market)

    # when: refunded in full
    with CaptureQueriesContext(connection) as queries:
        assert refund(order, 70)

    # then: the buyer's wallet (the credits clawed back), then both sellers' pending
    # proceeds in primary-key order, not one seller's money before the wallet
    assert_locked_in_order(
        queries,
        market.ledger(market.buyer, AccountKind.WALLET),
        market.pending(market.high),
        market.pending(market.low),
    )
    assert organization_balance(organization=market.buyer).total == 0
    assert proceeds_pending(market) == (0, 0)
    assert ledger_reconcile().ok


def test_a_refund_undone_locks_every_seller_s_money_in_primary_key_order(market):
    # given: the order paid (70), then refunded in full
    order = paid(market)
    assert refund(order, 70)
    reversal = MarketReversal.objects.get()

    # when: the refund fails (the money came back)
    with CaptureQueriesContext(connection) as queries:
        assert market_reinstatement_handle(key=reversal.key)

    # then: the buyer's wallet (its credits back), then both sellers' pending proceeds
    # in primary-key order
    assert_locked_in_order(
        queries,
        market.ledger(market.buyer, AccountKind.WALLET),
        market.pending(market.high),
        market.pending(market.low),
    )
    assert organization_balance(organization=market.buyer).total == credits(200)
    assert proceeds_pending(market) == (27, 36)
    assert ledger_reconcile().ok
