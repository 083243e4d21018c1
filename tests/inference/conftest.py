"""A real tritonserver serving the CPU development engine, one per test run.

Tests talk to it the way the gateway talks to a TensorRT-LLM deployment with
`decoupled_mode=true`: every request, streamed or not, goes over the gRPC
bidirectional stream (the unary RPC and HTTP /infer refuse decoupled models).
"""

from __future__ import annotations

import queue
import re
import socket
import threading
import time
import urllib.request
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from inference.engine.server import MODEL_REPOSITORY, TritonDevServer
from inference.triton import ServerPool, close_pools

MODEL = "ensemble"

# Wire types of TensorRT-LLM's ensemble inputs (every one is sent as [1, n]).
_INPUT_TYPES = {
    "text_input": ("BYTES", np.object_),
    "stop_words": ("BYTES", np.object_),
    "bad_words": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32),
    "min_tokens": ("INT32", np.int32),
    "top_k": ("INT32", np.int32),
    "beam_width": ("INT32", np.int32),
    "end_id": ("INT32", np.int32),
    "pad_id": ("INT32", np.int32),
    "temperature": ("FP32", np.float32),
    "top_p": ("FP32", np.float32),
    "repetition_penalty": ("FP32", np.float32),
    "presence_penalty": ("FP32", np.float32),
    "frequency_penalty": ("FP32", np.float32),
    "seed": ("UINT64", np.uint64),
    "stream": ("BOOL", np.bool_),
    "exclude_input_in_output": ("BOOL", np.bool_),
    "return_num_input_tokens": ("BOOL", np.bool_),
    "return_num_output_tokens": ("BOOL", np.bool_),
    "return_log_probs": ("BOOL", np.bool_),
}


def ensemble_inputs(module, **values) -> list:
    """InferInputs for `module` (tritonclient.grpc or .http), shaped [1, n]."""
    inputs = []
    for name, value in values.items():
        datatype, dtype = _INPUT_TYPES[name]
        items = value if isinstance(value, list | tuple) else [value]
        if dtype is np.object_:
            items = [item.encode() for item in items]
        array = np.array([items], dtype=dtype)
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


@dataclass
class Response:
    outputs: dict[str, np.ndarray]
    final: bool

    @property
    def text(self) -> str:
        return self.outputs["text_output"][0][0].decode()

    def count(self, name: str) -> int:
        return int(self.outputs[name][0][0])


@dataclass
class Result:
    """Every response of one request, in order; the last one carries the final flag."""

    responses: list[Response] = field(default_factory=list)
    error: Exception | None = None

    @property
    def data(self) -> list[Response]:
        return [response for response in self.responses if response.outputs]

    @property
    def text(self) -> str:
        return "".join(response.text for response in self.data)

    def total(self, name: str) -> int:
        return sum(response.count(name) for response in self.data)


class EngineClient:
    """One gRPC bidirectional stream, one request at a time."""

    def __init__(self, url: str):
        self.client = grpcclient.InferenceServerClient(url)
        self._results: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self._results.put((result, error)))

    def generate(self, prompt: str, max_tokens: int, **params) -> Result:
        self.client.async_stream_infer(
            MODEL,
            ensemble_inputs(grpcclient, text_input=prompt, max_tokens=max_tokens, **params),
            # The final flag may come on a response without tensors; ask for it
            # so that end-of-stream is explicit rather than guessed.
            enable_empty_final_response=True,
        )
        result = Result()
        while True:
            answer, error = self._results.get(timeout=30)
            if error is not None:
                result.error = error
                return result
            response = answer.get_response()
            outputs = {output.name: answer.as_numpy(output.name) for output in response.outputs}
            final = response.parameters["triton_final_response"].bool_param
            result.responses.append(Response(outputs=outputs, final=final))
            if final:
                return result

    def close(self) -> None:
        # An open stream keeps tritonserver from shutting down until it is closed.
        self.client.stop_stream()
        self.client.close()


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory):
    """A real tritonserver on free 127.0.0.1 ports; `.grpc_url`, `.http_url`, `.metrics_url`.

    Its log stays in pytest's temporary directory (the last few runs are kept)
    so that concurrent test runs never share one.

    Every server a test starts is killed at its end (`graceful=False`): nothing is
    asked of it afterwards, and Triton's own shutdown costs about 3 s a server (over
    60 servers a run). tests/inference/engine/test_triton_dev.py stops one both ways.
    """
    log = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    with TritonDevServer(log_path=log, graceful=False) as server:
        yield server
        # Triton does not finish shutting down while a client holds a stream open.
        close_pools()


# Milliseconds the paced server waits after each streamed token. Unpaced, a
# stream of 1,000-2,000 tokens lasts 0.2-0.7 s as this machine's speed swings
# (a response per token): a test that must act, or be timed out, while a
# stream runs raced its end (two failed fresh-clone runs, 2026-12-02). Paced,
# such a stream lasts over a second on any machine.
PACE_MS = 1


@pytest.fixture(scope="session")
def paced_triton_server(tmp_path_factory):
    """A second tritonserver whose engine waits PACE_MS after each streamed token."""
    log = tmp_path_factory.mktemp("paced-tritonserver") / "tritonserver.log"
    with TritonDevServer(log_path=log, stream_token_interval_ms=PACE_MS, graceful=False) as server:
        yield server
        close_pools()


@pytest.fixture
def engine(triton_server):
    client = EngineClient(triton_server.grpc_url)
    yield client
    client.close()


@pytest.fixture
def pool(triton_server):
    """The gateway's client (inference.triton) on the session server; closed afterwards."""
    server_pool = ServerPool([triton_server.grpc_url])
    yield server_pool
    server_pool.close()


@pytest.fixture
def dead_grpc_url() -> str:
    """host:port where nothing listens: a port the kernel just handed out, closed again."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"127.0.0.1:{port}"


@pytest.fixture
def hung_grpc_url():
    """host:port where a server hangs: the kernel takes connections (a listening socket's
    backlog) but nothing ever answers, as from a server stuck or behind a dropped route."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def private_triton_server(tmp_path):
    """A second tritonserver that a test may kill, its own (started afresh for each test)."""
    with TritonDevServer(log_path=tmp_path / "tritonserver.log", graceful=False) as server:
        yield server


@pytest.fixture
def paced_private_triton_server(tmp_path):
    """private_triton_server paced as paced_triton_server is (PACE_MS a streamed token): for
    a test that must kill it, or act on its own, while a stream runs or a request waits
    behind BusyEngine's streams, on any machine. It costs what the unpaced one does."""
    with TritonDevServer(
        log_path=tmp_path / "tritonserver.log", stream_token_interval_ms=PACE_MS, graceful=False
    ) as server:
        yield server


def _engine_output_tokens(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("gym_engine_output_tokens_total{"):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def busy_engine(paced_triton_server):
    """Every engine worker of the paced server held by a 3000-token stream; a request sent
    meanwhile waits, silent, at least one such stream (3 s) on any machine.

    The streams go to `gym_engine` itself, not `ensemble`, so that cancelling
    them at teardown really stops them (the ensemble does not pass a
    cancellation on). Yields the number of workers held.
    """
    triton_server = paced_triton_server
    before = _engine_output_tokens(triton_server.metrics_url)
    client, workers = occupy_engine_workers(triton_server.grpc_url)
    try:
        yield workers
    finally:
        client.stop()
        # The engine counts a request's tokens when it stops, and publishes its
        # counts every METRICS_FLUSH_S (0.1 s): wait for the count to settle.
        deadline = time.monotonic() + 10
        last = before
        while time.monotonic() < deadline:
            time.sleep(0.25)
            now = _engine_output_tokens(triton_server.metrics_url)
            if now == last and now > before:
                break
            last = now


class BusyEngine:
    """Every engine worker of a server held by a long stream, each replaced as it ends, until stop().

    The streams go to `gym_engine` itself, not `ensemble`, so that stopping
    them really stops them (the ensemble does not pass a cancellation on).
    Meanwhile a request answers ready but waits, silent, for a free engine
    worker. A stream of 3000 tokens lasts about a second here, less on a
    quicker machine (the engine takes no more than 4,096 tokens a sequence);
    replacing each as it ends keeps the engine busy for as long as the test
    needs, however fast it is. How long a request waits silent is a stream or
    two, so a test that needs it silent for a set time (past a gateway's wait
    or a run limit) uses the paced server, whose streams last at least 3 s. As many streams again wait
    queued behind the running ones: the engine takes its queue in order, so
    when a running stream ends, a request a test sent meanwhile still waits
    behind one of those (a replacement is queued behind it, and alone it let
    the test's request through: a flaky cancel test).
    """

    def __init__(self, grpc_url: str):
        config = (MODEL_REPOSITORY / "gym_engine" / "config.pbtxt").read_text()
        self.workers = int(
            re.search(r'"worker_threads"\s*value: \{ string_value: "(\d+)"', config)[1]
        )
        self._stopping = threading.Event()
        self._seen: set[str] = set()
        self._started: queue.Queue = queue.Queue()
        self.client = grpcclient.InferenceServerClient(grpc_url)
        self.client.start_stream(callback=self._on_response)
        for index in range(2 * self.workers):
            self._send(f"busy-{index}")
        started: set[str] = set()
        while len(started) < self.workers:
            request_id, error = self._started.get(timeout=30)
            assert error is None, error
            started.add(request_id)

    def _send(self, request_id: str) -> None:
        self.client.async_stream_infer(
            "gym_engine",
            ensemble_inputs(
                grpcclient,
                text_input="Hold this worker",
                max_tokens=3000,
                min_tokens=3000,
                stream=True,
            ),
            request_id=request_id,
            # The end of a stream comes on a response of its own: ask for it.
            enable_empty_final_response=True,
        )

    def _on_response(self, result, error) -> None:
        if self._stopping.is_set():
            return
        if error is not None:
            self._started.put((None, error))
            return
        response = result.get_response()
        if response.id not in self._seen:
            self._seen.add(response.id)
            self._started.put((response.id, None))
        if response.parameters["triton_final_response"].bool_param:
            self._send(response.id)

    def stop(self) -> None:
        self._stopping.set()
        self.client.stop_stream(cancel_requests=True)
        self.client.close()


def occupy_engine_workers(grpc_url: str) -> tuple[BusyEngine, int]:
    """Hold every engine worker of a server (BusyEngine); returns (it, the number of workers)."""
    busy = BusyEngine(grpc_url)
    return busy, busy.workers


def wait_for_engine_load(metrics_url: str, load: int, timeout: float = 30.0) -> int:
    """Wait until a server holds at least `load` requests, by its own metrics (the load the
    gateway routes by: inference.triton.engine_load); returns the load seen.

    A BusyEngine keeps 2 x workers requests in the engine (it sends the next
    only after one ends), so one more than that is a request of the test's:
    the engine has taken its prompt. The gauges are published every 0.1 s.
    """
    from inference.triton import engine_load, scrape_samples
    from tests.helpers import wait_until

    def held() -> int:
        seen = engine_load(scrape_samples(metrics_url)) or 0
        return seen if seen >= load else 0

    return wait_until(held, timeout=timeout, what=f"the engine to hold {load} requests")


@pytest.fixture
def fresh_tokenizer_caches():
    """The catalog tokenizers' per-process caches (inference.services.jobs), empty before and
    after: a test's tokenizer file, readable or not, is never another test's."""
    from inference.services import jobs

    caches = (jobs._tokenizer, jobs._longest_token_bytes, jobs._bound_slack)
    for cache in caches:
        cache.cache_clear()
    yield
    for cache in caches:
        cache.cache_clear()
