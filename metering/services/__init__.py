"""Every write to the credit ledger. Import services from here."""

from metering.services.holds import hold_capture, hold_place, hold_release, holds_expire
from metering.services.ledger import (
    claim_drop,
    claim_reset,
    claim_settle,
    clawbacks_reverse,
    clawbacks_under,
    credits_adjust,
    credits_claim,
    credits_grant,
    credits_transfer,
    credits_trim,
    lot_clawback,
    lots_expire_now,
    lots_trim,
    transaction_reverse,
)
from metering.services.lots import LotSale, credits_expire
from metering.services.pricing import (
    Rates,
    Usage,
    credits_for_usage,
    credits_worst_case,
    price_book_publish,
    round_charge,
)
from metering.services.usage import usage_record_create

__all__ = [
    "LotSale",
    "Rates",
    "Usage",
    "claim_drop",
    "claim_reset",
    "claim_settle",
    "clawbacks_reverse",
    "clawbacks_under",
    "credits_adjust",
    "credits_claim",
    "credits_expire",
    "credits_for_usage",
    "credits_grant",
    "credits_transfer",
    "credits_trim",
    "credits_worst_case",
    "hold_capture",
    "hold_place",
    "hold_release",
    "holds_expire",
    "lot_clawback",
    "lots_expire_now",
    "lots_trim",
    "price_book_publish",
    "round_charge",
    "transaction_reverse",
    "usage_record_create",
]
