"""Billing's reconciliation: each paid subscription invoice has exactly one grant,
and each invoice grant a paid invoice; each wallet's claim is what its refunds and
disputes have pending, and its rollovers claimed of the credits running jobs held over
their cap.

`billing_ledger_checks` run inside `ledger_reconcile` (and after every test)
over our own rows; `stripe_reconcile` asks Stripe itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gymbilling import stripe_client
from gymbilling.models import BillingCustomer, FormerStripeCustomer, Subscription
from gymbilling.services.invoices import invoice_credits, invoice_subscription_id
from metering.models import JournalTransaction
from metering.reconcile import register, sql_rows


def paid_invoices_without_grant() -> list[dict]:
    """Paid first and renewal invoices of our subscriptions without their grant, and
    any paid invoice of a subscription mirrored without one (subscription_sync
    refused it): what that bought was never granted, and only a human can say."""
    return sql_rows(
        """
        SELECT i.stripe_invoice_id, i.billing_reason, i.subscription_id
          FROM gymbilling_invoice i
         WHERE i.status = 'paid'
           AND ((i.subscription_id IS NOT NULL
                 AND i.billing_reason IN ('subscription_create', 'subscription_cycle'))
             OR (i.subscription_id IS NULL
                 AND i.billing_reason IN ('subscription_create', 'subscription_cycle',
                                          'subscription_update')))
           AND NOT EXISTS (SELECT 1 FROM metering_journaltransaction t
                            WHERE t.idempotency_key = 'grant:invoice:' || i.stripe_invoice_id)
        """
    )


def grants_without_paid_invoice() -> list[dict]:
    return sql_rows(
        """
        SELECT t.id, t.idempotency_key
          FROM metering_journaltransaction t
         WHERE t.idempotency_key LIKE 'grant:invoice:%'
           AND NOT EXISTS (SELECT 1 FROM gymbilling_invoice i
                            WHERE 'grant:invoice:' || i.stripe_invoice_id = t.idempotency_key
                              AND i.status = 'paid')
        """
    )


def claims_not_pending(organization_id: int | None = None) -> list[dict]:
    """Wallets whose claim is not what the organization's refunds and disputes still wait
    for (metering.services.ledger, "claims"), and its rollovers for the credits running jobs
    held over the cap (gymbilling.market.rollover): more locks up credits for nothing, less
    lets new work spend refunded credits, or the old period's over its cap. All wallets,
    or the one of `organization_id`."""
    only = "" if organization_id is None else " AND w.organization_id = %s"
    return sql_rows(
        """
        SELECT w.organization_id, w.claimed, COALESCE(p.pending, 0) AS pending
          FROM metering_ledgeraccount w
          LEFT JOIN (SELECT organization_id, SUM(pending) AS pending
                       FROM (SELECT organization_id, credits_pending AS pending
                               FROM gymbilling_paymentreversal
                              WHERE credits_pending > 0
                             UNION ALL
                             SELECT o.buyer_id, r.credits_pending
                               FROM gymbilling_marketreversal r
                               JOIN gymbilling_marketorder o ON o.id = r.order_id
                              WHERE r.credits_pending > 0
                             UNION ALL
                             SELECT organization_id, held_claimed
                               FROM gymbilling_rollovercarry
                              WHERE held_claimed > 0) reversals
                      GROUP BY organization_id) p
            ON p.organization_id = w.organization_id
         WHERE w.kind = 'wallet' AND w.claimed <> COALESCE(p.pending, 0)
        """
        + only,
        None if organization_id is None else [organization_id],
    )


def wallet_claims_repair() -> list[dict]:
    """Set every wallet's claim to what its refunds and disputes still have pending (and its
    rollovers claimed), for a wallet reconcile reports (`wallet_claim_pending`): after a
    deploy in which old code, which kept no claims, ran beside the migration that filled
    them in (gymbilling/0010).
    The lots those reversals wait on are marked claimed as their own claims mark them
    (metering's claim_reset), so work placed from now on burns them last; a claim set
    to nothing leaves no lot marked. Each wallet under its row lock, which every change
    of a claim and of what is pending takes too. Returns the wallets changed:
    organization, claim before, claim after."""
    from django.db import transaction

    from accounts.models import Organization
    from gymbilling.market.rollover import rollover_carries_claimed
    from gymbilling.market.services import market_reversals_claimed
    from gymbilling.services.payments import payment_reversals_claimed
    from metering.models import LedgerAccount
    from metering.services import claim_reset

    repaired = []
    for row in claims_not_pending():
        with transaction.atomic():
            wallet = LedgerAccount.objects.select_for_update().get(
                organization_id=row["organization_id"], kind="wallet"
            )
            # Read again under the lock: a sweep may have settled meanwhile.
            now_wrong = claims_not_pending(wallet.organization_id)
            if not now_wrong:
                continue
            organization = Organization.objects.get(pk=wallet.organization_id)
            pending = int(now_wrong[0]["pending"])
            before = claim_reset(
                organization=organization,
                amount=pending,
                covers=payment_reversals_claimed(organization=organization)
                + market_reversals_claimed(organization=organization)
                + rollover_carries_claimed(organization=organization),
            )
            repaired.append(
                {"organization_id": organization.pk, "before": before, "after": pending}
            )
    return repaired


def market_pending_not_by_fill() -> list[dict]:
    """Marketplace reversals whose pending credits are not the sum of their fills' (each
    fill's are taken back from its own lots: gymbilling.market.services)."""
    return sql_rows(
        """
        SELECT r.id, r.credits_pending,
               (SELECT COALESCE(SUM(value::bigint), 0)
                  FROM jsonb_each_text(r.pending_by_fill)) AS by_fill
          FROM gymbilling_marketreversal r
         WHERE r.credits_pending <> (SELECT COALESCE(SUM(value::bigint), 0)
                                       FROM jsonb_each_text(r.pending_by_fill))
        """
    )


def billing_ledger_checks() -> None:
    register(
        "paid_invoice_granted",
        "every paid first or renewal invoice of a subscription has its grant, "
        "and no paid subscription invoice lacks its subscription",
        paid_invoices_without_grant,
    )
    register(
        "invoice_grant_paid", "every invoice grant has a paid invoice", grants_without_paid_invoice
    )
    register(
        "wallet_claim_pending",
        "each wallet's claim equals the credits its refunds and disputes still have pending "
        "and its rollovers claimed of what running jobs held over the cap",
        claims_not_pending,
    )
    register(
        "market_pending_by_fill",
        "a marketplace reversal's pending credits are the sum of its fills' pending credits",
        market_pending_not_by_fill,
    )


@dataclass
class StripeReport:
    checked: int = 0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches


def stripe_reconcile() -> StripeReport:
    """Compare Stripe's paid subscription invoices with the ledger's grants, both ways."""
    report = StripeReport()
    # Customers replaced after Stripe deleted them too: their paid invoices granted credits.
    ours = set(BillingCustomer.objects.values_list("stripe_customer_id", flat=True)) | set(
        FormerStripeCustomer.objects.values_list("stripe_customer_id", flat=True)
    )
    subscriptions = {
        s.stripe_subscription_id: s for s in Subscription.objects.select_related("plan")
    }
    granted_ids = {
        key.removeprefix("grant:invoice:")
        for key in JournalTransaction.objects.filter(
            idempotency_key__startswith="grant:invoice:"
        ).values_list("idempotency_key", flat=True)
    }
    paid_ids: set[str] = set()
    for invoice in stripe_client.invoices_list(status="paid"):
        sub_id = invoice_subscription_id(invoice)
        if invoice.get("customer") not in ours or not sub_id:
            continue
        report.checked += 1
        paid_ids.add(invoice["id"])
        # The key is unique: one grant at most, so "exactly one" is "one".
        granted = int(invoice["id"] in granted_ids)
        subscription = subscriptions.get(sub_id)
        if subscription is None:
            report.mismatches.append(
                f"paid invoice {invoice['id']}: subscription {sub_id} unknown here"
            )
            continue
        expected = invoice_credits(invoice=invoice, subscription=subscription).credits
        if expected > 0 and granted != 1:
            report.mismatches.append(
                f"paid invoice {invoice['id']} ({invoice.get('billing_reason')}): {granted} grants, expected 1"
            )
        if expected <= 0 and granted:
            report.mismatches.append(
                f"paid invoice {invoice['id']} buys no credits but has a grant"
            )
    for invoice_id in sorted(granted_ids - paid_ids):
        report.mismatches.append(
            f"grant grant:invoice:{invoice_id}: no paid subscription invoice {invoice_id} at Stripe"
        )
    return report
