"""Stripe webhooks: how fast the app takes them, and how fast a worker applies them.

Two measurements, in one run, against gunicorn as in the API benchmark:

- ingest: signed events POSTed to `/stripe/webhook/` by 1 and 8 clients, each
  a new event id (verify the signature, insert the event row, queue the task
  on commit, answer 200) — the "answer 2xx at once" of the design;
- apply: a real Celery worker applying `invoice.paid` events for paid
  invoices of the local Stripe stand-in (re-read the invoice and the
  subscription from Stripe, mirror them, grant the credits once) — events per
  second until every grant is in the ledger.

Its own database (`gymbilling_bench_billing`, or BENCH_BILLING_DATABASE_URL),
Redis database 5 and a stand-in process; nothing else is touched.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench import api, harness

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/gymbilling_bench_billing"
REDIS_URL = "redis://127.0.0.1:6379/5"
SECRET_KEY = "sk_test_bench"
WEBHOOK_SECRET = "whsec_bench"
INGEST_CLIENTS = (1, 8)
APPLY_INVOICES = 60


@dataclass(frozen=True)
class Ingest:
    clients: int
    events: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass(frozen=True)
class Apply:
    events: int
    seconds: float
    grants: int
    failed: int

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def _signed(body: bytes) -> str:
    from gymbilling.stripe_standin.webhooks import sign

    return sign(body, WEBHOOK_SECRET, int(time.time()))


def _event(event_id: str, event_type: str, obj: dict) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": event_type,
            "created": int(time.time()),
            "livemode": False,
            "api_version": "2026-10-28.endive",
            "data": {"object": obj},
        }
    ).encode()


def _post_all(port: int, bodies: list[bytes], clients: int) -> tuple[list[float], int, float]:
    """POST the bodies from `clients` keep-alive connections; latencies (s), errors, wall time."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()
    chunks = [bodies[i::clients] for i in range(clients)]

    def run(chunk: list[bytes]) -> None:
        conn = http.client.HTTPConnection(api.HOST, port, timeout=30)
        for body in chunk:
            began = time.perf_counter()
            conn.request(
                "POST",
                "/stripe/webhook/",
                body=body,
                headers={"Content-Type": "application/json", "Stripe-Signature": _signed(body)},
            )
            response = conn.getresponse()
            response.read()
            took = time.perf_counter() - began
            with lock:
                latencies.append(took)
                if response.status != 200:
                    errors[0] += 1
        conn.close()

    threads = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors[0], time.perf_counter() - began


def _paid_invoices(standin, customer, count: int, log) -> list[dict]:
    """`count` paid invoices of one Pro subscription: Checkout, then renewals."""
    from gymbilling import stripe_client
    from gymbilling.services import checkout_create

    result = checkout_create(organization=customer, plan=_plan("pro"))
    standin.pay_checkout(result.session_id)
    session = stripe_client.checkout_session_retrieve(result.session_id)
    for _ in range(count - 1):
        standin.advance(session["subscription"])
    invoices = [
        invoice
        for invoice in stripe_client.invoices_list(status="paid")
        if invoice.get("customer") == session["customer"]
    ]
    log(f"{len(invoices)} paid invoices at the stand-in")
    return invoices


def _plan(code: str):
    from gymbilling.models import Plan

    return Plan.objects.get(code=code)


def _worker(url: str, standin_base: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "gymbilling.settings.production",
        "DJANGO_SECRET_KEY": "bench",
        "SITE_URL": "http://127.0.0.1",
        "EMAIL_URL": "consolemail://",
        "DATABASE_URL": url + "?conn_max_age=60",
        "REDIS_URL": REDIS_URL,
        "CELERY_BROKER_URL": REDIS_URL,
        "STRIPE_SECRET_KEY": SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "STRIPE_API_BASE": standin_base,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "gymbilling", "worker", "-Q", "celery",
         "--pool", "threads", "--concurrency", "4", "-l", "WARNING"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def measure(url: str, *, events: int, log) -> tuple[list[Ingest], Apply]:
    from gymbilling.stripe_standin.process import StripeStandIn

    os.environ.update(
        {
            "CELERY_BROKER_URL": REDIS_URL,
            "STRIPE_SECRET_KEY": SECRET_KEY,
            "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        }
    )
    with StripeStandIn() as standin:
        os.environ["STRIPE_API_BASE"] = standin.api_base
        api.database_prepare(url)
        import redis

        redis.Redis.from_url(REDIS_URL).flushdb()
        from django.conf import settings

        settings.STRIPE_API_BASE = standin.api_base
        settings.STRIPE_SECRET_KEY = SECRET_KEY
        from accounts.services import organization_create
        from gymbilling.models import StripeEvent
        from gymbilling.services.catalog import catalog_seed_defaults, catalog_sync
        from metering.models import JournalTransaction

        catalog_seed_defaults()
        catalog_sync()
        org = organization_create(slug="bench-billing", name="Bench billing")
        config = api.ServerConfig(workers=2, threads=4, conn_max_age=api.CONN_MAX_AGE)
        ingests = []
        with api.Server(url, config) as server:
            for clients in INGEST_CLIENTS:
                bodies = [
                    _event(
                        f"evt_bench_{clients}_{i}",
                        "customer.updated",
                        {"id": "cus_x", "object": "customer"},
                    )
                    for i in range(events)
                ]
                latencies, errors, seconds = _post_all(server.port, bodies, clients)
                ingests.append(
                    Ingest(clients, len(latencies), seconds, harness._percentile_ms(latencies, 50),
                           harness._percentile_ms(latencies, 99), errors)
                )  # fmt: skip
                log(f"ingest x{clients}: {ingests[-1].rate:.1f}/s, p50 {ingests[-1].p50_ms:.2f} ms")
            # apply: the queued ingest tasks are not part of it
            redis.Redis.from_url(REDIS_URL).flushdb()
            invoices = _paid_invoices(standin, org, APPLY_INVOICES, log)
            worker = _worker(url, standin.api_base)
            try:
                time.sleep(3)  # the worker connects to the broker
                bodies = [_event(f"evt_apply_{inv['id']}", "invoice.paid", inv) for inv in invoices]
                began = time.perf_counter()
                _post_all(server.port, bodies, 4)
                keys = [f"grant:invoice:{inv['id']}" for inv in invoices]
                deadline = time.monotonic() + 300
                while time.monotonic() < deadline:
                    done = StripeEvent.objects.filter(
                        stripe_event_id__startswith="evt_apply_",
                        status__in=["processed", "failed", "ignored"],
                    ).count()
                    if done == len(bodies):
                        break
                    time.sleep(0.05)
                seconds = time.perf_counter() - began
            finally:
                worker.terminate()
                worker.wait(30)
            grants = JournalTransaction.objects.filter(idempotency_key__in=keys).count()
            failed = StripeEvent.objects.filter(
                stripe_event_id__startswith="evt_apply_", status="failed"
            ).count()
            applied = Apply(len(bodies), seconds, grants, failed)
            log(f"apply: {applied.rate:.1f} events/s, {grants} grants, {failed} failed")
    return ingests, applied


def markdown(*, ingests: list[Ingest], applied: Apply, machine_rows, date: str) -> str:
    out = [
        "## Stripe webhooks",
        "",
        "Ingest: signed events POSTed to `/stripe/webhook/` through gunicorn (2 workers x 4 "
        "threads, production settings), each with a new event id: the signature verified, the "
        "event row inserted, the processing task queued in Redis after commit, 200 answered. "
        "Apply: a Celery worker (threads pool, 4) applying `invoice.paid` for paid invoices of "
        "the local Stripe stand-in: it re-reads the invoice and the subscription over HTTP, "
        "mirrors both and grants the period's credits once; measured from the first POST until "
        "every event is processed.",
        "",
        f"- Command: `make bench` (`bench/run.py`, section `billing`); date: {date}.",
        "- Machine (gunicorn, the worker, the stand-in, PostgreSQL, Redis and the clients share its CPUs):",
        *[f"  - {k}: {v}" for k, v in machine_rows],
        "",
        "| what | clients | events | events/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *[
            f"| ingest | {i.clients} | {i.events} | {i.rate:,.1f} | {i.p50_ms:.2f} | {i.p99_ms:.2f} | {i.errors} |"
            for i in ingests
        ],
        f"| apply (worker) | 4 posting | {applied.events} | {applied.rate:,.1f} | | | {applied.failed} failed |",
        "",
        f"- Grants in the ledger after the apply run: {applied.grants} for {applied.events} paid invoices "
        f"({'one each' if applied.grants == applied.events else '**not one each**'}).",
        "- No target in the issue: these say how much webhook traffic one small machine absorbs. "
        "Ingest is bounded by gunicorn and PostgreSQL; apply by the round trips to Stripe "
        "(two GETs per event, here to the stand-in on the same machine).",
    ]
    return "\n".join(out) + "\n"
