"""Every write of billing. Import services from here."""

from gymbilling.services.catalog import catalog_sync, stripe_prices_retired_archive
from gymbilling.services.checkout import (
    checkout_create,
    portal_create,
    subscription_change,
    subscription_downgrade_restore,
    subscriptions_downgrade_restore,
)
from gymbilling.services.customers import (
    billing_customer_call,
    billing_customer_connect_account_set,
    billing_customer_ensure,
)
from gymbilling.services.events import (
    checkout_handler_register,
    reinstatement_handler_register,
    reversal_handler_register,
    stripe_event_process,
    stripe_event_record,
    stripe_events_retry,
)
from gymbilling.services.overage import overage_report
from gymbilling.services.payments import (
    payment_reversal_apply,
    payment_reversal_reinstate,
    payment_reversals_pending_settle,
    resale_freeze,
    resale_unfreeze,
)
from gymbilling.services.subscriptions import (
    subscription_sync,
    subscriptions_last_period_cap,
    subscriptions_suspend_overdue,
)

__all__ = [
    "billing_customer_call",
    "billing_customer_connect_account_set",
    "billing_customer_ensure",
    "catalog_sync",
    "checkout_create",
    "checkout_handler_register",
    "overage_report",
    "payment_reversal_apply",
    "payment_reversal_reinstate",
    "payment_reversals_pending_settle",
    "portal_create",
    "reinstatement_handler_register",
    "resale_freeze",
    "resale_unfreeze",
    "reversal_handler_register",
    "stripe_event_process",
    "stripe_event_record",
    "stripe_events_retry",
    "stripe_prices_retired_archive",
    "subscription_change",
    "subscription_downgrade_restore",
    "subscription_sync",
    "subscriptions_downgrade_restore",
    "subscriptions_last_period_cap",
    "subscriptions_suspend_overdue",
]
