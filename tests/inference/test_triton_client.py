"""inference.triton, the gateway's Triton client, against a real tritonserver (no mocks)."""

from __future__ import annotations

import os
import signal
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from tritonclient.grpc import service_pb2

from inference import triton as triton_module
from inference.engine.server import TritonDevServer
from inference.engine.tokenizer import count_tokens
from inference.triton import (
    TRTLLM_REQUESTS,
    DeadlineExceeded,
    EngineError,
    EngineTimeout,
    EngineUnavailable,
    GenerationRequest,
    GenerationResult,
    ServerPool,
    TritonError,
    close_pools,
    engine_load,
    parse_metrics,
    pool_for,
    scrape_metrics,
    scrape_samples,
)
from tests.helpers import wait_until
from tests.inference.conftest import occupy_engine_workers

PROMPT = "Tokens are the unit of work, and the cluster"
# With this seed and temperature the engine writes 544 tokens before it ends on
# its own: long enough to cancel or kill it mid-stream.
LONG = {"seed": 27, "temperature": 1.5}


def _long_request(**changes) -> GenerationRequest:
    return GenerationRequest(PROMPT, 3000, stream=True, **{**LONG, **changes})


def test_non_streaming_generation_returns_text_and_the_engines_token_counts(pool, triton_server):
    # given
    deltas: list[str] = []

    # when
    result = pool.generate(GenerationRequest(PROMPT, 16, seed=7), on_delta=deltas.append)

    # then: counts are the engine tokenizer's, the prompt is not echoed
    assert result.text
    assert not result.text.startswith(PROMPT)
    assert result.input_tokens == count_tokens(PROMPT)
    assert result.output_tokens == count_tokens(result.text)
    assert 0 < result.output_tokens <= 16
    assert result.finish_reason == ("length" if result.output_tokens == 16 else "stop")
    assert 0 <= result.cached_input_tokens < result.input_tokens
    assert result.engine_ms >= 0
    assert result.server_url == triton_server.grpc_url
    # on_delta is for streams only
    assert deltas == []


def test_streamed_deltas_add_up_to_the_non_streamed_text_with_the_same_seed(pool):
    # given
    whole = pool.generate(GenerationRequest(PROMPT, 24, seed=5))
    deltas: list[str] = []

    # when
    streamed = pool.generate(
        GenerationRequest(PROMPT, 24, seed=5, stream=True), on_delta=deltas.append
    )

    # then
    assert len(deltas) >= 3
    assert "".join(deltas) == streamed.text == whole.text
    assert streamed.output_tokens == whole.output_tokens == count_tokens(whole.text)
    assert streamed.input_tokens == whole.input_tokens == count_tokens(PROMPT)
    assert streamed.finish_reason == whole.finish_reason


@pytest.mark.parametrize("stream", [False, True])
def test_reaching_max_tokens_finishes_with_length(pool, stream):
    # when
    result = pool.generate(GenerationRequest(PROMPT, 8, seed=3, stream=stream))

    # then
    assert result.output_tokens == 8
    assert count_tokens(result.text) == 8
    assert result.finish_reason == "length"


def test_the_engine_ending_on_its_own_finishes_with_stop(pool):
    # when: the default seed ends long before 3000 tokens
    result = pool.generate(GenerationRequest(PROMPT, 3000))

    # then
    assert 0 < result.output_tokens < 3000
    assert result.finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_word_ends_the_text_before_it_and_finishes_with_stop(pool, stream):
    # given: a stop word from the middle of a longer run
    full = pool.generate(GenerationRequest(PROMPT, 40, seed=21))
    stop = " " + full.text.split()[5]

    # when
    stopped = pool.generate(
        GenerationRequest(PROMPT, 40, seed=21, stop=[stop, "zzz-never"], stream=stream)
    )

    # then
    assert stopped.text == full.text[: full.text.index(stop)]
    assert stopped.finish_reason == "stop"
    assert stopped.output_tokens < full.output_tokens


def test_cancelling_mid_stream_returns_what_was_delivered(pool):
    # given: a run of 544 tokens, cancelled from on_delta after the fifth
    full = pool.generate(GenerationRequest(PROMPT, 3000, **LONG))
    cancel = threading.Event()
    deltas: list[str] = []

    def on_delta(text: str) -> None:
        deltas.append(text)
        if len(deltas) == 5:
            cancel.set()

    # when
    result = pool.generate(_long_request(), on_delta=on_delta, cancel=cancel)

    # then: exactly what reached the caller, no delta after the cancel
    assert result.finish_reason == "cancelled"
    assert result.text == "".join(deltas) == full.text[: len(result.text)]
    assert result.output_tokens == 5 == count_tokens(result.text)
    assert result.input_tokens == count_tokens(PROMPT)
    assert full.output_tokens > 500
    # and the pool goes on serving
    assert pool.generate(GenerationRequest(PROMPT, 4, seed=1)).output_tokens == 4


def test_a_request_cancelled_before_it_starts_is_not_sent(pool):
    # given
    cancel = threading.Event()
    cancel.set()

    # when
    result = pool.generate(GenerationRequest(PROMPT, 8), cancel=cancel)

    # then: nothing delivered, nothing to bill
    assert result == GenerationResult("", 0, 0, 0, 0, "cancelled")


def test_after_send_runs_once_while_the_engine_works_on_the_request(private_triton_server):
    # given: a pool on a server nothing else uses, and a hook that waits until
    # the server has answered the request (its success counters moved)
    pool = ServerPool([private_triton_server.grpc_url])
    request = GenerationRequest(PROMPT, 8, seed=3)
    expected = pool.generate(request)
    before = scrape_metrics(private_triton_server.metrics_url)["nv_inference_request_success"]
    seen: list[float] = []

    def served() -> float:
        return scrape_metrics(private_triton_server.metrics_url)["nv_inference_request_success"]

    def after_send() -> bool:
        seen.append(wait_until(lambda: served() > before, timeout=10, what="the server to answer"))
        return True

    try:
        # when
        result = pool.generate(request, after_send=after_send)
    finally:
        pool.close()

    # then: the request was served while the hook ran (sent before it), once,
    # and its answer is the one it gets without a hook
    assert len(seen) == 1
    assert result.text == expected.text and result.output_tokens == expected.output_tokens
    assert result.finish_reason == expected.finish_reason


def test_after_send_runs_once_though_the_request_is_retried_on_another_server(
    triton_server, private_triton_server
):
    # given: a pool whose first pick is a server that dies as soon as the
    # request is out (killed by the hook itself), before it answers anything
    doomed, live = private_triton_server.grpc_url, triton_server.grpc_url
    pool = ServerPool([doomed, live])
    calls: list[list[int]] = []

    def kill_the_server_it_went_to() -> bool:
        calls.append([server.inflight for server in pool._servers])  # where it went
        os.killpg(private_triton_server.process.pid, signal.SIGKILL)
        return True

    # when: a long request, answered in one response at its end (not streamed)
    try:
        result = pool.generate(
            GenerationRequest(PROMPT, 3000, **LONG), after_send=kill_the_server_it_went_to
        )
    finally:
        pool.close()

    # then: the request went to the doomed server first, was retried on the
    # live one, which served all of it, and the hook ran once, for the first
    # send only
    assert calls == [[1, 0]]
    assert result.server_url == live
    assert result.finish_reason == "stop" and result.output_tokens == 544


def test_after_send_saying_no_abandons_the_request_and_the_pool_serves_on(pool):
    # when
    result = pool.generate(GenerationRequest(PROMPT, 8, seed=3), after_send=lambda: False)

    # then: nothing delivered, but the request did go out (the engine took it)
    assert result.finish_reason == "cancelled"
    assert (result.text, result.input_tokens, result.output_tokens) == ("", 0, 0)
    assert result.sent
    # and its stream was let go: nothing in flight, no stream kept for reuse
    assert [(server.inflight, server.idle) for server in pool._servers] == [(0, [])]
    # and the next request gets its own answer, not the abandoned one's
    again = pool.generate(GenerationRequest(PROMPT, 4, seed=1))
    assert again.output_tokens == 4 and again.finish_reason == "length"


def test_after_send_raising_ends_the_request_and_propagates(pool):
    # given
    def after_send() -> bool:
        raise RuntimeError("the database is down")

    # when / then
    with pytest.raises(RuntimeError, match="the database is down"):
        pool.generate(GenerationRequest(PROMPT, 8, seed=3), after_send=after_send)
    assert [(server.inflight, server.idle) for server in pool._servers] == [(0, [])]
    assert pool.generate(GenerationRequest(PROMPT, 4, seed=1)).output_tokens == 4


def test_cancelling_from_another_thread_releases_the_caller_promptly(paced_triton_server):
    # given: the cancel comes from elsewhere (the API process), after the first delta,
    # on the paced engine: its 544 tokens take over half a second on any machine, where
    # unpaced they took 0.2 s here (0.1 s on a machine twice as quick), all a stall of
    # the cancelling thread would have needed to let the stream end first. (The whole
    # text counted unstreamed, which is not paced: the same tokens.)
    pool = ServerPool([paced_triton_server.grpc_url])
    full = pool.generate(GenerationRequest(PROMPT, 3000, **LONG))
    cancel = threading.Event()
    first_delta = threading.Event()
    deltas: list[str] = []

    def on_delta(text: str) -> None:
        deltas.append(text)
        first_delta.set()

    def cancel_after_first_delta() -> float:
        first_delta.wait(30)
        cancel.set()
        return time.monotonic()

    # when
    try:
        with ThreadPoolExecutor(1) as executor:
            cancelled_at = executor.submit(cancel_after_first_delta)
            result = pool.generate(_long_request(), on_delta=on_delta, cancel=cancel)
            returned_at = time.monotonic()
    finally:
        pool.close()

    # then: it returned as cancelled before the engine's stream was done (the
    # token counts say so, whatever the machine's load did to the clock)
    assert result.finish_reason == "cancelled"
    assert result.text == "".join(deltas)
    assert 1 <= result.output_tokens < full.output_tokens
    assert returned_at >= cancelled_at.result()


@pytest.mark.parametrize("outcome", ["cancelled", "timeout", "deadline"])
def test_a_request_waiting_silently_is_cancelled_or_timed_out_by_the_watchdog(
    paced_triton_server, busy_engine, outcome
):
    # given: every engine worker busy for thousands of tokens, so a new request
    # waits in the engine's queue and nothing at all arrives for it: on the paced
    # engine (busy_engine), at least one busy stream's 3 s, where unpaced a quick
    # machine's stream lasted not much longer than the 0.3 s this test waits
    triton_server = paced_triton_server
    waiting = ServerPool([triton_server.grpc_url], timeout_s=0.3 if outcome == "timeout" else 60)
    # its server's readiness known, so that the request's first step is not
    # a check run on its time (which, slow, would end a deadline unsent)
    assert waiting.ready_urls() == [triton_server.grpc_url]
    cancel = threading.Event()
    began = time.monotonic()
    if outcome == "cancelled":
        threading.Timer(0.1, cancel.set).start()

    # when
    try:
        if outcome == "cancelled":
            result = waiting.generate(GenerationRequest(PROMPT, 8, seed=1), cancel=cancel)
        elif outcome == "timeout":
            with pytest.raises(EngineTimeout) as timeout:
                waiting.generate(GenerationRequest(PROMPT, 8, seed=1))
        else:
            with pytest.raises(DeadlineExceeded) as timeout:
                waiting.generate(GenerationRequest(PROMPT, 8, seed=1), deadline=began + 0.3)
        elapsed = time.monotonic() - began
    finally:
        waiting.close()

    # then: released by the watchdog while the request still waited, with
    # nothing delivered (had it waited for a free worker, it would have its 8
    # tokens), and not before the cancel or the timeout. No upper bound on the
    # time: on a loaded machine a watchdog tick may take longer than usual.
    if outcome == "cancelled":
        assert result.finish_reason == "cancelled"
        assert (result.text, result.output_tokens) == ("", 0)
        assert elapsed >= 0.1
    elif outcome == "timeout":
        assert timeout.value.code == "engine_timeout"
        assert timeout.value.partial is None
        assert elapsed >= 0.3
    else:
        # the engine took the request (its prompt is the caller's to bill)
        assert (timeout.value.code, timeout.value.sent) == ("job_deadline_exceeded", True)
        assert timeout.value.partial is None
        assert elapsed >= 0.3


def test_the_timeout_bounds_silence_not_the_length_of_a_stream(paced_triton_server):
    # given: a timeout far longer than a token (about 1 ms on the paced
    # engine) and shorter than the whole stream (this seed writes 1070 tokens:
    # over a second paced; unpaced it took 0.2-0.6 s, and the fast runs
    # ended it within the timeout, proving nothing)
    pool = ServerPool([paced_triton_server.grpc_url], timeout_s=0.3)

    # when
    try:
        result = pool.generate(_long_request(seed=282, temperature=2.0), on_delta=lambda text: None)
    finally:
        pool.close()

    # then
    assert result.output_tokens > 1000
    assert result.finish_reason == "stop"
    assert result.engine_ms > 300


def test_a_stream_running_past_its_deadline_is_ended_with_what_was_delivered(
    paced_triton_server,
):
    # given a stream of over a thousand tokens, over a second long paced, and
    # what the engine writes for it when nothing stops it
    pool = ServerPool([paced_triton_server.grpc_url])
    request = _long_request(seed=282, temperature=2.0)
    try:
        full = pool.generate(request)
        assert full.output_tokens > 1000

        # when it is sent with half a second to run, the silence timeout long
        deltas: list[str] = []
        began = time.monotonic()
        with pytest.raises(DeadlineExceeded) as past:
            pool.generate(request, on_delta=deltas.append, deadline=began + 0.5)
        elapsed = time.monotonic() - began

        # then it was ended there, not at its end, with what was delivered:
        # the start of the whole text, counted by the engine
        partial = past.value.partial
        assert (past.value.code, past.value.sent) == ("job_deadline_exceeded", True)
        assert elapsed >= 0.5
        assert 0 < partial.output_tokens < full.output_tokens
        assert partial.text == "".join(deltas) and full.text.startswith(partial.text)
        assert partial.output_tokens == count_tokens(partial.text)
        assert partial.input_tokens == full.input_tokens
        # and the pool serves on
        assert pool.generate(GenerationRequest(PROMPT, 4, seed=1)).output_tokens == 4
    finally:
        pool.close()


def test_a_request_whose_deadline_has_passed_is_not_sent(pool):
    # given a deadline already behind us
    picked = [server.picked for server in pool._servers]

    # when
    with pytest.raises(DeadlineExceeded) as past:
        pool.generate(GenerationRequest(PROMPT, 4, seed=1), deadline=time.monotonic() - 1)

    # then no server was given it, and the error says it was not sent
    assert (past.value.sent, past.value.partial) == (False, None)
    assert [server.picked for server in pool._servers] == picked


def test_a_pool_with_a_dead_server_routes_to_the_live_one(triton_server, dead_grpc_url):
    # given
    pool = ServerPool([dead_grpc_url, triton_server.grpc_url])

    # when
    try:
        results = [pool.generate(GenerationRequest(PROMPT, 4, seed=seed)) for seed in range(6)]
        ready = pool.ready_urls()
    finally:
        pool.close()

    # then
    assert {result.server_url for result in results} == {triton_server.grpc_url}
    assert all(result.output_tokens == 4 for result in results)
    assert ready == [triton_server.grpc_url]


def test_a_server_that_comes_back_is_used_again_within_its_not_ready_ttl(dead_grpc_url, tmp_path):
    # given a pool whose one server answered not ready (nothing listens yet);
    # a ready answer would be kept a minute, a not-ready one half a second
    pool = ServerPool([dead_grpc_url], ready_ttl_s=60, not_ready_ttl_s=0.5, connect_timeout_s=1)
    with pytest.raises(EngineUnavailable):
        pool.generate(GenerationRequest(PROMPT, 2, seed=1))

    # when a server comes up at that address
    port = int(dead_grpc_url.rsplit(":", 1)[1])
    with TritonDevServer(grpc_port=port, log_path=tmp_path / "tritonserver.log", graceful=False):
        deadline = time.monotonic() + 15
        try:
            while True:
                try:
                    result = pool.generate(GenerationRequest(PROMPT, 2, seed=1))
                    break
                except EngineUnavailable:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            pool.close()  # before the server stops: it waits for open streams

    # then the pool serves from it again, long before a minute
    assert result.output_tokens == 2


def test_a_hung_server_is_checked_again_in_the_background_not_on_a_requests_thread(
    triton_server, hung_grpc_url
):
    # given: a pool with a server that never answers, beside a live one, whose
    # answers expire quickly; a record of where each readiness check ran; and
    # the hung server's checks after its first made to hang until the test ends
    pool = ServerPool(
        [hung_grpc_url, triton_server.grpc_url],
        ready_ttl_s=0.2,
        not_ready_ttl_s=0.2,
        connect_timeout_s=0.5,
    )
    checks: list[tuple[str, str]] = []
    hanging, release = threading.Event(), threading.Event()
    probe = pool._probe

    def recorded(server):
        checks.append((server.url, threading.current_thread().name))
        if server.url == hung_grpc_url and len(checks) > 2:
            hanging.set()
            release.wait(600)
        return probe(server)

    pool._probe = recorded

    def requests() -> tuple[str, list]:
        results = [pool.generate(GenerationRequest(PROMPT, 2, seed=1))]
        deadline = time.monotonic() + 30
        while not hanging.is_set():
            assert time.monotonic() < deadline, "the hung server was not checked again"
            results.append(pool.generate(GenerationRequest(PROMPT, 2, seed=1)))
        results += [pool.generate(GenerationRequest(PROMPT, 2, seed=s)) for s in range(20)]
        return threading.current_thread().name, results

    # when requests keep coming while the hung server's check hangs (on a
    # thread of their own: had one waited on that check, it would never end)
    with ThreadPoolExecutor(1, thread_name_prefix="requests") as executor:
        try:
            request_thread, results = executor.submit(requests).result(timeout=60)
        finally:
            release.set()
            pool.close()

    # then every request was served by the live server, none held up
    assert {result.server_url for result in results} == {triton_server.grpc_url}
    assert all(result.output_tokens == 2 for result in results)
    # and after each server's first answer, which the first request waited
    # for, every check ran on a background thread, none on the requests'
    first, later = checks[:2], checks[2:]
    assert {url for url, _ in first} == {hung_grpc_url, triton_server.grpc_url}
    assert {thread for _, thread in first} == {request_thread}
    assert later and request_thread not in {thread for _, thread in later}


def test_while_a_servers_answer_is_checked_again_requests_go_to_the_others(
    triton_server, private_triton_server
):
    # given: two live servers, answers that expire quickly, and the first
    # server's checks after its first made to hang until the test ends
    first, other = private_triton_server.grpc_url, triton_server.grpc_url
    pool = ServerPool([first, other], ready_ttl_s=1.0)
    hanging, release = threading.Event(), threading.Event()
    probe = pool._probe
    checked: list[str] = []

    def recorded(server):
        checked.append(server.url)
        if server.url == first and checked.count(first) > 1:
            hanging.set()
            release.wait(600)
        return probe(server)

    pool._probe = recorded
    try:
        warm = {pool.generate(GenerationRequest(PROMPT, 2, seed=s)).server_url for s in (1, 2)}
        wait_until(hanging.is_set, timeout=30, what="the first server to be checked again")

        # when requests come while its check is under way, each while the
        # other server's answer holds for at least half a second more (its
        # own checks run every second; with both answers expired the turn
        # decides, which is not what this test is about)
        [other_server] = [server for server in pool._servers if server.url == other]

        def others_answer_holds_a_while() -> bool:
            checked_at = other_server.checked_at
            return checked_at is not None and time.monotonic() - checked_at < 0.5

        served = []
        for seed in range(8):
            wait_until(others_answer_holds_a_while, timeout=30, what="a fresh answer")
            served.append(pool.generate(GenerationRequest(PROMPT, 2, seed=seed)).server_url)
    finally:
        release.set()
        pool.close()

    # then: both served before; now only the server whose answer holds, though
    # the turn would have alternated them
    assert warm == {first, other}
    assert served == [other] * 8


def test_a_pool_left_unused_forgets_its_answers_and_checks_again_when_used(pool, monkeypatch):
    # given: a pool that served, then was left alone past the idle limit
    monkeypatch.setattr(triton_module, "_FORGET_AFTER_IDLE_S", 0.3)
    checks: list[str] = []
    probe = pool._probe

    def recorded(server):
        checks.append(threading.current_thread().name)
        return probe(server)

    pool._probe = recorded
    pool.generate(GenerationRequest(PROMPT, 2, seed=1))
    [server] = pool._servers
    wait_until(lambda: server.checked_at is None, timeout=30, what="the answer to be forgotten")
    checks_while_idle = len(checks)

    # when it is used again
    result = pool.generate(GenerationRequest(PROMPT, 2, seed=1))

    # then: no background checks while idle after forgetting; the request
    # checked the server itself, as at first use, and was served
    assert checks[0] == checks[-1] == threading.current_thread().name
    assert len(checks) == checks_while_idle + 1
    assert result.output_tokens == 2


def test_a_pool_of_dead_servers_is_unavailable_quickly(dead_grpc_url):
    # given
    pool = ServerPool([dead_grpc_url, "127.0.0.1:1"])
    began = time.monotonic()

    # when
    try:
        with pytest.raises(EngineUnavailable) as unavailable:
            pool.generate(GenerationRequest(PROMPT, 4))
    finally:
        pool.close()

    # then
    assert time.monotonic() - began < 5
    assert unavailable.value.code == "engine_unavailable"
    assert unavailable.value.partial is None
    assert dead_grpc_url in str(unavailable.value)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerationRequest(PROMPT, 0), "max_tokens must be at least 1."),
        (
            GenerationRequest("lift " * 3000, 16),
            "exceeds the maximum input length (2048); shorten the prompt.",
        ),
        (GenerationRequest(PROMPT, 4090), "exceeds the maximum sequence length (4096)"),
        (GenerationRequest(PROMPT, 4, top_p=1.5), "top_p must be between 0 and 1"),
    ],
)
def test_an_engine_refusal_is_an_engine_error_with_the_engines_message(pool, request_, message):
    # when
    with pytest.raises(EngineError) as refused:
        pool.generate(request_)

    # then: the engine's own words, without Triton's ensemble prefix
    assert refused.value.code == "engine_error"
    assert message in refused.value.message
    assert not refused.value.message.startswith("in ensemble")
    assert refused.value.partial is None
    # and the next request on the same pool is served
    assert pool.generate(GenerationRequest(PROMPT, 4, seed=2)).output_tokens == 4


def test_a_nul_the_engine_sends_reaches_the_caller_as_u_fffd():
    # given the engine's responses as they come off the wire (tritonclient's
    # own message; the development engine's vocabulary has no NUL to sample):
    # a token that decodes to a NUL (a byte-fallback tokenizer's <0x00>),
    # then one whose character ends in the next response
    def response(text_bytes: bytes):
        message = service_pb2.ModelInferResponse()
        message.outputs.add(name="text_output", datatype="BYTES", shape=[1, 1])
        message.raw_output_contents.append(struct.pack("<I", len(text_bytes)) + text_bytes)
        return message

    accumulator = triton_module._Accumulator(GenerationRequest(PROMPT, 4, stream=True), "url")

    # when they are read
    deltas = [
        accumulator.add(response(raw)) for raw in (b"a\x00b", "é".encode()[:1], "é".encode()[1:])
    ]

    # then the NUL is U+FFFD in the delta and in the whole text, which
    # PostgreSQL can store, and which say the same
    assert deltas == ["a\ufffdb", "", "é"]
    assert accumulator.result().text == "a\ufffdbé" == "".join(deltas)


def test_a_value_the_wire_cannot_carry_is_refused_before_sending(pool):
    # when / then
    with pytest.raises(EngineError, match="seed=-1 is out of range"):
        pool.generate(GenerationRequest(PROMPT, 4, seed=-1))


def test_scrape_metrics_sums_the_series_of_each_metric(pool, triton_server):
    # given
    before = scrape_metrics(triton_server.metrics_url)
    results = [pool.generate(GenerationRequest(PROMPT, 6, seed=seed)) for seed in (1, 2)]

    # when (the engine publishes its token counts every METRICS_FLUSH_S)
    produced = sum(result.output_tokens for result in results)
    deadline = time.monotonic() + 10
    while True:
        after = scrape_metrics(triton_server.metrics_url)
        engine_counted = after.get("gym_engine_output_tokens_total", 0) - before.get(
            "gym_engine_output_tokens_total", 0
        )
        if engine_counted >= produced or time.monotonic() > deadline:
            break
        time.sleep(0.05)

    # then: both models (ensemble and gym_engine) count each request
    assert after["nv_inference_request_success"] > 0
    assert (
        after["nv_inference_request_success"] - before.get("nv_inference_request_success", 0) >= 4
    )
    assert "nv_inference_queue_duration_us" in after
    assert engine_counted >= produced > 0


def test_scrape_metrics_of_a_dead_endpoint_is_unavailable(dead_grpc_url):
    # when / then
    with pytest.raises(EngineUnavailable):
        scrape_metrics(f"http://{dead_grpc_url}/metrics", timeout_s=1)


def test_one_pool_serves_many_threads_without_crossing_their_streams(pool):
    # given: each thread its own prompt; half of its requests streamed
    prompts = [f"Thread {index} asks: {PROMPT}" for index in range(16)]

    def run(prompt: str) -> list[tuple[GenerationResult, str]]:
        outcomes = []
        seed = prompts.index(prompt)
        for attempt in range(10):
            deltas: list[str] = []
            request = GenerationRequest(prompt, 12, seed=seed, stream=attempt % 2 == 1)
            outcomes.append((pool.generate(request, on_delta=deltas.append), "".join(deltas)))
        return outcomes

    # when
    with ThreadPoolExecutor(16) as executor:
        per_thread = list(executor.map(run, prompts))

    # then: every answer is the one its own prompt and seed give, counts included
    for prompt, outcomes in zip(prompts, per_thread, strict=True):
        texts = {result.text for result, _ in outcomes}
        assert len(texts) == 1
        for attempt, (result, streamed) in enumerate(outcomes):
            assert result.input_tokens == count_tokens(prompt)
            assert result.output_tokens == count_tokens(result.text)
            assert streamed == (result.text if attempt % 2 else "")
    assert len({outcomes[0][0].text for outcomes in per_thread}) > 1


def test_pool_for_shares_one_pool_per_urls_model_and_options(triton_server):
    # given
    urls = [triton_server.grpc_url]

    try:
        # when
        first = pool_for(urls)
        again = pool_for(tuple(urls))
        other_model = pool_for(urls, "gym_engine")
        other_options = pool_for(urls, timeout_s=5)
        result = first.generate(GenerationRequest(PROMPT, 4, seed=1))
    finally:
        close_pools()

    # then
    assert again is first
    assert other_model is not first and other_options is not first
    assert other_options.timeout_s == 5
    assert result.output_tokens == 4
    assert pool_for(urls) is not first
    close_pools()


def test_a_server_killed_mid_stream_fails_with_the_partial_and_later_requests_retry(
    triton_server, paced_private_triton_server
):
    # given: a pool that believes both servers ready for a minute, and a stream
    # running on the server about to die. Paced, so that its 544 tokens last over
    # half a second on any machine: unpaced they took 0.2 s, and a client stalled
    # that long before its third token would have read the whole answer, not a failure
    private_triton_server = paced_private_triton_server
    doomed, live = private_triton_server.grpc_url, triton_server.grpc_url
    both = ServerPool([doomed, live], ready_ttl_s=60)
    only_doomed = ServerPool([doomed])
    deltas: list[str] = []

    def kill_after_three(text: str) -> None:
        deltas.append(text)
        if len(deltas) == 3:
            os.killpg(private_triton_server.process.pid, signal.SIGKILL)

    try:
        warm = {both.generate(GenerationRequest(PROMPT, 4, seed=s)).server_url for s in (1, 2)}
        assert warm == {doomed, live}

        # when
        with pytest.raises(TritonError) as lost:
            only_doomed.generate(_long_request(), on_delta=kill_after_three)
        after = [both.generate(GenerationRequest(PROMPT, 4, seed=s)) for s in range(4)]
        ready = both.ready_urls()
    finally:
        both.close()
        only_doomed.close()

    # then: the failed stream reports what it delivered, for billing
    assert isinstance(lost.value, EngineError)
    assert lost.value.code == "engine_error"
    partial = lost.value.partial
    assert partial is not None
    assert partial.output_tokens >= 3
    assert partial.finish_reason == "error"
    assert partial.text == "".join(deltas)
    assert partial.input_tokens == count_tokens(PROMPT)
    # and requests that met the dead server before any token went to the live one
    assert {result.server_url for result in after} == {live}
    assert all(result.output_tokens == 4 for result in after)
    assert ready == [live]


# -- load: what every client has running or queued on a server ---------------------------

# Triton's exposition as a TensorRT-LLM deployment writes it (the backend's
# documented example, with a request queued in front of the ensemble and
# nothing yet waiting in the executor).
TRTLLM_METRICS = """\
# HELP nv_trt_llm_request_metrics TRT LLM request metrics
# TYPE nv_trt_llm_request_metrics gauge
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="context",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="scheduled",version="1"} 1
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="max",version="1"} 512
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="active",version="1"} 3
nv_trt_llm_request_metrics{model="tensorrt_llm",request_type="waiting",version="1"} 2
nv_trt_llm_request_metrics{model="draft",request_type="active",version="1"} NaN
# HELP nv_inference_pending_request_count Instantaneous number of pending requests
# TYPE nv_inference_pending_request_count gauge
nv_inference_pending_request_count{model="ensemble",version="1"} 1
nv_inference_request_success{model="ensemble",version="1"} 1017 1733000000000
nv_gpu_utilization{gpu_uuid="GPU-b8 x"} 0.93
"""


def test_the_load_of_a_tensorrt_llm_server_is_its_active_waiting_and_pending_requests():
    # when
    samples = parse_metrics(TRTLLM_METRICS)

    # then: every series with its labels (a timestamp after the value ignored,
    # a label value with a space kept); the load counts the 3 active and the 1
    # pending, not the scheduled, context or waiting parts of active (waiting
    # is active - scheduled), nor the maximum, nor a value that is no number
    assert len(samples) == 9
    assert samples[-2].value == 1017 and samples[-1].labels == {"gpu_uuid": "GPU-b8 x"}
    assert engine_load(samples) == 4


def test_the_development_engine_reports_its_requests_as_tensorrt_llms_backend_does(
    private_triton_server,
):
    # given the gauges of an idle engine
    seen: list = []

    def gauges() -> dict[str, float]:
        seen[:] = scrape_samples(private_triton_server.metrics_url)
        return {s.labels["request_type"]: s.value for s in seen if s.name == TRTLLM_REQUESTS}

    busy, workers = occupy_engine_workers(private_triton_server.grpc_url)
    idle = {"active": 0, "scheduled": 0, "waiting": 0, "max": workers}
    try:
        # when another client holds every worker, as many more requests queued
        expected = {
            "active": 2 * workers,
            "scheduled": workers,
            "waiting": workers,
            "max": workers,
        }
        wait_until(lambda: gauges() == expected, timeout=30, what=f"the gauges to say {expected}")
        load = engine_load(seen)  # from the same reading
    finally:
        busy.stop()

    # then its load was all of them; once they are gone, none
    assert load == 2 * workers
    wait_until(lambda: gauges() == idle, timeout=30, what=f"the gauges to say {idle}")


def test_routing_counts_the_requests_other_clients_have_on_each_server(
    triton_server, private_triton_server
):
    # given a pool of two servers with their metrics urls
    busy_url, free_url = private_triton_server.grpc_url, triton_server.grpc_url
    pool = ServerPool(
        [busy_url, free_url],
        metrics_urls=[private_triton_server.metrics_url, triton_server.metrics_url],
        load_ttl_s=0.2,
    )
    busy_server = pool._servers[0]

    def others(server=busy_server) -> int | None:
        return pool._others(server, time.monotonic())

    try:
        # (what earlier tests left running on the session's server has ended)
        pool.generate(GenerationRequest(PROMPT, 2, seed=1))
        wait_until(
            lambda: [others(server) for server in pool._servers] == [0, 0],
            timeout=30,
            what="both servers to read idle",
        )
        while_idle = [
            pool.generate(GenerationRequest(PROMPT, 2, seed=s)).server_url for s in (1, 2)
        ]
        # when another client (not this pool) holds every worker of the first
        busy, workers = occupy_engine_workers(busy_url)
        try:
            wait_until(lambda: (others() or 0) >= workers, timeout=30, what="the load to be read")
            while_busy = [
                pool.generate(GenerationRequest(PROMPT, 2, seed=s)).server_url for s in range(6)
            ]
        finally:
            busy.stop()
        wait_until(
            lambda: [others(server) for server in pool._servers] == [0, 0],
            timeout=30,
            what="both servers to read idle again",
        )
        after = [pool.generate(GenerationRequest(PROMPT, 2, seed=s)).server_url for s in (1, 2)]
    finally:
        pool.close()

    # then: idle, the two took turns; while the first was busy with another
    # client's requests (which this process's own counts cannot see), every
    # request went to the other; once it was free again, turns again
    assert sorted(while_idle) == sorted(after) == sorted([busy_url, free_url])
    assert while_busy == [free_url] * 6


def test_the_pools_own_requests_are_not_counted_as_other_clients(paced_private_triton_server):
    # given a server every worker of which another client holds, as many of
    # its requests queued, and a pool that names it twice (so that routing,
    # whatever it reads, sends the pool's request there), with the metrics url.
    # Paced, so that the pool's request waits at least one busy stream (3 s) on any
    # machine, through the engine's count and the pool's two readings below (about
    # half a second); unpaced a quick machine's busy stream is not much longer.
    private_triton_server = paced_private_triton_server
    url, metrics = private_triton_server.grpc_url, private_triton_server.metrics_url
    busy, workers = occupy_engine_workers(url)
    pool = ServerPool([url, url], metrics_urls=[metrics, metrics], load_ttl_s=0.1)
    with ThreadPoolExecutor(1) as executor:
        try:
            # one request of the pool's own, queued behind the others' at the engine
            queued = executor.submit(pool.generate, GenerationRequest(PROMPT, 2, seed=1))
            wait_until(lambda: any(s.inflight for s in pool._servers), timeout=30, what="sent")
            [mine] = [server for server in pool._servers if server.inflight]
            wait_until(
                lambda: engine_load(scrape_samples(metrics)) > 2 * workers,
                timeout=30,
                what="the server to count it with the others' requests",
            )
            counted_from = time.monotonic()

            # when the pool reads the load again (a reading begun after that:
            # the second to end after it), while its request still waits
            wait_until(lambda: (mine.load_at or 0) > counted_from, timeout=30, what="a reading")
            first_end = mine.load_at
            wait_until(lambda: mine.load_at > first_end, timeout=30, what="another reading")
            seen = (mine.inflight, mine.others)
        finally:
            busy.stop()
            result = queued.result(timeout=60)
            pool.close()

    # then: the server counted the pool's request too, but the pool counts
    # only the other client's as others (at most all of them)
    assert seen[0] == 1
    assert workers <= seen[1] <= 2 * workers
    assert result.output_tokens == 2


def test_a_server_whose_load_is_unknown_does_not_draw_the_requests_of_a_busy_one(
    triton_server, private_triton_server, dead_grpc_url
):
    # given a pool of two servers: the first's metrics url answers nothing,
    # the second is busy with another client's requests, which it reports
    busy_url = private_triton_server.grpc_url
    pool = ServerPool(
        [triton_server.grpc_url, busy_url],
        metrics_urls=[f"http://{dead_grpc_url}/metrics", private_triton_server.metrics_url],
        load_ttl_s=0.1,
        connect_timeout_s=0.5,
    )
    unknown, busy_server = pool._servers
    busy, workers = occupy_engine_workers(busy_url)
    try:
        pool.generate(GenerationRequest(PROMPT, 2, seed=1))
        wait_until(
            lambda: unknown.read_at is not None and (busy_server.others or 0) >= workers,
            timeout=30,
            what="both loads to be read",
        )

        # when requests come
        served = [pool.generate(GenerationRequest(PROMPT, 2, seed=s)).server_url for s in (2, 3)]
    finally:
        busy.stop()
        pool.close()

    # then: the unknown load was not taken for none (which would send every
    # request there): with one unknown, this process's own counts decide, and
    # the two servers take turns, as without metrics
    assert unknown.others is None and unknown.load_at is None
    assert sorted(served) == sorted([triton_server.grpc_url, busy_url])


def test_metrics_that_cannot_be_read_leave_the_load_unknown_and_are_read_again_later(
    triton_server, private_triton_server
):
    # given a pool whose first server's metrics url answers, but not with
    # Prometheus text (Triton's HTTP API), and the second's with its metrics
    pool = ServerPool(
        [triton_server.grpc_url, private_triton_server.grpc_url],
        metrics_urls=[f"{triton_server.http_base}/v2", private_triton_server.metrics_url],
        load_ttl_s=0.1,
    )
    bad, good = pool._servers
    reads: list[float] = []
    scrape = pool._scrape_load_and_release

    def counted(server):
        if server is bad:
            reads.append(time.monotonic())
        scrape(server)

    pool._scrape_load_and_release = counted
    try:
        pool.generate(GenerationRequest(PROMPT, 2, seed=1))
        wait_until(lambda: len(reads) >= 3 and good.load_at, timeout=30, what="readings")
        spread = reads[-1] - reads[-3]
    finally:
        pool.close()

    # then: no load taken from it (it has no series of the load: unknown, not
    # 0), retried every load_ttl_s, not on every watchdog tick (0.05 s); the
    # other's read
    assert bad.others is None and bad.load_at is None
    assert good.others is not None
    assert spread >= 2 * 0.1


def test_pool_for_leaves_out_metrics_urls_that_do_not_match_the_servers(caplog):
    # when the catalog gives one metrics url for two servers, or any for one
    mismatched = pool_for(
        ["127.0.0.1:1", "127.0.0.1:2"], "ensemble", metrics_urls=["http://127.0.0.1:3/metrics"]
    )
    single = pool_for(["127.0.0.1:4"], "ensemble", metrics_urls=["http://127.0.0.1:5/metrics"])

    # then: pools that route by their own counts, as without metrics, and why
    assert mismatched.metrics_urls == () and not mismatched._reads_load
    assert mismatched is pool_for(["127.0.0.1:1", "127.0.0.1:2"], "ensemble")
    assert single is pool_for(["127.0.0.1:4"], "ensemble")
    assert "do not match the servers" in caplog.text
    close_pools()


def test_a_pool_needs_one_metrics_url_per_server_or_none():
    # when / then
    with pytest.raises(ValueError, match="one url per gRPC url"):
        ServerPool(["127.0.0.1:1", "127.0.0.1:2"], metrics_urls=["http://127.0.0.1:3/metrics"])


def test_a_request_of_this_pool_that_ends_while_the_load_is_read_is_not_read_as_another_clients(
    monkeypatch,
):
    # given a pool of two servers with metrics urls, one of whose requests is
    # routed to the first and ends while that server's metrics are read: the
    # reading, taken meanwhile, counts it (1 pending). Stood in at the
    # module's metrics read: a real server cannot be made to answer at the
    # one moment that request is in its queue.
    pool = ServerPool(
        ["127.0.0.1:1", "127.0.0.1:2"],
        metrics_urls=["http://127.0.0.1:3/metrics", "http://127.0.0.1:4/metrics"],
    )
    server = pool._servers[0]

    def reading_while_one_of_ours_ran(_url, *, timeout_s):
        with pool._lock:  # routed there, as _pick routes ...
            server.inflight += 1
            server.picked += 1
        with pool._lock:  # ... and answered, as a request's end counts it
            server.inflight -= 1
        return [triton_module.Sample(triton_module.TRITON_PENDING, {"model": "ensemble"}, 1.0)]

    monkeypatch.setattr(triton_module, "scrape_samples", reading_while_one_of_ours_ran)
    try:
        # when its load is read
        server.load_lock.acquire()
        pool._scrape_load_and_release(server)
    finally:
        pool.close()

    # then the request counted there is this pool's own, not another client's
    assert server.others == 0
