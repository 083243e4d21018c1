"""A real tritonserver serving the CPU development engine, one per test run.

Tests talk to it the way the gateway talks to a TensorRT-LLM deployment with
`decoupled_mode=true`: every request, streamed or not, goes over the gRPC
bidirectional stream (the unary RPC and HTTP /infer refuse decoupled models).
"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from inference.engine.server import TritonDevServer

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
    """
    log = tmp_path_factory.mktemp("tritonserver") / "tritonserver.log"
    with TritonDevServer(log_path=log) as server:
        yield server


@pytest.fixture
def engine(triton_server):
    client = EngineClient(triton_server.grpc_url)
    yield client
    client.close()
