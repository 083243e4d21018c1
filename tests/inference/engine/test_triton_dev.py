"""The CPU development engine on a real tritonserver, through TensorRT-LLM's ensemble interface."""

from __future__ import annotations

import queue
import signal
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from inference.engine.server import TritonDevServer
from inference.engine.tokenizer import count_tokens
from tests.inference.conftest import MODEL, ensemble_inputs

PROMPT = "Tokens are the unit of work, and the cluster"
COUNTS = {"return_num_input_tokens": True, "return_num_output_tokens": True}


def test_non_streaming_request_echoes_the_prompt_and_reports_tokenizer_counts(engine):
    # given / when
    result = engine.generate(PROMPT, 16, seed=7, **COUNTS)

    # then: one response that is also the final one, shaped like TensorRT-LLM's
    assert result.error is None
    [response] = result.responses
    assert response.final
    assert response.outputs["text_output"].shape == (1, 1)
    assert response.outputs["num_input_tokens"].dtype == np.int32
    assert response.outputs["num_output_tokens"].shape == (1, 1)
    # the prompt is echoed, as TensorRT-LLM does unless exclude_input_in_output
    assert response.text.startswith(PROMPT)
    generated = response.text[len(PROMPT) :]
    assert generated
    # counts are the shipped tokenizer's, not bytes
    assert response.count("num_input_tokens") == count_tokens(PROMPT)
    assert response.count("num_input_tokens") < len(PROMPT.encode())
    assert response.count("num_output_tokens") == count_tokens(generated)


def test_exclude_input_in_output_returns_only_the_generated_text(engine):
    # given
    echoed = engine.generate(PROMPT, 12, seed=3)

    # when
    bare = engine.generate(PROMPT, 12, seed=3, exclude_input_in_output=True)

    # then
    assert bare.text == echoed.text[len(PROMPT) :]


def test_max_tokens_bounds_the_output(engine):
    # given: min_tokens keeps the model from ending early on its own
    exact = engine.generate(PROMPT, 5, min_tokens=5, exclude_input_in_output=True, **COUNTS)
    capped = engine.generate(PROMPT, 3, seed=9, exclude_input_in_output=True, **COUNTS)

    # then
    assert exact.total("num_output_tokens") == 5
    assert count_tokens(exact.text) == 5
    assert capped.total("num_output_tokens") <= 3
    assert count_tokens(capped.text) == capped.total("num_output_tokens")


def test_stop_words_end_generation_and_are_cut_from_the_text(engine):
    # given: a long run, and a stop word taken from the middle of it
    full = engine.generate(PROMPT, 40, seed=21, exclude_input_in_output=True, **COUNTS)
    words = full.text.split()
    assert len(words) > 6
    stop = " " + words[5]

    # when
    stopped = engine.generate(
        PROMPT, 40, seed=21, exclude_input_in_output=True, stop_words=[stop, "zzz-never"], **COUNTS
    )

    # then: the same text up to the first occurrence, without the stop word
    assert stopped.text == full.text[: full.text.index(stop)]
    assert stop not in stopped.text
    assert stopped.total("num_output_tokens") < full.total("num_output_tokens")


def test_a_seed_fixes_the_output_and_other_seeds_change_it(engine):
    # when
    first = engine.generate(PROMPT, 24, seed=11, temperature=1.0, top_p=0.95)
    again = engine.generate(PROMPT, 24, seed=11, temperature=1.0, top_p=0.95)
    others = {
        engine.generate(PROMPT, 24, seed=seed, temperature=1.0, top_p=0.95).text
        for seed in range(1, 7)
    }

    # then
    assert first.text == again.text
    assert len(others) > 1


def test_temperature_zero_is_greedy_whatever_the_seed(engine):
    # when
    outputs = {engine.generate(PROMPT, 16, seed=seed, temperature=0.0).text for seed in (1, 2, 3)}

    # then
    assert len(outputs) == 1


@pytest.mark.parametrize("stop_words", [[], [" the"]])
def test_streaming_sends_token_deltas_that_add_up_to_the_non_streamed_text(engine, stop_words):
    # given
    params = {"seed": 5, "exclude_input_in_output": True, "stop_words": stop_words, **COUNTS}
    whole = engine.generate(PROMPT, 24, **params)

    # when
    streamed = engine.generate(PROMPT, 24, stream=True, **params)

    # then: one response per token, each counting itself, then an empty final one
    assert streamed.error is None
    assert len(streamed.data) >= 3
    assert not any(response.final for response in streamed.data)
    assert streamed.responses[-1].final
    assert streamed.responses[-1].outputs == {}
    assert all(response.count("num_output_tokens") in (0, 1) for response in streamed.data)
    assert all(
        response.count("num_input_tokens") == count_tokens(PROMPT) for response in streamed.data
    )
    # and together they are the non-streamed answer, counts included
    assert streamed.text == whole.text
    assert streamed.total("num_output_tokens") == whole.total("num_output_tokens")


def test_invalid_requests_are_answered_with_an_error(engine):
    # when
    beam = engine.generate(PROMPT, 8, beam_width=2)
    no_tokens = engine.generate(PROMPT, 0)

    # then
    assert "beam_width" in str(beam.error)
    assert "max_tokens" in str(no_tokens.error)


def test_decoupled_model_refuses_http_infer_and_unary_grpc(triton_server):
    # given: the same refusals a TensorRT-LLM deployment with decoupled_mode=true gives
    http = httpclient.InferenceServerClient(triton_server.http_url)
    grpc = grpcclient.InferenceServerClient(triton_server.grpc_url)

    # when / then
    with http, pytest.raises(InferenceServerException) as http_error:
        http.infer(MODEL, ensemble_inputs(httpclient, text_input=PROMPT, max_tokens=4))
    assert http_error.value.status() == "501"
    assert "decoupled" in http_error.value.message()

    with grpc, pytest.raises(InferenceServerException) as grpc_error:
        grpc.infer(MODEL, ensemble_inputs(grpcclient, text_input=PROMPT, max_tokens=4))
    assert "UNIMPLEMENTED" in grpc_error.value.status()


def test_prefix_cache_reports_cached_prompt_tokens_on_a_repeated_prompt(engine):
    # given: a long prompt no other test sends
    prompt = f"Session {uuid.uuid4().hex}. " + " ".join(
        ["The prompt tokens are read once, and the output tokens are generated one by one."] * 4
    )
    prompt_tokens = count_tokens(prompt)
    assert prompt_tokens > 40

    # when
    first = engine.generate(prompt, 4, **COUNTS)
    second = engine.generate(prompt, 4, **COUNTS)

    # then: whole 16-token blocks, never the last prompt token
    assert first.responses[0].count("num_cached_tokens") == 0
    cached = second.responses[0].count("num_cached_tokens")
    assert cached == 16 * ((prompt_tokens - 1) // 16)
    assert 0 < cached < prompt_tokens
    assert second.responses[0].count("num_input_tokens") == prompt_tokens


def test_metrics_endpoint_counts_successful_requests(triton_server, engine):
    # given
    engine.generate(PROMPT, 4)

    # when
    with urllib.request.urlopen(triton_server.metrics_url, timeout=5) as response:
        metrics = response.read().decode()

    # then
    [line] = [
        line
        for line in metrics.splitlines()
        if line.startswith(f'nv_inference_request_success{{model="{MODEL}"')
    ]
    assert float(line.rsplit(" ", 1)[1]) >= 1
    assert "gym_engine_output_tokens_total" in metrics


def test_ensemble_has_the_tensorrt_llm_interface(triton_server):
    # given / when
    with grpcclient.InferenceServerClient(triton_server.grpc_url) as client:
        ensemble = client.get_model_metadata(MODEL, as_json=True)
        engine_model = client.get_model_metadata("gym_engine", as_json=True)
        config = client.get_model_config("gym_engine", as_json=True)["config"]

    # then: the ensemble passes every tensor through 1:1
    def signature(metadata, kind):
        return {t["name"]: (t["datatype"], t["shape"]) for t in metadata[kind]}

    assert signature(ensemble, "inputs") == signature(engine_model, "inputs")
    assert signature(ensemble, "outputs") == signature(engine_model, "outputs")
    inputs = signature(ensemble, "inputs")
    assert inputs["text_input"] == ("BYTES", ["-1", "1"])
    assert inputs["max_tokens"] == ("INT32", ["-1", "1"])
    assert inputs["seed"] == ("UINT64", ["-1", "1"])
    assert inputs["stop_words"] == ("BYTES", ["-1", "-1"])
    outputs = signature(ensemble, "outputs")
    assert outputs["text_output"] == ("BYTES", ["-1", "-1"])
    assert outputs["num_output_tokens"] == ("INT32", ["-1", "1"])
    assert config["model_transaction_policy"]["decoupled"] is True


def _engine_output_tokens(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("gym_engine_output_tokens_total{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_cancelled_stream_stops_generation_in_the_engine(triton_server):
    # given: a stream that would run for thousands of tokens, sent to the engine
    # model itself (Triton 2.51's ensemble passes a cancellation on only between
    # steps, so through `ensemble` the engine would run to max_tokens)
    before = _engine_output_tokens(triton_server.metrics_url)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    arrived = queue.Queue()
    client.start_stream(callback=lambda result, error: arrived.put((result, error)))
    client.async_stream_infer(
        "gym_engine",
        ensemble_inputs(
            grpcclient, text_input=PROMPT, max_tokens=3000, min_tokens=3000, stream=True
        ),
    )
    for _ in range(2):
        _, error = arrived.get(timeout=30)
        assert error is None

    # when
    client.stop_stream(cancel_requests=True)
    client.close()

    # then: the engine counts its tokens when it stops, long before 3000
    deadline = time.monotonic() + 30
    while _engine_output_tokens(triton_server.metrics_url) == before:
        assert time.monotonic() < deadline, "the engine never finished the cancelled request"
        time.sleep(0.05)
    assert 2 <= _engine_output_tokens(triton_server.metrics_url) - before < 3000


def _in_process_group(pgid: int) -> list[int]:
    """The pids of every live process whose process group is `pgid` (from /proc)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # it exited while we looked
            continue
        # after the command: state, ppid, pgrp; a zombie is already gone
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


@pytest.mark.parametrize(
    ("graceful", "exit_code"), [(True, 0), (False, -signal.SIGKILL)], ids=["graceful", "killed"]
)
def test_a_stopped_server_leaves_no_process_and_no_shared_memory(tmp_path, graceful, exit_code):
    # given a server that has answered a request (its Python-backend stubs are up and
    # hold their shared-memory regions)
    server = TritonDevServer(log_path=tmp_path / "tritonserver.log", graceful=graceful).start()
    process = server.process
    with httpclient.InferenceServerClient(server.http_url) as client:
        assert client.is_model_ready(MODEL)
    stubs = [pid for pid in _in_process_group(process.pid) if pid != process.pid]
    assert stubs, "the Python backend runs its models in stub processes"
    assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*"))

    # when it is stopped
    server.stop()

    # then: the server ended as asked (Triton's own shutdown exits 0; killed, SIGKILL),
    # no stub of its group is left running, and its regions are removed
    assert process.returncode == exit_code
    assert _in_process_group(process.pid) == []
    assert list(Path("/dev/shm").glob(f"{server.shm_prefix}*")) == []
    assert not server.is_running()
