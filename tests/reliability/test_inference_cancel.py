"""Requests that end early: a streaming client that goes away, a job cancelled while it
runs or before the engine's first token, a request the engine refuses.

Real parts only, as in test_inference_faults.py: the app on a live server
thread, the session's Celery worker process, the real CPU Triton server,
PostgreSQL and Redis. The streaming client is a raw socket, so that the test
decides exactly when the connection closes.

What is billed when a request ends early (README, "Inference"):
- what the engine delivered to the worker before the worker ended the request:
  the engine's own counts, summed over the responses it read (through an
  `ensemble` the engine goes on generating after a cancellation; that is not
  billed);
- a prompt the engine took but never counted (cancelled before its first
  response, or a stream the engine ended without a token): counted with the
  catalog model's tokenizer, or not billed where the catalog has none, the
  job saying which (`input_tokens_source`);
- a failure before any response (unreachable, refusing, silent engine): nothing.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from decimal import Decimal
from urllib.parse import urlsplit

import openai
import pytest
import redis
import requests
from django.conf import settings
from rest_framework.test import APIClient

from accounts.models import Scope
from accounts.redis import get_redis
from accounts.services import apikey_create
from gymbilling.celery import app as celery_app
from inference import apis
from inference.apis import render_chat
from inference.engine.tokenizer import count_tokens
from inference.models import TERMINAL, CatalogModel, InputTokensSource, Job, JobStatus, ServerPool
from inference.triton import GenerationRequest
from inference.triton import ServerPool as EnginePool
from metering.models import HoldStatus
from metering.selectors import organization_balance
from metering.services import price_book_publish
from metering.services.postings import amount_display
from tests.helpers import RUNNING_WORKERS, credits, paused_consumers
from tests.inference import conftest as engine_fixtures
from tests.reliability.test_inference_faults import (
    _client,
    _expected_charge,
    _organization,
    _own_worker,
    _settled_once,
    _wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

triton_server = engine_fixtures.triton_server
paced_triton_server = engine_fixtures.paced_triton_server

MODEL = "gym-cancel"
TOKENIZER = "inference/engine/tokenizer.json"
# With the development engine this conversation, at temperature 2 and seed
# 4792, generates 1815 tokens before its end token: the longest of seeds
# 0-5999, so that a test has time to cancel well before the end.
LONG_MESSAGES = [{"role": "user", "content": "Write a very long training guide."}]
LONG_SEED, LONG_TEMPERATURE, MAX_TOKENS = 4792, 2.0, 3000


def _model(
    urls: list[str], *, tokenizer_file: str = TOKENIZER, context_limit: int = 4096
) -> CatalogModel:
    price_book_publish(
        prices=[
            {
                "model_name": MODEL,
                "input_rate": Decimal("0.5"),
                "cached_input_rate": Decimal("0.25"),
                "output_rate": Decimal("1.5"),
                "minimum_charge": 0,
            }
        ]
    )
    pool = ServerPool.objects.create(name="cancel-tests", grpc_urls=urls)
    return CatalogModel.objects.create(
        name=MODEL,
        pool=pool,
        access_tier="basic",
        max_output_tokens=4096,
        tokenizer_file=tokenizer_file,
        context_limit=context_limit,
    )


def _long_body(**extra) -> dict:
    return {
        "model": MODEL,
        "messages": LONG_MESSAGES,
        "max_tokens": MAX_TOKENS,
        "temperature": LONG_TEMPERATURE,
        "seed": LONG_SEED,
        **extra,
    }


QUESTION = [{"role": "user", "content": "How long should a warm-up last?"}]


QUESTION_STREAMED = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "stream": True}


def _asker(urls: list[str], grant, key_name: str, **model_fields) -> tuple[str, object, str]:
    """The model on `urls`, and an organization with credits and an inference key that will
    ask it QUESTION: (QUESTION's rendered prompt, the organization, the raw key)."""
    prompt = render_chat(_model(urls, **model_fields), QUESTION)
    org = _organization(grant, credits(100))
    _key, raw = apikey_create(organization=org, name=key_name, scopes=[Scope.INFERENCE])
    return prompt, org, raw


def _full_generation(grpc_url: str, prompt: str):
    """The whole generation the engine makes for the long request (it is deterministic)."""
    pool = EnginePool([grpc_url])
    try:
        request = GenerationRequest(
            prompt, MAX_TOKENS, temperature=LONG_TEMPERATURE, seed=LONG_SEED, stream=True
        )
        return pool.generate(request)
    finally:
        pool.close()


class _StreamingClient:
    """POST a streamed completion over a raw socket; read its SSE events; hang up at will."""

    def __init__(self, base_url: str, api_key: str, body: dict):
        address = urlsplit(base_url)
        payload = json.dumps(body).encode()
        self.sock = socket.create_connection((address.hostname, address.port), timeout=30)
        self.sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + f"Host: {address.netloc}\r\nAuthorization: Bearer {api_key}\r\n".encode()
            + b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        self._buffer = b""
        self.status_line = b""

    def events(self) -> Iterator[dict]:
        """Each `data: {...}` event as it arrives (comments and headers skipped)."""
        while True:
            while b"\n" in self._buffer:
                line, self._buffer = self._buffer.split(b"\n", 1)
                if not self.status_line:
                    self.status_line = line.strip()
                if line.startswith(b"data: {"):
                    yield json.loads(line[len(b"data: ") :])
            received = self.sock.recv(65536)
            if not received:
                return
            self._buffer += received

    def hang_up(self) -> None:
        self.sock.close()


def _relayed(job: Job) -> tuple[str, dict]:
    """What the worker relayed for the job: the text of its deltas, and its final event.

    Waits for the final event: the worker publishes it just after the
    settlement commits, so a job already seen ended may not have it yet.
    """

    def events() -> list[dict] | None:
        entries = get_redis().xrange(f"jobstream:{job.public_id}")
        found = [json.loads(fields[b"e"]) for _entry_id, fields in entries]
        return found if found and found[-1]["type"] in ("done", "error") else None

    relayed = _wait_for(events, timeout=10, what="the job's final relay event")
    text = "".join(event["text"] for event in relayed if event["type"] == "delta")
    return text, relayed[-1]


def _finished(job_pk: int) -> Job:
    return _wait_for(
        lambda: Job.objects.filter(pk=job_pk, status__in=TERMINAL).first(),
        timeout=60,
        what="the job to end",
    )


# -- 1. a streaming client that goes away mid-stream --------------------------------------


# The long generation on the paced engine (tests.inference.conftest) lasts
# about 2.7 s instead of 0.3-0.7 (a response per token, 1815 tokens), so that
# a cancel (a client hanging up, or the test noticing the job running and
# calling the cancel endpoint; then the worker's next poll: up to 0.5 s here)
# lands inside it on any machine. Unpaced, the async job's stream ended first
# in about one run in ten.
def test_a_client_that_hangs_up_mid_stream_cancels_the_job_and_pays_for_what_was_delivered(
    live_server, celery_worker_process, paced_triton_server, grant
):
    # given a long generation, a token a millisecond, and how long it is when
    # nobody stops it
    model = _model([paced_triton_server.grpc_url])
    prompt = render_chat(model, LONG_MESSAGES)
    full = _full_generation(paced_triton_server.grpc_url, prompt)
    assert full.output_tokens > 1000
    org = _organization(grant, credits(100))
    _key, raw = apikey_create(organization=org, name="cancel", scopes=[Scope.INFERENCE])
    before = organization_balance(organization=org)

    # when the client reads the first three tokens, then closes the connection
    client = _StreamingClient(live_server.url, raw, _long_body(stream=True))
    read = []
    for event in client.events():
        if event["choices"] and event["choices"][0]["delta"].get("content"):
            read.append(event["choices"][0]["delta"]["content"])
            if len(read) == 3:
                break
    client.hang_up()

    # then the job ends canceled, well before the engine's end
    job = _finished(Job.objects.get(organization=org).pk)
    assert client.status_line.endswith(b"200 OK")
    assert (job.status, job.finish_reason) == (JobStatus.CANCELED, "cancelled")
    assert len(read) <= job.output_tokens < full.output_tokens

    # and it was billed for exactly what the engine delivered to the worker
    # until it cancelled: the text relayed is the start of the engine's own
    # generation, and the billed count is the engine's count of that text;
    # and the hold settled once, for that, the rest released
    _billed_once_for_the_relayed_start(job, read=read, full=full, org=org, before=before)
    assert job.input_tokens == count_tokens(prompt)
    assert job.input_tokens_source == InputTokensSource.ENGINE


def _billed_once_for_the_relayed_start(job: Job, *, read: list[str], full, org, before) -> None:
    """The cancelled stream's job was billed for exactly what the engine delivered to its
    worker until the cancel: the text relayed, which starts with what its client `read`
    and is the start of the engine's whole generation (`full`), at the engine's count of
    it; its hold settled once, for that, the rest released (from the balance `before`)."""
    relayed_text, final = _relayed(job)
    assert relayed_text == final["text"]
    assert relayed_text.startswith("".join(read))
    assert full.text.startswith(relayed_text)
    assert job.output_tokens == count_tokens(relayed_text) == final["output_tokens"]
    charge = _expected_charge(job)
    assert job.credits_charged == charge > 0
    _settled_once(job, status=HoldStatus.CAPTURED, captured=charge)
    after = organization_balance(organization=org)
    assert before.available - after.available == charge
    assert after.held == 0


# The life of a streamed job's reader marker in this test's web side and in its
# worker (INFERENCE_STREAM_READER_TTL_SECONDS): a second, not five, so that the
# worker's cancel lands well inside the paced long generation (2.7 s here).
READER_TTL_S = 1.0


@pytest.fixture
def short_reader_worker(tmp_path, settings):
    """A worker of the test's own on inference.standard, whose streamed jobs' readers'
    markers live READER_TTL_S, as they do in this (web) process."""
    settings.INFERENCE_STREAM_READER_TTL_SECONDS = READER_TTL_S
    with _own_worker(
        tmp_path / "celery-worker.log",
        queue_name="inference.standard",
        pool="prefork",
        concurrency=1,
        env={"INFERENCE_STREAM_READER_TTL_SECONDS": str(READER_TTL_S)},
    ) as worker:
        yield worker


def test_a_stream_whose_web_process_died_is_cancelled_and_pays_for_what_was_generated(
    short_reader_worker, paced_triton_server, grant
):
    # given a long streamed generation, served by the app in this process
    model = _model([paced_triton_server.grpc_url])
    full = _full_generation(paced_triton_server.grpc_url, render_chat(model, LONG_MESSAGES))
    assert full.output_tokens > 1000
    org = _organization(grant, credits(100))
    _key, raw = apikey_create(organization=org, name="died", scopes=[Scope.INFERENCE])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    before = organization_balance(organization=org)
    response = client.post("/v1/chat/completions", _long_body(stream=True), format="json")
    assert response.status_code == 200
    try:
        # when its client reads the first three tokens, and then the web process
        # serving it dies: its response is never read on nor closed (no
        # `finally` runs, so no cancel is sent), and the marker it renewed while
        # it read lapses, as it does READER_TTL_S after its last renewal
        chunks = iter(response.streaming_content)
        read = []
        while len(read) < 3:
            line = next(chunks)
            if line.startswith(b"data: {"):
                delta = json.loads(line[len(b"data: ") :])["choices"][0]["delta"]
                if delta.get("content"):
                    read.append(delta["content"])
        job = Job.objects.get(organization=org)
        assert get_redis().delete(f"jobreader:{job.public_id}") == 1

        # then its worker cancels the job, well before the engine's end
        job = _finished(job.pk)
        assert (job.status, job.finish_reason) == (JobStatus.CANCELED, "cancelled")
        assert len(read) <= job.output_tokens < full.output_tokens

        # and it was billed for what the engine generated until then, the
        # start of the whole generation, at the engine's count; its hold
        # settled once, for that, the rest released
        _billed_once_for_the_relayed_start(job, read=read, full=full, org=org, before=before)
    finally:
        response.close()


# -- 2. ended after the engine took the prompt, before its first response -----------------


@pytest.mark.parametrize("tokenizer_file", [TOKENIZER, ""], ids=["tokenizer", "no tokenizer"])
def test_a_stream_cancelled_before_the_first_token_bills_the_prompt_the_engine_took(
    live_server, celery_worker_process, paced_triton_server, grant, tokenizer_file
):
    # given a model whose engine is busy: a request sent now waits, silent, in
    # the engine's queue. The paced engine, so that it waits at least one busy
    # stream's 3 s on any machine, past the moment the client hangs up
    triton_server = paced_triton_server
    prompt, org, raw = _asker(
        [triton_server.grpc_url], grant, "cancel", tokenizer_file=tokenizer_file
    )
    before = organization_balance(organization=org)
    busy, _workers = engine_fixtures.occupy_engine_workers(triton_server.grpc_url)
    try:
        # when a streaming client reads the opening chunk, waits until the
        # worker has sent its request to the engine, and hangs up
        client = _StreamingClient(live_server.url, raw, QUESTION_STREAMED)
        opening = next(client.events())
        assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        job = Job.objects.get(organization=org)
        _wait_for(
            lambda: Job.objects.filter(pk=job.pk, status=JobStatus.RUNNING).exists(),
            timeout=30,
            what="the job to start",
        )
        # The job is marked running while its request is sent (or before): the
        # engine's own count of the requests it holds says when it has it.
        engine_fixtures.wait_for_engine_load(triton_server.metrics_url, 2 * _workers + 1)
        client.hang_up()

        # then the job ends canceled with nothing generated, while the engine
        # is still busy: the SSE heartbeat noticed the client was gone
        job = _finished(job.pk)
    finally:
        busy.stop()
    assert (job.status, job.finish_reason, job.output_tokens) == (
        JobStatus.CANCELED,
        "cancelled",
        0,
    )
    after = organization_balance(organization=org)
    assert after.held == 0
    if tokenizer_file:
        # and its prompt was billed, counted with the model's tokenizer: the
        # count the engine itself makes of that prompt
        engine_count = EnginePool([triton_server.grpc_url])
        try:
            told = engine_count.generate(GenerationRequest(prompt, 1)).input_tokens
        finally:
            engine_count.close()
        assert job.input_tokens == count_tokens(prompt) == told > 0
        assert job.input_tokens_source == InputTokensSource.TOKENIZER
        charge = _expected_charge(job)
        assert job.credits_charged == charge > 0
        _settled_once(job, status=HoldStatus.CAPTURED, captured=charge)
        assert before.available - after.available == charge
    else:
        # and without a tokenizer it could not be counted: not billed, and said so
        assert (job.input_tokens, job.credits_charged) == (0, 0)
        assert job.input_tokens_source == InputTokensSource.UNMETERED
        _settled_once(job, status=HoldStatus.RELEASED, captured=0)
        assert after.available == before.available


def test_a_streamed_answer_the_engine_ends_at_once_still_bills_its_prompt(
    live_server, celery_worker_process, triton_server, grant
):
    # given a conversation the engine ends at its first step with seed 34: a
    # stream that has no token response at all, so no counts from the engine
    model = _model([triton_server.grpc_url])
    messages = [{"role": "user", "content": "Plan my week."}]
    prompt = render_chat(model, messages)
    org = _organization(grant, credits(100))
    client = _client(live_server, org)
    before = organization_balance(organization=org)

    # when
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=8,
        seed=34,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    # then the answer is empty, and its prompt was billed at the tokenizer's
    # count, which is the engine's own count of that prompt
    job = Job.objects.get(organization=org)
    assert (job.status, job.output_tokens) == (JobStatus.SUCCEEDED, 0)
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    engine_count = EnginePool([triton_server.grpc_url])
    try:
        told = engine_count.generate(GenerationRequest(prompt, 8, seed=34))
    finally:
        engine_count.close()
    assert told.output_tokens == 0
    assert job.input_tokens == count_tokens(prompt) == told.input_tokens > 0
    assert job.input_tokens_source == InputTokensSource.TOKENIZER
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (job.input_tokens, 0)
    assert chunks[-1].model_extra["gym"]["prompt_tokens_source"] == "tokenizer"
    charge = _expected_charge(job)
    assert job.credits_charged == charge > 0
    _settled_once(job, status=HoldStatus.CAPTURED, captured=charge)
    assert before.available - organization_balance(organization=org).available == charge


# -- 3. an asynchronous job cancelled while it runs ---------------------------------------


def test_cancelling_a_running_async_job_stops_it_and_bills_what_was_generated(
    live_server, celery_worker_process, paced_triton_server, grant
):
    # given a long asynchronous job, running, on an engine that streams a
    # token a millisecond
    model = _model([paced_triton_server.grpc_url])
    prompt = render_chat(model, LONG_MESSAGES)
    full = _full_generation(paced_triton_server.grpc_url, prompt)
    org = _organization(grant, credits(100))
    _key, raw = apikey_create(organization=org, name="cancel", scopes=[Scope.INFERENCE])
    headers = {"Authorization": f"Bearer {raw}"}
    jobs_url = f"{live_server.url}/api/v1/jobs"
    before = organization_balance(organization=org)
    queued = requests.post(jobs_url, headers=headers, json=_long_body(), timeout=30)
    assert queued.status_code == 202, queued.text
    job_id = queued.json()["id"]

    def progress() -> dict | None:
        return requests.get(f"{jobs_url}/{job_id}", headers=headers, timeout=30).json()["progress"]

    # its progress shows it has generated text
    told = _wait_for(progress, timeout=30, what="the job's first text")
    assert told["output_chars"] > 0
    [listed] = requests.get(jobs_url, headers=headers, timeout=30).json()["results"]
    assert listed["status"] == "running" and listed["progress"]["output_chars"] > 0

    # when it is cancelled
    cancelled = requests.post(f"{jobs_url}/{job_id}/cancel", headers=headers, timeout=30)

    # then it ends canceled, before the engine's end
    assert cancelled.status_code == 200, cancelled.text
    job = _finished(Job.objects.get(public_id=job_id).pk)
    read_back = requests.get(f"{jobs_url}/{job_id}", headers=headers, timeout=30).json()
    assert (read_back["status"], read_back["finish_reason"]) == ("canceled", "cancelled")
    assert 0 < job.output_tokens < full.output_tokens

    # and it kept, and was billed for, exactly what the engine had generated:
    # the start of the whole generation, at the engine's count of it
    assert read_back["output"] == job.output
    assert read_back["progress"] is None  # it has ended
    assert len(job.output) >= told["output_chars"]
    assert full.text.startswith(job.output)
    assert job.output_tokens == count_tokens(job.output)
    assert (read_back["input_tokens"], read_back["input_tokens_source"]) == (
        count_tokens(prompt),
        "engine",
    )
    charge = _expected_charge(job)
    assert read_back["credits_charged"] == job.credits_charged == charge > 0
    _settled_once(job, status=HoldStatus.CAPTURED, captured=charge)
    after = organization_balance(organization=org)
    assert before.available - after.available == charge
    assert after.held == 0


# -- 4. the engine refuses the request -------------------------------------------------


def test_a_request_the_engine_refuses_bills_nothing(
    live_server, celery_worker_process, triton_server, grant
):
    # given a request longer than the engine's sequence limit (prompt plus
    # max_tokens over 4096), on a model whose catalog entry says its context
    # is longer (8192): the gateway's own check lets it through, the engine
    # refuses it
    _model([triton_server.grpc_url], context_limit=8192)
    org = _organization(grant, credits(100))
    client = _client(live_server, org)
    before = organization_balance(organization=org)

    # when
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Plan my week."}], max_tokens=4096
        )

    # then the engine's reason comes back, and nothing was billed
    assert refused.value.body["code"] == "context_length_exceeded"
    assert "lower max_tokens" in refused.value.body["message"]
    job = Job.objects.get(organization=org)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "engine_error")
    assert (job.input_tokens, job.output_tokens, job.credits_charged) == (0, 0, 0)
    assert job.input_tokens_source == InputTokensSource.NONE
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)
    assert organization_balance(organization=org) == before


# -- 5. a client that stops waiting while its job is still queued ------------------------


def _queued_messages(queue: str = "inference.standard") -> int:
    """Messages waiting in the broker's queue (kombu's Redis transport: a list per queue)."""
    return redis.Redis.from_url(settings.CELERY_BROKER_URL).llen(queue)


def _worker_holds(job_pk: int) -> bool:
    """Whether a worker has the job's task running or reserved (Celery's inspect).

    Asked of the tests' workers by name: Celery then returns once each has answered.
    Asked of every worker, it cannot know how many there are and waits out the whole
    timeout for each question (10 s a call, the test's longest part)."""
    inspect = celery_app.control.inspect(timeout=5, destination=sorted(RUNNING_WORKERS))
    active, reserved = inspect.active(), inspect.reserved()
    if active is None or reserved is None:
        return True  # the worker did not answer (busy): it may hold it; ask again
    held = [task for found in (active, reserved) for tasks in found.values() for task in tasks]
    # With argsrepr set, a task's args are shown as that text: "(pk, <prompt: ...>)".
    return any(
        str(task.get("args", "")).startswith((f"({job_pk},", f"[{job_pk},")) for task in held
    )


def test_a_client_that_stops_waiting_before_its_job_starts_cancels_it_unrun_and_unbilled(
    live_server, celery_worker_process, triton_server, grant, settings
):
    # given a worker that has stopped taking the queue's messages (as a busy
    # one would not take them), so that a job submitted now stays queued
    _model([triton_server.grpc_url])
    org = _organization(grant, credits(100))
    client = _client(live_server, org)
    before = organization_balance(organization=org)
    settings.INFERENCE_TIMEOUT_SECONDS = 2
    queue = "inference.standard"
    with paused_consumers(queue):
        # when a client waits for an answer longer than the gateway waits
        with pytest.raises(openai.APIStatusError) as gave_up:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Plan my week."}], max_tokens=4
            )

        # then it is told so, and its job, never started, is canceled at once
        assert (gave_up.value.status_code, gave_up.value.body["code"]) == (504, "engine_timeout")
        job = Job.objects.get(organization=org)
        assert (job.status, job.started_at) == (JobStatus.CANCELED, None)
        # while its message still waits in the broker's queue
        assert _queued_messages(queue) == 1

    # and once the worker takes the queue again and has run that message (it
    # left the queue, and the worker holds it no longer; a job sent after it
    # is served), the job never ran: nothing was billed
    _wait_for(
        lambda: _queued_messages(queue) == 0 and not _worker_holds(job.pk),
        timeout=30,
        what="the worker to take and finish its message",
    )
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Plan my week."}], max_tokens=2
    )
    job.refresh_from_db()
    assert (job.status, job.started_at, job.credits_charged) == (JobStatus.CANCELED, None, 0)
    assert (job.input_tokens, job.output_tokens) == (0, 0)
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)
    served = Job.objects.filter(organization=org).exclude(pk=job.pk).get()
    assert served.status == JobStatus.SUCCEEDED
    after = organization_balance(organization=org)
    assert before.available - after.available == served.credits_charged
    assert after.held == 0


# -- 6. an answer the gateway stopped waiting for, retried under its Idempotency-Key ---------


def test_a_504_while_the_engine_queued_the_request_charges_nothing_and_keeps_no_key(
    live_server, celery_worker_process, paced_triton_server, grant, settings, monkeypatch
):
    # given a model whose engine is busy (a request sent now waits, silent, in
    # its queue) and a gateway that waits three seconds, then long enough for
    # the job's end to learn its charge on any machine. The paced engine: each
    # busy stream's 3,000 tokens take at least 3 s there, so the request waits at
    # least two of them, past the gateway's wait, however quick this machine is
    # (on the unpaced engine a quick machine served it within the 3 s)
    triton_server = paced_triton_server
    _prompt, org, raw = _asker([triton_server.grpc_url], grant, "timeout")
    headers = {"Authorization": f"Bearer {raw}", "Idempotency-Key": "timed-out-once"}
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8}
    url = f"{live_server.url}/v1/chat/completions"
    settings.INFERENCE_TIMEOUT_SECONDS = 3
    monkeypatch.setattr(apis, "FINAL_AFTER_CANCEL_WAIT_S", 15.0)
    before = organization_balance(organization=org)
    busy, _workers = engine_fixtures.occupy_engine_workers(triton_server.grpc_url)
    try:
        # when the request times out after the engine took its prompt, before
        # its first token
        first = requests.post(url, headers=headers, json=body, timeout=60)
        job = _finished(Job.objects.get(organization=org).pk)

        # and the client retries with the same key
        retried = requests.post(url, headers=headers, json=body, timeout=60)
    finally:
        busy.stop()

    # then the client got a 504 and nothing else, and paid nothing: the job
    # failed (engine_timeout), its whole hold released, the prompt the engine
    # took not billed
    assert first.status_code == 504, first.text
    error = first.json()["error"]
    assert (error["code"], error["job_id"]) == ("engine_timeout", job.public_id)
    assert "nothing was charged" in error["message"]
    assert first.headers["X-Gym-Credits-Charged"] == amount_display(0)
    assert (job.status, job.error_code) == (JobStatus.FAILED, "engine_timeout")
    assert (job.input_tokens, job.output_tokens, job.credits_charged) == (0, 0, 0)
    assert job.input_tokens_source == InputTokensSource.NONE
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)

    # and, nothing having taken effect, its key was not kept: the retry ran
    # anew (not a replay), and timed out unbilled too
    assert retried.status_code == 504, retried.text
    assert "Idempotent-Replayed" not in retried.headers
    jobs = Job.objects.filter(organization=org)
    assert jobs.count() == 2
    assert {(j.status, j.credits_charged) for j in jobs} == {(JobStatus.FAILED, 0)}
    after = organization_balance(organization=org)
    assert (after.available, after.held) == (before.available, 0)


# -- 7. a stream and the gateway's wait --------------------------------------------------


def test_a_stream_that_keeps_sending_outlasts_the_gateways_wait(
    live_server, celery_worker_process, paced_triton_server, grant, settings
):
    # given a stream of 1815 tokens that lasts at least 1.8 s (a millisecond a
    # token), and a gateway that waits a second and a half for each event
    model = _model([paced_triton_server.grpc_url])
    prompt = render_chat(model, LONG_MESSAGES)
    full = _full_generation(paced_triton_server.grpc_url, prompt)
    assert full.output_tokens > 1000
    org = _organization(grant, credits(100))
    client = _client(live_server, org)
    settings.INFERENCE_TIMEOUT_SECONDS = 1.5

    # when a client streams it
    began = time.monotonic()
    chunks = list(
        client.chat.completions.create(
            **_long_body(stream=True), stream_options={"include_usage": True}
        )
    )
    elapsed = time.monotonic() - began

    # then it was served whole, though it lasted longer than one wait: the
    # wait bounds the silence between events, not the answer
    assert elapsed > settings.INFERENCE_TIMEOUT_SECONDS
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == full.text
    assert chunks[-1].usage.completion_tokens == full.output_tokens
    job = Job.objects.get(organization=org)
    assert (job.status, job.output_tokens) == (JobStatus.SUCCEEDED, full.output_tokens)
    assert job.credits_charged == _expected_charge(job) > 0
    _settled_once(job, status=HoldStatus.CAPTURED, captured=job.credits_charged)


def test_a_stream_that_hears_nothing_for_a_whole_wait_ends_unbilled(
    live_server, celery_worker_process, paced_triton_server, grant, settings, monkeypatch
):
    # given a model whose engine is busy (a request sent now waits, silent, in
    # its queue), a gateway that waits three seconds for each event (time for
    # the worker to send the prompt), and that, once it cancels, waits for the
    # job's end long enough to learn its charge on any machine. The paced
    # engine, as in the 504 test above: the request waits at least two busy
    # streams of 3 s each, past the gateway's wait (on the unpaced engine a
    # quick CI machine began answering it within the 3 s: a failed CI run)
    triton_server = paced_triton_server
    _prompt, org, raw = _asker([triton_server.grpc_url], grant, "quiet")
    before = organization_balance(organization=org)
    settings.INFERENCE_TIMEOUT_SECONDS = 3
    monkeypatch.setattr(apis, "FINAL_AFTER_CANCEL_WAIT_S", 15.0)
    busy, _workers = engine_fixtures.occupy_engine_workers(triton_server.grpc_url)
    try:
        # when a client streams it and reads to the end
        client = _StreamingClient(live_server.url, raw, QUESTION_STREAMED)
        events = list(client.events())
        job = _finished(Job.objects.get(organization=org).pk)
    finally:
        busy.stop()

    # then the stream (begun: 200) ends with a timeout error that names the
    # job and says it was charged nothing: no token came, so the prompt the
    # engine took is not billed; the job failed (engine_timeout), its whole
    # hold released
    assert client.status_line.endswith(b"200 OK")
    opening, error = events
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert (error["error"]["code"], error["error"]["job_id"]) == ("engine_timeout", job.public_id)
    assert "nothing was charged" in error["error"]["message"]
    assert (job.status, job.error_code) == (JobStatus.FAILED, "engine_timeout")
    assert (job.input_tokens, job.output_tokens, job.credits_charged) == (0, 0, 0)
    _settled_once(job, status=HoldStatus.RELEASED, captured=0)
    after = organization_balance(organization=org)
    assert (after.available, after.held) == (before.available, 0)
