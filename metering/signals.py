"""What the ledger tells the apps that use it, without knowing them.

`hold_expired` is sent, inside the transaction of its release and just
before it, for each hold that `holds_expire` releases because it stayed
pending past its expiry: the work it was placed for never settled (for an
inference job: its worker vanished, or its message was lost). Arguments:
`key`, the hold's idempotency key. A receiver's writes commit with the
release; a receiver that raises undoes it (logged), and the next sweep tries
that hold again, so that a hold is never released under work its app still
shows open. A receiver's effects outside the database (Redis) belong in
`transaction.on_commit`. A hold still pending a day past its expiry
(`HOLD_EXPIRY_FORCED_AFTER`) is released first and its receivers are told
after the commit: a receiver that always fails must not hold credits forever.
"""

from django.dispatch import Signal

hold_expired = Signal()
