"""How long a migration keeps the ledger from being read, on a ledger of N rows.

Usage: .venv/bin/python bench/migration_lock.py [--rows N] [--migration APP NAME]

A migration runs in one transaction and holds the locks it takes until it
commits: rebuilding a unique index (metering/0006 turns three `unique=True`
fields into named constraints) locks its table against reads and writes
for as long as the build. This recreates its own database
(`gymbilling_bench_mig`, or BENCH_MIG_DATABASE_URL's), migrates it to just
before the migration, fills the journal transactions, the holds and the
usage records with N rows each (one organization, through SQL: the
services would take hours for millions), then applies the migration while
a second connection reads one hold and one journal transaction every 20 ms,
and prints the migration's time and the longest of those reads. Not part of
`make bench`: a million rows take a few minutes to write.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ledger import database_recreate  # noqa: E402

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/gymbilling_bench_mig"

# One organization, then N journal transactions, N pending holds placed by
# them, and N usage records of those holds, as the ledger at metering/0005
# shapes them.
FILL = """
INSERT INTO accounts_organization (id, slug, name, created_at, concurrent_jobs, max_priority,
    model_tiers, personal, requests_per_minute, seats, standing, store_prompts, tokens_per_minute)
VALUES (1, 'bench-mig', 'Bench migration', now(), 4, 'standard', '["basic"]', false, 60, 1,
    'good', false, 1000);
INSERT INTO metering_journaltransaction (id, kind, idempotency_key, fingerprint, memo, created_at,
    organization_id)
SELECT g, 'hold_place', 'hold:job_' || md5(g::text), md5(g::text), '', now(), 1
FROM generate_series(1, %(rows)s) g;
INSERT INTO metering_hold (id, key, amount, captured, status, expires_at, created_at,
    organization_id, place_transaction_id)
SELECT g, 'job_' || md5(g::text), 1000, 0, 'pending', now(), now(), 1, g
FROM generate_series(1, %(rows)s) g;
INSERT INTO metering_usagerecord (id, job_id, model_name, priority, input_tokens,
    cached_input_tokens, output_tokens, engine_busy_ms, credits, serving_cost, currency,
    created_at, organization_id, hold_id)
SELECT g, 'job_' || md5(g::text), 'm', 'standard', 10, 0, 16, 2, 1000, 0, 'usd', now(), 1, g
FROM generate_series(1, %(rows)s) g;
"""


def _manage(url: str, *args: str) -> float:
    env = os.environ | {"DATABASE_URL": url, "DJANGO_SETTINGS_MODULE": "gymbilling.settings.test"}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "manage.py", *args, "--noinput"],
        cwd=ROOT,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def _previous(app: str, name: str) -> str:
    number = int(name.split("_", 1)[0])
    found = sorted((ROOT / app / "migrations").glob(f"{number - 1:04d}_*.py"))
    if not found:
        raise SystemExit(f"no migration of {app} before {name}")
    return found[0].stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument(
        "--migration", nargs=2, default=["metering", "0006_unique_keys_without_like_indexes"]
    )
    args = parser.parse_args()
    app, name = args.migration
    url = os.environ.get("BENCH_MIG_DATABASE_URL", DEFAULT_URL)
    database_recreate(url)
    _manage(url, "migrate", app, _previous(app, name))
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in filter(str.strip, FILL.split(";")):
            conn.execute(statement, {"rows": args.rows} if "%(rows)s" in statement else None)
        for table in ("metering_journaltransaction", "metering_hold", "metering_usagerecord"):
            conn.execute(f"VACUUM ANALYZE {table}")
    print(f"filled {args.rows:,} rows each in {time.perf_counter() - started:.0f} s")

    # The reads a live ledger makes, timed while the migration runs.
    longest, done = [0.0], threading.Event()

    def probe() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            while not done.is_set():
                t = time.perf_counter()
                conn.execute("SELECT key FROM metering_hold WHERE id = 1").fetchone()
                conn.execute("SELECT 1 FROM metering_journaltransaction WHERE id = 1").fetchone()
                longest[0] = max(longest[0], time.perf_counter() - t)
                time.sleep(0.02)

    reader = threading.Thread(target=probe)
    reader.start()
    time.sleep(0.5)
    took = _manage(url, "migrate", app, name)
    done.set()
    reader.join()
    print(f"{app}/{name} on {args.rows:,} rows: {took:.1f} s (Django's start included)")
    print(f"longest read of one hold and one journal transaction meanwhile: {longest[0]:.2f} s")


if __name__ == "__main__":
    main()
