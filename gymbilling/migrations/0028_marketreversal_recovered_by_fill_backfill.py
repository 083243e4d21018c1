"""Market refunds and disputes whose loss a refused payout recovered before 0027 say how much,
by fill.

A refund or dispute of a fill being paid out books the seller's share as a loss against that
payout (its transaction reversal:<key>:<fill> names the payout); should Stripe refuse the
payout, _payout_fail recovers from the seller's share what the payout was paying of the
fill. From 0027 on it records that on the reversal (`recovered_by_fill`), and undoing the
reversal (a won dispute, a failed refund) gives that back to the seller's proceeds and the
rest to the losses. Before, undoing it counted all the loss as recovered. Read as 0027 reads
it, a row recovered before would count none of it: the seller would not be given back what
the refusal took from them.

What a reversal had recovered in all is on its row: its seller_reversed started as what its
own transactions took from the sellers' proceeds, and each recovery added to it (nothing
else changes it). That total is shared out among its fills whose loss was booked against a
refused payout, in the order the losses were booked, each at most its loss. Exactly what was
recovered, unless one reversal had losses of several fills against refused payouts and one
of those fills had been reopened (recovered less than its loss): which fill fell short is
then not on record. The code before 0027 could not undo such a reversal either (it gave the
seller more than was taken, below zero), so no row that was undone is read differently.

Rows that say what was recovered already (written since 0027, or by an earlier run) are left
as they are, so running this again changes nothing. Backwards is a no-op (0027 drops the
field). Few rows: only refunds and disputes of fills whose payout Stripe refused. The ORM
only: `make demo` migrates a SQLite file.
"""

from django.db import migrations

REVERSAL = "reversal"  # MoneyTransactionKind.REVERSAL
LOSSES = "losses"  # MoneyAccountKind.LOSSES
SELLER_KINDS = ("seller_pending", "seller_available")  # models.SELLER_KINDS
FAILED = "failed"  # PayoutStatus.FAILED


def backfill(apps, schema_editor):
    alias = schema_editor.connection.alias
    MarketReversal = apps.get_model("gymbilling", "MarketReversal")
    MarketFill = apps.get_model("gymbilling", "MarketFill")
    MoneyEntry = apps.get_model("gymbilling", "MoneyEntry")
    entries = MoneyEntry.objects.using(alias)
    # Losses booked against refused payouts, by reversal key, in the order they were booked.
    losses: dict[str, list[tuple[int, int]]] = {}
    for txn_key, fill_id, amount in (
        entries.filter(
            transaction__kind=REVERSAL,
            transaction__payout__status=FAILED,
            account__kind=LOSSES,
        )
        .order_by("transaction_id")
        .values_list("transaction__idempotency_key", "transaction__fill_id", "amount")
    ):
        key = txn_key.removeprefix(f"{REVERSAL}:").removesuffix(f":{fill_id}")
        losses.setdefault(key, []).append((fill_id, -amount))
    for reversal in MarketReversal.objects.using(alias).filter(key__in=list(losses)).order_by("pk"):
        if reversal.recovered_by_fill:
            continue
        # What its own transactions, reversal:<key>:<fill> of a fill of its order, took
        # from the sellers' proceeds.
        fills = MarketFill.objects.using(alias).filter(order_id=reversal.order_id)
        taken = -sum(
            entries.filter(
                transaction__kind=REVERSAL,
                transaction__idempotency_key__in=[
                    f"{REVERSAL}:{reversal.key}:{pk}" for pk in fills.values_list("pk", flat=True)
                ],
                account__kind__in=SELLER_KINDS,
            ).values_list("amount", flat=True)
        )
        left = reversal.seller_reversed - taken
        recovered = {}
        for fill_id, loss in losses[reversal.key]:
            share = min(loss, left)
            if share > 0:
                recovered[str(fill_id)] = share
                left -= share
        if recovered:
            MarketReversal.objects.using(alias).filter(pk=reversal.pk, recovered_by_fill={}).update(
                recovered_by_fill=recovered
            )


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0027_marketreversal_recovered_by_fill"),
    ]
    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
