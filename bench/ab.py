"""Compare two builds of the inference path on this machine at the same moment (A/B, paired).

Usage: .venv/bin/python bench/ab.py DIR_A DIR_B [--pairs N] [--clients N --seconds S]

DIR_A and DIR_B are checkouts of the project (a `git worktree` each, with a
`.venv`). Each build is served the way bench/inference.py serves it (its own
database `gymbilling_bench_ab0`/`ab1`, Redis database 9/10, development
Triton server, Celery threads worker and gunicorn), both at once. Then:

- latency (default): one client sends the same chat completion to A and to
  B in turn, in random order per pair, so that the machine's swings (on this
  2-CPU machine a run's speed moves by half within minutes) slow both alike;
  it prints each build's p50 and the median of the paired differences;
- throughput (`--clients N`): N closed-loop clients on each build at once for
  `--seconds`; each build's requests per second, competing for the same CPUs.

Not part of `make bench`: it measures a change, not the project. The
numbers it gave are in docs/BENCHMARKS.md with the commits compared.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

THIS = Path(__file__).resolve()
MESSAGES = [{"role": "user", "content": "Write one sentence about a gym."}]
WARMUP = 200


def serve(index: int) -> None:
    """In a build's directory: start its stack, print where it listens, serve until SIGTERM."""
    os.environ["BENCH_INF_REDIS_URL"] = f"redis://127.0.0.1:6379/{9 + index}"
    sys.path[0] = os.getcwd()  # the build's own code, not this file's checkout
    from bench import api
    from bench import inference as inf
    from inference.engine.server import TritonDevServer

    url = f"postgres://postgres@127.0.0.1:5432/gymbilling_bench_ab{index}"
    inf._environment(url)
    api.REDIS_URL = inf.REDIS_URL
    api.database_prepare(url)
    api.redis_flush()
    triton = TritonDevServer()
    triton.start()
    seeded = inf.seed(triton.grpc_url)
    from django.db import connections

    connections.close_all()
    config = inf.Config()
    worker = inf.Worker(url, config.pool, config.concurrency)
    server = api.Server(
        url, api.ServerConfig(config.server_workers, config.server_threads, api.CONN_MAX_AGE)
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        worker.start()
        server.start()
        # The engine's address and the prompt the chat template renders: a
        # client may call the same engine directly (bench/timeline.py).
        build = {
            "port": server.port,
            "key": seeded.api_key,
            "grpc": triton.grpc_url,
            "prompt": seeded.prompt,
        }
        print(json.dumps(build), flush=True)
        stop.wait()
    finally:
        from inference.triton import close_pools

        close_pools()
        server.stop()
        worker.stop()
        triton.stop()


class Client:
    """One keep-alive HTTP/1.1 connection to a build; `call()` returns the latency in ms."""

    def __init__(self, port: int, key: str):
        self.port, self.key = port, key
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, seed: int) -> float:
        body = json.dumps(
            {"model": "gym-tiny", "messages": MESSAGES, "max_tokens": 16, "seed": seed}
        ).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
            f"Authorization: Bearer {self.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        started = time.perf_counter()
        self.sock.sendall(head + body)
        data = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("the server closed the connection")
            data += chunk
            if b"\r\n\r\n" not in data:
                continue
            status, _, rest = data.partition(b"\r\n\r\n")
            lines = status.split(b"\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in lines
                if line.lower().startswith(b"content-length:")
            )
            if len(rest) >= length:
                break
        elapsed = (time.perf_counter() - started) * 1000
        if not lines[0].startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"{lines[0].decode()}: {rest[:300].decode(errors='replace')}")
        return elapsed


def latency(builds: list[dict], pairs: int) -> list[list[float]]:
    clients = [Client(b["port"], b["key"]) for b in builds]
    for n in range(WARMUP):
        clients[n % 2].call(n)
    measured: list[list[float]] = [[], []]
    for n in range(pairs):
        order = [0, 1] if random.random() < 0.5 else [1, 0]
        for i in order:
            measured[i].append(clients[i].call(WARMUP + n))
    return measured


def throughput(builds: list[dict], per_build: int, seconds: float) -> list[list[float]]:
    measured: list[list[float]] = [[], []]
    warm_until = time.monotonic() + 5
    stop_at = warm_until + seconds

    def run(i: int) -> None:
        client = Client(builds[i]["port"], builds[i]["key"])
        n = 0
        while time.monotonic() < stop_at:
            elapsed = client.call(n)
            n += 1
            if time.monotonic() > warm_until:
                measured[i].append(elapsed)

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1) for _ in range(per_build)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("builds", nargs="*", help="DIR_A DIR_B")
    parser.add_argument("--pairs", type=int, default=1500)
    parser.add_argument("--clients", type=int, default=0, help="per build: throughput mode")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        serve(args.serve)
        return 0
    if len(args.builds) != 2:
        parser.error("give two build directories")
    dirs = [Path(d).resolve() for d in args.builds]
    procs = []
    try:
        for i, build in enumerate(dirs):
            procs.append(
                subprocess.Popen(
                    [str(build / ".venv/bin/python"), str(THIS), "--serve", str(i)],
                    cwd=build,
                    stdout=subprocess.PIPE,
                    stderr=open(f"/tmp/bench-ab-{i}.log", "w"),  # noqa: SIM115
                    text=True,
                )
            )
        builds = []
        for i, proc in enumerate(procs):
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"build {dirs[i]} did not start; see /tmp/bench-ab-{i}.log")
            builds.append(json.loads(line))
        if args.clients:
            measured = throughput(builds, args.clients, args.seconds)
            for build, values in zip(dirs, measured, strict=True):
                print(
                    f"{build}: {len(values) / args.seconds:.1f} requests/s at {args.clients} "
                    f"clients, p50 {statistics.median(values):.2f} ms"
                )
        else:
            measured = latency(builds, args.pairs)
            for build, values in zip(dirs, measured, strict=True):
                print(
                    f"{build}: p50 {statistics.median(values):.2f} ms over {len(values)} requests"
                )
            diffs = [a - b for a, b in zip(*measured, strict=True)]
            print(
                f"A - B, paired: median {statistics.median(diffs):.2f} ms, "
                f"mean {statistics.mean(diffs):.2f} ms"
            )
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
