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
from inference.models import Job
from metering.selectors import organization_balance
from tests.accounts.conftest import key_client
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
