"""The OpenAI-compatible API: /v1/models, /v1/chat/completions, /v1/completions.

Bodies, streaming (Server-Sent Events, `stream_options.include_usage`) and
errors follow OpenAI's, so the official SDKs work unchanged with `base_url`
pointed here. Every response also says what it cost: a `gym` object in the
body (micro-credits), and, when the answer is not streamed, the headers
`X-Gym-Credits-Charged` and `X-Gym-Credits-Remaining` (credits, as decimal
strings). A stream's headers go out before its job settles, so its cost is in
the final chunk's `gym` object only.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import time
from collections.abc import Iterator
from datetime import datetime
from datetime import time as dt_time

from django.conf import settings
from django.http import Http404, StreamingHttpResponse
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.utils.http import http_date
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from redis.exceptions import RedisError
from rest_framework import serializers
from rest_framework.exceptions import ErrorDetail
from rest_framework.response import Response

from accounts.api_base import (
    ApiContentNegotiation,
    OrgApiView,
    PageQuery,
    StrictSerializer,
    acting_key,
    acting_user,
    query_data,
    require_no_input,
)
from accounts.errors import ApplicationError
from accounts.models import Priority, Scope
from inference.callback_client import callback_url_validate
from inference.chat_templates import chat_template_render
from inference.models import (
    JOB_ERROR_CODES,
    NON_TERMINAL,
    CatalogModel,
    Job,
    JobStatus,
    ModelStatus,
)
from inference.openai_body import (
    NEUTRAL_BY_KIND,
    content_parts_text,
    generation_body,
    neutral_refusal,
    neutral_spec,
    neutral_taken,
    text_storable,
)
from inference.relay import HEARTBEAT, CancelOrigin, relay_events, relay_progress
from inference.selectors import catalog_models_for, job_ended_final_event, organization_jobs
from inference.services import job_cancel, job_submit
from inference.services.jobs import SubmitParams, job_quote, job_run_limit
from metering.services.postings import amount_display

logger = logging.getLogger(__name__)

# How long a streamed request waits for its job's first event before its 200
# goes out: one relay poll. A job no engine takes comes back failed well within
# it when a worker is free (then answered 503, as unstreamed); behind a
# backlog the error comes in the stream. Not longer: the heartbeats that
# notice a client gone (and cancel its job) only start after it, and a client
# that hangs up before its first token should pay for as little as it can.
STREAM_FIRST_EVENT_WAIT_S = 0.5

# How long a request the gateway stopped waiting for waits for its job's last
# event once it asked the worker to cancel it: the cancel reaches the worker
# within its poll (0.1 s), and the settlement follows the engine's end.
FINAL_AFTER_CANCEL_WAIT_S = 2.0

# The engine's own refusals of a prompt too long for it, the only engine
# failures that are the request's fault: the development engine's ("Prompt
# length (N) exceeds the maximum input length (M)", and "... plus max_tokens
# (K) exceeds the maximum sequence length (S)") and TensorRT-LLM's
# (LlmRequest::validate: "Prompt length (N) exceeds maximum input length (M)",
# "Encoder length (N) exceeds maximum encoder input length (M)"; a prompt plus
# max_tokens over its sequence length it serves, with fewer tokens). Nothing
# looser: an engine failure taken for the client's is answered 400 and kept
# under its Idempotency-Key for good, where a 502 may be retried.
_PROMPT_TOO_LONG = re.compile(
    r"\b(?:prompt|encoder) length \(\d+\)(?: plus max_tokens \(\d+\))? exceeds (?:the )?"
    r"maximum (?:encoder )?(?:input|sequence) length \(\d+\)",
    re.IGNORECASE,
)


def render_chat(model: CatalogModel, messages: list[dict]) -> str:
    return chat_template_render(model.chat_template, messages)


class _JsonWhateverAccepted(ApiContentNegotiation):
    """OpenAI's API answers JSON (or, streaming, events) whatever `Accept` says; so do these.

    DRF's negotiation parses the header on every request to pick among
    renderers these views do not have (one: JSON): about 2.6% of the API
    process's CPU per chat completion here.
    """

    def select_renderer(self, request, renderers, format_suffix=None):
        return renderers[0], renderers[0].media_type


def _model_object(m: CatalogModel) -> dict:
    """A model as OpenAI's API shows one (`id`, `object`, `created`, `owned_by`), and the gym's."""
    return {
        "id": m.name,
        "object": "model",
        "created": int(m.created_at.timestamp()),
        "owned_by": "gymbilling",
        "gym": {
            "precision": m.precision,
            "context_limit": m.context_limit,
            "max_output_tokens": m.max_output_tokens,
            "status": m.status,
            "tier": m.access_tier,
            # A deprecated model: the day it stops being served, and
            # what to move to.
            "deprecation_date": m.deprecation_date,
            "successor": m.successor.name if m.successor else None,
        },
    }


class ModelsApi(OrgApiView):
    required_scope = Scope.INFERENCE
    content_negotiation_class = _JsonWhateverAccepted

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "ModelList"

        object = serializers.CharField()
        data = serializers.ListField(child=serializers.DictField())

    @extend_schema(responses=Output, summary="The models this organization may call")
    def get(self, request):
        data = [_model_object(m) for m in catalog_models_for(organization=request.organization)]
        return Response({"object": "list", "data": data})


class ModelDetailApi(OrgApiView):
    """OpenAI's `GET /v1/models/{model}`: one entry of the list, under the list's rules."""

    required_scope = Scope.INFERENCE
    content_negotiation_class = _JsonWhateverAccepted

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "Model"

        id = serializers.CharField()
        object = serializers.CharField()
        created = serializers.IntegerField()
        owned_by = serializers.CharField()
        gym = serializers.DictField()

    @extend_schema(responses=Output, summary="A model this organization may call")
    def get(self, request, model_id: str):
        # Only what GET /v1/models lists: a model of another tier, retired, or
        # unknown is not found alike (the list does not show them either).
        # No stored name has a NUL, which PostgreSQL refuses to compare.
        model = None
        if "\x00" not in model_id:
            model = (
                catalog_models_for(organization=request.organization).filter(name=model_id).first()
            )
        if model is None:
            raise ApplicationError(
                code="model_not_found",
                message=f"The model {model_id!r} does not exist; GET /v1/models lists yours.",
                status=404,
                param="model",
            )
        return Response(_model_object(model))


def _unsupported(message: str) -> serializers.ValidationError:
    """A value OpenAI's API takes and this one does not serve: 400 `unsupported_parameter`
    (accounts.errors), never dropped, since the client would not get what it asked for."""
    return serializers.ValidationError(message, code="unsupported_parameter")


class _Content(serializers.CharField):
    """A message's content: a string, or OpenAI's list of content parts (what many SDK users
    send), whose text parts are joined into one string (openai_body.content_parts_text).
    A part of another type (image_url, input_audio, file...) is refused naming its type: these
    models read text only, and dropping it would answer another prompt."""

    def __init__(self, **kwargs):
        super().__init__(allow_blank=True, max_length=200_000, trim_whitespace=False, **kwargs)

    def to_internal_value(self, data):
        if not isinstance(data, list):
            return super().to_internal_value(data)
        if not data:
            self.fail("invalid_parts")
        texts = []
        for index, part in enumerate(data):
            kind = part.get("type") if isinstance(part, dict) else None
            if not isinstance(kind, str):
                raise serializers.ValidationError(
                    {index: {"type": ['A content part needs a "type", such as "text".']}}
                )
            if kind != "text":
                refused = ErrorDetail(
                    f"A {kind!r} content part is not supported: this model reads text only. "
                    'Send text parts ({"type": "text", "text": "..."}) or a string.',
                    code="unsupported_parameter",
                )
                raise serializers.ValidationError({index: {"type": [refused]}})
            unknown = sorted(set(part) - {"type", "text"})
            if unknown:
                raise serializers.ValidationError(
                    {index: {unknown[0]: [f"Unknown field {unknown[0]!r} in a text part."]}}
                )
            if type(part.get("text")) is not str:
                raise serializers.ValidationError(
                    {index: {"text": ["A text part's text is a string."]}}
                )
            texts.append(part["text"])
        return content_parts_text(texts)

    default_error_messages = {
        **serializers.CharField.default_error_messages,
        "invalid_parts": "content is a string or a non-empty list of text parts.",
    }


class _Message(StrictSerializer):
    # Strict: OpenAI's `name`, `tool_call_id` or `tool_calls` change what its
    # model sees; dropped silently, the answer would be to another prompt.
    role = serializers.ChoiceField(choices=["system", "user", "assistant", "developer"])
    content = _Content()


class _Prompt(serializers.CharField):
    """A text completion's prompt: a string, or a list of one string, as OpenAI's SDK allows.
    Several prompts (a batch, answered with a choice each) or token ids are refused: one
    request is one job, billed and answered alone."""

    def __init__(self, **kwargs):
        super().__init__(max_length=200_000, trim_whitespace=False, **kwargs)

    def to_internal_value(self, data):
        if isinstance(data, list):
            if len(data) == 1 and isinstance(data[0], str):
                data = data[0]
            else:
                raise _unsupported(
                    "prompt is a string or a list of one string: several prompts, or token "
                    "ids, are not supported. Send one request per prompt."
                )
        return super().to_internal_value(data)

    def run_validation(self, data=serializers.empty):
        # CharField refuses a blank prompt before to_internal_value: [""] as "" too.
        if isinstance(data, list) and len(data) == 1 and isinstance(data[0], str):
            data = data[0]
        return super().run_validation(data)


# An OpenAPI 3.0 array must say what its items are: any JSON value here (`{}`).
_JSON_TYPES = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    str: {"type": "string"},
    list: {"type": "array", "items": {}},
    dict: {"type": "object"},
}


class _Neutral(serializers.Field):
    """An OpenAI parameter this API does not act on, taken at its neutral values only: those
    that ask for nothing more than leaving it out does (`logprobs: false`, `tools: []`), which
    clients send by default. Another value asks for what this API does not serve: refused
    with `unsupported_parameter`, never ignored; a malformed one is `invalid_request`. Taken
    values are dropped (_GenerationInput.validate), as openai_body drops them: both decide
    by openai_body.neutral_refusal, from its NEUTRAL table."""

    def __init__(self, *, name: str, kind: str | None, **kwargs):
        # kind: the endpoint's ("chat", "completion"), whose form of the parameter is taken;
        # None (a schema of both) either's.
        self.kind = kind
        super().__init__(
            required=False,
            allow_null=True,
            help_text=f"Not acted on: taken and dropped at {neutral_taken(name)}; refused "
            "(400) otherwise.",
            **kwargs,
        )
        # The schema gives OpenAI's JSON types, not a plain Field's "string".
        types = [_JSON_TYPES[t] for t in neutral_spec(name, kind)["types"]]
        extend_schema_field(types[0] if len(types) == 1 else {"oneOf": types})(self)

    def to_internal_value(self, data):
        refusal = neutral_refusal(self.field_name, data, self.kind)
        if refusal is None:
            return data
        code, message = refusal
        raise serializers.ValidationError(message, code=code)

    def to_representation(self, value):
        return value


class _JsonBoolean(serializers.BooleanField):
    """true or false only, as OpenAI takes them: DRF's also takes "yes", "on", 1 and "0"."""

    def to_internal_value(self, data):
        if type(data) is not bool:
            self.fail("invalid", input=data)
        return data


class _JsonNumber(serializers.FloatField):
    """A JSON number: DRF's also takes true and false (as 1.0 and 0.0)."""

    def to_internal_value(self, data):
        if type(data) is bool:
            self.fail("invalid", input=data)
        return super().to_internal_value(data)


class _StreamOptions(StrictSerializer):
    include_usage = _JsonBoolean(default=False)
    # OpenAI's: pads streamed chunks against length side channels. Taken and
    # ignored: these chunks go from this API straight to its client.
    include_obfuscation = _JsonBoolean(required=False)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        value.pop("include_obfuscation", None)
        return value


class _GenerationInput(StrictSerializer):
    model = serializers.CharField(max_length=128)
    max_tokens = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    max_completion_tokens = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    temperature = _JsonNumber(min_value=0, max_value=2, required=False, allow_null=True)
    top_p = _JsonNumber(min_value=0, max_value=1, required=False, allow_null=True)
    seed = serializers.IntegerField(
        min_value=0, max_value=2**63 - 1, required=False, allow_null=True
    )
    # OpenAI's range; sent to the engine (the TensorRT-LLM ensemble's own inputs).
    presence_penalty = _JsonNumber(min_value=-2, max_value=2, required=False, allow_null=True)
    frequency_penalty = _JsonNumber(min_value=-2, max_value=2, required=False, allow_null=True)
    stop = serializers.JSONField(required=False, allow_null=True)
    n = serializers.IntegerField(min_value=1, required=False, allow_null=True)
    stream = _JsonBoolean(default=False)
    stream_options = _StreamOptions(required=False, allow_null=True)
    user = serializers.CharField(max_length=256, required=False, allow_blank=True)
    priority = serializers.ChoiceField(choices=Priority.values, default=Priority.STANDARD)
    # The OpenAI endpoint ("chat", "completion") whose parameters not acted on
    # (openai_body.NEUTRAL_BY_KIND) the body also takes, each a _Neutral field; or
    # BY_TEXT_FIELD (the jobs API, the quote): the body's own text field says which, a
    # chat's `messages`, a completion's `prompt`, so that the other kind's parameter is an
    # unknown field, as at that kind's endpoint. Without a body to tell (the schema), or
    # with both or neither text field (refused), both kinds' are fields.
    neutral_kind: str
    BY_TEXT_FIELD = "by_text_field"

    def get_fields(self):
        fields = super().get_fields()
        kind = self.body_kind()
        names = NEUTRAL_BY_KIND[kind] if kind else frozenset().union(*NEUTRAL_BY_KIND.values())
        for name in sorted(names):
            fields[name] = _Neutral(name=name, kind=kind)
        return fields

    def body_kind(self) -> str | None:
        """The kind whose neutral parameters this body takes, None if it cannot tell."""
        if self.neutral_kind != self.BY_TEXT_FIELD:
            return self.neutral_kind
        # The fields are built when first read, which is after the body is given.
        data = getattr(self, "initial_data", None)
        if not isinstance(data, dict) or ("messages" in data) == ("prompt" in data):
            return None
        return "chat" if "messages" in data else "completion"

    def validate_stop(self, value):
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if (
            not isinstance(stops, list)
            or len(stops) > 4
            or not all(isinstance(s, str) and 0 < len(s) <= 64 for s in stops)
        ):
            raise serializers.ValidationError("stop is a string or a list of up to 4 strings.")
        if not all(text_storable(s) for s in stops):
            raise serializers.ValidationError(
                "stop strings may not hold a NUL character or a lone surrogate."
            )
        return stops

    def validate_n(self, value):
        if value is not None and value > 1:
            raise _unsupported(
                f"n={value} is not supported: each request generates one choice. Send n=1, "
                "or one request per choice."
            )
        return value

    def validate(self, attrs):
        for name, field in self.fields.items():
            if isinstance(field, _Neutral):
                attrs.pop(name, None)  # asks for nothing: nothing to pass on
        if attrs.get("stream_options") is not None and not attrs.get("stream"):
            raise serializers.ValidationError(
                {"stream_options": "stream_options is only allowed when stream is true."}
            )
        # OpenAI's newer name for max_tokens: one limit, named once (or twice alike).
        limits = {attrs.get("max_tokens"), attrs.get("max_completion_tokens")} - {None}
        if len(limits) > 1:
            raise serializers.ValidationError(
                {
                    "max_completion_tokens": "max_tokens and max_completion_tokens are the same "
                    "limit and differ here; send one of them."
                }
            )
        return attrs


def _max_tokens_param(data: dict) -> str:
    """The field the output limit came in, for an error about it to name."""
    return "max_completion_tokens" if data.get("max_completion_tokens") else "max_tokens"


def _announce_sunset(response, model: CatalogModel) -> None:
    """A deprecated model's answers say when it stops being served (RFC 8594's Sunset) and,
    if it has one, its successor; from that day it is refused as retired (the day begins
    at midnight in the project's time zone, the clock CatalogModel.retired_on is read on)."""
    if model.status != ModelStatus.DEPRECATED or model.deprecation_date is None:
        return
    midnight = timezone.make_aware(datetime.combine(model.deprecation_date, dt_time.min))
    response["Sunset"] = http_date(midnight.timestamp())
    if model.successor:
        response["X-Gym-Model-Successor"] = model.successor.name


def _cancel_abandoned(job: Job, *, origin: str = CancelOrigin.CLIENT) -> bool:
    """The job of a client that went away or stopped waiting: cancelled, not run for no one.

    Still queued (a backlog), it settles at once as canceled, nothing billed,
    and its message, when a worker takes it, is never sent to the engine;
    running, its worker ends the engine request and it settles as canceled,
    billed for what the engine delivered until then (and its prompt, once
    sent). Called while answering or closing the response: a failure here is
    logged, never raised (the job then runs on, and its hold bounds what it
    can cost, as before). Whether it was cancelled: ended, or its worker asked
    to stop. `origin` GATEWAY_TIMEOUT: the gateway stopped waiting, and a job
    it stops before its first token is charged nothing (inference.tasks).
    """
    try:
        cancelled = job_cancel(job=job, origin=origin)
    except Exception:
        logger.exception("could not cancel job %s, whose client went away", job.public_id)
        return False
    return cancelled.status not in NON_TERMINAL or cancelled.stop_requested


class _GenerationApi(OrgApiView):
    """Shared by chat and text completions: submit, then answer or stream.

    Subclasses define `prompt(data, model)`, `body(job, final)` and
    `chunk(job, delta_text=, finish_reason=)` in their endpoint's shape.
    """

    required_scope = Scope.INFERENCE
    content_negotiation_class = _JsonWhateverAccepted
    # The answer waits for the job's settlement (or streams): job_submit's
    # hold_durable. Not so an asynchronous job's 202.
    answers_after_settlement = True
    kind = "chat"
    # The request is counted with the job's tokens and slot (job_submit).
    counts_requests_with_work = True

    def submit(self, request, data: dict) -> Job:
        return job_submit(
            organization=request.organization,
            api_key=acting_key(request),
            # A signed-in member's (the dashboard's playground): the job names them.
            user=acting_user(request),
            model_name=data["model"],
            # Rendered with the model job_submit resolves (and checks), so the
            # catalog is read once per request.
            prompt=lambda model: self.prompt(data, model),
            params=SubmitParams(
                max_tokens=data.get("max_completion_tokens") or data.get("max_tokens"),
                max_tokens_param=_max_tokens_param(data),
                temperature=data.get("temperature"),
                top_p=data.get("top_p"),
                seed=data.get("seed"),
                presence_penalty=data.get("presence_penalty"),
                frequency_penalty=data.get("frequency_penalty"),
                stop=tuple(data.get("stop") or ()),
            ),
            priority=data["priority"],
            kind=self.kind,
            stream=data["stream"],
            callback_url=data.get("callback_url", ""),
            request_count=getattr(request, "request_count", None),
            # Answered only once the job settled, unless streamed: the hold's
            # commit need not wait for the disk (job_submit).
            hold_durable=data["stream"] or not self.answers_after_settlement,
            prompt_field="messages" if "messages" in data else "prompt",
        )

    def post(self, request):
        # The ordinary body without the serializer (inference.openai_body);
        # anything else, every error included, through it.
        data = generation_body(request.data, kind=self.kind)
        if data is None:
            serializer = self.Input(data=request.data)
            serializer.is_valid(raise_exception=True)
            data = serializer.validated_data
        return self.handle(request, data)

    def handle(self, request, data: dict):
        job = self.submit(request, data)
        try:
            return self.answer(job, data)
        except ApplicationError:
            raise
        except Exception as exc:
            # Redis or the database failed under the answer, after the job
            # was queued (and may be, or have been, charged): the job is
            # cancelled, and the answer is a 502 that names it and keeps the
            # Idempotency-Key (took_effect), so a retry does not run a second.
            logger.exception("job %s: its answer failed", job.public_id)
            cancelled = (
                "it was cancelled" if _cancel_abandoned(job) else "it could not be cancelled"
            )
            raise ApplicationError(
                code="engine_error",
                message=(
                    f"The answer failed after the job was queued; {cancelled}: see "
                    f"GET /api/v1/jobs/{job.public_id} for what it served and was charged."
                ),
                status=502,
                extra={"job_id": job.public_id},
                took_effect=True,
            ) from exc

    def answer(self, job: Job, data: dict):
        """The job's answer: its SSE stream, or its result once it settled."""
        if data["stream"]:
            include_usage = bool((data.get("stream_options") or {}).get("include_usage"))
            # A stream waits INFERENCE_TIMEOUT_SECONDS for each event, not for
            # the whole answer: a long generation that keeps sending tokens is
            # not cut off (its worker ends it at the run limit, and its last
            # chunk says why: gym.error). The whole is bounded all the same: a
            # wait in the queue, the run, a wait for its settlement.
            quiet_s = settings.INFERENCE_TIMEOUT_SECONDS
            # As reader: its worker cancels the job once this process stops
            # reading it, should it die where the generator's `finally` (sse)
            # never runs.
            events = relay_events(
                job.public_id,
                timeout_s=2 * quiet_s + job_run_limit(),
                quiet_s=quiet_s,
                heartbeat=True,
                reader=True,
            )
            # The first event, waited for up to STREAM_FIRST_EVENT_WAIT_S: a
            # job that failed before its first token (no engine would take
            # it, the engine refused it) is answered with its error status,
            # as a request that is not streamed is, not with a 200 whose
            # stream holds the error. One that fails later (behind a backlog,
            # or after tokens) can only say so in the stream: the 200 is sent.
            try:
                first = self.first_event(events)
            except TimeoutError:
                raise self.timed_out(job, *self.final_after_cancel(job)) from None
            if first is not HEARTBEAT and first["type"] == "error" and not first["output_tokens"]:
                raise self.engine_error(job, first)
            if first is not HEARTBEAT and self.cancelled_unanswered(first):
                raise self.cancelled(job, first)
            response = StreamingHttpResponse(
                self.sse(job, itertools.chain([first], events), include_usage=include_usage),
                content_type="text/event-stream",
            )
            response["Cache-Control"] = "no-cache"
            response["X-Accel-Buffering"] = "no"
            response["X-Gym-Job-Id"] = job.public_id
            _announce_sunset(response, job.model)
            return response
        final = self.wait(job)
        if final["type"] == "error":
            raise self.engine_error(job, final)
        if self.cancelled_unanswered(final):
            raise self.cancelled(job, final)
        response = Response(self.body(job, final), headers=self.cost_headers(job, final))
        _announce_sunset(response, job.model)
        return response

    @staticmethod
    def first_event(events: Iterator) -> dict:
        """The first real event, or HEARTBEAT when none came within STREAM_FIRST_EVENT_WAIT_S
        (each HEARTBEAT is one relay poll, half a second, without an event)."""
        deadline = time.monotonic() + STREAM_FIRST_EVENT_WAIT_S
        event = next(events)
        while event is HEARTBEAT and time.monotonic() < deadline:
            event = next(events)
        return event

    @staticmethod
    def wait(job: Job) -> dict:
        try:
            for event in relay_events(job.public_id, timeout_s=settings.INFERENCE_TIMEOUT_SECONDS):
                if event["type"] in ("done", "error"):
                    return event
        except TimeoutError:
            final, cancelled = _GenerationApi.final_after_cancel(job)
            if final is not None and final["status"] == JobStatus.SUCCEEDED:
                if final["text"] is None:  # from its row, its final event lost
                    raise _GenerationApi.answer_lost(job, final) from None
                return final  # it finished as the wait ended: answered, as it was billed
            if final is not None and final["status"] in (JobStatus.FAILED, JobStatus.EXPIRED):
                # It ended on its own (the engine failed it, its hold expired), not by
                # this cancel: answered with its own error, as if its event had come.
                raise _GenerationApi.engine_error(job, final) from None
            raise _GenerationApi.timed_out(job, final, cancelled) from None
        raise ApplicationError(
            code="engine_error",
            message=f"The job ended without a result: see GET /api/v1/jobs/{job.public_id}.",
            status=502,
            extra={"job_id": job.public_id},
            took_effect=True,  # what it was charged is not known here
        )

    @staticmethod
    def final_after_cancel(job: Job) -> tuple[dict | None, bool]:
        """The gateway stopped waiting: the job is cancelled (_cancel_abandoned), and its last
        event read once more, for up to FINAL_AFTER_CANCEL_WAIT_S, so that what it was billed
        is known (it may even have finished as the wait ended): (that event, None if it did
        not come; whether the cancel took: ended, or its worker told to stop).

        A job that ended without one (its worker died between its settlement's
        commit and publishing it, or Redis failed under it; or this cancel
        ended it while queued) is answered from its row (job_ended_final_event):
        else a job that succeeded and was charged in full would be a 504 saying
        it was cancelled, with no charge.

        The cancel is the gateway's own (CancelOrigin.GATEWAY_TIMEOUT): its
        client gets a 504 and nothing else, so its worker, stopping the job
        before any token, ends it failed (`engine_timeout`), nothing charged."""
        cancelled = _cancel_abandoned(job, origin=CancelOrigin.GATEWAY_TIMEOUT)
        try:
            for event in relay_events(job.public_id, timeout_s=FINAL_AFTER_CANCEL_WAIT_S):
                if event["type"] in ("done", "error"):
                    return event, cancelled
        except Exception:  # TimeoutError, or Redis failing: the row says the rest
            pass
        return job_ended_final_event(job_pk=job.pk), cancelled

    @staticmethod
    def timed_out(job: Job, final: dict | None, cancelled: bool = True) -> ApplicationError:
        """The 504 of a job the gateway stopped waiting for, with its charge when known.

        `cancelled` False: neither ended nor its worker told to stop (Redis failing), so
        it runs on, to its limit, and is charged for what it serves: said so, not "was
        cancelled" (a client told that would not look for the charge)."""
        if final is None:
            charged = f"it is charged only for what it served: see GET /api/v1/jobs/{job.public_id}"
        elif not final["credits_charged"]:
            charged = "nothing was charged"
        else:
            charged = f"it was charged {amount_display(final['credits_charged'])} credits for what it served"
        if final is None and not cancelled:
            outcome = (
                "the job could not be cancelled and runs on; it is charged for what it "
                f"serves: see GET /api/v1/jobs/{job.public_id}"
            )
        else:
            outcome = f"the job was cancelled, and {charged}"
        return ApplicationError(
            code="engine_timeout",
            message=f"The model did not answer in time; {outcome}.",
            status=504,
            extra={"job_id": job.public_id},
            took_effect=final is None or final["credits_charged"] > 0,
            headers=_GenerationApi.cost_headers(job, final),
        )

    @staticmethod
    def answer_lost(job: Job, final: dict) -> ApplicationError:
        """A job that succeeded, known from its row: its text, which only its final event
        carried, was lost. A 502 with its charge, keeping the Idempotency-Key: a retry
        would run and charge it again."""
        charged = amount_display(final["credits_charged"])
        return ApplicationError(
            code="answer_lost",
            message=(
                f"The job finished and was charged {charged} credits, but its answer was lost "
                f"on its way here (its worker stopped, or Redis failed, as it ended): see "
                f"GET /api/v1/jobs/{job.public_id}."
            ),
            status=502,
            extra={"job_id": job.public_id},
            took_effect=True,
            headers=_GenerationApi.cost_headers(job, final),
        )

    @staticmethod
    def engine_error(job: Job, final: dict) -> ApplicationError:
        """The job's failure as the answer; one that was charged (the tokens the engine served
        before it failed) keeps its Idempotency-Key, so that a retry does not charge again."""
        code = final.get("error_code") or "engine_error"
        status = {
            "engine_unavailable": 503,
            "engine_timeout": 504,
            "job_deadline_exceeded": 504,
        }.get(code, 502)
        message = final.get("error_message") or "The model failed."
        charged = final.get("credits_charged", 0) > 0
        # The engine's own refusal of a prompt too long for it, as OpenAI answers
        # one; only before anything was served: a 4xx says nothing happened.
        too_long = _PROMPT_TOO_LONG.search(message) is not None
        if code == "engine_error" and too_long and not charged:
            code, status = "context_length_exceeded", 400
        return ApplicationError(
            code=code,
            message=message,
            status=status,
            extra={"job_id": job.public_id},
            took_effect=charged,
            headers=_GenerationApi.cost_headers(job, final),
        )

    @staticmethod
    def cancelled_unanswered(final: dict) -> bool:
        """Whether the job's last event is that of a job cancelled before it generated
        anything: by POST /api/v1/jobs/{id}/cancel while it waited (the gateway's own
        cancels answer with their own errors)."""
        return final.get("status") == JobStatus.CANCELED and not final.get("output_tokens")

    @staticmethod
    def cancelled(job: Job, final: dict) -> ApplicationError:
        """The answer of a request whose job was cancelled before it generated anything: a
        409 that says so, not an empty completion a client could take for the model's
        answer. Charged (a prompt the engine took), it keeps its Idempotency-Key."""
        charged = final["credits_charged"]
        cost = (
            f"it was charged {amount_display(charged)} credits for the prompt the engine took"
            if charged
            else "nothing was charged"
        )
        return ApplicationError(
            code="job_cancelled",
            message=(
                f"The job was cancelled (POST /api/v1/jobs/{job.public_id}/cancel) before it "
                f"generated anything; {cost}."
            ),
            status=409,
            extra={"job_id": job.public_id},
            took_effect=charged > 0,
            headers=_GenerationApi.cost_headers(job, final),
        )

    @staticmethod
    def cost_headers(job: Job, final: dict | None) -> dict[str, str]:
        """What an answer says of its job in its headers, an error's too: the job, and, once
        it settled (`final`, its last event), what it was charged and what is left."""
        headers = {"X-Gym-Job-Id": job.public_id}
        if final is not None:
            headers["X-Gym-Credits-Charged"] = amount_display(final["credits_charged"])
            headers["X-Gym-Credits-Remaining"] = amount_display(final["credits_remaining"])
        return headers

    @staticmethod
    def usage(final: dict) -> dict:
        return {
            "prompt_tokens": final["input_tokens"],
            "completion_tokens": final["output_tokens"],
            "total_tokens": final["input_tokens"] + final["output_tokens"],
            "prompt_tokens_details": {"cached_tokens": final["cached_input_tokens"]},
        }

    @staticmethod
    def finish_reason(final: dict) -> str:
        """The choice's finish_reason, one of OpenAI's: strict clients (Go's, Rust's SDKs)
        fail to parse any other. "stop" and "length" as the engine said; an answer cut
        short otherwise (its job cancelled by POST /api/v1/jobs/{id}/cancel, or failed
        after its first tokens) is "length", incomplete as one cut at max_tokens is, never
        "stop", which would pass it for whole. Our own reason is `gym.finish_reason`."""
        reason = final.get("finish_reason") if final["type"] == "done" else None
        return reason if reason in ("stop", "length") else "length"

    @staticmethod
    def gym(job: Job, final: dict) -> dict:
        gym = {
            "job_id": job.public_id,
            "credits_charged": final["credits_charged"],
            "credits_remaining": final["credits_remaining"],
            "unit": "micro_credit",
            "prompt_tokens_source": final.get("input_tokens_source", ""),
            # The job's own: "cancelled" and "error" too (as GET /api/v1/jobs/{id} says),
            # where the choice carries the nearest of OpenAI's (finish_reason above).
            "finish_reason": "error" if final["type"] == "error" else final["finish_reason"],
        }
        if final["type"] == "error":
            # A stream that failed after its first tokens: why (job_deadline_exceeded,
            # engine_error...), also sent as the stream's error event (sse_end).
            gym["error"] = {
                "code": final.get("error_code", ""),
                "message": final.get("error_message", ""),
            }
        return gym

    def sse(self, job: Job, events: Iterator, *, include_usage: bool) -> Iterator[bytes]:
        finished = False
        relayed = 0  # characters of text sent so far
        try:
            yield _sse_line(self.chunk(job, delta_text="", finish_reason=None))
            final = None
            try:
                for event in events:
                    if event is HEARTBEAT:
                        # An SSE comment, which clients ignore: writing it is how a
                        # client that went away is noticed before the first token.
                        yield b": keep-alive\n\n"
                    elif event["type"] == "delta":
                        relayed += len(event["text"])
                        yield _sse_line(
                            self.chunk(job, delta_text=event["text"], finish_reason=None)
                        )
                    else:
                        final = event
                        break
            except TimeoutError:
                # No event for a whole wait: the job is cancelled and its end read
                # once more. One that finished as the wait ended is answered as it
                # was billed (the text not relayed yet first); else the error says
                # what it was charged, or names it, as a 504 does.
                finished = True
                final, cancelled = self.final_after_cancel(job)
                if final is None or final["status"] != JobStatus.SUCCEEDED:
                    yield _sse_line(self.timed_out(job, final, cancelled).as_dict())
                    yield _sse_line("[DONE]")
                    return
                # A final event from the job's row has no text: a stream's was relayed.
                rest = (final["text"] or "")[relayed:]
                if rest:
                    yield _sse_line(self.chunk(job, delta_text=rest, finish_reason=None))
            if final is None:
                return  # the events ended without an end: cancelled below
            finished = True
            for payload in self.sse_end(job, final, include_usage=include_usage):
                yield _sse_line(payload)
        finally:
            if not finished:
                # The client went away (the server closed this generator when a
                # write failed).
                _cancel_abandoned(job)

    def sse_end(self, job: Job, final: dict, *, include_usage: bool) -> Iterator[dict | str]:
        """The stream's last events for the job's final event.

        A job that failed, or was cancelled, before generating anything ends its
        stream with the error event its unstreamed answer's 4xx/5xx would carry. One
        that failed after its first tokens ends its choice (finish_reason "length"),
        its usage chunk if asked for, then an error event in OpenAI's error shape, as
        OpenAI's streams report a failure (its SDKs raise it): after the usage, so a
        client reading until the error has what it was charged (an error before any
        token comes first, as it always did)."""
        if final["type"] == "error" and not final["output_tokens"]:
            yield self.engine_error(job, final).as_dict()
        elif self.cancelled_unanswered(final):
            yield self.cancelled(job, final).as_dict()
        else:
            last = self.chunk(job, delta_text=None, finish_reason=self.finish_reason(final))
            if not include_usage:
                # What the answer cost, which a streamed answer cannot
                # carry in its headers (sent before it settled).
                last["gym"] = self.gym(job, final)
            yield last
        if include_usage:
            final_chunk = self.chunk(job, delta_text=None, finish_reason=None)
            final_chunk["choices"] = []
            final_chunk["usage"] = self.usage(final)
            final_chunk["gym"] = self.gym(job, final)
            yield final_chunk
        if final["type"] == "error" and final["output_tokens"]:
            yield self.engine_error(job, final).as_dict()
        yield "[DONE]"


def _sse_line(payload: dict | str) -> bytes:
    text = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {text}\n\n".encode()


def _openai_schema(input_serializer, *, answer: str, summary: str):
    return extend_schema(
        request=input_serializer,
        responses={200: OpenApiResponse(OpenApiTypes.OBJECT, description=answer)},
        summary=summary,
    )


class ChatCompletionsApi(_GenerationApi):
    """OpenAI's chat completions: the messages are rendered with the model's chat template."""

    kind = "chat"

    class Input(_GenerationInput):
        class Meta:
            ref_name = "ChatCompletionInput"

        neutral_kind = "chat"
        messages = _Message(many=True, allow_empty=False, max_length=512)

    def prompt(self, data, model):
        return render_chat(model, data["messages"])

    def body(self, job, final):
        return {
            "id": f"chatcmpl-{job.public_id}",
            "object": "chat.completion",
            "created": int(job.queued_at.timestamp()),
            "model": job.model.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": final["text"]},
                    "finish_reason": self.finish_reason(final),
                    "logprobs": None,
                }
            ],
            "usage": self.usage(final),
            "gym": self.gym(job, final),
        }

    def chunk(self, job, *, delta_text, finish_reason):
        delta = {} if delta_text is None else {"content": delta_text}
        if delta_text == "":
            delta["role"] = "assistant"
        return {
            "id": f"chatcmpl-{job.public_id}",
            "object": "chat.completion.chunk",
            "created": int(job.queued_at.timestamp()),
            "model": job.model.name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }


class CompletionsApi(_GenerationApi):
    """OpenAI's (legacy) text completions: the prompt is sent as it is."""

    kind = "completion"

    class Input(_GenerationInput):
        class Meta:
            ref_name = "CompletionInput"

        neutral_kind = "completion"
        prompt = _Prompt()

    def prompt(self, data, model):
        return data["prompt"]

    def body(self, job, final):
        return {
            "id": f"cmpl-{job.public_id}",
            "object": "text_completion",
            "created": int(job.queued_at.timestamp()),
            "model": job.model.name,
            "choices": [
                {
                    "index": 0,
                    "text": final["text"],
                    "finish_reason": self.finish_reason(final),
                    "logprobs": None,
                }
            ],
            "usage": self.usage(final),
            "gym": self.gym(job, final),
        }

    def chunk(self, job, *, delta_text, finish_reason):
        return {
            "id": f"cmpl-{job.public_id}",
            "object": "text_completion",
            "created": int(job.queued_at.timestamp()),
            "model": job.model.name,
            "choices": [
                {
                    "index": 0,
                    "text": delta_text or "",
                    "finish_reason": finish_reason,
                    "logprobs": None,
                }
            ],
        }


# --- asynchronous jobs and quotes (/api/v1/) -------------------------------------------


class JobProgress(serializers.Serializer):
    output_chars = serializers.IntegerField(
        help_text="characters of text generated so far (the tokens billed are counted when "
        "the job ends)"
    )
    first_token_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField(help_text="when the worker last told it (every second)")


class JobOutput(serializers.Serializer):
    """A job; `progress` from the context's `progress` (jobs_progress), else null."""

    class Meta:
        ref_name = "Job"

    id = serializers.CharField(source="public_id")
    model = serializers.CharField(source="model.name")
    priority = serializers.CharField()
    status = serializers.CharField()
    output = serializers.CharField(help_text="the generated text, once succeeded")
    finish_reason = serializers.CharField()
    input_tokens = serializers.IntegerField()
    cached_input_tokens = serializers.IntegerField()
    output_tokens = serializers.IntegerField()
    input_tokens_source = serializers.CharField(
        help_text="where the billed input_tokens came from: engine (its own count), tokenizer "
        "(the engine took the prompt but sent no count: counted with the model's tokenizer), "
        "unmetered (same, no tokenizer: not billed), none (the prompt never reached the "
        "engine, or the engine failed first: not billed); blank until the job ends"
    )
    credits_held = serializers.IntegerField(source="hold_amount")
    credits_charged = serializers.IntegerField()
    # Named `member_id`, not `user`: the request's `user` is OpenAI's end-user string.
    # An id, not the address: a key reads people's addresses only with the admin scope
    # (GET /api/v1/orgs/{id}/members, whose user_id this is), and an inference key reads jobs.
    member_id = serializers.IntegerField(
        source="user_id",
        allow_null=True,
        help_text="the member who sent it signed in to the dashboard (its playground), by the "
        "user_id GET /api/v1/orgs/{id}/members gives them; null when an API key sent it",
    )
    error_code = serializers.CharField(
        help_text="why a failed or expired job ended, blank otherwise: "
        + ", ".join(f"{code} ({meaning})" for code, meaning in JOB_ERROR_CODES.items())
    )
    error_message = serializers.CharField()
    queued_at = serializers.DateTimeField()
    started_at = serializers.DateTimeField(allow_null=True)
    first_token_at = serializers.DateTimeField(allow_null=True)
    finished_at = serializers.DateTimeField(allow_null=True)
    progress = serializers.SerializerMethodField(
        help_text="while the job runs and has generated text: how much, told every second; "
        "null otherwise"
    )

    @extend_schema_field(JobProgress(allow_null=True))
    def get_progress(self, job: Job) -> dict | None:
        if job.status != JobStatus.RUNNING:
            return None  # a stale report of a job that has ended since it was read
        return self.context.get("progress", {}).get(job.public_id)


def jobs_progress(jobs) -> dict[str, dict]:
    """The running jobs' last progress reports, for JobOutput's context: one Redis read.
    Advisory: with Redis failing, the jobs are shown without it."""
    running = [job.public_id for job in jobs if job.status == JobStatus.RUNNING]
    try:
        return relay_progress(running)
    except RedisError:
        logger.warning("jobs' progress could not be read", exc_info=True)
        return {}


class JobListCreateApi(_GenerationApi):
    """Queue a job and answer at once; poll GET /api/v1/jobs/{id} for the result."""

    kind = "async"
    # Its 202 names the job right after the hold commits: that commit waits
    # for the disk. And, as the rest of /api/v1/, it negotiates Accept.
    answers_after_settlement = False
    content_negotiation_class = ApiContentNegotiation

    class Input(_GenerationInput):
        class Meta:
            ref_name = "JobInput"

        neutral_kind = _GenerationInput.BY_TEXT_FIELD
        messages = _Message(many=True, allow_empty=False, max_length=512, required=False)
        prompt = _Prompt(required=False)
        callback_url = serializers.CharField(
            required=False,
            allow_blank=True,
            trim_whitespace=False,
            help_text="https URL of a public host, at most 2048 characters: it receives a "
            "webhook signed with your webhook secret (GET /api/v1/webhooks/secret) when the job ends.",
        )

        def validate_callback_url(self, value):
            return callback_url_validate(value) if value else ""

        def validate(self, attrs):
            attrs = super().validate(attrs)
            if ("messages" in attrs) == ("prompt" in attrs):
                raise serializers.ValidationError(
                    {"messages": "Give either messages (chat) or prompt (completion)."}
                )
            if attrs.get("stream"):
                raise serializers.ValidationError(
                    {"stream": "Asynchronous jobs do not stream; use /v1/chat/completions."}
                )
            return attrs

    def prompt(self, data, model):
        return render_chat(model, data["messages"]) if "messages" in data else data["prompt"]

    class Query(PageQuery):
        class Meta:
            ref_name = "JobListQuery"

        status = serializers.ChoiceField(choices=JobStatus.values, required=False)
        model = serializers.CharField(max_length=128, required=False)  # CatalogModel.name's

    @extend_schema(
        parameters=[
            OpenApiParameter("status", str, enum=JobStatus.values, description="only jobs in it"),
            OpenApiParameter("model", str, description="only this model's (its public name)"),
        ],
        responses=JobOutput(many=True),
        summary="List jobs, newest first",
    )
    def get(self, request):
        query = self.Query(data=query_data(request))
        query.is_valid(raise_exception=True)
        paginator = self.pagination_class()
        data = query.validated_data
        jobs = organization_jobs(
            organization=request.organization, status=data.get("status"), model=data.get("model")
        )
        page = paginator.paginate_queryset(jobs, request, view=self)
        output = JobOutput(page, many=True, context={"progress": jobs_progress(page)})
        return paginator.get_paginated_response(output.data)

    @extend_schema(request=Input, responses={202: JobOutput}, summary="Queue an inference job")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        job = self.submit(request, data.validated_data)
        return Response(JobOutput(job).data, status=202)


class JobDetailApi(OrgApiView):
    required_scope = Scope.INFERENCE

    @extend_schema(responses=JobOutput, summary="A job's status, usage and result")
    def get(self, request, job_id: str):
        job = _organization_job(request, job_id)
        return Response(JobOutput(job, context={"progress": jobs_progress([job])}).data)


class JobCancelApi(OrgApiView):
    required_scope = Scope.INFERENCE

    @extend_schema(request=None, responses=JobOutput, summary="Cancel a job")
    def post(self, request, job_id: str):
        require_no_input(request)
        job = job_cancel(job=_organization_job(request, job_id))
        if job.status in NON_TERMINAL and not job.stop_requested:
            # Redis failed: its worker was not told, and the job runs on.
            raise ApplicationError(
                code="cancel_unavailable",
                message="The job's worker could not be asked to stop; it runs on and is charged "
                "for what it serves. Try again shortly.",
                status=503,
                extra={"job_id": job.public_id},
            )
        return Response(JobOutput(job).data)


def _organization_job(request, job_id: str) -> Job:
    """The request's organization's job of that public id, else 404 (another's too)."""
    if "\x00" in job_id:  # no stored id has one, and PostgreSQL refuses to compare it
        raise Http404
    return get_object_or_404(organization_jobs(organization=request.organization), public_id=job_id)


class QuoteApi(OrgApiView):
    """What a request would cost: at most (what is held), and at an expected length."""

    required_scope = Scope.INFERENCE

    class Input(_GenerationInput):
        class Meta:
            ref_name = "QuoteInput"

        neutral_kind = _GenerationInput.BY_TEXT_FIELD
        messages = _Message(many=True, allow_empty=False, max_length=512, required=False)
        prompt = _Prompt(required=False)
        expected_output_tokens = serializers.IntegerField(min_value=0, required=False)

        def validate(self, attrs):
            attrs = super().validate(attrs)
            if ("messages" in attrs) == ("prompt" in attrs):
                raise serializers.ValidationError(
                    {"messages": "Give either messages (chat) or prompt (completion)."}
                )
            return attrs

    class Output(serializers.Serializer):
        class Meta:
            ref_name = "Quote"

        model = serializers.CharField()
        priority = serializers.CharField()
        unit = serializers.CharField()
        max_credits = serializers.IntegerField(
            help_text="the worst case, which is what a request holds"
        )
        expected_credits = serializers.IntegerField(
            help_text="at about 4 prompt bytes per token and expected_output_tokens (default max_tokens)"
        )
        prompt_tokens_max = serializers.IntegerField()
        max_tokens = serializers.IntegerField()

    @extend_schema(request=Input, responses=Output, summary="Price a request before sending it")
    def post(self, request):
        data = self.Input(data=request.data)
        data.is_valid(raise_exception=True)
        v = data.validated_data
        # Rendered with the model job_quote resolves (after the checks it shares with submit).
        prompt = (
            (lambda model: render_chat(model, v["messages"])) if "messages" in v else v["prompt"]
        )
        quote = job_quote(
            organization=request.organization,
            model_name=v["model"],
            prompt=prompt,
            max_tokens=v.get("max_completion_tokens") or v.get("max_tokens"),
            max_tokens_param=_max_tokens_param(v),
            priority=v["priority"],
            expected_output_tokens=v.get("expected_output_tokens"),
            prompt_field="messages" if "messages" in v else "prompt",
        )
        return Response(self.Output(quote).data)


# Applied here rather than as class decorators: each schema names the view's
# nested Input, which does not exist before the class body has run.
extend_schema_view(
    post=_openai_schema(
        ChatCompletionsApi.Input,
        answer="A chat.completion, or with stream=true a text/event-stream of "
        "chat.completion.chunk objects ending in [DONE].",
        summary="Chat completion (OpenAI-compatible)",
    )
)(ChatCompletionsApi)
extend_schema_view(
    post=_openai_schema(
        CompletionsApi.Input,
        answer="A text_completion, or with stream=true a text/event-stream of "
        "text_completion chunks ending in [DONE].",
        summary="Text completion (OpenAI-compatible)",
    )
)(CompletionsApi)
