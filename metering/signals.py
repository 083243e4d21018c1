"""What the ledger tells the apps that use it, without knowing them.

`hold_expired` is sent, once its release has committed, for each hold that
`holds_expire` released because it stayed pending past its expiry: the work
it was placed for never settled (for an inference job: its worker vanished,
or its message was lost). Arguments: `key`, the hold's idempotency key. A
receiver that fails is logged and does not stop the sweep; should one never
run, the hold is released all the same.
"""

from django.dispatch import Signal

hold_expired = Signal()
