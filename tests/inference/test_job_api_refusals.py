"""Inputs that reached the database before a review found them: each is a 4xx now, and nothing
is held, written or kept under an Idempotency-Key.

One database transaction per test, never committed: no job's task is sent.
"""

from __future__ import annotations

import base64
import json

import pytest

from accounts.models import Scope
from accounts.services import apikey_create
from inference.models import CatalogModel, Job
from metering.selectors import organization_balance
from tests.accounts.conftest import key_client
from tests.factories import OrganizationFactory
from tests.helpers import credits, served_model

pytestmark = pytest.mark.django_db

MODEL = "gym-refusals"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Plan my week."}]}


@pytest.fixture
def api(org, grant):
    """A client with an inference key of `org`, which has credits and a model."""
    served_model(MODEL)
    grant(org, credits(10))
    _key, raw = apikey_create(organization=org, name="refusals", scopes=[Scope.INFERENCE])
    return key_client(raw)


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.content
    return response.json()["error"]


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {**CHAT, "stop": "\x00"}),
        ("/v1/chat/completions", {**CHAT, "stop": ["end", "\ud800"], "stream": True}),
        ("/v1/completions", {"model": MODEL, "prompt": "Plan", "stop": ["\x00"]}),
        ("/api/v1/jobs", {"model": MODEL, "prompt": "Plan", "stop": "a\x00b"}),
    ],
    ids=["chat NUL", "streamed chat surrogate", "completion NUL", "job NUL"],
)
def test_a_stop_string_postgresql_cannot_store_is_refused_before_anything_is_held(
    api, org, path, body
):
    # given
    before = organization_balance(organization=org)

    # when
    # (sent as JSON text: "\ud800" travels escaped, as a client's JSON encoder sends it)
    error = _error(api.post(path, json.dumps(body), content_type="application/json"), 400)

    # then
    assert (error["code"], error["param"]) == ("invalid_request", "stop")
    assert "NUL character or a lone surrogate" in error["message"]
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


def test_a_cursor_whose_position_is_not_a_row_is_refused(api):
    for position in ("abc", "%00", "1.5"):
        cursor = base64.b64encode(f"p={position}".encode()).decode()
        error = _error(api.get("/api/v1/jobs", {"cursor": cursor}), 400)
        assert (error["code"], error["param"]) == ("invalid_cursor", "cursor")
    # and one DRF made is still followed
    first = api.get("/api/v1/jobs", {"limit": 1})
    assert first.status_code == 200 and first.json()["results"] == []


def test_a_job_id_with_a_nul_is_not_found(api):
    assert _error(api.get("/api/v1/jobs/job_a%00b"), 404)["code"] == "not_found"
    assert _error(api.post("/api/v1/jobs/job_a%00b/cancel"), 404)["code"] == "not_found"


def test_a_refused_callback_url_leaves_the_idempotency_key_for_the_corrected_retry(api, org):
    # given a job refused for its callback URL, under an Idempotency-Key
    body = {"model": MODEL, "prompt": "Plan", "max_tokens": 4}
    refused = api.post(
        "/api/v1/jobs",
        {**body, "callback_url": "ftp://example.com/hook"},
        format="json",
        HTTP_IDEMPOTENCY_KEY="job-1",
    )
    assert _error(refused, 400)["code"] == "invalid_callback_url"
    assert not org.idempotency_records.exists()

    # when the corrected request is sent with the same key
    retried = api.post("/api/v1/jobs", body, format="json", HTTP_IDEMPOTENCY_KEY="job-1")

    # then it runs: one job, under that key
    assert retried.status_code == 202, retried.content
    assert Job.objects.filter(organization=org).count() == 1


@pytest.mark.parametrize("stream", ["yes", 1, "true"])
def test_stream_is_true_or_false_only(api, stream):
    error = _error(api.post("/v1/chat/completions", {**CHAT, "stream": stream}, format="json"), 400)
    assert (error["code"], error["param"]) == ("invalid_request", "stream")


def test_stream_options_come_only_with_stream(api):
    error = _error(
        api.post(
            "/v1/chat/completions",
            {**CHAT, "stream_options": {"include_usage": True}},
            format="json",
        ),
        400,
    )
    assert (error["code"], error["param"]) == ("invalid_request", "stream_options")


def _nested(depth: int) -> str:
    """A JSON array `depth` levels deep."""
    return "[" * depth + '"x"' + "]" * depth


@pytest.mark.parametrize("depth", [30, 900, 980, 5000])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/jobs", "/api/v1/credits/quote"])
def test_json_nested_too_deep_is_bad_json_and_holds_nothing(api, org, path, depth):
    # given a body whose one message's role nests `depth` levels below the
    # body's own 3 (object, messages, message): 33 levels and more. From
    # about 980 on, DRF's validation overflowed Python's stack (a 500), and
    # from about 1000 the parser did
    before = organization_balance(organization=org)
    role = _nested(depth)
    body = f'{{"model": "{MODEL}", "messages": [{{"role": {role}, "content": "hi"}}]}}'

    # when
    error = _error(api.post(path, body, content_type="application/json"), 400)

    # then
    assert error["code"] == "invalid_json"
    assert "nested more than 32 levels" in error["message"]
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


@pytest.mark.parametrize(
    "body",
    [
        # the same field twice at the top: json keeps the last silently (1 token asked,
        # 4,000 served), as a repeated query parameter did
        f'{{"model": "{MODEL}", "max_tokens": 1, "messages": [{{"role": "user", '
        f'"content": "hi"}}], "max_tokens": 4000}}',
        # and inside a message
        f'{{"model": "{MODEL}", "messages": [{{"role": "user", "role": "system", '
        f'"content": "hi"}}]}}',
    ],
    ids=["top", "message"],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/jobs", "/api/v1/credits/quote"])
def test_a_key_given_twice_is_bad_json_and_holds_nothing(api, org, path, body):
    before = organization_balance(organization=org)

    # when
    error = _error(api.post(path, body, content_type="application/json"), 400)

    # then: refused as bad JSON naming the key, nothing held or queued
    assert error["code"] == "invalid_json"
    assert "given more than once" in error["message"]
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


def test_json_nested_as_deep_as_allowed_is_read(api):
    # 32 levels (the body's 3 and the role's 29) are read: the role is then
    # refused as a role, not the body as JSON
    role = _nested(29)
    body = f'{{"model": "{MODEL}", "messages": [{{"role": {role}, "content": "hi"}}]}}'
    error = _error(api.post("/v1/chat/completions", body, content_type="application/json"), 400)
    assert error["code"] == "invalid_request"
    assert error["param"].startswith("messages")


@pytest.mark.parametrize("limit", ["abc", "-5", "0", "1e3", "201", "\N{FULLWIDTH DIGIT ONE}"])
def test_a_page_size_outside_1_to_200_is_refused(api, limit):
    error = _error(api.get("/api/v1/jobs", {"limit": limit}), 400)
    assert (error["code"], error["param"]) == ("invalid_request", "limit")
    assert "from 1 to 200" in error["message"]
    # while the bounds are pages
    for fine in ("1", "200", ""):
        assert api.get("/api/v1/jobs", {"limit": fine}).status_code == 200


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/jobs"])
def test_a_sampling_value_is_a_number_not_a_boolean(api, org, path, field):
    before = organization_balance(organization=org)
    error = _error(api.post(path, {**CHAT, field: True}, format="json"), 400)
    assert (error["code"], error["param"]) == ("invalid_request", field)
    assert organization_balance(organization=org) == before


def test_stream_options_take_openais_include_obfuscation(api, org):
    # OpenAI's chat stream_options has include_obfuscation too: taken, ignored
    body = {
        **CHAT,
        "stream": True,
        "stream_options": {"include_usage": True, "include_obfuscation": False},
    }
    quoted = api.post("/api/v1/credits/quote", body, format="json")
    assert quoted.status_code == 200, quoted.content
    error = _error(
        api.post(
            "/v1/chat/completions",
            {**body, "stream_options": {"include_obfuscation": "no"}},
            format="json",
        ),
        400,
    )
    assert error["param"].startswith("stream_options")


def test_stream_options_are_only_the_known_ones(api):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True, "bogus": 1}}
    error = _error(api.post("/v1/chat/completions", body, format="json"), 400)
    assert error["code"] == "invalid_request"
    assert error["param"].startswith("stream_options")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/jobs", "/api/v1/credits/quote"])
def test_two_different_output_limits_are_refused(api, org, path):
    # given max_tokens and its newer name, max_completion_tokens, that differ
    before = organization_balance(organization=org)
    body = {**CHAT, "max_tokens": 5, "max_completion_tokens": 9}

    # then the request is refused, naming the second
    error = _error(api.post(path, body, format="json"), 400)
    assert (error["code"], error["param"]) == ("invalid_request", "max_completion_tokens")
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()
    # while the same limit under both names is one limit
    quoted = api.post(
        "/api/v1/credits/quote",
        {**CHAT, "max_tokens": 5, "max_completion_tokens": 5},
        format="json",
    )
    assert quoted.status_code == 200, quoted.content


def test_a_format_query_parameter_is_not_a_renderer_choice(api, org):
    # given a job
    job_id = api.post("/api/v1/jobs", {**CHAT, "max_tokens": 4}, format="json").json()["id"]

    # when it is read with ?format=xml (DRF's format override answered 404
    # "Not found." for a format it had no renderer for: the job looked missing)
    read = api.get(f"/api/v1/jobs/{job_id}", {"format": "xml"})

    # then it is the job, in JSON
    assert read.status_code == 200, read.content
    assert read.json()["id"] == job_id
    # and the list, which knows its query parameters, refuses an unknown one
    error = _error(api.get("/api/v1/jobs", {"format": "xml"}), 400)
    assert (error["code"], error["param"]) == ("invalid_request", "format")


@pytest.mark.parametrize(
    ("body", "param"),
    [({"reason": "too slow"}, "reason"), (["now"], None)],
    ids=["unknown field", "not an object"],
)
def test_a_cancel_takes_no_body_and_a_refused_one_cancels_nothing(api, org, body, param):
    # given a queued job (its body was ignored: a client that sent a field the cancel does
    # not take, believing it used, got its job cancelled all the same)
    job_id = api.post("/api/v1/jobs", {**CHAT, "max_tokens": 4}, format="json").json()["id"]
    held = organization_balance(organization=org).held

    # when
    response = api.post(f"/api/v1/jobs/{job_id}/cancel", body, format="json")

    # then
    error = _error(response, 400)
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert Job.objects.get(public_id=job_id).status == "queued"
    assert organization_balance(organization=org).held == held > 0
    # while an empty body, or none, is a cancel
    assert api.post(f"/api/v1/jobs/{job_id}/cancel", {}, format="json").status_code == 200


def test_a_401_for_a_bad_key_names_the_scheme(org):
    from django.test import Client

    response = Client().get("/v1/models", HTTP_AUTHORIZATION="Bearer gym_not_a_key")
    assert _error(response, 401)["code"] in ("authentication_failed", "invalid_api_key")
    assert response["WWW-Authenticate"] == "Bearer"
    response = Client().get("/v1/models", HTTP_AUTHORIZATION="Basic abc")
    assert _error(response, 401)["code"] == "authentication_failed"
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/jobs", "/api/v1/credits/quote"])
def test_an_output_limit_over_the_models_names_the_field_it_came_in(api, org, path, field):
    # given a model that writes at most its catalog's max_output_tokens
    before = organization_balance(organization=org)
    over = CatalogModel.objects.get(name=MODEL).max_output_tokens + 1

    # when a request asks for more, under either name
    error = _error(api.post(path, {**CHAT, field: over}, format="json"), 400)

    # then the error names the field the client sent, and nothing is held
    assert (error["code"], error["param"]) == ("invalid_request", field)
    assert error["message"].startswith(f"{field} may be at most")
    assert organization_balance(organization=org) == before


def test_listing_jobs_counts_against_the_request_limit(api, org, fresh_window):
    # given an organization allowed two requests a minute
    org.requests_per_minute = 2
    org.save()

    # when it lists its jobs three times
    answers = [api.get("/api/v1/jobs") for _ in range(3)]

    # then the third is refused, as any other endpoint's would be
    assert [answer.status_code for answer in answers] == [200, 200, 429]
    assert answers[2].json()["error"]["code"] == "rate_limited"
    assert answers[1]["x-ratelimit-remaining-requests"] == "0"


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ({"role": "user", "content": "Who am I?", "name": "alice"}, "messages.1.name"),
        ({"role": "tool", "content": "42", "tool_call_id": "c1"}, "messages.1.tool_call_id"),
        ({"role": "assistant", "content": "", "tool_calls": []}, "messages.1.tool_calls"),
        ({"role": "tool", "content": "42"}, "messages.1.role"),
        ({"role": "user", "content": []}, "messages.1.content"),
        ({"role": "user", "content": [{"text": "hi"}]}, "messages.1.content.0.type"),
        (
            {"role": "user", "content": [{"type": "text", "text": "hi", "name": "a"}]},
            "messages.1.content.0.name",
        ),
    ],
    ids=[
        "name",
        "tool_call_id",
        "tool_calls",
        "tool role",
        "no parts",
        "untyped part",
        "part field",
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/v1/jobs"])
def test_a_message_the_model_would_read_otherwise_is_refused_naming_it(
    api, org, path, message, param
):
    # given a valid first message and, second, one with a field OpenAI's model
    # reads (dropped, the answer would be to another prompt) or a value not taken
    before = organization_balance(organization=org)
    body = {"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, message]}

    # when
    response = api.post(path, json.dumps(body), content_type="application/json")

    # then it is refused, naming the message and its field, and nothing is held or queued
    error = _error(response, 400)
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert error["message"] != "{}"
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "wizard", "content": "Plan my week."}], "messages.0.role"),
        (
            [{"role": "user", "content": "Plan my week."}, {"role": "wizard", "content": "Hi"}],
            "messages.1.role",
        ),
    ],
    ids=["first", "second"],
)
def test_a_bad_message_is_named_by_its_index_the_first_too(api, org, messages, param):
    # given
    before = organization_balance(organization=org)

    # when
    body = {"model": MODEL, "messages": messages}
    response = api.post("/v1/chat/completions", body, content_type="application/json")

    # then the path keeps index 0, which is falsy
    error = _error(response, 400)
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_lone_surrogate_echoed_in_an_error_is_escaped_not_a_500(api, org, path, stream):
    # given a body whose error repeats what was sent: a role that is no choice (chat), a
    # field that is not known (completions), each a lone surrogate, which the JSON
    # renderer could not encode (a 500 on every endpoint)
    before = organization_balance(organization=org)
    if path == "/v1/chat/completions":
        body = {"model": MODEL, "messages": [{"role": "\ud800", "content": "hi"}]}
        param = "messages.0.role"
    else:
        body = {"model": MODEL, "prompt": "hi", "\ud800": 1}
        param = "\\ud800"

    # when (sent as JSON text: "\ud800" travels escaped, as a client's JSON encoder sends it)
    response = api.post(
        path,
        json.dumps({**body, "stream": stream}),
        content_type="application/json",
        HTTP_IDEMPOTENCY_KEY=f"surrogate-{stream}",
    )

    # then a 400 naming the field, the surrogate written as its escape
    error = _error(response, 400)
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert "\\ud800" in error["message"]
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()
    assert not org.idempotency_records.exists()


IMAGE = {"type": "image_url", "image_url": {"url": "https://example.com/squat.png"}}
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
AUDIO = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}


@pytest.mark.parametrize(
    ("path", "body", "param", "named"),
    [
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}
                ],
            },
            "messages.0.content.1.type",
            "'image_url' content part",
        ),
        (
            "/api/v1/jobs",
            {"model": MODEL, "messages": [{"role": "user", "content": [AUDIO]}]},
            "messages.0.content.0.type",
            "'input_audio' content part",
        ),
        ("/v1/chat/completions", {**CHAT, "logprobs": True}, "logprobs", "logprobs=true"),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 3}, "top_logprobs", "top_logprobs=3"),
        (
            "/v1/chat/completions",
            {**CHAT, "response_format": {"type": "json_object"}},
            "response_format",
            'response_format={"type": "json_object"}',
        ),
        ("/v1/chat/completions", {**CHAT, "n": 2}, "n", "n=2"),
        ("/v1/completions", {"model": MODEL, "prompt": "Plan", "echo": True}, "echo", "echo=true"),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "Plan", "best_of": 3},
            "best_of",
            "best_of=3",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "Plan", "logprobs": 2},
            "logprobs",
            "logprobs=2",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": ["Plan a week", "Plan a day"]},
            "prompt",
            "several prompts",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": [464, 3290]}, "prompt", "token ids"),
        *[
            ("/v1/chat/completions", {**CHAT, name: value}, name, named)
            for name, value, named in [
                ("tools", [LOOKUP], "tools=[{"),
                ("tool_choice", "required", 'tool_choice="required"'),
                ("tool_choice", LOOKUP, "tool_choice={"),
                ("functions", [LOOKUP["function"]], "function calling is not served"),
                ("function_call", {"name": "lookup"}, 'function_call={"name": "lookup"}'),
                ("logit_bias", {"50256": -100}, 'logit_bias={"50256": -100}'),
                ("store", True, "store=true"),
                ("service_tier", "flex", 'service_tier="flex"'),
                ("service_tier", "priority", "this API's own `priority` field"),
                ("service_tier", "scale", 'service_tier="scale"'),
                ("modalities", ["text", "audio"], 'modalities=["text", "audio"]'),
                ("prediction", {"type": "content", "content": "Plan"}, "predicted outputs"),
                ("audio", {"voice": "alloy", "format": "wav"}, "text only"),
                ("reasoning_effort", "low", 'reasoning_effort="low"'),
                ("web_search_options", {}, "web_search_options={}"),
            ]
        ],
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "Plan", "logit_bias": {"50256": -100}},
            "logit_bias",
            "token biases",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "def plan(", "suffix": "    return week"},
            "suffix",
            'suffix="    return week"',
        ),
        ("/api/v1/jobs", {**CHAT, "tools": [LOOKUP]}, "tools", "tools=[{"),
        ("/api/v1/credits/quote", {**CHAT, "store": True}, "store", "store=true"),
        (
            "/api/v1/credits/quote",
            {"model": MODEL, "prompt": "Plan", "echo": True},
            "echo",
            "echo=true",
        ),
    ],
    ids=[
        "image part",
        "audio part (jobs)",
        "logprobs",
        "top_logprobs",
        "json mode",
        "n",
        "echo",
        "best_of",
        "completion logprobs",
        "several prompts",
        "token ids",
        "tools",
        "tool_choice required",
        "tool_choice a function",
        "functions",
        "function_call",
        "logit_bias",
        "store",
        "service_tier flex",
        "service_tier priority",
        "service_tier scale",
        "audio modality",
        "prediction",
        "audio",
        "reasoning_effort",
        "web_search_options",
        "completion logit_bias",
        "suffix",
        "tools (jobs)",
        "store (quote)",
        "echo (quote)",
    ],
)
def test_what_openai_serves_and_this_api_does_not_is_refused_as_unsupported_naming_it(
    api, org, path, body, param, named
):
    # given a body OpenAI's API would take, asking for what these models do not serve
    # (an image, log probabilities, a JSON mode, several choices or prompts, tools, a
    # service tier, stored completions, audio, a suffix...)
    before = organization_balance(organization=org)

    # when
    response = api.post(
        path, json.dumps(body), content_type="application/json", HTTP_IDEMPOTENCY_KEY="unsup"
    )

    # then a 400 unsupported_parameter naming the field (and the part's type), not a
    # silently different answer, and nothing is held, queued or kept under the key
    error = _error(response, 400)
    assert (error["code"], error["param"], error["type"]) == (
        "unsupported_parameter",
        param,
        "invalid_request_error",
    )
    assert named in error["message"]
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()
    assert not org.idempotency_records.exists()


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({**CHAT, "logprobs": "no"}, "logprobs"),
        ({**CHAT, "logprobs": 0}, "logprobs"),
        ({**CHAT, "presence_penalty": 2.5}, "presence_penalty"),
        ({**CHAT, "frequency_penalty": True}, "frequency_penalty"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "tools": {}}, "tools"),
        ({**CHAT, "tool_choice": "maybe"}, "tool_choice"),
        ({**CHAT, "logit_bias": {"50256": 500}}, "logit_bias"),
        ({**CHAT, "store": "no"}, "store"),
        ({**CHAT, "metadata": {f"tag{i}": "x" for i in range(17)}}, "metadata"),
        ({**CHAT, "metadata": {"k" * 65: "x"}}, "metadata"),
        ({**CHAT, "metadata": {"team": "x" * 513}}, "metadata"),
        ({**CHAT, "metadata": {"team": 42}}, "metadata"),
        ({**CHAT, "service_tier": "turbo"}, "service_tier"),
        ({**CHAT, "modalities": ["video"]}, "modalities"),
        ({**CHAT, "web_search_options": "on"}, "web_search_options"),
        ({"model": MODEL, "prompt": "Plan", "suffix": 5}, "suffix"),
        ({**CHAT, "tool": []}, "tool"),
        ({"model": MODEL, "prompt": "Plan", "tools": []}, "tools"),
    ],
    ids=[
        "logprobs not a boolean",
        "chat logprobs an integer",
        "penalty out of range",
        "penalty not a number",
        "n 0",
        "tools not a list",
        "tool_choice not OpenAI's",
        "logit_bias out of range",
        "store not a boolean",
        "metadata 17 keys",
        "metadata key too long",
        "metadata value too long",
        "metadata value not a string",
        "service_tier not OpenAI's",
        "modalities not OpenAI's",
        "web_search_options not an object",
        "suffix not a string",
        "unknown field",
        "tools on a text completion",
    ],
)
def test_a_malformed_or_unknown_openai_field_stays_an_invalid_request(api, org, body, param):
    # given
    before = organization_balance(organization=org)
    path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"

    # when a field is of the wrong type or out of OpenAI's own range, or one this endpoint
    # does not know (tools are a chat parameter)
    error = _error(api.post(path, body, format="json"), 400)

    # then it is the plain invalid_request naming it, as before, and nothing is held
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


@pytest.mark.parametrize("path", ["/api/v1/jobs", "/api/v1/credits/quote"])
@pytest.mark.parametrize(
    ("body", "param", "unknown"),
    [
        ({**CHAT, "echo": False}, "echo", True),
        ({**CHAT, "suffix": ""}, "suffix", True),
        ({"model": MODEL, "prompt": "Plan", "tools": []}, "tools", True),
        ({"model": MODEL, "prompt": "Plan", "store": False}, "store", True),
        ({**CHAT, "logprobs": 0}, "logprobs", False),
    ],
    ids=[
        "echo with messages",
        "suffix with messages",
        "tools with prompt",
        "store with prompt",
        "chat logprobs an integer",
    ],
)
def test_a_job_or_quote_refuses_the_other_kinds_parameters_as_its_endpoint_does(
    api, org, path, body, param, unknown
):
    # given a body of one kind (messages: chat, prompt: completion) with a parameter the
    # other kind's endpoint takes, or chat's logprobs as a completion's integer
    before = organization_balance(organization=org)

    # when
    response = api.post(path, body, format="json", HTTP_IDEMPOTENCY_KEY=f"kind-{param}")

    # then it is refused as /v1/chat/completions or /v1/completions refuses it, and nothing
    # is held, queued or kept under the key
    error = _error(response, 400)
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert (f"Unknown field {param!r}" in error["message"]) == unknown
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()
    assert not org.idempotency_records.exists()


# The parameters clients send by default, at their neutral values, of each kind.
CHAT_NEUTRAL = {
    **CHAT,
    "logprobs": False,
    "tools": [],
    "tool_choice": "auto",
    "store": False,
    "metadata": {"team": "strength"},
    "service_tier": "auto",
    "parallel_tool_calls": True,
    "response_format": {"type": "text"},
}
COMPLETION_NEUTRAL = {
    "model": MODEL,
    "prompt": "Plan",
    "logprobs": None,
    "echo": False,
    "best_of": 1,
    "suffix": "",
    "logit_bias": {},
}


@pytest.mark.parametrize("body", [CHAT_NEUTRAL, COMPLETION_NEUTRAL], ids=["chat", "completion"])
def test_a_quote_prices_the_body_its_endpoint_takes_neutral_parameters_and_all(api, org, body):
    # given the exact body a client sends to /v1/chat/completions or /v1/completions
    without = {k: v for k, v in body.items() if k in ("model", "messages", "prompt")}
    before = organization_balance(organization=org)

    # when it is quoted, and the same without the parameters not acted on
    quoted = api.post("/api/v1/credits/quote", body, format="json")
    plain = api.post("/api/v1/credits/quote", without, format="json")

    # then it is priced as if they were left out, and nothing is held
    assert quoted.status_code == 200, quoted.content
    assert quoted.json() == plain.json()
    assert organization_balance(organization=org) == before


def test_a_job_takes_its_kinds_neutral_parameters(api, org):
    # when a chat body with the parameters clients send by default is queued
    response = api.post("/api/v1/jobs", CHAT_NEUTRAL, format="json")

    # then the job is queued, as /v1/chat/completions would take it
    assert response.status_code == 202, response.content
    job = Job.objects.get(organization=org)
    assert job.public_id == response.json()["id"]


def test_a_request_without_max_tokens_refused_for_credits_says_what_its_default_held(api, org):
    # given a model whose output is dear: its default max_tokens (its whole output
    # limit, 1024) costs more than the organization's 10 credits, 16 tokens do not
    served_model("gym-dear", output_rate="100000")
    before = organization_balance(organization=org)
    body = {"model": "gym-dear", "messages": [{"role": "user", "content": "Plan my week."}]}

    # when a request leaves max_tokens out
    error = _error(api.post("/v1/chat/completions", body, format="json"), 402)

    # then the 402 says that the default was priced, and that a lower max_tokens holds less
    assert (error["code"], error["param"]) == ("insufficient_credits", "max_tokens")
    assert "left max_tokens out, so it holds credits for 1024 output tokens" in error["message"]
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


def test_a_request_without_max_tokens_fits_a_token_limit_below_the_output_limit(
    grant, fresh_window
):
    # given an organization allowed 300 tokens a minute, fewer than the model's output
    # limit (1,024), the default of a request without max_tokens
    served_model(MODEL)
    org = OrganizationFactory(tokens_per_minute=300)
    grant(org, credits(10))
    _key, raw = apikey_create(organization=org, name="tpm", scopes=[Scope.INFERENCE])
    api = key_client(raw)
    body = {"model": MODEL, "prompt": "Plan my week."}

    # when it is quoted and submitted without max_tokens (each was a 429 "no retry can
    # succeed", where the old default of 256 fitted)
    quoted = api.post("/api/v1/credits/quote", body, format="json")
    queued = api.post("/api/v1/jobs", body, format="json")

    # then both take the old default of 256, which fits what the limit leaves after the
    # prompt's 13 bytes (287: all of it would leave nothing for the next request)
    assert quoted.status_code == 200, quoted.content
    assert queued.status_code == 202, queued.content
    assert quoted.json()["max_tokens"] == 256
    assert Job.objects.get(organization=org).params["max_tokens"] == 256

    # and a prompt that fills the limit alone is refused as before, naming the prompt
    long = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 300}]}
    error = _error(api.post("/v1/chat/completions", long, format="json"), 429)
    assert (error["code"], error["param"]) == ("request_exceeds_rate_limit", "messages")
    assert "It left max_tokens out" in error["message"]
    assert Job.objects.filter(organization=org).count() == 1
