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
from gymbilling.models.market import (  # noqa: F401
    SELLER_KINDS,
    FillStatus,
    ListingLot,
    ListingStatus,
    MarketFill,
    MarketListing,
    MarketOrder,
    MarketPayout,
    MarketReversal,
    MoneyAccount,
    MoneyAccountKind,
    MoneyEntry,
    MoneyTransaction,
    MoneyTransactionKind,
    OrderStatus,
    PayoutMethod,
    PayoutStatus,
    ProceedsState,
)
