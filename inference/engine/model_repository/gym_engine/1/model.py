"""Triton Python-backend model: the CPU development engine behind the `ensemble`.

It takes and returns the tensors of TensorRT-LLM's `ensemble` (text in, text
out, with the sampling inputs and the token counts), so the gateway talks to
it exactly as it talks to a GPU deployment. Differences a client can see are
listed in `inference/engine/README.md`.

Runs inside Triton's Python stub, not in Django: it imports only
`inference.engine` (numpy and tokenizers, no Django).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

try:
    from inference.engine import STREAM_TOKEN_INTERVAL_ENV
    from inference.engine.generation import EngineError, SamplingParams, load_engine
except ImportError:
    # Started by hand (`tritonserver --model-repository ...`) without PYTHONPATH:
    # the repository root is five levels up from this file.
    sys.path.insert(0, str(Path(__file__).resolve().parents[5]))
    from inference.engine import STREAM_TOKEN_INTERVAL_ENV
    from inference.engine.generation import EngineError, SamplingParams, load_engine

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
# Token counts are added up in the stub and published to Triton's metrics by
# one thread this often: an increment is a round trip to the Triton process,
# and three per request cost about a tenth of the engine's CPU per request
# and of its latency (direct gRPC calls, 2026-12-02). A scrape sees a
# request's tokens within this interval.
METRICS_FLUSH_S = 0.1
# TensorRT-LLM's backend reports its executor's requests in this gauge family;
# the gateway routes by it (inference.triton.engine_load), so this engine
# reports the same, with the same meanings: `active` every request it holds,
# `scheduled` those a worker thread is generating, `waiting` the rest
# (active - scheduled, a part of active), `max` the worker threads. Unlike
# TensorRT-LLM's executor it has no limit on what it holds, so `active` may
# pass `max`. Published with the token counts, every METRICS_FLUSH_S.
REQUEST_GAUGES = "nv_trt_llm_request_metrics"


class RequestError(Exception):
    """Input the model cannot serve; answered as an INVALID_ARG error."""


def _tensor(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _row(array, row: int, name: str):
    # A batched request sends every [1] input as [batch, 1]; an input given
    # once for the whole batch ([1, 1]) applies to every row.
    if array.shape[0] == 1:
        return array[0]
    if row >= array.shape[0]:
        raise RequestError(f"{name} has {array.shape[0]} rows but text_input has more.")
    return array[row]


def _scalar(request, name: str, row: int, default, cast):
    array = _tensor(request, name)
    if array is None or array.size == 0:
        return default
    value = _row(array, row, name).reshape(-1)
    if value.size != 1:
        raise RequestError(f"{name} must hold one value per batch row.")
    return cast(value[0].item())


def _strings(request, name: str, row: int) -> tuple[str, ...]:
    array = _tensor(request, name)
    if array is None or array.size == 0:
        return ()
    return tuple(_decode(value, name) for value in _row(array, row, name).reshape(-1))


def _decode(value, name: str) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"{name} must be UTF-8 text.") from exc
    return str(value)


def _column(values, dtype) -> np.ndarray:
    """A [batch, 1] output tensor, the shape of every `dims: [1]` output."""
    return np.array(values, dtype=dtype).reshape(-1, 1)


class _Request:
    """One batch row of a Triton request, parsed before `execute` returns."""

    def __init__(self, engine, request, row: int):
        prompt = _decode(
            _row(_tensor(request, "text_input"), row, "text_input").reshape(-1)[0], "text_input"
        )
        max_tokens = _scalar(request, "max_tokens", row, None, int)
        if max_tokens is None:
            raise RequestError("max_tokens is required.")
        beam_width = _scalar(request, "beam_width", row, 1, int)
        if beam_width not in (0, 1):
            raise RequestError("beam_width > 1 is not supported by the CPU development engine.")
        self.prompt = prompt
        self.prompt_ids = engine.encode(prompt)
        self.stream = _scalar(request, "stream", row, False, bool)
        self.exclude_input = _scalar(request, "exclude_input_in_output", row, False, bool)
        self.return_input_count = _scalar(request, "return_num_input_tokens", row, False, bool)
        self.return_output_count = _scalar(request, "return_num_output_tokens", row, False, bool)
        self.return_log_probs = _scalar(request, "return_log_probs", row, False, bool)
        self.params = SamplingParams(
            max_tokens=max_tokens,
            temperature=_scalar(request, "temperature", row, 1.0, float),
            top_k=_scalar(request, "top_k", row, 0, int),
            top_p=_scalar(request, "top_p", row, 0.0, float),
            seed=_scalar(request, "seed", row, 0, int),
            min_tokens=_scalar(request, "min_tokens", row, 0, int),
            repetition_penalty=_scalar(request, "repetition_penalty", row, 1.0, float),
            presence_penalty=_scalar(request, "presence_penalty", row, 0.0, float),
            frequency_penalty=_scalar(request, "frequency_penalty", row, 0.0, float),
            end_id=_scalar(request, "end_id", row, None, int),
            stop_words=_strings(request, "stop_words", row),
            bad_words=_strings(request, "bad_words", row),
        )
        try:
            engine.validate(self.prompt_ids, self.params)
        except EngineError as exc:
            raise RequestError(str(exc)) from exc


def _error_response(message: str):
    return pb_utils.InferenceResponse(
        output_tensors=[], error=pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    )


class TritonPythonModel:
    def initialize(self, args):
        # The stub imports numpy from the first python3 on PATH; numpy 2 breaks
        # BYTES tensors. Fail loudly at load rather than on the first request.
        if int(np.__version__.split(".")[0]) >= 2:
            raise pb_utils.TritonModelException(
                f"numpy {np.__version__} from {sys.prefix}: the Python backend needs numpy<2; "
                "start tritonserver with the project's .venv/bin first on PATH."
            )
        config = json.loads(args["model_config"])
        parameters = {
            key: value["string_value"] for key, value in config.get("parameters", {}).items()
        }
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        # TritonDevServer checks it; by hand, a bad value means no pacing.
        try:
            pace_ms = max(0.0, float(os.environ.get(STREAM_TOKEN_INTERVAL_ENV) or 0))
        except ValueError:
            pace_ms = 0.0
        self.token_interval_s = pace_ms / 1000
        self.engine = load_engine(
            max_input_len=int(parameters.get("max_input_len", 2048)),
            max_seq_len=int(parameters.get("max_seq_len", 4096)),
            prefix_block_size=int(parameters.get("prefix_cache_block_size", 16)),
            prefix_max_blocks=int(parameters.get("prefix_cache_max_blocks", 4096)),
        )
        # A worker thread that finishes a request waits for the GIL, held by the
        # stub's own threads, up to the switch interval (5 ms by default): that
        # wait was half the latency of a short request.
        sys.setswitchinterval(0.0005)
        # Decoupled requests run on these threads so that `execute` returns at
        # once and streams interleave, as in-flight batching does on a GPU.
        workers = int(parameters.get("worker_threads", 4))
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="gym-engine")
        self._metrics_lock = threading.Lock()
        labels = {"model": args["model_name"], "version": args["model_version"]}
        # Requests taken (execute) and started (a worker thread has them), not
        # yet answered: counted under _metrics_lock.
        self._taken = 0
        self._started = 0
        self.request_family = pb_utils.MetricFamily(
            name=REQUEST_GAUGES,
            description="Requests of the development engine, as TensorRT-LLM's backend reports them",
            kind=pb_utils.MetricFamily.GAUGE,
        )
        self.request_gauges = {
            kind: self.request_family.Metric(labels={**labels, "request_type": kind})
            for kind in ("active", "waiting", "scheduled", "max")
        }
        self.request_gauges["max"].set(workers)
        self._published_requests = (0, 0)
        # The families must outlive their metrics, or incrementing fails.
        self.metric_families = {
            kind: pb_utils.MetricFamily(
                name=f"gym_engine_{kind}_tokens_total",
                description=f"{kind.capitalize()} tokens processed by the development engine",
                kind=pb_utils.MetricFamily.COUNTER,
            )
            for kind in ("input", "output", "cached")
        }
        self.token_metrics = {
            kind: family.Metric(labels=labels) for kind, family in self.metric_families.items()
        }
        # Counted here, published by one thread (see METRICS_FLUSH_S).
        self._pending_tokens = dict.fromkeys(self.token_metrics, 0)
        self._flusher_stop = threading.Event()
        self._flusher = threading.Thread(
            target=self._publish_metrics_loop, name="gym-engine-metrics", daemon=True
        )
        self._flusher.start()
        pb_utils.Logger.log_info(
            f"gym_engine ready: vocabulary {self.engine.tokenizer.get_vocab_size()} tokens, "
            f"decoupled={self.decoupled}, numpy {np.__version__} from {sys.prefix}"
        )

    def execute(self, requests):
        if not self.decoupled:
            return [self._serve_whole(request) for request in requests]
        for request in requests:
            sender = request.get_response_sender()
            try:
                rows = self._parse(request)
            except RequestError as exc:
                sender.send(_error_response(str(exc)), flags=FINAL)
                continue
            except Exception as exc:  # every request must get its final flag
                pb_utils.Logger.log_error(f"gym_engine could not read a request: {exc!r}")
                sender.send(
                    pb_utils.InferenceResponse(
                        output_tensors=[], error=pb_utils.TritonError(str(exc))
                    ),
                    flags=FINAL,
                )
                continue
            with self._metrics_lock:
                self._taken += 1
            self.pool.submit(self._serve_decoupled, rows, sender)
        return None

    def finalize(self):
        # Triton unloads a decoupled model only after every request got its final
        # flag, so nothing is queued here; wait for the threads to wind down.
        self.pool.shutdown(wait=True)
        self._flusher_stop.set()
        self._flusher.join()
        self._publish_metrics()

    def _parse(self, request) -> list[_Request]:
        text = _tensor(request, "text_input")
        if text is None or text.ndim != 2 or text.shape[0] < 1:
            raise RequestError("text_input must have shape [batch, 1].")
        rows = [_Request(self.engine, request, row) for row in range(text.shape[0])]
        if any(row.stream for row in rows):
            if not self.decoupled:
                raise RequestError("Streaming is only supported in decoupled mode.")
            if len(rows) > 1:
                raise RequestError("Streaming requests must have a batch size of 1.")
        return rows

    def _serve_whole(self, request):
        try:
            return self._whole_response(self._parse(request))
        except RequestError as exc:
            return _error_response(str(exc))

    def _serve_decoupled(self, rows: list[_Request], sender) -> None:
        with self._metrics_lock:
            self._started += 1
        try:
            if rows[0].stream:
                self._stream(rows[0], sender)
            else:
                sender.send(self._whole_response(rows), flags=FINAL)
        except Exception as exc:  # a thread has no caller to raise to
            pb_utils.Logger.log_error(f"gym_engine request failed: {exc!r}")
            sender.send(
                pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                flags=FINAL,
            )
        finally:
            with self._metrics_lock:
                self._taken -= 1
                self._started -= 1

    def _count(self, row: _Request, output_ids: list[int], cached: int) -> None:
        self.engine.prefix_cache.store([*row.prompt_ids, *output_ids])
        with self._metrics_lock:
            self._pending_tokens["input"] += len(row.prompt_ids)
            self._pending_tokens["output"] += len(output_ids)
            self._pending_tokens["cached"] += cached

    def _publish_metrics(self) -> None:
        with self._metrics_lock:
            pending = self._pending_tokens
            self._pending_tokens = dict.fromkeys(pending, 0)
            requests = (self._started, self._taken - self._started)
        for kind, count in pending.items():
            if count:
                self.token_metrics[kind].increment(count)
        if requests != self._published_requests:
            # Each set is a round trip to the Triton process: only on a change.
            scheduled, waiting = requests
            self.request_gauges["active"].set(scheduled + waiting)
            self.request_gauges["scheduled"].set(scheduled)
            self.request_gauges["waiting"].set(waiting)
            self._published_requests = requests

    def _publish_metrics_loop(self) -> None:
        while not self._flusher_stop.wait(METRICS_FLUSH_S):
            try:
                self._publish_metrics()
            except Exception as exc:  # the thread must outlive a failed publish
                pb_utils.Logger.log_error(f"gym_engine could not publish its metrics: {exc!r}")

    def _whole_response(self, rows: list[_Request]):
        texts, input_counts, output_counts, cached_counts, log_probs = [], [], [], [], []
        for row in rows:
            cached = self.engine.prefix_cache.lookup(row.prompt_ids)
            steps = list(self.engine.generate(row.prompt_ids, row.params))
            output_ids = [step.token_id for step in steps if step.token_id is not None]
            generated = "".join(step.text for step in steps)
            texts.append((generated if row.exclude_input else row.prompt + generated).encode())
            input_counts.append(len(row.prompt_ids))
            output_counts.append(len(output_ids))
            cached_counts.append(cached)
            log_probs.append([step.logprob for step in steps if step.token_id is not None])
            self._count(row, output_ids, cached)
        tensors = [pb_utils.Tensor("text_output", _column(texts, np.object_))]
        tensors += self._count_tensors(rows[0], input_counts, output_counts, cached_counts)
        if rows[0].return_log_probs:
            width = max(1, *(len(values) for values in log_probs))
            padded = np.zeros((len(rows), 1, width), dtype=np.float32)
            for index, values in enumerate(log_probs):
                padded[index, 0, : len(values)] = values
            sums = [sum(values) for values in log_probs]
            tensors.append(pb_utils.Tensor("cum_log_probs", _column(sums, np.float32)))
            tensors.append(pb_utils.Tensor("output_log_probs", padded))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    @staticmethod
    def _count_tensors(row: _Request, input_counts, output_counts, cached_counts) -> list:
        tensors = []
        if row.return_input_count:
            tensors.append(pb_utils.Tensor("num_input_tokens", _column(input_counts, np.int32)))
            # Our stand-in for TensorRT-LLM's KV-cache reuse stats: the part of
            # num_input_tokens that the prefix cache served.
            tensors.append(pb_utils.Tensor("num_cached_tokens", _column(cached_counts, np.int32)))
        if row.return_output_count:
            tensors.append(pb_utils.Tensor("num_output_tokens", _column(output_counts, np.int32)))
        return tensors

    def _stream(self, row: _Request, sender) -> None:
        """One response per generated token, each with its text and its own count.

        As in TensorRT-LLM streaming: the prompt is never echoed, and
        `num_output_tokens` is the count of that response (1), so the total is
        the sum. The stream ends with an empty response flagged final.
        """
        cached = self.engine.prefix_cache.lookup(row.prompt_ids)
        output_ids: list[int] = []
        for step in self.engine.generate(row.prompt_ids, row.params):
            if sender.is_cancelled():
                # The client went away: stop spending compute on it. The final
                # flag below still has to be sent, or the request is never
                # released and the model cannot unload. (Through the ensemble
                # this never fires on Triton 2.51: the ensemble only passes a
                # cancellation on between steps.)
                break
            produced = 0 if step.token_id is None else 1
            if step.token_id is not None:
                output_ids.append(step.token_id)
            if not produced and not step.text:
                continue
            tensors = [pb_utils.Tensor("text_output", _column([step.text.encode()], np.object_))]
            tensors += self._count_tensors(row, [len(row.prompt_ids)], [produced], [cached])
            if row.return_log_probs:
                tensors.append(
                    pb_utils.Tensor("cum_log_probs", _column([step.logprob], np.float32))
                )
                tensors.append(
                    pb_utils.Tensor(
                        "output_log_probs", np.array([[[step.logprob]]], dtype=np.float32)
                    )
                )
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))
            if self.token_interval_s:
                time.sleep(self.token_interval_s)
        self._count(row, output_ids, cached)
        sender.send(flags=FINAL)
