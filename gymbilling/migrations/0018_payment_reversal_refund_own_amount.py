"""Refunds applied before b2882f7 record the money they returned, not Stripe's running total.

Until b2882f7, payment_reversal_apply stored a charge's `amount_refunded` (what all its
refunds so far had returned) as each refund's `amount`. Finance's revenue report
(reversals_by_customer) adds the rows up, and a later refund of the charge subtracts the
earlier rows from its running total: two refunds of $3.00 read as $9.00 refunded, and a
third, of $4.00, as $1.00.

Such a row's key, `refund:<charge>:<total>`, holds that same running total, so it is
found by its amount being its key's total while the charge has a refund of a smaller
total before it; its own amount is its total less the greatest such total (what the
charge's refunds had returned when it came). Rows written since b2882f7 already hold
their own amount, which is below their key's total whenever a refund came before them
(their total counts it, failed ones too; their amount does not): they are left as they
are, so running this again changes nothing. A charge's first refund is its own either
way. Disputes are not running totals.

Backwards is a no-op: the code from b2882f7 on writes and reads each row's own amount,
which is what the rows hold after this; the running totals were never right to go back to.

Not atomic: a thousand rows per transaction, each under the lock payment_reversal_apply
takes on their charges (a refund applied meanwhile subtracts the corrected amounts, or
its row, committed first, is corrected here), so that live refunds wait on at most one
batch.
"""

import zlib

from django.db import migrations, transaction

BATCH = 1_000


def _total(key: str) -> int | None:
    """The running total in a refund's key, `refund:<charge>:<total>` (None if malformed)."""
    _, _, total = key.rpartition(":")
    return int(total) if total.isdigit() else None


def _charges_lock(connection, charge_ids: list[str]) -> None:
    """payment_reversal_apply's lock on each charge (gymbilling.locks.transaction_lock, by
    the same name and id), until the batch's transaction ends; none on the demo's SQLite."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        for charge_id in sorted(charge_ids):
            lock_id = zlib.crc32(f"stripe-charge:{charge_id}".encode())
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id])


def refunds_own_amount(apps, schema_editor):
    alias = schema_editor.connection.alias
    PaymentReversal = apps.get_model("gymbilling", "PaymentReversal")
    refunds = PaymentReversal.objects.using(alias).filter(kind="refund", key__startswith="refund:")
    last = 0
    while True:
        with transaction.atomic(using=alias):
            batch = list(
                refunds.filter(pk__gt=last)
                .order_by("pk")
                .values_list("pk", "stripe_charge_id")[:BATCH]
            )
            if not batch:
                return
            charges = {charge for _, charge in batch}
            _charges_lock(schema_editor.connection, list(charges))
            # Read under the locks: every refund of the batch's charges, for the totals
            # before each row, whichever batch the rows are in.
            rows = list(
                refunds.filter(stripe_charge_id__in=charges).only(
                    "key", "amount", "stripe_charge_id"
                )
            )
            totals: dict[str, list[int]] = {}
            for row in rows:
                if (total := _total(row.key)) is not None:
                    totals.setdefault(row.stripe_charge_id, []).append(total)
            in_batch = {pk for pk, _ in batch}
            fixed = []
            for row in rows:
                total = _total(row.key)
                if row.pk not in in_batch or total is None or row.amount != total:
                    continue
                before = max((t for t in totals[row.stripe_charge_id] if t < total), default=0)
                if before:
                    row.amount = total - before
                    fixed.append(row)
            PaymentReversal.objects.using(alias).bulk_update(fixed, ["amount"])
        last = batch[-1][0]


class Migration(migrations.Migration):
    atomic = False
    dependencies = [
        ("gymbilling", "0017_marketpayout_retry_allowed_at"),
    ]
    operations = [migrations.RunPython(refunds_own_amount, migrations.RunPython.noop)]
