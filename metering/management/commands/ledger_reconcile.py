"""Check every ledger invariant; exit 0 with a summary, or 1 with the offending rows."""

import json

from django.core.management.base import BaseCommand, CommandError

from metering.reconcile import ledger_reconcile


class Command(BaseCommand):
    help = "Check every invariant of the credit ledger over the whole database."

    def add_arguments(self, parser):
        parser.add_argument("--json", action="store_true", help="print the report as JSON")
        parser.add_argument(
            "--limit", type=int, default=20, help="offending rows to print per check (default 20)"
        )

    def handle(self, *args, **options):
        report = ledger_reconcile()
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "ok": report.ok,
                        "checked": report.checked,
                        "violations": [
                            {"check": v.check, "description": v.description, "rows": v.rows}
                            for v in report.violations
                        ],
                    },
                    default=str,
                    indent=2,
                )
            )
        else:
            for name in report.checked:
                bad = next((v for v in report.violations if v.check == name), None)
                status = "ok" if bad is None else f"FAILED ({len(bad.rows)} rows)"
                self.stdout.write(f"{name:28} {status}")
                if bad is not None:
                    self.stdout.write(f"  invariant: {bad.description}")
                    for row in bad.rows[: options["limit"]]:
                        self.stdout.write(f"  {row}")
        if not report.ok:
            raise CommandError(
                f"{len(report.violations)} of {len(report.checked)} ledger invariants do not hold."
            )
        if not options["json"]:
            self.stdout.write(self.style.SUCCESS(f"All {len(report.checked)} invariants hold."))
