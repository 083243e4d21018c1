"""A local Stripe stand-in for tests and `make demo`: localstripe plus what it lacks.

DEVELOPMENT AND TEST TOOL ONLY. Nothing in production imports this package; the
settings point the Stripe client at api.stripe.com unless a developer points it here.

What it is: an aiohttp server that runs localstripe (PyPI `localstripe`, GPL) for
customers, payment methods, products, payment intents, charges and refunds, and
adds, in the new API shape that the `stripe` SDK's pinned version reads
(`stripe.api_version`):

- Prices (`/v1/prices`), with lookup keys and metered prices tied to a meter.
- Subscriptions and invoices of our own (localstripe's derive the period from the
  start date and cannot move it): items with a full `price`, per-item periods,
  `billing_reason`, `parent.subscription_details`, prorations with
  `proration_behavior`, past_due and recovery through `invoices.pay`.
- Checkout Sessions with a local payment page, the billing portal page,
  billing meters and meter events, Connect accounts and transfers, customer
  balance transactions, disputes, refund events, refunds that fail later (the
  charge stops counting them), customers deleted as Stripe deletes them
  (their subscriptions ended; retrieved, `deleted: true`), the customer balance
  applied to invoices as they are finalized.
- Stripe's refusals of a currency mixed into a subscription or a customer's live
  subscriptions (subscriptions.py): each subscription in one currency for life.
- Idempotency-Key replay on every `POST /v1/...`, Stripe-shaped errors.
- Signed webhooks delivered in creation order, retried with backoff.
- A test clock of sorts: `POST /_config/subscriptions/<id>/advance` ends the
  current period (see `control.py` for every `/_config` endpoint).

What it is not: tax, coupons and discounts, trials, 3-D Secure, a customer's
currency bound by its invoice items and balance (only its live subscriptions bind it
here), Connect fees,
payouts, real test clocks, `Customer.search`, rate limits, API versions other than
the pinned one. Amounts are integers in minor units throughout.
"""
