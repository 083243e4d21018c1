"""A catalog model's default max_tokens, for a request that leaves it out.

Nullable, no default: blank is the model's max_output_tokens cut to what the context
leaves (OpenAI's default), and processes of the previous release, still running during
a deploy, neither read nor write it. The ALTER waits at most a lock_timeout
(metering/0016's AddFieldIfAbsentOnPostgres), not atomic; the PositiveIntegerField's
`>= 0` CHECK is added NOT VALID and validated apart, as gymbilling/0038's is.
"""

import importlib

import django.core.validators
from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("inference", "0012_job_running_started_index"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="catalogmodel",
            name="default_max_tokens",
            field=models.PositiveIntegerField(
                blank=True,
                help_text="max_tokens of a request that leaves it out, at most max_output_tokens; "
                "blank: max_output_tokens, cut to what the context leaves after the prompt "
                "(OpenAI's default). Each request holds credits for its max_tokens until it "
                "settles.",
                null=True,
                validators=[django.core.validators.MinValueValidator(1)],
            ),
        ),
        _0016.ValidateFieldCheckOnPostgres(model_name="catalogmodel", name="default_max_tokens"),
    ]
