"""Money in: plans, packs, Stripe customers, subscriptions, invoices, webhook
events (billing.py); the credit marketplace (market.py)."""

from gymbilling.models.billing import (  # noqa: F401
    BillingCustomer,
    CheckoutKind,
    CheckoutSession,
    CheckoutStatus,
    CreditPack,
    EventStatus,
    Invoice,
    OverageReport,
    PaymentReversal,
    Plan,
    PriceKind,
    StripeEvent,
    StripePrice,
    Subscription,
)
