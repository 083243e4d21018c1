"""A request the gateway stops waiting for: its job is cancelled, and the answer says what it cost.

The job's last event can come just after the wait ends (the job finished
then, or its worker settled the cancel): it is read once more, so a job that
succeeded is answered as it was billed, and a cancelled one's 504 carries its
real charge. The wait is made to end at once (INFERENCE_TIMEOUT_SECONDS 0);
the worker's side is played by the real settlement and relay.

One database transaction per test, never committed: no job's task is sent.
"""

from __future__ import annotations

import copy
import json

import pytest
import redis
from django.db import connection

from accounts.errors import ApplicationError, exception_handler
from inference import apis, relay, tasks
from inference.models import Job, JobStatus
from inference.relay import CancelOrigin, relay_cancel_requested, relay_publish
from inference.services import job_settle, job_start
from inference.services.jobs import Outcome
from inference.triton import DeadlineExceeded, GenerationResult
from metering.models import AccountKind, CreditLot, Hold
from metering.selectors import organization_balance
from metering.services.postings import accounts_for, amount_display
from tests.factories import OrganizationFactory
from tests.helpers import StatementLog, credits, expire_just_after, served_model, submit_job

pytestmark = pytest.mark.django_db

MODEL = "gym-wait"


@pytest.fixture
def running_job(grant, settings, monkeypatch) -> Job:
    settings.INFERENCE_TIMEOUT_SECONDS = 0
    monkeypatch.setattr(apis, "FINAL_AFTER_CANCEL_WAIT_S", 0.2)
    served_model(MODEL)
    org = OrganizationFactory()
    grant(org, credits(10))
    job = submit_job(org, MODEL, max_tokens=8)
    return job_start(job_pk=job.pk, public_id=job.public_id)


def _settled_by_its_worker(job: Job, status: str, output_tokens: int) -> dict:
    """What the worker does at the end: settle, then publish the final event. The worker's
    own copy of the job: the API's (`job`) still says what the API saw."""
    job = copy.copy(job)
    outcome = Outcome(
        text="Squat low.",
        input_tokens=5,
        output_tokens=output_tokens,
        finish_reason="length" if status == JobStatus.SUCCEEDED else "cancelled",
    )
    settled = job_settle(job=job, outcome=outcome, status=status)
    event = tasks._final_event(settled, outcome)
    relay_publish(job.public_id, event)
    return event


def test_a_job_that_finished_as_the_wait_ended_is_answered_as_it_was_billed(running_job):
    # given a job whose worker settled it and sent its answer just as the wait ended
    sent = _settled_by_its_worker(running_job, JobStatus.SUCCEEDED, output_tokens=8)

    # when the API stops waiting, then the answer is the job's, not a 504
    assert apis._GenerationApi.wait(running_job) == sent
    assert sent["credits_charged"] > 0


def test_a_job_cancelled_at_the_timeout_is_a_504_with_its_real_charge(running_job):
    # given a job whose worker settles the cancel for the 3 tokens it served
    sent = _settled_by_its_worker(running_job, JobStatus.CANCELED, output_tokens=3)

    # when the API stops waiting
    with pytest.raises(ApplicationError) as timed_out:
        apis._GenerationApi.wait(running_job)

    # then its worker was told to stop, and the 504 says what the job cost
    assert relay_cancel_requested(running_job.public_id)
    assert (timed_out.value.code, timed_out.value.status) == ("engine_timeout", 504)
    charged = amount_display(sent["credits_charged"])
    assert f"charged {charged} credits for what it served" in timed_out.value.message
    assert timed_out.value.extra == {"job_id": running_job.public_id}


def test_a_job_that_says_nothing_after_the_cancel_is_a_504_that_names_it(running_job):
    with pytest.raises(ApplicationError) as timed_out:
        apis._GenerationApi.wait(running_job)
    assert timed_out.value.status == 504
    assert f"see GET /api/v1/jobs/{running_job.public_id}" in timed_out.value.message
    # its worker is told the gateway stopped waiting, not that its client cancelled
    assert relay_cancel_requested(running_job.public_id) == CancelOrigin.GATEWAY_TIMEOUT
    assert Job.objects.get(pk=running_job.pk).status == JobStatus.RUNNING  # its worker settles it


def test_a_stream_whose_job_ended_unbilled_at_the_timeout_says_nothing_was_charged(running_job):
    # given a streamed job its worker stopped at the gateway's timeout before its
    # first token: failed, engine_timeout, nothing charged (inference.tasks)
    outcome = Outcome(
        finish_reason="error",
        error_code="engine_timeout",
        error_message="The model did not answer before the gateway stopped waiting.",
    )
    settled = job_settle(job=copy.copy(running_job), outcome=outcome, status=JobStatus.FAILED)
    relay_publish(running_job.public_id, tasks._final_event(settled, outcome))

    # when the stream's wait ends, and its last event is read after the cancel
    final, cancelled = apis._GenerationApi.final_after_cancel(running_job)
    error = apis._GenerationApi.timed_out(running_job, final, cancelled)

    # then its error says nothing was charged, and keeps no Idempotency-Key
    assert (error.code, error.status) == ("engine_timeout", 504)
    assert "nothing was charged" in error.message
    assert error.headers["X-Gym-Credits-Charged"] == amount_display(0)
    assert not error.took_effect


def test_a_job_whose_cancel_did_not_take_is_a_504_that_says_it_runs_on(running_job, monkeypatch):
    # given Redis failing under the request to stop the job's worker (stood in at the
    # relay's one call for it: Redis cannot be made to fail for one call here, and a real
    # outage would stop every other test's relay and broker)
    def relay_down(_job_id, **_origin):
        raise redis.ConnectionError("redis is down")

    monkeypatch.setattr(relay, "relay_cancel", relay_down)

    # when the API stops waiting for the running job
    with pytest.raises(ApplicationError) as timed_out:
        apis._GenerationApi.wait(running_job)

    # then the 504 does not say it was cancelled: it runs on, and is charged for it
    message = timed_out.value.message
    assert timed_out.value.status == 504
    assert "was cancelled" not in message
    assert "could not be cancelled and runs on" in message
    assert f"see GET /api/v1/jobs/{running_job.public_id}" in message
    assert not relay_cancel_requested(running_job.public_id)
    assert Job.objects.get(pk=running_job.pk).status == JobStatus.RUNNING


def test_a_job_stopped_at_its_run_limit_is_answered_504_and_keeps_its_key(grant):
    # given a job its worker stopped at its run limit (job_run_limit) after 3
    # tokens, which it settled for them
    served_model(MODEL)
    org = OrganizationFactory()
    grant(org, credits(10))
    submitted = submit_job(org, MODEL, max_tokens=8)
    job = job_start(job_pk=submitted.pk, public_id=submitted.public_id)
    delivered = GenerationResult("Squat low", 5, 0, 3, 300_000, "error", sent=True)
    past = DeadlineExceeded("ran past its deadline", partial=delivered, sent=True)
    outcome = tasks._past_deadline(job, "", past, tasks._failure_outcome(past), 300.0)
    settled = job_settle(job=job, outcome=outcome, status=JobStatus.FAILED)
    relay_publish(job.public_id, tasks._final_event(settled, outcome))

    # when the waiting request reads its end and answers with it
    final = apis._GenerationApi.wait(job)
    answer = apis._GenerationApi.engine_error(job, final)

    # then it is a 504 that says why, names the job, and (charged) keeps its
    # Idempotency-Key, so that a retry is not run and charged again
    assert (answer.code, answer.status) == ("job_deadline_exceeded", 504)
    assert answer.message == (
        "The job ran longer than its limit of 300 s and was stopped; it is billed for what "
        "the engine took and delivered until then: 5 prompt and 3 output tokens."
    )
    assert answer.extra == {"job_id": job.public_id}
    assert settled.credits_charged > 0 and answer.took_effect


def _stream_timed_out_after(job: Job, text: str) -> tuple[list[bytes], list[dict]]:
    """The job's stream (with usage) as written when its first delta, `text`, came and then
    nothing within the wait: its lines, and the JSON of its data lines."""

    def events():
        yield {"type": "delta", "text": text}
        raise TimeoutError(job.public_id)

    lines = list(apis.ChatCompletionsApi().sse(job, events(), include_usage=True))
    payloads = [json.loads(line[len(b"data: ") :]) for line in lines if line.startswith(b"data: {")]
    return lines, payloads


def test_a_stream_whose_job_finished_as_its_wait_ended_is_answered_in_full(running_job):
    # given a streamed job whose first token was sent, and whose worker
    # settled it and sent its end just as the stream's wait for the next
    # event ran out
    sent = _settled_by_its_worker(running_job, JobStatus.SUCCEEDED, output_tokens=8)

    # when the stream is written
    lines, payloads = _stream_timed_out_after(running_job, "Squat")

    # then it is the whole answer, as it was billed, not a timeout error: the
    # text not relayed yet, then the usage, then [DONE]
    assert not [payload for payload in payloads if "error" in payload]
    text = "".join(
        payload["choices"][0]["delta"].get("content") or ""
        for payload in payloads
        if payload["choices"]
    )
    assert text == sent["text"] == "Squat low."
    assert payloads[-1]["usage"]["completion_tokens"] == 8
    assert payloads[-1]["gym"]["credits_charged"] == sent["credits_charged"] > 0
    assert lines[-1] == b"data: [DONE]\n\n"


def test_a_stream_stopped_at_its_run_limit_after_tokens_ends_saying_why(running_job):
    # given a streamed job its worker stopped at its run limit after 3 tokens,
    # and settled for them
    delivered = GenerationResult("Squat low", 5, 0, 3, 300_000, "error", sent=True)
    past = DeadlineExceeded("ran past its deadline", partial=delivered, sent=True)
    outcome = tasks._past_deadline(running_job, "", past, tasks._failure_outcome(past), 300.0)
    settled = job_settle(job=running_job, outcome=outcome, status=JobStatus.FAILED)
    end = tasks._final_event(settled, outcome)

    # when its stream is written, without usage
    lines = list(
        apis.ChatCompletionsApi().sse(
            running_job, iter([{"type": "delta", "text": "Squat low"}, end]), include_usage=False
        )
    )

    # then its choice ends with one of OpenAI's finish reasons (cut short: "length"),
    # saying why and what it cost in its gym object, and an error event in OpenAI's
    # shape follows, which OpenAI's SDKs raise
    last = json.loads(lines[-3][len(b"data: ") :])
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["gym"]["finish_reason"] == "error"
    assert last["gym"]["error"] == {
        "code": "job_deadline_exceeded",
        "message": outcome.error_message,
    }
    assert last["gym"]["credits_charged"] == settled.credits_charged > 0
    error = json.loads(lines[-2][len(b"data: ") :])["error"]
    assert (error["code"], error["message"], error["job_id"]) == (
        "job_deadline_exceeded",
        outcome.error_message,
        running_job.public_id,
    )
    assert lines[-1] == b"data: [DONE]\n\n"


def test_a_charged_error_says_what_it_cost_in_its_headers_as_an_answer_does(running_job, settings):
    # given a job its worker stopped at its run limit after 3 tokens, and
    # settled for them (as the 504 above), whose end the request waits for
    settings.INFERENCE_TIMEOUT_SECONDS = 5
    delivered = GenerationResult("Squat low", 5, 0, 3, 300_000, "error", sent=True)
    past = DeadlineExceeded("ran past its deadline", partial=delivered, sent=True)
    outcome = tasks._past_deadline(running_job, "", past, tasks._failure_outcome(past), 300.0)
    settled = job_settle(job=running_job, outcome=outcome, status=JobStatus.FAILED)
    relay_publish(running_job.public_id, tasks._final_event(settled, outcome))

    # when the waiting request answers with its error
    final = apis._GenerationApi.wait(running_job)
    response = exception_handler(apis._GenerationApi.engine_error(running_job, final), {})

    # then the error carries the headers an answer carries: the job, what it
    # was charged, what is left
    left = organization_balance(organization=running_job.organization).available
    assert response.status_code == 504
    assert response["X-Gym-Job-Id"] == running_job.public_id
    assert response["X-Gym-Credits-Charged"] == amount_display(settled.credits_charged)
    assert settled.credits_charged > 0
    assert response["X-Gym-Credits-Remaining"] == amount_display(left)


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_an_answer_leaves_out_of_what_remains_the_credits_that_expired_while_it_ran(
    running_job, grant, settings, fast_path
):
    # given a job placed while its organization's 10 credits were valid, which then
    # expired as it ran (the minute's sweep has not moved them yet), and 5 credits that
    # never expire; the consumption account open, so that on the fast path the
    # settlement is the function's
    settings.METERING_FAST_PATH = fast_path  # the settlement function and the ORM agree
    org = running_job.organization
    grant(org, credits(5), expires_at=None)
    expire_just_after(
        Hold.objects.get(key=running_job.public_id),
        CreditLot.objects.get(organization=org, expires_at__isnull=False),
    )
    accounts_for(org, AccountKind.CONSUMPTION)

    # when its worker settles it, and the waiting request answers
    with connection.execute_wrapper(statements := StatementLog()):
        _settled_by_its_worker(running_job, JobStatus.SUCCEEDED, output_tokens=8)
    final = apis._GenerationApi.wait(running_job)

    # then what it says remains is the 5 a new request may take, as the balance says,
    # not the expired credits the job did not use, which the sweep will move
    assert any("metering_hold_settle(" in sql for sql in statements.sql) == fast_path
    left = organization_balance(organization=org).available
    assert left == credits(5)
    headers = apis._GenerationApi.cost_headers(running_job, final)
    assert headers["X-Gym-Credits-Remaining"] == amount_display(left)
    assert apis._GenerationApi.gym(running_job, final)["credits_remaining"] == left


def test_a_timeout_whose_charge_is_known_says_it_in_its_headers(running_job):
    # given a job whose worker settles the cancel for the 3 tokens it served
    sent = _settled_by_its_worker(running_job, JobStatus.CANCELED, output_tokens=3)

    # when the API stops waiting and answers 504
    with pytest.raises(ApplicationError) as timed_out:
        apis._GenerationApi.wait(running_job)
    response = exception_handler(timed_out.value, {})

    # then
    assert response.status_code == 504
    assert response["X-Gym-Credits-Charged"] == amount_display(sent["credits_charged"])
    assert response["X-Gym-Credits-Remaining"] == amount_display(sent["credits_remaining"])


@pytest.mark.parametrize(
    ("charged", "answer"),
    [(0, (400, "context_length_exceeded")), (1_500, (502, "engine_error"))],
)
def test_an_engine_error_that_names_a_length_is_a_400_only_if_nothing_was_served(charged, answer):
    # given a job the engine failed with a message about length, after serving tokens or not
    job = Job(public_id="job_len")
    final = {
        "type": "error",
        "error_code": "engine_error",
        "error_message": (
            "Prompt length (9000) exceeds the maximum input length (8192); shorten the prompt."
        ),
        "credits_charged": charged,
        "credits_remaining": 10_000,
    }

    # when it is turned into the answer
    error = apis._GenerationApi.engine_error(job, final)

    # then a refusal of the request (4xx) only when it cost nothing; once tokens were
    # served and charged, the engine's failure (5xx) that keeps its Idempotency-Key
    assert (error.status, error.code) == answer
    assert error.took_effect == (charged > 0)


PROMPT_TOO_LONG = {
    "the development engine's input limit": (
        "Prompt length (9000) exceeds the maximum input length (8192); shorten the prompt."
    ),
    "the development engine's sequence limit": (
        "Prompt length (12) plus max_tokens (4096) exceeds the maximum sequence length (4096); "
        "lower max_tokens."
    ),
    # TensorRT-LLM's LlmRequest::validate, as Triton's TensorRT-LLM backend passes it on
    "TensorRT-LLM's input limit": (
        "[TensorRT-LLM][ERROR] Assertion failed: Prompt length (9000) exceeds maximum input "
        "length (8192). Set log level to info and check TRTGptModel logs for how maximum input "
        "length is set"
    ),
    "TensorRT-LLM's encoder input limit": (
        "Encoder length (3000) exceeds maximum encoder input length (2048)."
    ),
}

NOT_THE_CLIENTS_FAULT = {
    "a full request queue": "request queue size exceeds capacity",
    "out of KV cache": "Requested KV cache blocks exceeds the free blocks in the pool",
    "a batch too big": "Batch size (300) exceeds maximum batch size (256)",
    "a draft too long": "Draft tokens length (9) exceeds maximum draft tokens length (4).",
    "memory": "CUDA out of memory: the allocation exceeds what is free; too long a wait",
}


@pytest.mark.parametrize("message", PROMPT_TOO_LONG.values(), ids=PROMPT_TOO_LONG.keys())
def test_the_engines_own_refusal_of_a_prompt_too_long_is_a_400(message):
    # given a job the engine refused for its prompt's length, before serving anything
    job = Job(public_id="job_len")
    final = {"type": "error", "error_code": "engine_error", "error_message": message}
    final |= {"credits_charged": 0, "credits_remaining": 10_000}

    # when it is turned into the answer
    error = apis._GenerationApi.engine_error(job, final)

    # then it is the request's fault, as OpenAI says it
    assert (error.status, error.code, error.message) == (400, "context_length_exceeded", message)


@pytest.mark.parametrize(
    "message", NOT_THE_CLIENTS_FAULT.values(), ids=NOT_THE_CLIENTS_FAULT.keys()
)
def test_an_engine_failure_that_merely_says_exceeds_stays_the_engines_fault(message):
    # given a job the engine failed, before serving anything, for a reason of its own
    # whose message happens to say "exceeds" (or "too long")
    job = Job(public_id="job_busy")
    final = {"type": "error", "error_code": "engine_error", "error_message": message}
    final |= {"credits_charged": 0, "credits_remaining": 10_000}

    # when it is turned into the answer
    error = apis._GenerationApi.engine_error(job, final)

    # then a 502 the client may retry under the same Idempotency-Key, not a 400 that
    # would be kept under it for good
    assert (error.status, error.code, error.message) == (502, "engine_error", message)
    assert error.took_effect is False


def _settled_and_its_end_lost(job: Job, *, stream: bool = False) -> Job:
    """The chat job (whose row keeps no text, unlike an asynchronous one's) settled in full
    by its worker, which died before publishing its final event (or Redis failed under it):
    the row says it succeeded and was charged, the relay nothing."""
    Job.objects.filter(pk=job.pk).update(kind="chat", stream=stream)
    job.kind, job.stream = "chat", stream
    outcome = Outcome(text="Squat low.", input_tokens=5, output_tokens=8, finish_reason="length")
    settled = job_settle(job=copy.copy(job), outcome=outcome, status=JobStatus.SUCCEEDED)
    assert settled.credits_charged > 0
    return settled


def test_a_job_whose_final_event_was_lost_is_answered_as_it_ended_not_as_cancelled(running_job):
    # given a job that succeeded and was charged in full, whose final event was lost
    settled = _settled_and_its_end_lost(running_job)

    # when the API stops waiting for it
    with pytest.raises(ApplicationError) as lost:
        apis._GenerationApi.wait(running_job)
    response = exception_handler(lost.value, {})

    # then the answer says it finished and what it cost, not that it was
    # cancelled; its text is not known here, so it is an error that keeps the
    # Idempotency-Key (a retry would be charged again) and names the job
    charged = amount_display(settled.credits_charged)
    assert (lost.value.code, lost.value.status) == ("answer_lost", 502)
    assert "cancelled" not in lost.value.message
    assert f"finished and was charged {charged} credits" in lost.value.message
    assert lost.value.took_effect
    assert lost.value.extra == {"job_id": running_job.public_id}
    assert response["X-Gym-Credits-Charged"] == charged
    left = organization_balance(organization=running_job.organization).available
    assert response["X-Gym-Credits-Remaining"] == amount_display(left)
    # and the job is as its worker settled it
    job = Job.objects.get(pk=running_job.pk)
    assert (job.status, job.credits_charged) == (JobStatus.SUCCEEDED, settled.credits_charged)


def test_a_job_that_failed_and_whose_final_event_was_lost_is_answered_with_its_error(
    running_job,
):
    # given a job its worker stopped at its run limit after 3 tokens and settled
    # for them, its final event lost (the worker died before publishing it)
    delivered = GenerationResult("Squat low", 5, 0, 3, 300_000, "error", sent=True)
    past = DeadlineExceeded("ran past its deadline", partial=delivered, sent=True)
    outcome = tasks._past_deadline(running_job, "", past, tasks._failure_outcome(past), 300.0)
    settled = job_settle(job=copy.copy(running_job), outcome=outcome, status=JobStatus.FAILED)

    # when the API stops waiting for it
    with pytest.raises(ApplicationError) as failed:
        apis._GenerationApi.wait(running_job)
    response = exception_handler(failed.value, {})

    # then the answer is the job's own failure, as its event would have said,
    # not a timeout that says this request cancelled it; charged, it keeps its
    # Idempotency-Key and says what it cost
    assert (failed.value.code, failed.value.status) == ("job_deadline_exceeded", 504)
    assert failed.value.message == outcome.error_message
    assert "cancelled" not in failed.value.message
    assert failed.value.took_effect
    assert response["X-Gym-Credits-Charged"] == amount_display(settled.credits_charged)
    assert settled.credits_charged > 0
    assert Job.objects.get(pk=running_job.pk).status == JobStatus.FAILED


def test_a_stream_whose_final_event_was_lost_ends_as_its_job_ended(running_job):
    # given a streamed job whose tokens were relayed, then settled in full, its
    # final event lost
    settled = _settled_and_its_end_lost(running_job, stream=True)

    # when the stream is written
    lines, payloads = _stream_timed_out_after(running_job, "Squat low.")

    # then it ends as the job ended, with what it was charged, not with a timeout error
    assert not [payload for payload in payloads if "error" in payload]
    finish = [p["choices"][0]["finish_reason"] for p in payloads if p["choices"]]
    assert finish[-1] == "length"
    assert payloads[-1]["usage"]["completion_tokens"] == 8
    assert payloads[-1]["gym"]["credits_charged"] == settled.credits_charged
    assert lines[-1] == b"data: [DONE]\n\n"


def test_a_running_job_cancelled_before_it_generated_anything_is_a_409_with_its_charge(
    running_job, settings
):
    # given a job not streamed, cancelled (POST /api/v1/jobs/{id}/cancel) as it
    # ran, whose worker settled it for the prompt the engine took and sent its end
    settings.INFERENCE_TIMEOUT_SECONDS = 5
    sent = _settled_by_its_worker(running_job, JobStatus.CANCELED, output_tokens=0)

    # when the waiting request answers
    with pytest.raises(ApplicationError) as cancelled:
        apis.ChatCompletionsApi().answer(running_job, {"stream": False})
    response = exception_handler(cancelled.value, {})

    # then it says the job was cancelled and what it cost, not an empty
    # completion; charged, it keeps its Idempotency-Key
    charged = amount_display(sent["credits_charged"])
    assert (cancelled.value.code, response.status_code) == ("job_cancelled", 409)
    assert f"charged {charged} credits for the prompt the engine took" in cancelled.value.message
    assert cancelled.value.took_effect and sent["credits_charged"] > 0
    assert response["X-Gym-Credits-Charged"] == charged
