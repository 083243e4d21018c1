"""Market reversals written before 0022 record what they took of the sale, and the rest apart.

Until 8039835 (0022), a dispute recorded all it disputed, and a refund given as Stripe's
running total all it added to it, even when the order's fills had less left to give back
(a dispute of a charge already half refunded, a refund by hand that also returned the
order's unrefunded shortfall): a 124 dispute after a refund of 62 recorded 124 while the
money ledger took back 62, and finance's revenue report and the admin said 124.

What a reversal took of the sale is in the money ledger: per fill of its order it took
from, one transaction `reversal:<reversal key>:<fill>`, whose buyer-clearing posting is
what went back to the buyer for that fill, against the fee, the seller's share and the
loss it came from (which add up to it, as _reversal_apply computes them). That posting is
read, not the row's fee_reversed + seller_reversed + loss: a won dispute or a failed
refund (`reinstated_at`) zeroes the row's loss, undoing the money with transactions of its
own (`reinstatement:<key>:<fill>`) that leave the reversal's as they were.

A row whose amount is more than that gets it, and the difference goes to `unapplied`:
amount + unapplied (what the refund or dispute returned, which a later refund given as a
running total subtracts) stays as it was. Rows written since 0022, and those written
before that fitted, hold it already and are left as they are, so running this again
changes nothing. (A refund applied one at a time dropped its excess instead: its row
agrees with the ledger, and what it dropped was kept nowhere to restore.)

Backwards is a no-op: from 0022 on the code writes and reads `amount` as what was taken of
the sale and `unapplied` beside it, which is what the rows hold after this; of an old row
it reads amount + unapplied only, which this does not change.

Not atomic: a thousand reversals per transaction, a row updated only while its amount is
still the one read (nothing writes a reversal's amount once it is applied), so that live
refunds and disputes wait on at most one batch's row locks. The ORM only: `make demo`
migrates a SQLite file.
"""

from django.db import migrations, transaction
from django.db.models import F

BATCH = 1_000
REVERSAL = "reversal"  # MoneyTransactionKind.REVERSAL
BUYER_CLEARING = "buyer_clearing"  # MoneyAccountKind.BUYER_CLEARING


def backfill(apps, schema_editor):
    alias = schema_editor.connection.alias
    reversals = apps.get_model("gymbilling", "MarketReversal").objects.using(alias)
    last = 0
    while True:
        with transaction.atomic(using=alias):
            batch = list(
                reversals.filter(pk__gt=last)
                .order_by("pk")
                .values_list("pk", "key", "order_id", "amount")[:BATCH]
            )
            if not batch:
                return
            taken = _taken_of_sale(apps, alias, {key: order for _, key, order, _ in batch})
            # One row at a time, in primary-key order: the order the services lock them in.
            for pk, key, _, amount in batch:
                moved = taken.get(key, 0)
                if moved < amount:
                    reversals.filter(pk=pk, amount=amount).update(
                        amount=moved, unapplied=F("unapplied") + (amount - moved)
                    )
        last = batch[-1][0]


def _taken_of_sale(apps, alias, orders: dict[str, int]) -> dict[str, int]:
    """What each reversal (by key, with its order's id) took of the sale: the buyer-clearing
    postings of its own transactions, reversal:<key>:<fill> of a fill of its order."""
    MoneyEntry = apps.get_model("gymbilling", "MoneyEntry")
    entries = MoneyEntry.objects.using(alias).filter(
        transaction__kind=REVERSAL,
        transaction__fill__order_id__in=set(orders.values()),
        account__kind=BUYER_CLEARING,
    )
    taken: dict[str, int] = {}
    for txn_key, fill_id, order_id, amount in entries.values_list(
        "transaction__idempotency_key", "transaction__fill_id", "transaction__fill__order_id", "amount"
    ):
        key = txn_key.removeprefix(f"{REVERSAL}:").removesuffix(f":{fill_id}")
        if txn_key == f"{REVERSAL}:{key}:{fill_id}" and orders.get(key) == order_id:
            taken[key] = taken.get(key, 0) + amount
    return taken


class Migration(migrations.Migration):
    atomic = False
    dependencies = [
        ("gymbilling", "0022_marketreversal_unapplied"),
    ]
    operations = [migrations.RunPython(backfill, migrations.RunPython.noop)]
