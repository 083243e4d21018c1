"""The marketplace's invariants, checked by `ledger_reconcile` (and after every test).

Registered from gymbilling.apps, next to billing's checks.
"""

from __future__ import annotations

from metering.reconcile import register, sql_rows

CHECKS = [
    (
        "market_money_balanced",
        "entries of every money transaction sum to zero, and there are at least two",
        """
        SELECT t.id, t.idempotency_key, COALESCE(SUM(e.amount), 0) AS total, COUNT(e.id) AS entries
          FROM gymbilling_moneytransaction t
          LEFT JOIN gymbilling_moneyentry e ON e.transaction_id = t.id
         GROUP BY t.id, t.idempotency_key
        HAVING COALESCE(SUM(e.amount), 0) <> 0 OR COUNT(e.id) < 2
        """,
    ),
    (
        "market_money_cached_balance",
        "each seller proceeds account's balance equals the sum of its entries, in its currency",
        """
        SELECT a.id, a.kind, a.organization_id, a.balance, COALESCE(SUM(e.amount), 0) AS entries
          FROM gymbilling_moneyaccount a
          LEFT JOIN gymbilling_moneyentry e ON e.account_id = a.id
          LEFT JOIN gymbilling_moneytransaction t ON t.id = e.transaction_id
         WHERE a.organization_id IS NOT NULL
         GROUP BY a.id, a.kind, a.organization_id, a.balance
        HAVING a.balance <> COALESCE(SUM(e.amount), 0)
            OR a.balance < 0
            OR BOOL_OR(t.currency <> a.currency)
        """,
    ),
    (
        "market_proceeds_match_fills",
        "a seller's pending and available proceeds equal their fills' unpaid shares",
        """
        SELECT a.id, a.kind, a.organization_id, a.currency, a.balance, COALESCE(f.owed, 0) AS owed
          FROM gymbilling_moneyaccount a
          LEFT JOIN (SELECT seller_id, currency, proceeds,
                            SUM(gross - fee - seller_reversed - earlier_payouts) AS owed
                       FROM gymbilling_marketfill
                      WHERE proceeds IN ('pending', 'available')
                      GROUP BY seller_id, currency, proceeds) f
            ON f.seller_id = a.organization_id AND f.currency = a.currency
           AND f.proceeds = CASE a.kind WHEN 'seller_pending' THEN 'pending' ELSE 'available' END
         WHERE a.organization_id IS NOT NULL AND a.balance <> COALESCE(f.owed, 0)
        UNION ALL
        SELECT NULL, 'missing_account', f.seller_id, f.currency, 0, SUM(f.gross - f.fee - f.seller_reversed - f.earlier_payouts)
          FROM gymbilling_marketfill f
         WHERE f.proceeds IN ('pending', 'available')
           AND NOT EXISTS (SELECT 1 FROM gymbilling_moneyaccount a
                            WHERE a.organization_id = f.seller_id AND a.currency = f.currency
                              AND a.kind = 'seller_' || f.proceeds)
         GROUP BY f.seller_id, f.currency
        HAVING SUM(f.gross - f.fee - f.seller_reversed - f.earlier_payouts) <> 0
        """,
    ),
    (
        "market_fill_booked_once",
        "each paid fill has exactly one sale (its gross) and one fee (its fee) transaction",
        """
        SELECT f.id, f.gross, f.fee, s.amount AS sale, c.amount AS fee_booked
          FROM gymbilling_marketfill f
          LEFT JOIN (SELECT t.fill_id, SUM(e.amount) AS amount, COUNT(DISTINCT t.id) AS n
                       FROM gymbilling_moneytransaction t
                       JOIN gymbilling_moneyentry e ON e.transaction_id = t.id
                       JOIN gymbilling_moneyaccount a ON a.id = e.account_id
                      WHERE t.kind = 'sale' AND a.kind = 'seller_pending'
                      GROUP BY t.fill_id) s ON s.fill_id = f.id
          LEFT JOIN (SELECT t.fill_id, SUM(e.amount) AS amount
                       FROM gymbilling_moneytransaction t
                       JOIN gymbilling_moneyentry e ON e.transaction_id = t.id
                       JOIN gymbilling_moneyaccount a ON a.id = e.account_id
                      WHERE t.kind = 'fee' AND a.kind = 'platform_fees'
                      GROUP BY t.fill_id) c ON c.fill_id = f.id
         WHERE COALESCE(s.amount, 0) <> f.gross OR COALESCE(s.n, 0) > 1
            OR COALESCE(c.amount, 0) <> f.fee
        """,
    ),
    (
        "market_fill_one_transfer",
        "each delivered fill moved exactly its delivered credits to the buyer's wallet, once",
        """
        SELECT f.id, f.status, f.delivered_quantity, COALESCE(d.amount, 0) AS moved
          FROM gymbilling_marketfill f
          JOIN gymbilling_marketorder o ON o.id = f.order_id
          LEFT JOIN (SELECT e.transaction_id, a.organization_id, SUM(e.amount) AS amount
                       FROM metering_ledgerentry e
                       JOIN metering_ledgeraccount a ON a.id = e.account_id
                      WHERE a.kind = 'wallet'
                      GROUP BY e.transaction_id, a.organization_id) d
            ON d.transaction_id = f.settle_transaction_id AND d.organization_id = o.buyer_id
         WHERE (f.status = 'delivered' AND COALESCE(d.amount, 0) <> f.delivered_quantity)
            OR (f.status = 'reserved' AND f.settle_transaction_id IS NOT NULL)
            OR (f.status <> 'delivered' AND f.delivered_quantity <> 0)
        """,
    ),
    (
        "market_listing_sold",
        "a listing's sold quantity is what its fills delivered",
        """
        SELECT l.id, l.sold, COALESCE(SUM(f.delivered_quantity), 0) AS delivered
          FROM gymbilling_marketlisting l
          LEFT JOIN gymbilling_marketfill f ON f.listing_id = l.id
         GROUP BY l.id, l.sold
        HAVING l.sold <> COALESCE(SUM(f.delivered_quantity), 0)
        """,
    ),
    (
        "market_escrow_attributed",
        "every escrowed credit backs an open listing or a pending order's reservation",
        """
        SELECT c.id AS lot_id, c.organization_id, c.remaining
          FROM metering_creditlot c
          JOIN metering_ledgeraccount a ON a.id = c.account_id AND a.kind = 'escrow'
          LEFT JOIN gymbilling_listinglot ll ON ll.lot_id = c.id
          LEFT JOIN gymbilling_marketlisting l ON l.id = ll.listing_id
          LEFT JOIN gymbilling_marketfill f
            ON f.reserve_transaction_id = c.created_by_id AND f.status = 'reserved'
         WHERE c.remaining > 0
           AND NOT (l.status = 'open' AND l.seller_id = c.organization_id)
           AND f.id IS NULL
        """,
    ),
    (
        "market_order_total",
        "an order's total is the sum of its fills' amounts",
        """
        SELECT o.id, o.amount_total, SUM(f.amount) AS fills, o.quantity, SUM(f.quantity) AS qty
          FROM gymbilling_marketorder o
          JOIN gymbilling_marketfill f ON f.order_id = o.id
         GROUP BY o.id, o.amount_total, o.quantity
        HAVING o.amount_total <> SUM(f.amount) OR o.quantity <> SUM(f.quantity)
        """,
    ),
    (
        "market_reversal_amount",
        "a refund or dispute's amount is what the money ledger took back under it",
        # Its own transactions, reversal:<key>:<fill> of its order's fills: their
        # buyer-clearing postings are what went back to the buyer (the fee, the seller's
        # share and the loss add up to them). A won dispute or failed refund leaves them:
        # its reinstatement:<key>:<fill> transactions undo the money apart. What was
        # returned beyond the sale is `unapplied`, in no account. Rows written before
        # gymbilling/0022 held both in amount until gymbilling/0023.
        """
        SELECT r.id, r.key, r.amount, r.unapplied, COALESCE(m.moved, 0) AS moved
          FROM gymbilling_marketreversal r
          LEFT JOIN (SELECT r2.id, SUM(e.amount) AS moved
                       FROM gymbilling_marketreversal r2
                       JOIN gymbilling_marketfill f ON f.order_id = r2.order_id
                       JOIN gymbilling_moneytransaction t
                         ON t.idempotency_key = 'reversal:' || r2.key || ':' || f.id::text
                       JOIN gymbilling_moneyentry e ON e.transaction_id = t.id
                       JOIN gymbilling_moneyaccount a ON a.id = e.account_id
                      WHERE t.kind = 'reversal' AND a.kind = 'buyer_clearing'
                      GROUP BY r2.id) m ON m.id = r.id
         WHERE r.amount <> COALESCE(m.moved, 0)
        """,
    ),
]


def market_ledger_checks() -> None:
    for name, description, sql in CHECKS:
        register(name, description, lambda sql=sql: sql_rows(sql))
