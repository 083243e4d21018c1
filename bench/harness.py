"""Run a step function in N client processes for a fixed time and measure it.

Clients are processes, not threads: with threads the GIL, not PostgreSQL,
would bound 8 clients. Processes are forked after the parent has closed its
database connections, so each client opens its own.

The machine may be shared with other work, which lowers every figure. So the
parent also measures, over the same window, how much CPU everything else
used: the report shows it next to each figure, and a run on a busy machine
says so instead of passing for a slow ledger.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import statistics
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A step factory runs inside the client process: it opens connections and
# loads what the step needs, so none of that is timed.
StepFactory = Callable[..., Callable[[], None]]

# Clients that have not reported this long after the run should have ended
# are stuck (a lock nobody releases); fail loudly rather than hang `make bench`.
REPORT_GRACE_S = 60
# How long a step may run past the window before `overrun` cuts it short.
OVERRUN_GRACE_S = 1.0

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Measurement:
    clients: int
    duration_s: float
    latencies: list[float] = field(repr=False)
    errors: int
    first_error: str
    # CPUs' worth of time used during the measured window by the client
    # processes, by the PostgreSQL backends serving them, and by everything
    # else on the machine.
    client_cpus: float
    backend_cpus: float
    other_cpus: float

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.completed / self.duration_s

    def _per_step_ms(self, cpus: float) -> float:
        if not self.latencies:
            return float("nan")
        return cpus * self.duration_s * 1000 / self.completed

    @property
    def client_cpu_ms(self) -> float:
        """Client CPU time per completed step: a figure other work barely moves."""
        return self._per_step_ms(self.client_cpus)

    @property
    def backend_cpu_ms(self) -> float:
        """PostgreSQL backend CPU time per completed step."""
        return self._per_step_ms(self.backend_cpus)

    @property
    def p50_ms(self) -> float:
        return _percentile_ms(self.latencies, 50)

    @property
    def p99_ms(self) -> float:
        return _percentile_ms(self.latencies, 99)


def combine(parts: list[Measurement]) -> Measurement:
    """One measurement from several windows of the same configuration."""
    total = sum(p.duration_s for p in parts)
    return Measurement(
        clients=parts[0].clients,
        duration_s=total,
        latencies=[lat for p in parts for lat in p.latencies],
        errors=sum(p.errors for p in parts),
        first_error=next((p.first_error for p in parts if p.first_error), ""),
        client_cpus=sum(p.client_cpus * p.duration_s for p in parts) / total,
        backend_cpus=sum(p.backend_cpus * p.duration_s for p in parts) / total,
        other_cpus=sum(p.other_cpus * p.duration_s for p in parts) / total,
    )


def _percentile_ms(latencies: list[float], q: int) -> float:
    if not latencies:
        return float("nan")
    if len(latencies) == 1:
        return latencies[0] * 1000
    return statistics.quantiles(latencies, n=100, method="inclusive")[q - 1] * 1000


# --- CPU accounting ---------------------------------------------------------------


def _busy_ticks() -> int:
    """Ticks all CPUs spent on anything but idling, since boot."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return user + nice + system + irq + softirq + steal


def _own_cpu_ns(client_pids: set[int], dbname: str) -> dict[int, tuple[bool, int]]:
    """{pid: (is a client, CPU ns used)} for the clients and the PostgreSQL backends serving them.

    A backend's process title names its database, which is how ours are told
    from the backends of whatever else uses the same server. The time is the
    scheduler's exact runtime (/proc/PID/schedstat): the tick-sampled
    utime/stime miss most of a process that runs in bursts shorter than a
    tick, as a backend answering one short statement at a time does.
    """
    marker = f" {dbname} ".encode()
    used: dict[int, tuple[bool, int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            if pid not in client_pids and marker not in Path(f"/proc/{pid}/cmdline").read_bytes():
                continue
            runtime_ns = int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
        except OSError:
            continue  # exited meanwhile
        used[pid] = (pid in client_pids, runtime_ns)
    return used


@dataclass(frozen=True)
class _Sample:
    at: float
    busy: int
    own: dict[int, tuple[bool, int]]


def _sample(client_pids: set[int], dbname: str) -> _Sample:
    return _Sample(time.perf_counter(), _busy_ticks(), _own_cpu_ns(client_pids, dbname))


def _cpus(first: _Sample, last: _Sample) -> tuple[float, float, float]:
    """CPUs' worth used between two samples by the clients, their backends, and the rest."""
    clients = backends = 0
    # Per process, and only those alive at the end: a backend of an earlier
    # run that exits meanwhile must not take its whole life's CPU time with it.
    for pid, (is_client, ns) in last.own.items():
        used = ns - first.own.get(pid, (is_client, 0))[1]
        if is_client:
            clients += used
        else:
            backends += used
    seconds = last.at - first.at
    other = max(0.0, (last.busy - first.busy) / _TICKS - (clients + backends) / 1e9)
    return clients / 1e9 / seconds, backends / 1e9 / seconds, other / seconds


# --- clients ------------------------------------------------------------------------


def _cancelled(exc: BaseException | None) -> bool:
    """Whether a statement was cancelled (SQLSTATE 57014), however the error is wrapped."""
    for _ in range(10):  # chains are short; never loop on a pathological one
        if exc is None:
            break
        if getattr(exc, "sqlstate", None) == "57014":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _client(
    factory: StepFactory,
    args: tuple[Any, ...],
    index: int,
    barrier: Any,
    results: Any,
    sampled: Any,
    warmup_s: float,
    duration_s: float,
) -> None:
    try:
        step = factory(index, *args)
        barrier.wait()
        # Every process starts its clock right after the barrier; the skew
        # between them is well under a millisecond.
        measure_from = time.perf_counter() + warmup_s
        stop_at = measure_from + duration_s
        latencies: list[float] = []
        errors = 0
        first_error = ""
        while True:
            started = time.perf_counter()
            if started >= stop_at:
                break
            try:
                step()
            except Exception as exc:
                # A step still running after the window may be cut short on
                # purpose (see run_clients); that is no error of the ledger.
                if not (_cancelled(exc) and time.perf_counter() >= stop_at):
                    errors += 1
                    first_error = first_error or traceback.format_exc(limit=3)
                continue
            ended = time.perf_counter()
            # Only steps wholly inside the window count, so the rate is
            # completed work per second of steady state.
            if started >= measure_from and ended <= stop_at:
                latencies.append(ended - started)
        results.put((index, latencies, errors, first_error))
        # Exiting closes the connection, and its backend exits with it: wait
        # until the parent has taken its last CPU sample, or the backend's
        # time would go missing from it (and count as other work).
        sampled.wait(REPORT_GRACE_S)
    except BaseException:
        barrier.abort()
        results.put((index, None, 1, traceback.format_exc()))


def run_clients(
    factory: StepFactory,
    args: tuple[Any, ...],
    *,
    clients: int,
    warmup_s: float,
    duration_s: float,
    dbname: str,
    overrun: Callable[[], None] | None = None,
) -> Measurement:
    """Run `factory(index, *args)()` in a loop in `clients` processes.

    `overrun` is called, about once a second, while clients are still busy
    after the window has closed (say, waiting on a lock): it should cancel
    their statements, so a stalled run cannot eat the time of the others.
    """
    from django.db import connections

    # A forked child must never share the parent's socket to PostgreSQL.
    connections.close_all()
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(clients + 1)  # the parent too: it samples the CPU
    results = ctx.Queue()
    sampled = ctx.Event()
    procs = [
        ctx.Process(
            target=_client,
            args=(factory, args, i, barrier, results, sampled, warmup_s, duration_s),
            daemon=True,
        )
        for i in range(clients)
    ]
    for proc in procs:
        proc.start()
    pids = {proc.pid for proc in procs if proc.pid is not None}
    first = last = None
    try:
        barrier.wait(timeout=REPORT_GRACE_S)
    except threading.BrokenBarrierError:
        pass  # a client failed to start; its report below says why
    else:
        start = time.perf_counter()
        time.sleep(max(0.0, start + warmup_s - time.perf_counter()))
        first = _sample(pids, dbname)
        time.sleep(max(0.0, start + warmup_s + duration_s - time.perf_counter()))
        last = _sample(pids, dbname)
    sampled.set()
    latencies: list[float] = []
    errors = 0
    first_error = ""
    # Drain the queue before joining: a child blocks on exit until what it
    # put is read.
    deadline = time.perf_counter() + REPORT_GRACE_S
    for _ in procs:
        while True:
            try:
                _, lats, errs, err = results.get(timeout=OVERRUN_GRACE_S)
                break
            except queue.Empty:
                if time.perf_counter() > deadline:
                    raise
                if overrun is not None:
                    overrun()
        if lats is None:
            for proc in procs:
                proc.kill()
            raise RuntimeError(f"a benchmark client failed to start:\n{err}")
        latencies.extend(lats)
        errors += errs
        first_error = first_error or err
    for proc in procs:
        proc.join()
    if first is None or last is None:
        raise RuntimeError("the benchmark clients never started together")
    client_cpus, backend_cpus, other_cpus = _cpus(first, last)
    return Measurement(
        clients=clients,
        duration_s=duration_s,
        latencies=latencies,
        errors=errors,
        first_error=first_error,
        client_cpus=client_cpus,
        backend_cpus=backend_cpus,
        other_cpus=other_cpus,
    )
