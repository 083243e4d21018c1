"""`python manage.py triton_status`: is every Triton server of the catalog serving, and how busy.

For operators and monitoring: each server pool of the catalog (or one, with
`--pool`), each server asked now whether it serves every engine model the
pool is used for (catalog models, and dedicated capacity assigned to it),
with its load and request counts from its metrics url where the pool has
them. Exit status 1 when a pool that catalog models use has no server
serving all of them (what a job would meet as `engine_unavailable`; a
dedicated pool down is not that: its jobs go to the shared pool), so it can
back an alert or a deploy check; `--json` for machines.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict

from django.core.management.base import BaseCommand, CommandError

from inference.models import DedicatedCapacity, ModelStatus, ServerPool
from inference.triton import server_report


class Command(BaseCommand):
    help = "Ask every Triton server of the model catalog whether it serves, and how busy it is."

    def add_arguments(self, parser):
        parser.add_argument("--pool", help="only this server pool (its name)")
        parser.add_argument("--json", action="store_true", help="print JSON, one object")
        parser.add_argument(
            "--timeout", type=float, default=2.0, help="seconds per question (default 2)"
        )

    def handle(self, *args, **options):
        pools = ServerPool.objects.prefetch_related("models").order_by("name")
        if options["pool"]:
            pools = pools.filter(name=options["pool"])
            if not pools:
                raise CommandError(f"No server pool named {options['pool']!r}.")
        dedicated: dict[int, set[str]] = {}
        for capacity in DedicatedCapacity.objects.select_related("model"):
            if capacity.model.status != ModelStatus.RETIRED:
                dedicated.setdefault(capacity.pool_id, set()).add(capacity.model.triton_model)
        result, down = [], []
        for pool in pools:
            # The engine models the pool's catalog entries call (retired ones
            # are never called); a pool no model uses is checked for liveness.
            shared = {m.triton_model for m in pool.models.all() if m.status != ModelStatus.RETIRED}
            names = sorted(shared | dedicated.get(pool.pk, set()))
            # Every server, whatever its metrics urls say (a row written
            # around the admin may have too few or too many).
            metrics = [url if isinstance(url, str) else "" for url in pool.metrics_urls or []]
            reports = [
                server_report(url, names or ["ensemble"], metrics_url, timeout_s=options["timeout"])
                for url, metrics_url in itertools.zip_longest(
                    pool.grpc_urls, metrics[: len(pool.grpc_urls)], fillvalue=""
                )
            ]
            serving = sum(report.ready for report in reports)
            if shared and not serving:
                down.append(pool.name)
            result.append(
                {"pool": pool.name, "models": names, "serving": serving, "servers": reports}
            )
        if options["json"]:
            self.stdout.write(
                json.dumps(
                    {
                        "pools": [
                            {
                                **entry,
                                "servers": [
                                    asdict(r) | {"ready": r.ready} for r in entry["servers"]
                                ],
                            }
                            for entry in result
                        ],
                        "unavailable": down,
                    },
                    indent=2,
                )
            )
        else:
            self._print(result)
        if down:
            self.stderr.write(f"No server serves pool(s): {', '.join(down)}.")
            raise SystemExit(1)

    def _print(self, result: list[dict]) -> None:
        for entry in result:
            models = ", ".join(entry["models"]) or "no catalog model"
            self.stdout.write(
                f"{entry['pool']}: {entry['serving']} of {len(entry['servers'])} server(s) "
                f"serving ({models})"
            )
            for report in entry["servers"]:
                state = "serving" if report.ready else "NOT SERVING"
                line = f"  {report.url}  {state}"
                if report.load is not None:
                    line += (
                        f"  load {report.load} (requests it holds)"
                        f"  requests ok {report.requests_ok}, failed {report.requests_failed}"
                    )
                elif report.metrics_error:
                    line += f"  metrics: {report.metrics_error}"
                self.stdout.write(line)
                for name, why in report.models.items():
                    if why:
                        self.stdout.write(f"    {name}: {why}")
