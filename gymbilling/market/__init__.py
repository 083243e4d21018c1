"""The credit marketplace (DESIGN.md "Money in", issue 6).

- `rules`: the money arithmetic (price x quantity, platform fee), in one place.
- `escrow`: credit movements between wallets and escrow, lot by lot.
- `money`: the double-entry ledger of sellers' proceeds.
- `services`: listings, orders, payment, release, expiry, payouts, reversals.
- `selectors`: the order book, the caller's own listings and orders, and a seller's
  sales, earnings and payouts.
"""
