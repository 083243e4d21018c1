"""Lots granted before lots said what they were sold for (metering/0016) say it now.

The grants name their business event in their journal transaction's key, so
each granted lot finds what bought it:
- `grant:pack:<checkout session>`: the checkout's total and currency, origin
  "pack", as pack_purchase_grant writes them;
- `grant:invoice:<invoice>`: the plan's code (the grant's memo, "<plan> x<seats>,
  invoice ...", as subscription_period_grant wrote it; else the subscription's
  plan now) and the invoice's currency. The amount: what the invoice's lines
  that bought credits charged is not kept, so it is the invoice's amount paid,
  but at most what the plan's price asks for that many credits: a renewal also
  bills the period before's overage in arrears, which the allowance's own
  revenue counts (below), and must not count twice. A discount shows in the
  amount paid; a price changed since makes the cap the new price's;
- `grant:overage:<invoice>`: the allowance at its plan's overage price (now),
  as subscription_period_grant writes it.
Other paid grants (metering's credits_grant command, say) keep no price:
finance's report shows their credits as "without a known price".

Not atomic: a thousand lots per transaction, as metering/0016 does, so that a
live ledger's settlements wait on at most one batch's row locks.
"""

import re

from django.db import migrations, transaction

BATCH = 1_000
MICRO = 1_000_000
PACK_ORIGIN = "pack"  # gymbilling.services.payments.PACK_ORIGIN
_PLAN_MEMO = re.compile(r"^(?:overage allowance of )?([-a-zA-Z0-9_]+)[ ,]")


def backfill(apps, schema_editor):
    alias = schema_editor.connection.alias
    CreditLot = apps.get_model("metering", "CreditLot")
    lots = CreditLot.objects.using(alias).filter(
        parent__isnull=True, revenue__isnull=True, created_by__idempotency_key__startswith="grant:"
    )
    sources = _Sources(apps, alias)
    last = 0
    while True:
        with transaction.atomic(using=alias):
            batch = list(
                lots.filter(pk__gt=last).select_related("created_by").order_by("pk")[:BATCH]
            )
            if not batch:
                return
            priced = [lot for lot in batch if sources.price(lot)]
            CreditLot.objects.using(alias).bulk_update(
                priced, ["revenue", "revenue_currency", "origin"]
            )
        last = batch[-1].pk


class _Sources:
    """What bought a granted lot, read from the invoices, checkouts and plans."""

    def __init__(self, apps, alias: str) -> None:
        self.invoices = apps.get_model("gymbilling", "Invoice").objects.using(alias)
        self.checkouts = apps.get_model("gymbilling", "CheckoutSession").objects.using(alias)
        self.plans = apps.get_model("gymbilling", "Plan").objects.using(alias)

    def price(self, lot) -> bool:
        """Set the lot's revenue, currency and origin if its grant says what bought it."""
        kind, _, ref = lot.created_by.idempotency_key.removeprefix("grant:").partition(":")
        if kind == "pack":
            checkout = self.checkouts.filter(stripe_session_id=ref).first()
            if checkout is None:
                return False
            lot.revenue, lot.revenue_currency = checkout.amount_total, checkout.currency
            lot.origin = PACK_ORIGIN
            return True
        if kind not in ("invoice", "overage"):
            return False
        invoice = self.invoices.filter(stripe_invoice_id=ref).first()
        plan = self._plan(lot.created_by.memo, invoice)
        if invoice is None or plan is None:
            return False
        if kind == "overage":
            lot.revenue = plan.overage_price_per_1k * lot.amount // (1_000 * MICRO)
            lot.revenue_currency = plan.currency
        else:
            lot.revenue = max(0, invoice.amount_paid)
            if plan.monthly_credits:
                listed = plan.monthly_price * lot.amount // plan.monthly_credits
                lot.revenue = min(lot.revenue, listed)
            lot.revenue_currency = invoice.currency
        lot.origin = plan.code
        return True

    def _plan(self, memo: str, invoice):
        match = _PLAN_MEMO.match(memo)
        plan = self.plans.filter(code=match[1]).first() if match else None
        if plan is None and invoice is not None and invoice.subscription_id:
            plan = self.plans.filter(subscriptions__pk=invoice.subscription_id).first()
        return plan


class Migration(migrations.Migration):
    atomic = False
    dependencies = [
        ("gymbilling", "0013_payment_reversal_lost_at"),
        ("metering", "0016_creditlot_revenue"),
    ]
    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
