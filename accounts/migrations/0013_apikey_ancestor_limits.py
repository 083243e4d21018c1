"""ApiKey.ancestor_limits: the limited keys above a key, for its requests to count in each
one's bucket (accounts.api_base), read with the key in one query.

Nullable, no default, no backfill: keys made before it, or by web processes of the
previous release while it deploys (they write no such column), read null, and the key
lookup walks their `parent` instead (api_keys._ancestor_limits), on a cache miss only;
a key made from one of them stores the list that walk found.

The ALTER waits at most a lock_timeout (metering/0016's AddFieldIfAbsentOnPostgres).
"""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("accounts", "0012_apikey_parent"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="apikey",
            name="ancestor_limits",
            field=models.JSONField(blank=True, null=True),
        ),
    ]
