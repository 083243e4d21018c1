"""Job callbacks end to end: a signed webhook when an asynchronous job ends, at least once.

Real parts only: the app on a live server thread, a real Celery worker
process that runs the job on the real CPU Triton server and makes the first
delivery, and a real HTTP receiver on 127.0.0.1 (loopback is allowed by the
test settings). Retries are driven by calling the delivery service with a
`now` at the retry's due time, instead of sleeping through the backoff.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests
from django.utils import timezone

from accounts.models import Scope
from accounts.services import apikey_create
from inference.models import CallbackStatus, CatalogModel, Job, JobCallback, JobStatus, ServerPool
from inference.services.callbacks import (
    job_callback_deliver,
    job_callbacks_due,
    job_callbacks_sweep,
)
from metering.services import price_book_publish
from tests.factories import OrganizationFactory
from tests.helpers import credits, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gym-tiny"
RETRY_SCHEDULE = [10, 60, 300, 1800, 7200, 21600, 43200]


def verify(secret: str, body: bytes, header: str, tolerance: int = 300) -> bool:
    """The receiver's check, as the README documents it (written here independently)."""
    items = [part.split("=", 1) for part in header.split(",")]
    timestamp = next(value for key, value in items if key == "t")
    if abs(time.time() - int(timestamp)) > tolerance:
        return False
    signed = timestamp.encode() + b"." + body
    expected = hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, value) for key, value in items if key == "v1")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """A webhook receiver on 127.0.0.1 answering the given statuses in turn (the last repeats)."""

    statuses: list[int]
    received: list[Received] = field(default_factory=list)

    def __post_init__(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                receiver.received.append(
                    Received(self.path, dict(self.headers.items()), self.rfile.read(length))
                )
                index = min(len(receiver.received), len(receiver.statuses)) - 1
                self.send_response(receiver.statuses[index])
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_of():
    made: list[Receiver] = []

    def _make(*statuses: int) -> Receiver:
        made.append(Receiver(list(statuses)))
        return made[-1]

    yield _make
    for receiver in made:
        receiver.close()


@pytest.fixture
def silent_receiver():
    """A port that completes the TCP handshake and takes the request, and never answers."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # never accepted: the kernel queues the connections, nobody reads
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/never"
    sock.close()


@pytest.fixture
def gym(live_server, triton_server, celery_worker_process, grant):
    price_book_publish(
        prices=[
            {
                "model_name": MODEL,
                "input_rate": Decimal("0.5"),
                "cached_input_rate": Decimal("0.25"),
                "output_rate": Decimal("1.5"),
            }
        ]
    )
    pool = ServerPool.objects.create(name="test-cpu", grpc_urls=[triton_server.grpc_url])
    CatalogModel.objects.create(name=MODEL, pool=pool, access_tier="basic")
    org = OrganizationFactory(requests_per_minute=10_000, tokens_per_minute=10_000_000)
    grant(org, credits(100))
    _key, raw = apikey_create(organization=org, name="hooks", scopes=[Scope.INFERENCE, Scope.ADMIN])
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {raw}"
    secret = session.get(f"{live_server.url}/api/v1/webhooks/secret").json()["secret"]
    return {"org": org, "http": session, "url": live_server.url, "secret": secret}


def submit(gym, callback_url: str, model: str = MODEL) -> str:
    queued = gym["http"].post(
        f"{gym['url']}/api/v1/jobs",
        json={"model": model, "prompt": "Strength training", "max_tokens": 6,
              "callback_url": callback_url},
    )  # fmt: skip
    assert queued.status_code == 202, queued.text
    return queued.json()["id"]


def callback_of(job_id: str, **where) -> JobCallback | None:
    return JobCallback.objects.filter(job__public_id=job_id, **where).first()


def test_a_succeeded_job_delivers_one_signed_callback_that_matches_get(gym, receiver_of):
    # given
    receiver = receiver_of(200)

    # when
    job_id = submit(gym, f"{receiver.url}/hooks/gym?source=jobs")
    callback = wait_until(
        lambda: callback_of(job_id, status=CallbackStatus.DELIVERED), what="the delivery"
    )

    # then exactly one request came, signed with the organization's secret
    job = gym["http"].get(f"{gym['url']}/api/v1/jobs/{job_id}").json()
    assert job["status"] == JobStatus.SUCCEEDED
    [request] = receiver.received
    assert request.path == "/hooks/gym?source=jobs"
    assert request.headers["Content-Type"] == "application/json"
    assert verify(gym["secret"], request.body, request.headers["Gym-Signature"])
    assert not verify("whsec_not_the_secret", request.body, request.headers["Gym-Signature"])
    assert request.headers["Gym-Delivery-Attempt"] == "1"

    # and its body is the event, carrying the job exactly as GET shows it
    event = json.loads(request.body)
    assert event["id"] == request.headers["Gym-Event-Id"] == callback.event_id
    assert event["type"] == "job.succeeded"
    assert abs(event["created"] - time.time()) < 60
    assert event["data"]["job"] == job
    assert (callback.attempts, callback.last_status_code) == (1, 200)

    # and nothing is left to send, however late the sweep comes
    later = timezone.now() + timedelta(days=2)
    assert job_callbacks_due(now=later) == []
    assert job_callback_deliver(callback_id=callback.pk, now=later) is None
    assert len(receiver.received) == 1


def test_a_failed_job_sends_job_failed(gym, receiver_of, dead_grpc_url):
    # given a model whose only server is down
    pool = ServerPool.objects.create(name="dead", grpc_urls=[dead_grpc_url])
    CatalogModel.objects.create(name="gym-dead", pool=pool, access_tier="basic")
    price_book_publish(
        prices=[{"model_name": "gym-dead", "input_rate": Decimal("1"),
                 "cached_input_rate": Decimal("1"), "output_rate": Decimal("1")}]
    )  # fmt: skip
    receiver = receiver_of(204)

    # when
    job_id = submit(gym, f"{receiver.url}/hooks", model="gym-dead")
    wait_until(lambda: callback_of(job_id, status=CallbackStatus.DELIVERED), what="the delivery")

    # then
    [request] = receiver.received
    event = json.loads(request.body)
    assert event["type"] == "job.failed"
    assert event["data"]["job"]["status"] == JobStatus.FAILED
    assert event["data"]["job"]["error_code"] == "engine_unavailable"
    assert verify(gym["secret"], request.body, request.headers["Gym-Signature"])


def test_a_receiver_that_fails_once_gets_the_same_event_again_after_the_backoff(gym, receiver_of):
    # given a receiver that answers 500, then 200
    receiver = receiver_of(500, 200)
    job_id = submit(gym, f"{receiver.url}/hooks")

    # when the worker's first attempt has failed
    first = wait_until(
        lambda: callback_of(job_id, status=CallbackStatus.PENDING, last_status_code=500),
        what="the first attempt",
    )

    # then the retry is due 10 s later, and not a moment before
    assert first.attempts == 1
    assert first.next_attempt_at == first.last_attempt_at + timedelta(seconds=RETRY_SCHEDULE[0])
    early = first.next_attempt_at - timedelta(seconds=1)
    assert job_callback_deliver(callback_id=first.pk, now=early) is None
    assert len(receiver.received) == 1

    # when the retry comes due
    second = job_callback_deliver(callback_id=first.pk, now=first.next_attempt_at)

    # then it is delivered: the same event, the same body, signed afresh
    assert second is not None
    assert (second.status, second.attempts, second.last_status_code) == (
        CallbackStatus.DELIVERED, 2, 200,
    )  # fmt: skip
    assert second.next_attempt_at is None
    one, two = receiver.received
    assert one.body == two.body
    assert one.headers["Gym-Event-Id"] == two.headers["Gym-Event-Id"] == first.event_id
    assert (one.headers["Gym-Delivery-Attempt"], two.headers["Gym-Delivery-Attempt"]) == ("1", "2")
    assert verify(gym["secret"], two.body, two.headers["Gym-Signature"])
    assert (
        job_callback_deliver(callback_id=first.pk, now=timezone.now() + timedelta(days=2)) is None
    )
    assert len(receiver.received) == 2


def test_the_sweep_queues_a_due_retry_and_the_worker_delivers_it(gym, receiver_of):
    # given a callback whose first attempt failed, and whose retry is now due
    receiver = receiver_of(503, 200)
    job_id = submit(gym, f"{receiver.url}/hooks")
    first = wait_until(
        lambda: callback_of(job_id, status=CallbackStatus.PENDING, last_status_code=503),
        what="the first attempt",
    )
    assert job_callbacks_due() == []  # not yet due: nothing to queue
    # As if its 10 s had passed (the worker's clock is the real one).
    JobCallback.objects.filter(pk=first.pk).update(
        next_attempt_at=timezone.now() - timedelta(seconds=1)
    )

    # when beat's sweep runs
    queued = job_callbacks_sweep()

    # then the worker delivers it
    assert queued == 1
    delivered = wait_until(
        lambda: callback_of(job_id, status=CallbackStatus.DELIVERED), what="the retry"
    )
    assert delivered.attempts == 2
    assert [r.headers["Gym-Delivery-Attempt"] for r in receiver.received] == ["1", "2"]


def test_a_receiver_that_never_answers_is_given_up_after_the_last_attempt(
    gym, silent_receiver, settings
):
    # given a receiver that takes the request and never answers
    job_id = submit(gym, silent_receiver)
    callback = wait_until(
        lambda: callback_of(job_id, attempts=1, status=CallbackStatus.PENDING, last_error__gt=""),
        what="the worker's first attempt to time out",
    )
    assert "no answer" in callback.last_error
    # Only this process's attempts are shortened; the worker's took the test settings' 2 s.
    settings.INFERENCE_CALLBACK_TIMEOUT_SECONDS = 0.2

    # when every retry is made when it comes due
    waits = []
    while callback.status == CallbackStatus.PENDING:
        waits.append(callback.next_attempt_at - callback.last_attempt_at)
        callback = job_callback_deliver(callback_id=callback.pk, now=callback.next_attempt_at)
        assert callback is not None

    # then it waited 10 s, 1 min, 5 min, 30 min, 2 h, 6 h and 12 h, and gave up after 8 attempts
    assert waits == [timedelta(seconds=s) for s in RETRY_SCHEDULE]
    assert (callback.status, callback.attempts) == (CallbackStatus.FAILED, 8)
    assert callback.next_attempt_at is None and callback.delivered_at is None
    assert callback.last_status_code is None and "no answer" in callback.last_error
    later = timezone.now() + timedelta(days=30)
    assert job_callbacks_due(now=later) == []
    assert job_callback_deliver(callback_id=callback.pk, now=later) is None
    # The job itself is untouched by its callback's fate.
    assert Job.objects.get(public_id=job_id).status == JobStatus.SUCCEEDED
