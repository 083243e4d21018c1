"""ApiKey.parent and ApiKey.limit_root: the key that made a key, and the first of its line.

Set by apikey_create from now on. Keys made before this migration stay without either:
they are not revoked with the key that made them, and count against their own bucket only
(README, "The partner API"). No backfill: the key that made them is only in the audit log (an
`api_key.created` row's actor_key), and filling it in would make revoking an old key
revoke integrations made with it long ago, which their owners were never told; that is a
product decision, not a schema change. Nullable columns: no rewrite of the table.

Added as gymbilling/0040 added a fill's refused payout, with metering/0016's operations:
not atomic, each foreign key NOT VALID then validated (a scan of the keys under a lock
that lets them be read and written: every request reads its key), each ALTER under a
lock_timeout, the index built concurrently under Django's name; the schema and the state
are AddField's.
"""

import importlib

import django.db.models.deletion
from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")

LIMIT_ROOT = models.ForeignKey(
    blank=True,
    null=True,
    on_delete=django.db.models.deletion.RESTRICT,
    related_name="+",
    to="accounts.apikey",
)
PARENT = models.ForeignKey(
    blank=True,
    null=True,
    on_delete=django.db.models.deletion.RESTRICT,
    related_name="children",
    to="accounts.apikey",
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("accounts", "0011_invitation_sent_with_revoked_key_revoke"),
    ]

    operations = [
        _0016.AddForeignKeyNotValidOnPostgres("apikey", "limit_root", LIMIT_ROOT),
        _0016.ValidateForeignKeyOnPostgres(model_name="apikey", name="limit_root"),
        _0016.AddFieldIndexConcurrentlyOnPostgres(model_name="apikey", name="limit_root"),
        _0016.AddForeignKeyNotValidOnPostgres("apikey", "parent", PARENT),
        _0016.ValidateForeignKeyOnPostgres(model_name="apikey", name="parent"),
        _0016.AddFieldIndexConcurrentlyOnPostgres(model_name="apikey", name="parent"),
    ]
