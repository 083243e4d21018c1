"""Where one request's time goes, hop by hop, across the client, gunicorn and the worker.

Usage: .venv/bin/python bench/timeline.py [--requests N]

The stage table of `make bench` comes from the Job row's timestamps: four
stages. This serves the inference path as bench/ab.py serves one build
(gunicorn, a Celery threads worker, the development Triton server) with
every process stamping `time.perf_counter_ns()` (CLOCK_MONOTONIC, one clock
for all processes of the machine) as it enters and leaves each step of the
path: the API key, the rate limits, the hold's statement, the publish, the
worker's BRPOP, the job's start while the engine works, the engine call,
the settlement's statement, the relay. One client sends N chat completions
one after the other, each followed by one direct Triton call of the same
request, and the report gives, per consecutive pair of stamps, the median
over the requests whose stamps came in the most common order.

The stamps are put in from outside: a `sitecustomize` module that the
served processes find first on their path wraps the functions named in
STAMPS once Django is set up (`install`). Nothing in the project's code
knows about it; a wrapped function costs about a microsecond more per call.
Not part of `make bench`: it explains the figures, it does not measure the
project (docs/BENCHMARKS.md, "ninth pass", has what it showed).
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import glob
import inspect
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV_DIR = "GYM_TIMELINE_DIR"

# (module, attribute, stamp name): the wrapped callable is looked up where the
# path calls it (a module's global, or a class's method), and stamped as
# "<name>" on entry and "<name>/" on return.
STAMPS = [
    ("gymbilling.middleware", "ApiErrorMiddleware.__call__", "api"),
    ("accounts.api_base", "OrgApiView.initial", "key+limits"),
    ("inference.services.jobs", "rate_limit_consume", "tokens"),
    ("inference.services.jobs", "hold_place", "hold"),
    ("inference.services.jobs", "task_publish", "publish"),
    ("inference.tasks", "_job_run", "task"),
    ("inference.tasks", "job_start", "start"),
    ("inference.triton", "ServerPool._attempt", "engine"),
    ("inference.tasks", "job_settle", "settle"),
    ("inference.tasks", "_send", "relay"),
    ("inference.apis", "_GenerationApi.wait", "wait"),
    ("accounts.sql", "execute", "sql"),
]

_SITECUSTOMIZE = f"""
import os
try:
    import django
except ImportError:  # a process of the engine's, say: nothing to stamp
    django = None
if django is not None and os.environ.get({ENV_DIR!r}):
    _setup = django.setup
    def setup(*args, **kwargs):
        _setup(*args, **kwargs)
        from bench.timeline import install
        install()
    django.setup = setup
"""

# --- in the served processes ----------------------------------------------------

_stamps: list[str] = []
_stamps_lock = threading.Lock()
_installed = False


def stamp(name: str) -> None:
    # list.append is atomic; the flush swaps the list under the lock, so a
    # stamp another thread appends meanwhile goes to the next flush.
    _stamps.append(f"{time.perf_counter_ns()} {os.getpid()} {name}\n")
    if len(_stamps) >= 256:
        _flush()


def _flush() -> None:
    global _stamps
    with _stamps_lock:
        taken, _stamps = _stamps, []
    directory = os.environ.get(ENV_DIR)
    if directory and taken:
        with open(Path(directory) / f"{os.getpid()}.txt", "a") as out:
            out.write("".join(taken))


def _stamped(func, name: str):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        stamp(name)
        try:
            return func(*args, **kwargs)
        finally:
            stamp(name + "/")

    return wrapper


def install() -> None:
    """Wrap STAMPS and kombu's BRPOP read (the worker's wake-up for a message), once."""
    global _installed
    if _installed:  # django.setup() called again
        return
    _installed = True
    import importlib

    for module_name, attribute, name in STAMPS:
        owner = importlib.import_module(module_name)
        *path, leaf = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        wrapped = _stamped(getattr(owner, leaf), name)
        if isinstance(inspect.getattr_static(owner, leaf), staticmethod):
            wrapped = staticmethod(wrapped)
        setattr(owner, leaf, wrapped)
    from kombu.transport import redis as kombu_redis

    read = kombu_redis.Channel._brpop_read

    def brpop_read(self, **options):
        stamp("brpop")
        return read(self, **options)

    kombu_redis.Channel._brpop_read = brpop_read
    atexit.register(_flush)


# --- the client -------------------------------------------------------------------


def _serve(directory: str) -> tuple[subprocess.Popen, dict]:
    hooks = Path(directory) / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    env = {
        **os.environ,
        ENV_DIR: directory,
        # First on the path, so that Python's own sitecustomize (Debian's:
        # an apport hook) is not the one imported.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")])),
    }
    log = Path(tempfile.gettempdir()) / "gym-timeline-serve.log"  # kept: read it when a run fails
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "ab.py"), "--serve", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
    )
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the build did not start; see {log}")
        return proc, json.loads(line)
    except BaseException:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    """ab.py's serve stops its gunicorn, worker and Triton on SIGTERM."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _requests(stamps: list[tuple[int, str]]) -> list[list[tuple[int, str]]]:
    """Each request's stamps, from the client's send to its receipt, in time order."""
    requests, current = [], None
    for at, name in sorted(stamps):
        if name == "client":
            current = [(at, name)]
        elif current is not None:
            current.append((at, name))
            if name == "client/":
                requests.append(current)
                current = None
    return requests


def report(stamps: list[tuple[int, str]], direct_ms: list[float]) -> str:
    requests = _requests(stamps)
    orders = collections.Counter(tuple(name for _at, name in r) for r in requests)
    order, count = orders.most_common(1)[0]
    chosen = [r for r in requests if tuple(name for _at, name in r) == order]
    lines = [
        f"{len(requests)} requests, {count} with the most common order of stamps "
        f"({len(orders)} orders); end to end p50 "
        f"{statistics.median((r[-1][0] - r[0][0]) / 1e6 for r in chosen):.3f} ms; "
        f"direct Triton, interleaved, p50 {statistics.median(direct_ms):.3f} ms",
        "",
        "| from | to | p50 ms | mean ms |",
        "| --- | --- | ---: | ---: |",
    ]
    for i in range(1, len(order)):
        gaps = [(r[i][0] - r[i - 1][0]) / 1e6 for r in chosen]
        lines.append(
            f"| {order[i - 1]} | {order[i]} | {statistics.median(gaps):.3f} | "
            f"{statistics.mean(gaps):.3f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=300)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    import ab

    with tempfile.TemporaryDirectory(prefix="gym-timeline-") as directory:
        proc, build = _serve(directory)
        try:
            os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gymbilling.settings.test")
            sys.path.insert(0, str(ROOT))
            import django

            django.setup()
            from inference import triton

            pool = triton.pool_for([build["grpc"]])
            client = ab.Client(build["port"], build["key"])

            def direct_call(seed: int) -> None:
                # As the path's request: the same prompt, length and seed.
                pool.generate(
                    triton.GenerationRequest(prompt=build["prompt"], max_tokens=16, seed=seed)
                )

            for n in range(args.warmup):
                client.call(n)
                direct_call(n)
            stamps: list[tuple[int, str]] = []
            direct: list[float] = []
            for n in range(args.requests):
                sent = time.perf_counter_ns()
                client.call(args.warmup + n)
                stamps += [(sent, "client"), (time.perf_counter_ns(), "client/")]
                # A pause, then the direct call, then a pause: each path's
                # request starts from a machine at rest from the other's.
                time.sleep(0.002)
                started = time.perf_counter()
                direct_call(args.warmup + n)
                direct.append((time.perf_counter() - started) * 1000)
                time.sleep(0.002)
        finally:
            _stop(proc)
        for path in glob.glob(str(Path(directory) / "*.txt")):
            for line in Path(path).read_text().splitlines():
                at, _pid, name = line.split(" ", 2)
                stamps.append((int(at), name))
        print(report(stamps, direct))
    return 0


if __name__ == "__main__":
    sys.exit(main())
