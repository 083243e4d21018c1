"""Migration operations shared by the apps' migrations.

Kept small and stable: a migration that imports it runs this code forever.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.db import migrations


def postgresql_only(forward: Sequence[str], backward: Sequence[str]) -> migrations.RunPython:
    """Run these SQL statements on PostgreSQL (the demo's SQLite skips them), reversibly."""

    def run(statements: Sequence[str]):
        def apply(apps, schema_editor) -> None:
            if schema_editor.connection.vendor == "postgresql":
                for sql in statements:
                    schema_editor.execute(sql)

        return apply

    return migrations.RunPython(run(forward), run(backward))
