"""Ledger settlements per second, next to the bare-psycopg floor.

A settlement is what inference does for every request: `hold_place` for the
worst case, then `hold_capture` of what was really served; two service calls,
each its own database transaction. It is measured on one hot wallet (every
client settles on the same organization) and spread over 1,000 wallets, with
1 and 8 client processes.

The floor is a bare psycopg 3 loop that, per iteration, commits the same two
transactions' worth of row writes (the INSERT and UPDATE statements one
settlement was measured to perform, with the same row counts) into a plain
append table and a balance row, and nothing else: what PostgreSQL itself
costs on this machine. The ratio ledger / floor says how much of that the
application keeps.
"""

from __future__ import annotations

import functools
import itertools
import math
import multiprocessing
import os
import random
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from bench.harness import Measurement, combine, run_clients

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/gymbilling_bench"

SPREAD_WALLETS = 1_000
SEED_PROCESSES = 4
MICRO = 1_000_000
# Enough that no run can exhaust a wallet: a refused hold would be a seeding
# bug, not a measurement.
SEED_CREDITS = 10**9 * MICRO
HOLD = 2 * MICRO  # the worst case of a small request
CAPTURE = 1_234_567  # what it really used: a partial capture burns a lot

# The two targets of the issue.
SPREAD_TARGET_RATIO = 1 / 3
# "Not collapsing" (see targets()): 8 clients on one wallet keep at least
# this share of one client's rate, and at least SPREAD_TARGET_RATIO of what
# bare psycopg does on one hot row with 8 clients.
HOT_TARGET_SCALE = 2 / 3
DEADLOCK_STATS_DELAY_S = 0.5
KEY_PREFIX = "bench:"


@dataclass(frozen=True)
class Statement:
    verb: str  # SELECT, SELECT FOR UPDATE, INSERT, UPDATE, WITH, ...
    table: str
    rows: int  # rows written (INSERT/UPDATE) or returned (SELECT, WITH)
    sql: str
    joins: tuple[str, ...] = ()  # a SELECT FOR UPDATE locks the joined rows too
    # A WITH statement's data-modifying parts, in order: ("UPDATE", table), ...
    modifies: tuple[tuple[str, str], ...] = ()

    @property
    def is_write(self) -> bool:
        # FUNCTION: a call of one of the ledger's server-side functions
        # (migration metering 0005), which write.
        return self.verb in ("INSERT", "UPDATE", "FUNCTION") or bool(self.modifies)

    def describe(self) -> str:
        unit = "row" if self.rows == 1 else "rows"
        if self.verb == "FUNCTION":
            return (
                f"SELECT … FROM {self.table}(…): server-side, writes ({self.rows} {unit} returned)"
            )
        if self.verb == "WITH":
            # One statement doing the work of several (the ledger's SQL fast
            # path): name what it writes; the row counts are in the table below.
            writes = ", ".join(f"{verb} {table}" for verb, table in self.modifies) or "reads only"
            locks = " FOR UPDATE" if re.search(r"\bFOR\s+UPDATE\b", self.sql, re.I) else ""
            return f"WITH …{locks}: {writes} ({self.rows} {unit} returned)"
        joined = "".join(f" JOIN {table}" for table in self.joins)
        return f"{self.verb} {self.table}{joined} ({self.rows} {unit})"


@dataclass(frozen=True)
class TableWrites:
    """Rows one transaction wrote to one table, as PostgreSQL counted them."""

    table: str
    inserted: int
    updated: int


@dataclass(frozen=True)
class Config:
    name: str  # "spread" or "hot"
    clients: int


CONFIGS = [Config("spread", 1), Config("spread", 8), Config("hot", 1), Config("hot", 8)]


# --- database -------------------------------------------------------------------


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def database_recreate(url: str) -> None:
    """Drop and create the benchmark's own database; never a developer's."""
    dbname = urlsplit(url).path.lstrip("/")
    if "bench" not in dbname:
        # BENCH_DATABASE_URL pointed at a real database by mistake: dropping it
        # is not something a benchmark may do.
        raise SystemExit(
            f"refusing to drop {dbname!r}: the benchmark's database name has 'bench' in it"
        )
    with psycopg.connect(_with_dbname(url, "postgres"), autocommit=True) as conn:
        # FORCE: a client of an interrupted run may still be connected.
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))


def django_setup(url: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "gymbilling.settings.test"
    os.environ["DATABASE_URL"] = url
    import django

    django.setup()


def pg_settings(url: str) -> dict[str, str]:
    """The server settings a commit-heavy benchmark depends on."""
    names = ["server_version", "synchronous_commit", "fsync", "shared_buffers"]
    with psycopg.connect(url, autocommit=True) as conn:
        return {name: conn.execute(f"SHOW {name}").fetchone()[0] for name in names}


def maintenance(url: str, *statements: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def statements_cancel(url: str) -> None:
    """Cancel what the benchmark's clients are running; for clients stuck after a window."""
    maintenance(
        url,
        "SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid() AND state = 'active'",
    )


def deadlocks_count(url: str) -> int:
    # A backend reports its deadlocks to the statistics when it goes idle or
    # exits; the clients of the last window have just exited.
    time.sleep(DEADLOCK_STATS_DELAY_S)
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row else 0


def settle_for_checkpoint(url: str) -> None:
    # A checkpoint now rather than one falling inside a measured window:
    # every configuration then starts from the same state.
    maintenance(url, "CHECKPOINT")


# --- seeding ---------------------------------------------------------------------


def _grant_all(org_ids: list[int], expires_at) -> None:
    from django.db import connections

    from accounts.models import Organization
    from metering.services import credits_grant

    for org in Organization.objects.filter(pk__in=org_ids):
        credits_grant(
            organization=org,
            amount=SEED_CREDITS,
            source="subscription",
            paid=True,
            resellable=False,
            key=f"bench-seed:{org.slug}",
            expires_at=expires_at,
        )
    connections.close_all()


def seed(url: str) -> tuple[list[int], int]:
    """1,000 spread organizations and one hot one, each granted credits by the real service."""
    from django.db import connections
    from django.utils import timezone

    from accounts.models import Organization

    Organization.objects.bulk_create(
        [Organization(slug=f"bench-{i:04d}", name=f"Bench {i}") for i in range(SPREAD_WALLETS)]
        + [Organization(slug="bench-hot", name="Bench hot wallet")]
    )
    org_ids = list(
        Organization.objects.filter(slug__startswith="bench-").values_list("pk", flat=True)
    )
    expires_at = timezone.now() + timedelta(days=30)
    # A thousand grants one after the other would take most of the time
    # budget; a few processes, each with its own connection, share them.
    connections.close_all()
    with multiprocessing.get_context("fork").Pool(SEED_PROCESSES) as pool:
        pool.starmap(
            _grant_all, [(org_ids[i::SEED_PROCESSES], expires_at) for i in range(SEED_PROCESSES)]
        )
    # Fresh tables have no planner statistics; autovacuum would gather them
    # at some random moment during a measurement.
    maintenance(url, "VACUUM ANALYZE")
    spread = list(
        Organization.objects.exclude(slug="bench-hot")
        .filter(slug__startswith="bench-")
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    hot = Organization.objects.get(slug="bench-hot").pk
    return spread, hot


def settle_once(organization, key: str, *, hold_durable: bool = True) -> None:
    """One settlement, exactly as inference does it (`hold_durable=False`: as an answer
    given only after its job settles places its hold, not waiting for the WAL flush)."""
    from metering.services import hold_capture, hold_place

    hold_place(organization=organization, amount=HOLD, key=key, durable=hold_durable)
    hold_capture(key=key, amount=CAPTURE)


# --- counting statements --------------------------------------------------------------

_TABLE = {
    "INSERT": re.compile(r'^INSERT\s+INTO\s+"?(\w+)"?', re.IGNORECASE),
    "UPDATE": re.compile(r'^UPDATE\s+"?(\w+)"?', re.IGNORECASE),
    "SELECT": re.compile(r'\sFROM\s+"?(\w+)"?', re.IGNORECASE),
    "DELETE": re.compile(r'^DELETE\s+FROM\s+"?(\w+)"?', re.IGNORECASE),
}


def _classify(raw: str, rowcount: int) -> Statement:
    text = " ".join(raw.split())
    verb = text.split(" ", 1)[0].upper()
    match = _TABLE.get(verb, re.compile(r"$^")).search(text)
    table = match.group(1) if match else ""
    joins: tuple[str, ...] = ()
    modifies: tuple[tuple[str, str], ...] = ()
    if verb == "WITH":
        modifies = tuple(
            (found.group(1).upper().split()[0], found.group(2))
            for found in re.finditer(r'\b(INSERT\s+INTO|UPDATE)\s+"?(\w+)"?', text, re.IGNORECASE)
        )
    called = re.search(r"\sFROM\s+(metering_\w+)\(", text)
    if verb == "SELECT" and called:
        return Statement(verb="FUNCTION", table=called.group(1), rows=max(rowcount, 0), sql=text)
    if verb == "SELECT":
        joins = tuple(re.findall(r'\sJOIN\s+"?(\w+)"?', text, re.IGNORECASE))
        locking = re.search(r"\bFOR\s+UPDATE(\s+OF\b)?", text, re.IGNORECASE)
        if locking:
            verb = "SELECT FOR UPDATE OF" if locking.group(1) else "SELECT FOR UPDATE"
    return Statement(
        verb=verb, table=table, rows=max(rowcount, 0), sql=text, joins=joins, modifies=modifies
    )


class StatementLog:
    """A Django execute wrapper that records every statement and the rows it touched."""

    def __init__(self) -> None:
        self.statements: list[Statement] = []

    def __call__(self, execute, sql_text, params, many, context):
        result = execute(sql_text, params, many, context)
        self.statements.append(_classify(sql_text, context["cursor"].rowcount))
        return result


@dataclass(frozen=True)
class SettlementProfile:
    place: list[Statement]
    capture: list[Statement]
    # Per transaction, the rows written to each table (pg_stat_xact_user_tables).
    place_rows: list[TableWrites]
    capture_rows: list[TableWrites]
    fast_path: bool  # METERING_FAST_PATH: the SQL fast path or the ORM path

    @property
    def writes(self) -> list[list[tuple[str, int]]]:
        """Per transaction, the (verb, rows) of each write, for the bare floor to copy.

        Counted from the rows PostgreSQL saw written, not from the statements:
        the fast path writes several tables in one WITH statement, and the
        floor must write what the settlement writes, however it is phrased.
        One multi-row INSERT per table and one single-row UPDATE per updated
        row: exactly the statements the ORM path sends.
        """
        return [
            [("INSERT", t.inserted) for t in txn if t.inserted]
            + [("UPDATE", 1) for t in txn for _ in range(t.updated)]
            for txn in (self.place_rows, self.capture_rows)
        ]


_XACT_WRITES = "SELECT relname, n_tup_ins, n_tup_upd FROM pg_stat_xact_user_tables"


def _xact_writes(cursor) -> dict[str, tuple[int, int]]:
    cursor.execute(_XACT_WRITES)
    return {name: (ins, upd) for name, ins, upd in cursor.fetchall()}


def _rows_written(call: Callable[[], object]) -> list[TableWrites]:
    """The rows `call` writes, per table, counted by PostgreSQL.

    Run inside an outer transaction, read pg_stat_xact_user_tables before and
    after it. The difference, not the final figure: those counters also hold
    what earlier transactions of the same backend wrote and the backend has
    not yet reported to the statistics (it does so when idle, at most once a
    second), and nothing is reported in the middle of a transaction.
    Committed at the end, as the call would have been on its own.
    """
    from django.db import connection, transaction

    with transaction.atomic(), connection.cursor() as cursor:
        before = _xact_writes(cursor)
        call()
        after = _xact_writes(cursor)
    written = []
    for name in sorted(after):
        ins0, upd0 = before.get(name, (0, 0))
        ins, upd = after[name][0] - ins0, after[name][1] - upd0
        if ins or upd:
            written.append(TableWrites(name, ins, upd))
    return written


def settlement_profile(org_id: int) -> SettlementProfile:
    """The statements and row writes of a steady-state settlement (not the wallet's first)."""
    from django.db import connection

    from accounts.models import Organization
    from metering.services import fastpath

    org = Organization.objects.get(pk=org_id)
    # The first capture ever opens the consumption account; inference's
    # steady state never does, so profile later settlements.
    settle_once(org, "bench-profile-warm")
    from metering.services import hold_capture, hold_place

    place, capture = StatementLog(), StatementLog()
    with connection.execute_wrapper(place):
        hold_place(organization=org, amount=HOLD, key="bench-profile")
    with connection.execute_wrapper(capture):
        hold_capture(key="bench-profile", amount=CAPTURE)
    # A separate settlement for the row counts: the outer transaction they
    # need turns the services' own transactions into savepoints, which would
    # show up among the statements above.
    place_rows = _rows_written(
        lambda: hold_place(organization=org, amount=HOLD, key="bench-profile-rows")
    )
    capture_rows = _rows_written(lambda: hold_capture(key="bench-profile-rows", amount=CAPTURE))
    return SettlementProfile(
        place=place.statements,
        capture=capture.statements,
        place_rows=place_rows,
        capture_rows=capture_rows,
        fast_path=fastpath.enabled(),
    )


# --- the clients -------------------------------------------------------------------


def ledger_client(index: int, org_ids: list[int]) -> Callable[[], None]:
    # Imported here, before the clock starts, in case the parent never did.
    import metering.services  # noqa: F401
    from accounts.models import Organization

    # Loading them opens this process's own connection, before the clock starts.
    orgs = list(Organization.objects.filter(pk__in=org_ids))
    rng = random.Random(index)
    counter = itertools.count()
    # Keys as unique as job ids, across clients, windows and runs: a key seen
    # before would make the services replay the first settlement (cheaply)
    # instead of making a new one.
    prefix = f"{KEY_PREFIX}{uuid.uuid4().hex}"

    def step() -> None:
        settle_once(rng.choice(orgs), f"{prefix}:{next(counter)}")

    return step


BARE_SCHEMA = """
DROP TABLE IF EXISTS bench_balance, bench_append;
CREATE TABLE bench_balance (id bigint PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE bench_append (
    id bigserial PRIMARY KEY,
    account_id bigint NOT NULL,
    amount bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO bench_balance SELECT g, 0 FROM generate_series(1, {rows}) g;
VACUUM ANALYZE bench_balance;
"""


def bare_prepare(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in BARE_SCHEMA.format(rows=SPREAD_WALLETS).split(";"):
            if statement.strip():
                conn.execute(statement)


def _insert_sql(rows: int) -> str:
    values = ", ".join(["(%s, %s)"] * rows)
    return f"INSERT INTO bench_append (account_id, amount) VALUES {values}"


def bare_client(
    index: int, url: str, hot: bool, writes: list[list[tuple[str, int]]]
) -> Callable[[], None]:
    conn = psycopg.connect(url)  # not autocommit: BEGIN ... COMMIT, as Django's atomic
    rng = random.Random(index)
    plans = [
        [(_insert_sql(rows), rows) if verb == "INSERT" else (_UPDATE_BARE, 0) for verb, rows in txn]
        for txn in writes
    ]

    def step() -> None:
        row = 1 if hot else rng.randrange(1, SPREAD_WALLETS + 1)
        with conn.cursor() as cur:
            for plan in plans:
                for statement, rows in plan:
                    if rows:
                        cur.execute(statement, [row, 1] * rows)
                    else:
                        cur.execute(statement, (1, row))
                conn.commit()

    return step


_UPDATE_BARE = "UPDATE bench_balance SET balance = balance + %s WHERE id = %s"


# --- the run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    config: Config
    ledger: Measurement
    bare: Measurement
    deadlocks: int  # detected by PostgreSQL while this configuration ran

    @property
    def cpu_ratio(self) -> float:
        """The ratio a CPU-bound run on an idle machine would give: bare CPU ÷ ledger CPU."""
        ledger = self.ledger.client_cpu_ms + self.ledger.backend_cpu_ms
        return (self.bare.client_cpu_ms + self.bare.backend_cpu_ms) / ledger

    @property
    def ratio(self) -> float:
        return self.ledger.rate / self.bare.rate


def _interleaved(
    sides: dict[str, tuple[Callable[..., Callable[[], None]], tuple]],
    *,
    clients: int,
    rounds: int,
    warmup_s: float,
    duration_s: float,
    dbname: str,
    overrun: Callable[[], None],
) -> dict[str, Measurement]:
    """Measure each side in `rounds` alternating windows (A B, B A, ...) of duration/rounds.

    Alternating, rather than one side after the other, exposes both to the
    same drift: table growth, checkpoints, and other work on a shared machine.
    """
    parts: dict[str, list[Measurement]] = {name: [] for name in sides}
    order = list(sides)
    for round_ in range(rounds):
        for name in order if round_ % 2 == 0 else reversed(order):
            factory, args = sides[name]
            parts[name].append(
                run_clients(
                    factory,
                    args,
                    clients=clients,
                    warmup_s=warmup_s,
                    duration_s=duration_s / rounds,
                    dbname=dbname,
                    overrun=overrun,
                )
            )
    return {name: combine(measurements) for name, measurements in parts.items()}


def measure(
    url: str,
    *,
    warmup_s: float,
    duration_s: float,
    rounds: int,
    log: Callable[[str], None],
) -> tuple[SettlementProfile, list[Row], dict[str, float]]:
    timings: dict[str, float] = {}
    # The machine may be shared: other work running meanwhile lowers every
    # figure, so the report says how busy it was.
    timings["load_before"] = os.getloadavg()[0]
    started = time.perf_counter()
    dbname = urlsplit(url).path.lstrip("/")
    database_recreate(url)
    django_setup(url)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    timings["migrate"] = time.perf_counter() - started

    started = time.perf_counter()
    spread, hot = seed(url)
    timings["seed"] = time.perf_counter() - started
    log(f"seeded {len(spread)} + 1 wallets in {timings['seed']:.1f} s")

    profile = settlement_profile(spread[0])
    writes = profile.writes
    log(
        "one settlement: "
        + ", ".join(f"{len(txn)} writes" for txn in writes)
        + f" in 2 transactions; {len(profile.place) + len(profile.capture)} statements"
    )
    bare_prepare(url)

    rows: list[Row] = []
    for config in CONFIGS:
        org_ids = spread if config.name == "spread" else [hot]
        settle_for_checkpoint(url)
        deadlocks = deadlocks_count(url)
        measured = _interleaved(
            {
                "ledger": (ledger_client, (org_ids,)),
                "bare": (bare_client, (url, config.name == "hot", writes)),
            },
            clients=config.clients,
            rounds=rounds,
            warmup_s=warmup_s,
            duration_s=duration_s,
            dbname=dbname,
            overrun=functools.partial(statements_cancel, url),
        )
        row = Row(config, measured["ledger"], measured["bare"], deadlocks_count(url) - deadlocks)
        rows.append(row)
        log(
            f"{config.name:>6} x{config.clients}: ledger {row.ledger.rate:8.1f}/s "
            f"(CPU ms {row.ledger.client_cpu_ms:.1f}+{row.ledger.backend_cpu_ms:.1f}, "
            f"errors {row.ledger.errors}, "
            f"other CPUs {row.ledger.other_cpus:.2f}), bare {row.bare.rate:8.1f}/s "
            f"(CPU ms {row.bare.client_cpu_ms:.1f}+{row.bare.backend_cpu_ms:.1f}, "
            f"errors {row.bare.errors}, "
            f"other CPUs {row.bare.other_cpus:.2f}), ratio {row.ratio:.2f}, "
            f"deadlocks {row.deadlocks}"
        )
        for m in (row.ledger, row.bare):
            if m.first_error:
                log(f"first error:\n{m.first_error}")
    timings["load_after"] = os.getloadavg()[0]
    return profile, rows, timings


@dataclass(frozen=True)
class Audit:
    reconcile_ok: bool
    violations: list
    captured_holds: int  # settlements the database holds, warm-ups included


def audit() -> Audit:
    """After the run: the ledger still exact, and every counted settlement really made."""
    from metering.models import Hold, HoldStatus
    from metering.reconcile import ledger_reconcile

    report = ledger_reconcile()
    captured = Hold.objects.filter(
        key__startswith=KEY_PREFIX, status=HoldStatus.CAPTURED, captured=CAPTURE
    ).count()
    return Audit(report.ok, report.violations, captured)


# --- the report ---------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    # NaN: nothing completed, so there is no latency or cost per operation.
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _label(config: Config) -> str:
    return "1,000 wallets" if config.name == "spread" else "1 hot wallet"


def _cpu(m: Measurement) -> str:
    return f"{_fmt(m.client_cpu_ms, 2)} + {_fmt(m.backend_cpu_ms, 2)}"


def table(rows: list[Row]) -> str:
    lines = [
        "| wallets | clients | settlements/s | p50 ms | p99 ms "
        "| bare psycopg iterations/s | bare p50 ms | bare p99 ms | ratio "
        "| CPU ms per op, client + PostgreSQL (ledger / bare) | CPU ratio "
        "| deadlocks | other CPU load (ledger / bare) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for row in rows:
        ledger, bare = row.ledger, row.bare
        lines.append(
            f"| {_label(row.config)} | {row.config.clients} | {_fmt(ledger.rate)} "
            f"| {_fmt(ledger.p50_ms, 2)} | {_fmt(ledger.p99_ms, 2)} | {_fmt(bare.rate)} "
            f"| {_fmt(bare.p50_ms, 2)} | {_fmt(bare.p99_ms, 2)} | {row.ratio:.2f} "
            f"| {_cpu(ledger)} / {_cpu(bare)} | {row.cpu_ratio:.2f} | {row.deadlocks} "
            f"| {ledger.other_cpus:.2f} / {bare.other_cpus:.2f} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[tuple[str, bool, str]]:
    """(target, met, evidence) for the issue's two targets."""
    by = {(r.config.name, r.config.clients): r for r in rows}
    result = []
    for clients in (1, 8):
        row = by[("spread", clients)]
        result.append(
            (
                f"spread-out settlements ≥ 1/3 of the bare-psycopg rate, {clients} client(s)",
                row.ratio >= SPREAD_TARGET_RATIO,
                f"ratio {row.ratio:.2f}",
            )
        )
    hot1, hot8 = by[("hot", 1)], by[("hot", 8)]
    # "Not collapsing": one wallet's settlements serialize on its row locks,
    # so 8 clients cannot do much more than 1; collapsing is doing far less
    # (lock convoys, deadlocks, retries) or failing. Two bars, both needed:
    # against its own 1-client rate (a share, not 100%: this 2-CPU machine
    # moves a single rate by 10-20% between runs, and bare psycopg's own
    # 8-to-1 scaling on one hot row measured anywhere from x0.73 to x1.54),
    # and against what PostgreSQL allows on one hot row with 8 clients, the
    # bare floor measured in the same alternating windows (the spread-out
    # settlements' 1/3 bar). An earlier 80% bar on the first alone was
    # dropped: the same code passed and failed it from run to run.
    scale = hot8.ledger.rate / hot1.ledger.rate
    bare_scale = hot8.bare.rate / hot1.bare.rate
    result.append(
        (
            "the hot wallet does not collapse under 8 clients (8-client rate ≥ "
            f"{HOT_TARGET_SCALE:.0%} of the 1-client rate and ≥ 1/3 of bare psycopg's "
            "8-client rate on one hot row, no failed settlements)",
            scale >= HOT_TARGET_SCALE
            and hot8.ratio >= SPREAD_TARGET_RATIO
            and hot8.ledger.errors == 0,
            f"{_fmt(hot8.ledger.rate)}/s vs {_fmt(hot1.ledger.rate)}/s (x{scale:.2f}; "
            f"bare psycopg on one hot row: x{bare_scale:.2f}), ratio to bare at 8 clients "
            f"{hot8.ratio:.2f}, {hot8.ledger.errors} failed settlements, "
            f"{hot8.deadlocks} deadlocks",
        )
    )
    return result


def _statement_lines(statements: list[Statement]) -> list[str]:
    return [f"   {i}. `{s.describe()}`" for i, s in enumerate(statements, 1)]


def _counts(statements: list[Statement], rows: list[TableWrites]) -> str:
    writing = sum(1 for s in statements if s.is_write)
    inserted = sum(t.inserted for t in rows)
    updated = sum(t.updated for t in rows)
    noun = "statement" if len(statements) == 1 else "statements"
    return (
        f"{len(statements)} {noun}, {writing} of them writing; "
        f"{inserted + updated} rows written ({inserted} inserted, {updated} updated)"
    )


def _rows_line(rows: list[TableWrites]) -> str:
    parts = []
    for t in rows:
        done = [
            f"{n} {verb}" for n, verb in ((t.inserted, "inserted"), (t.updated, "updated")) if n
        ]
        parts.append(f"`{t.table}` {' + '.join(done)}")
    return "   - rows written, as PostgreSQL counted them: " + ", ".join(parts)


def markdown(
    *,
    profile: SettlementProfile,
    rows: list[Row],
    machine_rows: list[tuple[str, str]],
    date: str,
    warmup_s: float,
    duration_s: float,
    rounds: int,
    audit: Audit,
    timings: dict[str, float],
) -> str:
    both = profile.place + profile.capture
    path = (
        "the SQL fast path (`METERING_FAST_PATH` on, the default: `metering/services/fastpath.py`)"
        if profile.fast_path
        else "the ORM path (`METERING_FAST_PATH` off)"
    )
    out = [
        "## Ledger settlements",
        "",
        "A settlement is what inference does for every request: `hold_place` for the worst "
        "case, then `hold_capture` of part of it (the tokens really served) — two service "
        "calls, each its own database transaction. Measured on one hot wallet (every client "
        "settles on the same organization) and spread over 1,000 wallets (each settlement "
        "picks one at random), with 1 and 8 client processes. The services ran "
        f"{path}.",
        "",
        f"- Command: `make bench` (`bench/run.py`, section `ledger`); date: {date}.",
        "- Machine (PostgreSQL runs on it too, sharing the CPUs with the clients):",
        *(f"  - {name}: {value}" for name, value in machine_rows),
        f"  - 1-minute load average: {timings['load_before']:.2f} before the run, "
        f"{timings['load_after']:.2f} after it (anything else running lowers every figure)",
        f"- Each configuration: its client processes run the ledger and the bare loop in "
        f"{rounds} alternating windows (ledger, bare, then bare, ledger, ...), each a "
        f"{warmup_s:g} s warm-up then {duration_s / rounds:g} s measured: {duration_s:g} s "
        "measured per side in all. A settlement counts when it starts and ends inside a "
        "measured window; latency is per settlement (both calls); a step still running "
        "1 s after its window closes is cancelled (`pg_cancel_backend`), so a stall shows as "
        "a low rate rather than a long run. Own database "
        "`gymbilling_bench`, dropped, migrated and seeded through the real services "
        "(`credits_grant`, one 30-day subscription lot per wallet) at the start of each run.",
        "- Other CPU load: the CPUs' worth of time used, during the measured windows, by "
        "everything but the clients and their PostgreSQL backends (from /proc; "
        f"{len(os.sched_getaffinity(0))} means the machine was fully taken by other work). "
        "Well above 0, the figures of that row are lower than this machine can do.",
        "- CPU ms per op: CPU time the client processes, then their PostgreSQL backends, "
        "spent per completed settlement (or bare iteration) in the measured windows, also "
        "from the scheduler's runtime in /proc; other work moves it far less than "
        "the rates, so it is the figure to compare between runs on a busy machine. "
        "CPU ratio: bare CPU per op ÷ ledger CPU per op, the ratio a CPU-bound run would "
        "give on an idle machine.",
        "- Deadlocks: detected by PostgreSQL (`pg_stat_database.deadlocks`) while the "
        "configuration ran; each costs `deadlock_timeout` (1 s) of waiting, and the services "
        "retry the victim.",
        "- Bare psycopg: psycopg 3, one connection per process, per iteration the same two "
        "transactions' worth of row writes as one settlement (per transaction, the rows "
        "PostgreSQL counted it inserting and updating, below: one multi-row INSERT per table "
        "and one single-row UPDATE per updated row), into a plain append table and a balance "
        "row (one of 1,000 at random, or one hot row); nothing else, with psycopg's default "
        "cursor (server-side parameters, "
        "statements prepared after 5 uses; Django binds parameters client-side). The ratio is "
        "ledger settlements/s ÷ bare iterations/s.",
        "",
        "### Statements per settlement",
        "",
        "Statements counted by wrapping Django's connection (`execute_wrapper`) around one "
        "steady-state settlement; rows written counted by PostgreSQL "
        "(`pg_stat_xact_user_tables`) for another: "
        f"**{_counts(both, profile.place_rows + profile.capture_rows)}**, "
        + (
            "each statement sent alone, outside any transaction block, so PostgreSQL "
            "commits it as it ends (no BEGIN or COMMIT round trip; the wallet's row lock "
            "is never held while the client process runs)."
            if profile.fast_path
            else "plus BEGIN and COMMIT for each of the 2 transactions."
        ),
        "",
        f"1. `hold_place` — {_counts(profile.place, profile.place_rows)}:",
        *_statement_lines(profile.place),
        _rows_line(profile.place_rows),
        f"2. `hold_capture` — {_counts(profile.capture, profile.capture_rows)}:",
        *_statement_lines(profile.capture),
        _rows_line(profile.capture_rows),
        "",
        "### Results",
        "",
        table(rows),
        "",
        "### Targets",
        "",
    ]
    for name, met, evidence in targets(rows):
        out.append(f"- {'met' if met else '**not met**'}: {name} — {evidence}.")
    errors = sum(r.ledger.errors + r.bare.errors for r in rows)
    counted = sum(r.ledger.completed for r in rows)
    out += [
        "",
        f"Failed operations during the run: {errors}. After the run, the database holds "
        f"{audit.captured_holds:,} captured benchmark holds (warm-ups included) for the "
        f"{counted:,} settlements counted above, and ledger reconciliation finds "
        + (
            "every invariant holding."
            if audit.reconcile_ok
            else f"**violations**: {audit.violations}"
        ),
    ]
    return "\n".join(out) + "\n"
