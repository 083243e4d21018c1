"""Invitations still open that were sent with an API key revoked before dd21f75 are revoked.

Since dd21f75, apikey_revoke revokes the open invitations the key sent
(invitations_sent_with_key_revoke). A key revoked before that left its invitations open:
listed as pending in the API, the dashboard and the admin, and holding the address against
a new invitation, though an accept of one is refused (403 `invitation_sender_not_allowed`:
a revoked key vouches for nothing). This closes them as the service would have: open means
neither accepted nor revoked nor expired (_invitations_revoke; an expired one admits nobody
already, and invitation_create closes it when its address is invited again), `revoked_at`
set, one audit row each, `invitation.revoked` with the role and reason
`sender_key_revoked`. The rows are written with the historical models, in the service's
shape, because its code (audit_record, the key cache) is not for migrations.

`revoked_at` is now, the time of this run, not the key's `revoked_at`: until now they were
listed open and held their address, and the audit row saying they were revoked is written
now (its created_at is the insert's and the log reads in insertion order); an invitation
revoked by hand or expired in between is left as it is. When the key stopped vouching for
them is still on the key. The audit rows name no actor: nobody revoked them, the upgrade
did (the key's own `api_key.revoked` row says who revoked the key).

Backwards is a no-op: reopening an invitation that no accept can use would only list it as
pending again. Running this again finds nothing open, so it changes nothing.

Not atomic: a thousand invitations per transaction, each batch taking its organizations'
rows first (FOR NO KEY UPDATE, in primary-key order) and the invitations' after, the order
an accept and apikey_revoke take them in (accounts.services.organizations
._organization_lock: the audit rows' foreign key takes a key-share lock on the
organization at COMMIT, which deadlocked against an accept when taken last), then
re-reading them under those locks, so that an invitation revoked or accepted meanwhile is
left alone. The ORM only: `make demo` migrates a SQLite file, where the locks are no-ops.
"""

from django.db import migrations, transaction
from django.utils import timezone

BATCH = 1_000
REVOKED = "invitation.revoked"
REASON = "sender_key_revoked"


def revoke_sent_with_revoked_keys(apps, schema_editor):
    alias = schema_editor.connection.alias
    Invitation = apps.get_model("accounts", "Invitation")
    Organization = apps.get_model("accounts", "Organization")
    AuditEvent = apps.get_model("accounts", "AuditEvent")
    now = timezone.now()
    invitations = Invitation.objects.using(alias)
    open_ = invitations.filter(
        accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=now
    )
    # A key is never un-revoked, so this need not be re-checked under the locks.
    found = open_.filter(invited_by_key__revoked_at__isnull=False)
    last = 0
    while True:
        with transaction.atomic(using=alias):
            batch = list(
                found.filter(pk__gt=last)
                .order_by("pk")
                .values_list("pk", "organization_id")[:BATCH]
            )
            if not batch:
                return
            list(
                Organization.objects.using(alias)
                .select_for_update(no_key=True)
                .filter(pk__in={organization for _, organization in batch})
                .order_by("pk")
                .values_list("pk", flat=True)
            )
            revoked = list(
                open_.filter(pk__in=[pk for pk, _ in batch])
                .select_for_update()
                .order_by("pk")
                .values_list("pk", "organization_id", "email", "role")
            )
            invitations.filter(pk__in=[pk for pk, *_ in revoked]).update(revoked_at=now)
            AuditEvent.objects.using(alias).bulk_create(
                AuditEvent(
                    organization_id=organization,
                    action=REVOKED,
                    target=email[:200],
                    data={"role": role, "reason": REASON},
                )
                for _, organization, email, role in revoked
            )
        last = batch[-1][0]


class Migration(migrations.Migration):
    atomic = False
    dependencies = [
        ("accounts", "0010_invitation_invited_by_key"),
    ]
    operations = [migrations.RunPython(revoke_sent_with_revoked_keys, migrations.RunPython.noop)]
