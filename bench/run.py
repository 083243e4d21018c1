"""`make bench`: measure on this machine and write the figures into docs/BENCHMARKS.md.

Usage: .venv/bin/python bench/run.py [--only ledger|api|inference|billing] [--no-write]
           [--duration S] [--rounds N] [--warmup S]            (ledger)
           [--api-duration S] [--api-rounds N] [--api-warmup S]
           [--workers N] [--threads N] [--conn-max-age S]
           [--no-reuse-port]                                   (api)
           [--inf-duration S] [--inf-warmup S] [--inf-pool threads|prefork]
           [--inf-concurrency N] [--inf-server-workers N]
           [--inf-server-threads N]                            (inference)
Without --only it runs every benchmark, the ledger, the API then the
inference path, each in a process of its own. Each creates, and drops at its
next run, its own database (`gymbilling_bench`, `gymbilling_bench_api` and
`gymbilling_bench_inf`, or the ones BENCH_DATABASE_URL, BENCH_API_DATABASE_URL
and BENCH_INF_DATABASE_URL name; the inference path its Redis database, 8 or
BENCH_INF_REDIS_URL); none touches the database DATABASE_URL
points at.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# Run as a script, Python puts bench/ first on the path; the project root is
# what `bench`, `metering` and the settings are imported from.
ROOT = Path(__file__).resolve().parent.parent
sys.path[0] = str(ROOT)

from bench import api, billing, inference, ledger, report  # noqa: E402

SECTIONS = ("ledger", "api", "inference", "billing")


def ledger_run(args: argparse.Namespace, log) -> str:
    url = os.environ.get("BENCH_DATABASE_URL", ledger.DEFAULT_URL)
    profile, rows, timings = ledger.measure(
        url, warmup_s=args.warmup, duration_s=args.duration, rounds=args.rounds, log=log
    )
    return ledger.markdown(
        profile=profile,
        rows=rows,
        machine_rows=report.machine(ledger.pg_settings(url)),
        date=report.date_utc(),
        warmup_s=args.warmup,
        duration_s=args.duration,
        rounds=args.rounds,
        audit=ledger.audit(),
        timings=timings,
    )


def api_run(args: argparse.Namespace, log) -> str:
    url = os.environ.get("BENCH_API_DATABASE_URL", api.DEFAULT_URL)
    config = api.ServerConfig(
        workers=args.workers,
        threads=args.threads,
        conn_max_age=api.CONN_MAX_AGE if args.conn_max_age is None else args.conn_max_age,
        reuse_port=not args.no_reuse_port,
    )
    result = api.measure(
        url,
        warmup_s=args.api_warmup,
        duration_s=args.api_duration,
        rounds=args.api_rounds,
        config=config,
        log=log,
    )
    return api.markdown(
        result=result,
        machine_rows=report.machine(ledger.pg_settings(url)),
        date=report.date_utc(),
        warmup_s=args.api_warmup,
        duration_s=args.api_duration,
    )


def inference_run(args: argparse.Namespace, log) -> str:
    url = os.environ.get("BENCH_INF_DATABASE_URL", inference.DEFAULT_URL)
    config = inference.Config(
        pool=args.inf_pool,
        concurrency=args.inf_concurrency,
        server_workers=args.inf_server_workers,
        server_threads=args.inf_server_threads,
    )
    result = inference.measure(
        url, warmup_s=args.inf_warmup, duration_s=args.inf_duration, config=config, log=log
    )
    return inference.markdown(
        result=result,
        machine_rows=report.machine(ledger.pg_settings(url)),
        date=report.date_utc(),
        warmup_s=args.inf_warmup,
        duration_s=args.inf_duration,
    )


def billing_run(args: argparse.Namespace, log) -> str:
    url = os.environ.get("BENCH_BILLING_DATABASE_URL", billing.DEFAULT_URL)
    ingests, applied = billing.measure(url, events=args.billing_events, log=log)
    return billing.markdown(
        ingests=ingests,
        applied=applied,
        machine_rows=report.machine(ledger.pg_settings(url)),
        date=report.date_utc(),
    )


RUNS = {
    "ledger": ledger_run,
    "api": api_run,
    "inference": inference_run,
    "billing": billing_run,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=SECTIONS, help="run one benchmark (default: all)")
    parser.add_argument(
        "--no-write", action="store_true", help="print the results, leave docs/ alone"
    )
    ledger_args = parser.add_argument_group("ledger")
    ledger_args.add_argument(
        "--duration", type=float, default=10.0, help="seconds measured per configuration and side"
    )
    ledger_args.add_argument(
        "--rounds", type=int, default=2, help="alternating ledger/bare windows the time is cut in"
    )
    ledger_args.add_argument(
        "--warmup", type=float, default=1.0, help="seconds of warm-up before each window"
    )
    api_args = parser.add_argument_group("api")
    api_args.add_argument(
        "--api-duration",
        type=float,
        default=10.0,
        help="seconds measured per endpoint and number of clients",
    )
    api_args.add_argument(
        "--api-rounds", type=int, default=2, help="alternating ping/balance windows per count"
    )
    api_args.add_argument(
        "--api-warmup", type=float, default=2.0, help="seconds of warm-up before each window"
    )
    api_args.add_argument(
        "--workers", type=int, default=api.WORKERS, help="gunicorn worker processes"
    )
    api_args.add_argument(
        "--threads", type=int, default=api.THREADS, help="threads per gunicorn worker"
    )
    api_args.add_argument(
        "--no-reuse-port",
        action="store_true",
        help="one listening socket shared by the workers (gunicorn's default)",
    )
    api_args.add_argument(
        "--conn-max-age",
        type=int,
        default=None,
        help="seconds Django keeps a database connection (0: one per request)",
    )
    inf_args = parser.add_argument_group("inference")
    inf_args.add_argument(
        "--inf-duration",
        type=float,
        default=10.0,
        help="seconds measured per number of clients on the HTTP path",
    )
    inf_args.add_argument(
        "--inf-warmup", type=float, default=2.0, help="seconds of warm-up before each window"
    )
    inf_args.add_argument(
        "--inf-pool",
        choices=("threads", "prefork"),
        default=inference.Config.pool,
        help="the Celery worker's pool",
    )
    inf_args.add_argument(
        "--inf-concurrency",
        type=int,
        default=inference.Config.concurrency,
        help="the Celery worker's concurrency (threads or processes)",
    )
    inf_args.add_argument(
        "--inf-server-workers",
        type=int,
        default=inference.Config.server_workers,
        help="gunicorn worker processes",
    )
    inf_args.add_argument(
        "--inf-server-threads",
        type=int,
        default=inference.Config.server_threads,
        help="threads per gunicorn worker",
    )
    billing_args = parser.add_argument_group("billing")
    billing_args.add_argument(
        "--billing-events", type=int, default=400, help="webhook events posted per client count"
    )
    args = parser.parse_args()

    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    if args.only is None:
        # One process per benchmark: each sets Django up for its own
        # database, and a process's settings cannot change once set up.
        status = 0
        for name in SECTIONS:
            log(f"benchmark {name}")
            code = subprocess.call([sys.executable, __file__, *sys.argv[1:], "--only", name])
            if code:
                log(f"benchmark {name} failed with exit status {code}")
                status = status or code
        log("done")
        return status

    body = RUNS[args.only](args, log)
    print(body)
    if not args.no_write:
        report.section_write(args.only, body)
        log(f"wrote the {args.only} section of {report.BENCHMARKS_MD.relative_to(ROOT)}")
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
