"""The OpenAI-compatible API end to end, with the official `openai` SDK as the client.

Real parts only: the app served by a live server thread on the test
database, a real Celery worker process, the real CPU Triton server, Redis.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from datetime import time as dt_time
from decimal import Decimal

import openai
import pytest
import redis
import requests
from django.db import connection
from django.test import Client
from django.utils import timezone
from django.utils.http import http_date

from accounts.models import Membership, Role, Scope, Standing
from accounts.redis import get_redis
from accounts.services import apikey_create, organization_entitlements_set
from inference import apis
from inference.engine.tokenizer import count_tokens
from inference.models import TERMINAL, CatalogModel, Job, JobStatus, ModelStatus, ServerPool
from metering.models import AccountKind, CreditLot, Hold, HoldStatus, UsageRecord
from metering.selectors import organization_balance
from metering.services import Rates, Usage, credits_for_usage, price_book_publish
from metering.services.postings import accounts_for, amount_display
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import StatementLog, credits, expire_just_after, served_model, wait_until
from tests.inference.conftest import occupy_engine_workers

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gym-tiny"


@pytest.fixture
def gym(live_server, triton_server, celery_worker_process, grant):
    """An organization with credits, a priced model on the real Triton server, and a key."""
    price_book_publish(
        prices=[
            {
                "model_name": MODEL,
                "input_rate": Decimal("0.5"),
                "cached_input_rate": Decimal("0.25"),
                "output_rate": Decimal("1.5"),
                "minimum_charge": 0,
            },
            {
                "model_name": "gym-large",
                "input_rate": Decimal("3"),
                "cached_input_rate": Decimal("1.5"),
                "output_rate": Decimal("12"),
            },
        ]
    )
    pool = ServerPool.objects.create(name="test-cpu", grpc_urls=[triton_server.grpc_url])
    CatalogModel.objects.create(name=MODEL, pool=pool, access_tier="basic")
    CatalogModel.objects.create(name="gym-large", pool=pool, access_tier="pro")
    org = OrganizationFactory(requests_per_minute=10_000, tokens_per_minute=10_000_000)
    grant(org, credits(100))
    _key, raw = apikey_create(
        organization=org, name="sdk", scopes=[Scope.INFERENCE, Scope.BILLING_READ]
    )
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key=raw, max_retries=0)
    return {"org": org, "client": client, "raw": raw, "url": live_server.url}


def expected_charge(job: Job) -> int:
    rates = Rates.of(job.model_price, job.priority)
    usage = Usage(
        input_tokens=job.input_tokens,
        output_tokens=job.output_tokens,
        cached_input_tokens=job.cached_input_tokens,
    )
    return credits_for_usage(rates=rates, usage=usage)


def test_a_chat_completion_is_answered_and_billed_token_by_token(gym):
    # given an engine whose GPU-hour costs 3,600,000 minor units, on two GPUs
    # (tensor parallel): its serving cost is then 2 minor units per engine ms
    org, client = gym["org"], gym["client"]
    model = CatalogModel.objects.get(name=MODEL)
    model.gpu_hour_cost, model.tensor_parallel = 3_600_000, 2
    model.save()  # as the admin saves it: the processes' catalog caches are told
    before = organization_balance(organization=org)

    # when
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL,
        messages=[{"role": "user", "content": "How should a member plan a training week?"}],
        max_tokens=12,
        seed=7,
    )
    reply = raw.parse()

    # then the answer has OpenAI's shape and the engine's real token counts
    job = Job.objects.get(organization=org)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content
    assert reply.usage.completion_tokens == job.output_tokens <= 12
    assert reply.usage.prompt_tokens == job.input_tokens > 0
    assert job.output_tokens == count_tokens(reply.choices[0].message.content) or (
        reply.choices[0].finish_reason == "length"
    )
    assert job.status == JobStatus.SUCCEEDED

    # and exactly the served tokens were charged, the rest of the hold released
    charge = expected_charge(job)
    after = organization_balance(organization=org)
    assert job.credits_charged == charge > 0
    assert before.available - after.available == charge
    assert after.held == 0
    hold = Hold.objects.get(key=job.public_id)
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, charge)
    record = UsageRecord.objects.get(job_id=job.public_id)
    assert (record.input_tokens, record.output_tokens, record.credits) == (
        job.input_tokens,
        job.output_tokens,
        charge,
    )
    # with the engine's busy time and what it cost to serve, on the job and its record
    assert job.engine_ms > 0
    assert job.serving_cost == record.serving_cost == 2 * job.engine_ms
    assert raw.headers["x-gym-credits-charged"] == f"{Decimal(charge) / 1_000_000:f}".rstrip(
        "0"
    ).rstrip(".")
    assert int(Decimal(raw.headers["x-gym-credits-remaining"]) * 1_000_000) == after.available


def test_a_streamed_chat_completion_relays_tokens_and_reports_usage(gym):
    # given
    org, client = gym["org"], gym["client"]

    # when
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Describe a good warm-up."}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)

    # then the deltas add up to the text and the last chunk carries the usage
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    job = Job.objects.get(organization=org)
    assert text
    deltas = [
        c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content
    ]
    assert len(deltas) >= 2, (deltas, job.output_tokens, job.stream)
    assert usage.completion_tokens == job.output_tokens
    assert usage.prompt_tokens == job.input_tokens
    assert job.credits_charged == expected_charge(job)
    assert organization_balance(organization=org).held == 0


def test_a_streamed_answer_without_usage_still_says_what_it_cost(gym):
    # given
    org, client = gym["org"], gym["client"]

    # when: streamed, usage not asked for
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a good warm-up."}],
            max_tokens=8,
            # a seed whose answer is not empty: unseeded, the gateway draws one, and
            # about 1 in 80 makes this model end at its first step (no counts, no cost)
            seed=7,
            stream=True,
        )
    )

    # then no chunk carries usage, and the one that finishes the answer
    # carries the credits charged and remaining (headers went out before)
    job = Job.objects.get(organization=org)
    assert all(chunk.usage is None for chunk in chunks)
    [last] = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert last is chunks[-1]
    cost = last.model_extra["gym"]
    assert cost["job_id"] == job.public_id
    assert cost["credits_charged"] == job.credits_charged == expected_charge(job) > 0
    assert cost["credits_remaining"] == organization_balance(organization=org).available


def test_an_answer_leaves_out_of_what_remains_the_credits_that_expired_while_it_ran(
    gym, paced_triton_server, grant
):
    # given the organization's 100 credits, which expire while its request waits for a
    # busy engine (the paced one: it waits at least a busy stream's 3 s on any machine),
    # and 5 that never expire; the consumption account open, so that the worker settles
    # in its one statement
    org = gym["org"]
    served_model("gym-paced", grpc_urls=[paced_triton_server.grpc_url], access_tier="basic")
    grant(org, credits(5), expires_at=None)
    accounts_for(org, AccountKind.CONSUMPTION)
    busy, _workers = occupy_engine_workers(paced_triton_server.grpc_url)
    with ThreadPoolExecutor(max_workers=1) as sender:
        try:
            answer = sender.submit(
                requests.post,
                f"{gym['url']}/v1/chat/completions",
                headers={"Authorization": f"Bearer {gym['raw']}"},
                json={"model": "gym-paced", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 4},
                timeout=120,
            )  # fmt: skip
            hold = wait_until(
                lambda: Hold.objects.filter(organization=org).first(), what="the job's hold"
            )
            expire_just_after(
                hold, CreditLot.objects.get(organization=org, expires_at__isnull=False)
            )
        finally:
            # when the engine is free: the job runs, and its worker settles it
            busy.stop()
        response = answer.result()

    # then the answer says the 5 a new request may take remain, as the balance does, not
    # the expired credits the job did not use, which the sweep will move
    assert response.status_code == 200, response.content
    left = organization_balance(organization=org).available
    assert left == credits(5)
    assert response.headers["X-Gym-Credits-Remaining"] == amount_display(left)
    assert Job.objects.get(organization=org).credits_charged > 0


def test_a_deprecated_model_is_served_with_its_sunset_until_its_date_then_refused(gym, monkeypatch):
    # given the model deprecated, with a successor and a date a month away
    org, client = gym["org"], gym["client"]
    model = CatalogModel.objects.get(name=MODEL)
    model.status = ModelStatus.DEPRECATED
    model.successor = CatalogModel.objects.get(name="gym-large")
    model.deprecation_date = timezone.localdate() + timedelta(days=30)
    model.save()
    message = [{"role": "user", "content": "hi"}]

    # when it is called before that date
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=message, max_tokens=2
    )
    listed = {m.id: m.model_extra["gym"] for m in client.models.list().data}

    # then it answers, saying when it stops and what follows it
    assert raw.http_response.status_code == 200
    sunset = timezone.make_aware(datetime.combine(model.deprecation_date, dt_time.min))
    assert raw.headers["sunset"] == http_date(sunset.timestamp())
    assert raw.headers["x-gym-model-successor"] == "gym-large"
    assert listed[MODEL]["status"] == "deprecated"
    assert listed[MODEL]["deprecation_date"] == model.deprecation_date.isoformat()
    assert listed[MODEL]["successor"] == "gym-large"

    # and when its date has come (the clock moved, nothing saved: the catalog
    # entry the API process cached is the one it reads), it is refused as
    # retired, pointing at its successor, no longer listed, and nothing is
    # held or queued for it
    monkeypatch.setattr(timezone, "localdate", lambda *_a, **_k: model.deprecation_date)
    before = organization_balance(organization=org)
    with pytest.raises(openai.NotFoundError) as gone:
        client.chat.completions.create(model=MODEL, messages=message, max_tokens=2)
    assert gone.value.body["code"] == "model_not_found"
    assert "'gym-large'" in gone.value.body["message"]
    assert MODEL not in [m.id for m in client.models.list().data]
    assert organization_balance(organization=org) == before
    assert Job.objects.filter(organization=org).count() == 1


def test_a_text_completion_works_too(gym):
    # when
    reply = gym["client"].completions.create(model=MODEL, prompt="Rest days matter", max_tokens=5)

    # then
    assert reply.object == "text_completion"
    assert reply.usage.completion_tokens <= 5
    assert Job.objects.get(organization=gym["org"]).kind == "completion"

    # and streamed, with the same seed, the pieces make the same text
    kwargs = {"model": MODEL, "prompt": "Rest days matter", "max_tokens": 5, "seed": 3}
    whole = gym["client"].completions.create(**kwargs)
    chunks = list(
        gym["client"].completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_text_completion_takes_its_prompt_as_a_list_of_one_and_refuses_several(gym):
    # given
    client = gym["client"]
    kwargs = {"model": MODEL, "max_tokens": 6, "seed": 4}

    # when the prompt comes as OpenAI's SDK also sends one, a list of one string
    listed = client.completions.create(prompt=["Rest days matter"], **kwargs)
    plain = client.completions.create(prompt="Rest days matter", **kwargs)

    # then it is that prompt, answered alike
    assert listed.choices[0].text == plain.choices[0].text
    assert listed.usage.prompt_tokens == plain.usage.prompt_tokens > 0

    # and several prompts (a batch) are refused naming the field, nothing queued
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(prompt=["Rest days matter", "Sleep matters"], **kwargs)
    assert (refused.value.body["code"], refused.value.body["param"]) == (
        "unsupported_parameter",
        "prompt",
    )
    assert Job.objects.filter(organization=gym["org"]).count() == 2


def test_a_message_given_as_text_parts_is_answered_as_their_joined_text(gym):
    # given a message as many SDK users send one: a list of text parts
    client = gym["client"]
    parts = [
        {"type": "text", "text": "Plan a training week."},
        {"type": "text", "text": "Keep it short."},
    ]

    # when it is sent, and the same text as a string (parts joined by a newline)
    as_parts = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": parts}], max_tokens=8, seed=11
    )
    as_text = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Plan a training week.\nKeep it short."}],
        max_tokens=8,
        seed=11,
    )

    # then both are the same prompt, answered alike
    assert as_parts.choices[0].message.content == as_text.choices[0].message.content
    assert as_parts.usage.prompt_tokens == as_text.usage.prompt_tokens > 0

    # and a part the model cannot read (an image) is refused naming it, nothing held
    before = organization_balance(organization=gym["org"])
    image = {"type": "image_url", "image_url": {"url": "https://example.com/squat.png"}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [parts[0], image]}], max_tokens=8
        )
    assert (refused.value.body["code"], refused.value.body["param"]) == (
        "unsupported_parameter",
        "messages.0.content.1.type",
    )
    assert "'image_url'" in refused.value.body["message"]
    assert organization_balance(organization=gym["org"]) == before
    assert Job.objects.filter(organization=gym["org"]).count() == 2


WARM_UP = {"model": MODEL, "messages": [{"role": "user", "content": "Describe a good warm-up."}]}


def test_the_fields_clients_send_by_default_are_taken_and_the_penalties_reach_the_engine(gym):
    # given a prompt answered greedily (temperature 0: the same text every time)
    client = gym["client"]
    ask = {**WARM_UP, "max_tokens": 32, "temperature": 0}
    plain = client.chat.completions.create(**ask).choices[0].message.content

    # when it is sent with what clients send by default: each neutral value of a
    # parameter this API does not act on (through extra_body where the SDK names no
    # such argument), and no penalty
    defaults = client.chat.completions.create(
        **ask,
        n=1,
        logprobs=False,
        top_logprobs=0,
        response_format={"type": "text"},
        parallel_tool_calls=True,
        user="member-42",
        presence_penalty=0,
        frequency_penalty=0,
        tools=[],
        tool_choice="none",
        functions=[],
        function_call="none",
        logit_bias={},
        store=False,
        metadata={"team": "strength", "client": "sdk"},
        service_tier="auto",
        modalities=["text"],
        prediction=None,
        audio=None,
        reasoning_effort=None,
        extra_body={"web_search_options": None},
    )
    # and with penalties on the tokens already generated
    penalized = client.chat.completions.create(**ask, presence_penalty=2, frequency_penalty=2)

    # then the first is answered as without them, and the engine applied the penalties
    assert defaults.choices[0].message.content == plain
    assert defaults.usage.completion_tokens > 0
    assert penalized.choices[0].message.content != plain
    job = Job.objects.filter(organization=gym["org"]).latest("pk")
    assert (job.params["presence_penalty"], job.params["frequency_penalty"]) == (2.0, 2.0)

    # and a value asking for what is not served is refused, naming it, nothing held
    before = organization_balance(organization=gym["org"])
    for refused_kwargs, param in [
        ({"logprobs": True}, "logprobs"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"service_tier": "flex"}, "service_tier"),
    ]:
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(**ask, **refused_kwargs)
        assert (refused.value.body["code"], refused.value.body["param"]) == (
            "unsupported_parameter",
            param,
        )
    assert organization_balance(organization=gym["org"]) == before
    assert Job.objects.filter(organization=gym["org"]).count() == 3


def test_a_text_completion_takes_an_empty_suffix_and_logit_bias(gym):
    # given a prompt answered greedily
    client = gym["client"]
    ask = {"model": MODEL, "prompt": "Rest days matter", "max_tokens": 8, "temperature": 0}
    plain = client.completions.create(**ask)

    # when it is sent with the neutral values of OpenAI's suffix and logit_bias
    defaults = client.completions.create(**ask, suffix="", logit_bias={})

    # then it is answered as without them
    assert defaults.choices[0].text == plain.choices[0].text
    assert defaults.usage.prompt_tokens == plain.usage.prompt_tokens > 0

    # and a suffix to fill in before is refused, naming it, nothing held
    before = organization_balance(organization=gym["org"])
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(**ask, suffix=" and so does sleep.")
    assert (refused.value.body["code"], refused.value.body["param"]) == (
        "unsupported_parameter",
        "suffix",
    )
    assert organization_balance(organization=gym["org"]) == before
    assert Job.objects.filter(organization=gym["org"]).count() == 2


def test_requests_without_a_seed_are_sampled_afresh_and_a_seed_still_repeats(gym):
    # given a prompt sampled at temperature 1
    client = gym["client"]
    ask = {**WARM_UP, "max_tokens": 12, "temperature": 1}

    # when it is sent four times without a seed, and twice with one
    unseeded = [client.chat.completions.create(**ask).choices[0].message.content for _ in range(4)]
    seeded = [
        client.chat.completions.create(**ask, seed=9).choices[0].message.content for _ in range(2)
    ]

    # then the unseeded answers differ, as OpenAI's do, each job with a seed of its own
    # (kept on it, so a run can be replayed); the seeded ones repeat
    assert len(set(unseeded)) > 1, unseeded
    assert seeded[0] == seeded[1]
    seeds = [
        job.params["seed"] for job in Job.objects.filter(organization=gym["org"]).order_by("pk")
    ]
    assert seeds[4:] == [9, 9]
    assert len(set(seeds[:4])) == 4 and all(0 <= seed < 2**63 for seed in seeds[:4])


def test_a_request_without_max_tokens_runs_to_the_models_output_limit_not_256(gym):
    # given a model whose output limit is 400 tokens, and a prompt the engine answers at
    # length (at temperature 2 with this seed it writes over 1,800 tokens)
    client = gym["client"]
    model = CatalogModel.objects.get(name=MODEL)
    model.max_output_tokens = 400
    model.save()
    long = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long training guide."}],
        "temperature": 2.0,
        "seed": 4792,
    }

    # when it leaves max_tokens out
    reply = client.chat.completions.create(**long)

    # then it runs to the model's output limit (held for it), not to 256
    job = Job.objects.get(organization=gym["org"])
    assert job.params["max_tokens"] == 400
    assert (reply.usage.completion_tokens, reply.choices[0].finish_reason) == (400, "length")

    # and a catalog default, where staff set one, is the limit instead
    model.default_max_tokens = 20
    model.save()
    reply = client.chat.completions.create(**long)
    assert reply.usage.completion_tokens <= 20
    assert Job.objects.filter(organization=gym["org"]).latest("pk").params["max_tokens"] == 20


def test_a_stream_cancelled_through_the_jobs_api_ends_with_an_openai_finish_reason(
    gym, paced_triton_server
):
    # given a long streamed answer on the paced engine (1,815 tokens at a millisecond each)
    client = gym["client"]
    served_model(
        "gym-long",
        grpc_urls=[paced_triton_server.grpc_url],
        access_tier="basic",
        max_output_tokens=3000,
    )
    stream = client.chat.completions.create(
        model="gym-long",
        messages=[{"role": "user", "content": "Write a very long training guide."}],
        max_tokens=3000,
        temperature=2.0,
        seed=4792,
        stream=True,
    )

    # when its job is cancelled through the jobs API after its first tokens
    chunks, deltas = [], 0
    for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            deltas += 1
            if deltas == 3:
                job_id = chunk.id.removeprefix("chatcmpl-")
                cancel = requests.post(
                    f"{gym['url']}/api/v1/jobs/{job_id}/cancel",
                    headers={"Authorization": f"Bearer {gym['raw']}"},
                    timeout=10,
                )
                assert cancel.status_code == 200, cancel.text

    # then the choice ends with one of OpenAI's finish reasons, "length" (cut short:
    # not "stop", which would pass it for whole), and ours says it was cancelled
    job = Job.objects.get(public_id=job_id)
    assert (job.status, job.finish_reason) == (JobStatus.CANCELED, "cancelled")
    [last] = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last is chunks[-1]
    assert last.choices[0].finish_reason == "length"
    assert last.model_extra["gym"]["finish_reason"] == "cancelled"
    assert 3 <= job.output_tokens < 1815
    assert last.model_extra["gym"]["credits_charged"] == job.credits_charged > 0


def test_models_lists_what_the_plan_allows(gym):
    # when
    models = gym["client"].models.list()

    # then the basic tier model is there and the pro one is not
    names = [m.id for m in models.data]
    assert MODEL in names
    assert "gym-large" not in names


def test_a_model_is_retrieved_as_the_list_shows_it_and_only_if_listed(gym):
    # given a basic model the plan allows, a pro one it does not, and a retired one
    client = gym["client"]
    pool = ServerPool.objects.get(name="test-cpu")
    CatalogModel.objects.create(
        name="gym-old", pool=pool, access_tier="basic", status=ModelStatus.RETIRED
    )
    [listed] = [m for m in client.models.list().data if m.id == MODEL]

    # when each is retrieved
    model = client.models.retrieve(MODEL)
    refused = {}
    for name in ("gym-large", "gym-old", "gym-nothing"):
        with pytest.raises(openai.NotFoundError) as missing:
            client.models.retrieve(name)
        refused[name] = missing.value.body

    # then the allowed one is the list's entry, and the others are not found
    # alike, in OpenAI's error shape
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "gymbilling")
    assert model.model_dump() == listed.model_dump()
    for name, error in refused.items():
        assert (error["code"], error["param"]) == ("model_not_found", "model"), error
        assert error["type"] and repr(name) in error["message"]
    # and, as the list, it needs a valid key
    anonymous = requests.get(f"{gym['url']}/v1/models/{MODEL}", timeout=10)
    assert anonymous.status_code == 401


@pytest.mark.parametrize("accept", ["text/html", "application/xml", "application/json; indent=4"])
def test_the_openai_endpoints_answer_json_whatever_accept_says(gym, accept):
    # as OpenAI's API does (the rest of this API negotiates: 406 for text/html)
    headers = {"Authorization": f"Bearer {gym['raw']}", "Accept": accept}
    models = requests.get(f"{gym['url']}/v1/models", headers=headers, timeout=10)
    refused = requests.post(f"{gym['url']}/v1/chat/completions", json={}, headers=headers,
                            timeout=10)  # fmt: skip
    assert models.status_code == 200
    assert models.headers["Content-Type"] == "application/json"
    assert MODEL in [m["id"] for m in models.json()["data"]]
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "invalid_request"
    elsewhere = requests.get(f"{gym['url']}/api/v1/credits/balance", headers=headers, timeout=10)
    assert elsewhere.status_code == (200 if accept.startswith("application/json") else 406)


def test_errors_come_back_in_openai_shape_and_take_nothing(gym):
    # given
    org, client = gym["org"], gym["client"]
    before = organization_balance(organization=org)
    message = [{"role": "user", "content": "hi"}]

    # when / then: an unknown model
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nope", messages=message, max_tokens=4)
    assert missing.value.body["code"] == "model_not_found"

    # a model outside the plan
    with pytest.raises(openai.PermissionDeniedError) as outside:
        client.chat.completions.create(model="gym-large", messages=message, max_tokens=4)
    assert outside.value.body["code"] == "model_not_in_plan"

    # a bad key
    bad = openai.OpenAI(base_url=f"{gym['url']}/v1", api_key="gym_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unknown:
        bad.chat.completions.create(model=MODEL, messages=message, max_tokens=4)
    assert unknown.value.body["code"] == "authentication_failed"

    # a request over the organization's requests per minute
    org.requests_per_minute = 0
    org.save()
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model=MODEL, messages=message, max_tokens=4)
    assert limited.value.body["code"] == "rate_limited"
    assert limited.value.response.headers["retry-after"]

    # then nothing was held, charged or queued
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


def test_a_request_the_credits_cannot_cover_is_402_and_takes_nothing(gym, grant):
    # given an organization with almost no credits
    poor = OrganizationFactory(requests_per_minute=10_000, tokens_per_minute=10_000_000)
    grant(poor, 5)  # five micro-credits
    _key, raw = apikey_create(organization=poor, name="poor", scopes=[Scope.INFERENCE])
    client = openai.OpenAI(base_url=f"{gym['url']}/v1", api_key=raw, max_retries=0)

    # when
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50
        )

    # then
    assert refused.value.status_code == 402
    assert refused.value.body["code"] == "insufficient_credits"
    balance = organization_balance(organization=poor)
    assert (balance.available, balance.held) == (5, 0)
    assert not Job.objects.filter(organization=poor).exists()


def test_an_asynchronous_job_is_queued_run_and_read_back(gym):
    # given
    import time

    headers = {"Authorization": f"Bearer {gym['raw']}"}
    url = f"{gym['url']}/api/v1/jobs"

    # when a job is queued
    queued = requests.post(
        url, headers=headers, json={"model": MODEL, "prompt": "Strength training", "max_tokens": 6}
    )
    job_id = queued.json()["id"]
    deadline = time.monotonic() + 30
    while True:
        job = requests.get(f"{url}/{job_id}", headers=headers).json()
        if job["status"] not in ("queued", "running") or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    # then it ran on the worker, its text is kept, and it was billed for what was served
    assert queued.status_code == 202
    assert queued.json()["status"] == "queued"
    assert job["status"] == "succeeded"
    assert job["output"]
    row = Job.objects.get(public_id=job_id)
    assert job["credits_charged"] == expected_charge(row) > 0
    assert organization_balance(organization=gym["org"]).held == 0
    # with the time its first token came (it is streamed from the engine)
    assert job["first_token_at"] is not None
    assert row.started_at <= row.first_token_at <= row.finished_at
    listed = requests.get(url, headers=headers).json()["results"]
    assert [j["id"] for j in listed] == [job_id]


def test_a_prompt_the_engine_served_from_its_prefix_cache_is_billed_at_the_cached_rate(gym):
    # given a long prompt the engine has seen once
    org, client = gym["org"], gym["client"]
    messages = [{"role": "user", "content": "Plan a twelve week strength block " * 8}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, seed=1)

    # when it is sent again
    again = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, seed=2)

    # then the engine says which prompt tokens came from its cache (whole
    # blocks of 16), the answer reports them, and they cost the cached rate
    job = Job.objects.filter(organization=org).latest("pk")
    assert 16 <= job.cached_input_tokens < job.input_tokens
    assert job.cached_input_tokens % 16 == 0
    assert again.usage.prompt_tokens_details.cached_tokens == job.cached_input_tokens
    assert job.credits_charged == expected_charge(job)
    uncached = credits_for_usage(
        rates=Rates.of(job.model_price, job.priority),
        usage=Usage(input_tokens=job.input_tokens, output_tokens=job.output_tokens),
    )
    assert job.credits_charged < uncached
    assert UsageRecord.objects.get(job_id=job.public_id).cached_input_tokens == (
        job.cached_input_tokens
    )


def test_usage_by_model_and_by_key_adds_up_what_was_served(gym):
    # given two chat completions served, billed to the fixture's key
    client, headers = gym["client"], {"Authorization": f"Bearer {gym['raw']}"}
    for seed in (1, 2):
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, seed=seed
        )
    jobs = Job.objects.filter(organization=gym["org"])

    # when the usage is asked for, by model and by key
    by = {
        group_by: requests.get(
            f"{gym['url']}/api/v1/usage", headers=headers, params={"group_by": group_by}
        ).json()["data"]
        for group_by in ("model", "key")
    }

    # then each grouping has one row with both requests' engine counts and credits
    expected = {
        "requests": 2,
        "input_tokens": sum(j.input_tokens for j in jobs),
        "cached_input_tokens": sum(j.cached_input_tokens for j in jobs),
        "output_tokens": sum(j.output_tokens for j in jobs),
        "credits": sum(j.credits_charged for j in jobs),
    }
    assert expected["credits"] > 0 and expected["input_tokens"] > 0
    [by_model], [by_key] = by["model"], by["key"]
    assert by_model["group"] == MODEL
    assert {k: by_model[k] for k in expected} == expected
    assert {k: by_key[k] for k in expected} == expected


def _playground(gym, member, settings) -> tuple[Client, dict]:
    """`member`'s browser on the dashboard's playground, and the headers its script sends
    with the session: the CSRF token the page gave it, and the organization it acts for."""
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(member)
    browser.get("/dashboard/playground")  # the page sets the CSRF cookie, as in a browser
    token = browser.cookies[settings.CSRF_COOKIE_NAME].value
    return browser, {"HTTP_X_CSRFTOKEN": token, "HTTP_X_ORGANIZATION": gym["org"].slug}


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_a_playground_request_names_the_member_who_sent_it_and_a_keys_request_no_one(
    gym, settings, fast_path
):
    # given a member of the organization, signed in to the dashboard, and a
    # partner app with the organization's key; the job's row written with its
    # hold by the one statement, or by the ORM path
    settings.METERING_FAST_PATH = fast_path
    org = gym["org"]
    member = UserFactory()
    Membership.objects.create(user=member, organization=org, role=Role.MEMBER)
    browser, session = _playground(gym, member, settings)

    # when the member's playground sends a chat completion with the session,
    # and the partner app one with its key
    by_member = browser.post(
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "Plan my week."}],
         "max_tokens": 4},
        content_type="application/json",
        **session,
    )  # fmt: skip
    gym["client"].chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Plan my week."}], max_tokens=4
    )

    # then both were served and billed, the member's job naming the member and
    # no key, the key's naming its key and no one (settled by the worker)
    assert by_member.status_code == 200, by_member.content
    member_job = Job.objects.get(organization=org, user=member)
    key_job = Job.objects.get(organization=org, user=None)
    assert member_job.api_key_id is None and key_job.api_key_id is not None
    assert member_job.status == key_job.status == JobStatus.SUCCEEDED
    assert member_job.credits_charged > 0

    # and the jobs API says so, to the member and to the key alike
    listed = browser.get("/api/v1/jobs", **session).json()["results"]
    assert {job["id"]: job["member_id"] for job in listed} == {
        member_job.public_id: member.pk,
        key_job.public_id: None,
    }
    headers = {"Authorization": f"Bearer {gym['raw']}"}
    url = f"{gym['url']}/api/v1/jobs"
    assert (
        requests.get(f"{url}/{member_job.public_id}", headers=headers).json()["member_id"]
        == member.pk
    )
    assert requests.get(f"{url}/{key_job.public_id}", headers=headers).json()["member_id"] is None

    # and so do their usage records: usage by key has the member's row apart
    assert UsageRecord.objects.get(job_id=member_job.public_id).user_id == member.pk
    assert UsageRecord.objects.get(job_id=key_job.public_id).user_id is None
    by_key = requests.get(
        f"{gym['url']}/api/v1/usage", headers=headers, params={"group_by": "key"}
    ).json()["data"]
    assert {row["group"]: row["credits"] for row in by_key} == {
        f"user:{member.pk}": member_job.credits_charged,
        key_job.api_key.public_id: key_job.credits_charged,
    }


def test_the_job_list_pages_with_a_cursor_newest_first(gym):
    # given three asynchronous jobs
    headers = {"Authorization": f"Bearer {gym['raw']}"}
    url = f"{gym['url']}/api/v1/jobs"
    body = {"model": MODEL, "prompt": "Strength training", "max_tokens": 2}
    ids = [requests.post(url, headers=headers, json=body).json()["id"] for _ in range(3)]

    # when they are listed two at a time, following the cursor
    first = requests.get(url, headers=headers, params={"limit": 2}).json()
    second = requests.get(first["next"], headers=headers).json()

    # then every job comes once, newest first, and the last page says it is the last
    assert [j["id"] for j in first["results"]] == ids[::-1][:2]
    assert [j["id"] for j in second["results"]] == ids[::-1][2:]
    assert second["next"] is None

    # and the jobs end before the test does: the session's worker runs them,
    # and one settling while the teardown empties the tables fails the flush
    wait_until(
        lambda: not Job.objects.filter(public_id__in=ids).exclude(status__in=TERMINAL).exists(),
        what="the listed jobs to end",
    )


def test_the_job_list_filters_by_status_and_model_and_refuses_what_it_cannot_filter_by(gym):
    # given three asynchronous jobs, all ended, one of them failed (set so
    # here: the list reads the stored status, whatever ended the job)
    headers = {"Authorization": f"Bearer {gym['raw']}"}
    url = f"{gym['url']}/api/v1/jobs"
    body = {"model": MODEL, "prompt": "Strength training", "max_tokens": 2}
    ids = [requests.post(url, headers=headers, json=body).json()["id"] for _ in range(3)]
    wait_until(
        lambda: not Job.objects.filter(public_id__in=ids).exclude(status__in=TERMINAL).exists(),
        what="the jobs to end",
    )
    Job.objects.filter(public_id=ids[1]).update(status=JobStatus.FAILED)

    def listed(**params) -> list[str]:
        answer = requests.get(url, headers=headers, params=params)
        assert answer.status_code == 200, answer.text
        page = answer.json()
        found = [job["id"] for job in page["results"]]
        while page["next"]:  # the next page keeps the filter
            page = requests.get(page["next"], headers=headers).json()
            found += [job["id"] for job in page["results"]]
        return found

    # when listed by status, then by model: each list has its jobs only, newest first
    assert listed(status="failed") == [ids[1]]
    assert listed(status="failed", cursor="", limit="") == [ids[1]]  # blank: first page
    assert listed(status="succeeded", limit=1) == [ids[2], ids[0]]
    assert listed(status="running") == []
    assert listed(model=MODEL, limit=2) == ids[::-1]
    assert listed(model="gym-none") == []

    # and a status that is not one, or a filter it does not have, is a 400 that names it
    for params, param in (({"status": "done"}, "status"), ({"colour": "red"}, "colour")):
        refused = requests.get(url, headers=headers, params=params)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == param


def _with_context(limit: int, *, max_input_tokens: int | None = None) -> None:
    """gym-tiny with the engine's tokenizer, a context of `limit` tokens and the engine's
    prompt limit, as the admin sets them."""
    model = CatalogModel.objects.get(name=MODEL)
    model.context_limit, model.tokenizer_file = limit, "inference/engine/tokenizer.json"
    model.max_input_tokens = max_input_tokens
    model.save()  # the processes' catalog caches are told


def _refused_chat(client, content: str, **params) -> dict:
    """The error body of a chat completion of one user message that must be refused with 400."""
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}], **params
        )
    return refused.value.body


# 121 bytes, 59 tokens as the default chat template renders it: over a 64-token
# context by its bytes, within it by its tokens.
FITS_BY_TOKENS = "Plan a week of squats, presses, rows and easy runs for a new member who trains three days a week."


def _rendered(content: str) -> str:
    return f"<|user|>\n{content}\n<|assistant|>\n"


def test_a_request_over_the_models_context_is_refused_before_anything_is_held(gym):
    # given a model whose catalog entry allows 64 tokens of context (the
    # engine itself takes 4096), and a prompt of 82 tokens
    _with_context(64)
    org, client = gym["org"], gym["client"]
    before = organization_balance(organization=org)
    content = "squat " * 60
    assert count_tokens(_rendered(content)) == 82

    # when
    refused = _refused_chat(client, content, max_tokens=8)

    # then OpenAI's error, with the counts, and nothing held, queued or reserved
    assert refused["code"] == "context_length_exceeded"
    assert refused["param"] == "messages"
    assert refused["message"].startswith(
        "This model's maximum context length is 64 tokens. However, you requested 90 tokens "
        "(82 in the prompt, 8 for the completion)."
    )
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()
    assert _tokens_reserved(org) == 0

    # and a prompt that fits by its tokens, with more max_tokens than the
    # context leaves, is refused too: a max_tokens asked for is never cut
    with pytest.raises(openai.BadRequestError) as over:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": FITS_BY_TOKENS}], max_tokens=8
        )
    assert (
        "you requested 67 tokens (59 in the prompt, 8 for the completion)"
        in (over.value.body["message"])
    )

    # and a quote of the same request says so as well
    quote = requests.post(
        f"{gym['url']}/api/v1/credits/quote",
        headers={"Authorization": f"Bearer {gym['raw']}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8},
    )
    assert (quote.status_code, quote.json()["error"]["code"]) == (400, "context_length_exceeded")
    assert quote.json()["error"]["param"] == "messages"

    # and an asynchronous job given a prompt, naming that field
    job = requests.post(
        f"{gym['url']}/api/v1/jobs",
        headers={"Authorization": f"Bearer {gym['raw']}"},
        json={"model": MODEL, "prompt": content, "max_tokens": 8},
    )
    assert job.status_code == 400, job.text
    assert (job.json()["error"]["code"], job.json()["error"]["param"]) == (
        "context_length_exceeded",
        "prompt",
    )
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()


def _tokens_reserved(org) -> int:
    """Tokens reserved in Redis for the organization this minute (accounts.ratelimits)."""
    redis_client = get_redis()
    return sum(
        int(redis_client.get(key) or 0) for key in redis_client.keys(f"rl:tokens:org:{org.pk}:*")
    )


def test_a_prompt_that_fills_the_context_alone_is_refused_whatever_max_tokens_says(gym):
    # given a 64-token context
    _with_context(64)
    org, client = gym["org"], gym["client"]
    before = organization_balance(organization=org)

    # when an 82-token prompt leaves max_tokens out (nothing left to cut it to)
    with pytest.raises(openai.BadRequestError) as full:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "squat " * 60}]
        )
    # and a 40 KB prompt comes as a text completion: its bytes alone prove it
    # too long, so it is refused without being tokenized
    with pytest.raises(openai.BadRequestError) as huge:
        client.completions.create(model=MODEL, prompt="squat " * 7000, max_tokens=4)

    # then both are refused, saying the prompt is the problem, naming the field
    assert full.value.body["code"] == huge.value.body["code"] == "context_length_exceeded"
    assert full.value.body["message"].endswith(
        "your prompt is 82 tokens or more. Please shorten it."
    )
    assert (full.value.body["param"], huge.value.body["param"]) == ("messages", "prompt")
    assert "tokens or more" in huge.value.body["message"]
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()
    assert _tokens_reserved(org) == 0


def test_a_prompt_over_the_context_by_its_bytes_is_counted_and_served(gym):
    # given a 64-token context and a prompt of 121 bytes, 59 tokens
    _with_context(64)
    org, client = gym["org"], gym["client"]
    assert count_tokens(_rendered(FITS_BY_TOKENS)) == 59

    # when it asks for 5 tokens, then for none (the default, 256)
    asked = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": FITS_BY_TOKENS}], max_tokens=5, seed=3
    )
    default = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": FITS_BY_TOKENS}], seed=3
    )

    # then both are served, the default cut to the 5 tokens the context leaves,
    # and the engine counted the prompt as the gateway did
    jobs = list(Job.objects.filter(organization=org).order_by("pk"))
    assert [job.params["max_tokens"] for job in jobs] == [5, 5]
    assert [job.status for job in jobs] == [JobStatus.SUCCEEDED] * 2
    for reply in (asked, default):
        assert reply.usage.prompt_tokens == 59
        assert reply.usage.completion_tokens <= 5
    assert default.choices[0].message.content == asked.choices[0].message.content
    # and their tokens are counted against the limits where a refused
    # request's would have been (_tokens_reserved is not blind)
    assert _tokens_reserved(org) >= 2 * 59


def test_a_prompt_over_the_engines_own_prompt_limit_is_refused_before_anything_is_held(gym):
    # given gym-tiny with a 4096-token context on an engine that takes
    # prompts of at most 64 tokens (its max_input_len)
    _with_context(4096, max_input_tokens=64)
    org, client = gym["org"], gym["client"]
    before = organization_balance(organization=org)

    # when an 82-token prompt asks for 8 tokens, well within the context
    refused = _refused_chat(client, "squat " * 60, max_tokens=8)

    # then it is refused with the engine's limit and the count, before any
    # hold, job or reservation
    assert (refused["code"], refused["param"]) == ("context_length_exceeded", "messages")
    assert refused["message"] == (
        "This model's maximum prompt length is 64 tokens. However, your prompt is 82 tokens. "
        "Please shorten it."
    )
    assert organization_balance(organization=org) == before
    assert not Job.objects.filter(organization=org).exists()
    assert _tokens_reserved(org) == 0

    # and a 59-token prompt, over the limit by its bytes, is served
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": FITS_BY_TOKENS}], max_tokens=4
    )
    assert reply.usage.prompt_tokens == 59


def test_a_quote_is_what_a_request_then_holds(gym):
    # given
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Plan my week"}]}

    # when
    quote = requests.post(
        f"{gym['url']}/api/v1/credits/quote",
        headers={"Authorization": f"Bearer {gym['raw']}"},
        json={**body, "max_tokens": 8},
    )
    gym["client"].chat.completions.create(**body, max_tokens=8)

    # then the quote's worst case is exactly the hold the request placed, and it wrote nothing
    job = Job.objects.get(organization=gym["org"])
    assert quote.status_code == 200
    assert quote.json()["max_credits"] == job.hold_amount
    assert 0 < quote.json()["expected_credits"] <= quote.json()["max_credits"]


def test_a_quote_of_a_request_that_would_be_refused_is_refused_alike(gym):
    # given an organization whose plan allows standard priority at most
    org = gym["org"]
    url = f"{gym['url']}/api/v1/credits/quote"
    headers = {"Authorization": f"Bearer {gym['raw']}"}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Plan my week"}]}
    assert org.max_priority == "standard"

    # when it asks the price of a request at a priority its plan does not have
    over = requests.post(url, headers=headers, json={**body, "priority": "priority"})

    # then it is told so, as the request itself would be, and given no price
    assert over.status_code == 403, over.text
    assert (over.json()["error"]["code"], over.json()["error"]["param"]) == (
        "priority_not_in_plan",
        "priority",
    )

    # and once inference is suspended for an unpaid invoice, no quote either
    organization_entitlements_set(organization=org, reason="test", standing=Standing.SUSPENDED)
    suspended = requests.post(url, headers=headers, json=body)
    assert suspended.status_code == 402, suspended.text
    assert suspended.json()["error"]["code"] == "subscription_past_due"
    # whatever the model, as for the request itself (the standing is checked first)
    unknown = requests.post(url, headers=headers, json={**body, "model": "no-such-model"})
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (402, "subscription_past_due")
    assert not Job.objects.filter(organization=org).exists()


@pytest.mark.parametrize("stream", [False, True], ids=["answered once settled", "streamed"])
def test_only_an_answer_given_after_settlement_places_its_hold_unflushed(gym, stream):
    # Django's test client, in this thread, so that this connection's
    # statements are the API's own (the live server's thread has its own).
    # given a chat completion, answered once its job settled, or streamed
    # (tokens reach the client before the job settles)
    statements = StatementLog()
    with connection.execute_wrapper(statements):
        response = Client().post(
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
             "seed": 1, "stream": stream},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {gym['raw']}",
        )  # fmt: skip
        body = b"".join(response.streaming_content) if stream else response.content
    assert response.status_code == 200, body

    # then only the hold of the answer given after settlement skipped the
    # flush (the settlement's durable commit flushes it before the answer)
    [placement] = [s for s in statements.sql if "INSERT INTO metering_hold" in s]
    assert ("synchronous_commit" in placement) is not stream
    # and either way the job settled, its hold captured
    hold = Hold.objects.get(key=response["X-Gym-Job-Id"])
    assert hold.status == HoldStatus.CAPTURED and hold.captured > 0


def test_an_asynchronous_job_answered_before_it_settles_places_its_hold_durably(gym):
    # its 202 names the job right after the hold commits: that commit waits for the disk
    statements = StatementLog()
    with connection.execute_wrapper(statements):
        response = Client().post(
            "/api/v1/jobs",
            {"model": MODEL, "prompt": "Plan a week.", "max_tokens": 4},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {gym['raw']}",
        )
    assert response.status_code == 202, response.content
    [placement] = [s for s in statements.sql if "INSERT INTO metering_hold" in s]
    assert "synchronous_commit" not in placement
    # (and it runs to its end before the test's tables are emptied under the worker)
    deadline = time.monotonic() + 30
    while Job.objects.filter(status__in=[JobStatus.QUEUED, JobStatus.RUNNING]).exists():
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.05)
    assert Job.objects.get(public_id=response.json()["id"]).status == JobStatus.SUCCEEDED


# --- the per-process caches (accounts.cache): what another process changed is seen at once
#
# The live server runs in this process, so its caches are this process's: a
# change "elsewhere" is the row written without save signals and its cache's
# token rewritten in Redis, which is all another process's commit leaves here.


def _changed_elsewhere(cache_name: str) -> None:
    from accounts.redis import get_redis

    get_redis().set(f"cachegen:{cache_name}", f"elsewhere-{timezone.now().timestamp()}")


def _chat(gym, idempotency_key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {gym['raw']}"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    return requests.post(
        f"{gym['url']}/v1/chat/completions",
        # seeded: unseeded, the gateway draws a seed, and about 1 in 80 makes this
        # model answer nothing
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4,
            "seed": 1,
        },
        headers=headers,
        timeout=30,
    )


def test_a_key_revoked_elsewhere_is_refused_at_once_and_takes_nothing(gym):
    # given a key this process has authenticated (its cache holds it, live)
    assert _chat(gym).status_code == 200
    org = gym["org"]
    before, jobs = organization_balance(organization=org), Job.objects.count()
    ApiKeyModel = Job._meta.get_field("api_key").related_model

    # when another process revokes it
    ApiKeyModel.objects.filter(organization=org).update(revoked_at=timezone.now())
    _changed_elsewhere("api-keys")

    # then the very next request is refused, with nothing held, charged or queued
    refused = _chat(gym)
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "api_key_revoked"
    assert organization_balance(organization=org) == before
    assert Job.objects.count() == jobs


def test_a_model_brought_back_elsewhere_is_served_at_once(gym):
    # given a model this process has cached as retired (and refused)
    CatalogModel.objects.filter(name=MODEL).update(status=ModelStatus.RETIRED)
    _changed_elsewhere("inference-catalog")
    gone = _chat(gym)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"

    # when another process makes it active again
    CatalogModel.objects.filter(name=MODEL).update(status=ModelStatus.ACTIVE)
    _changed_elsewhere("inference-catalog")

    # then the next request, though this process cached the row as retired,
    # is served
    served = _chat(gym, idempotency_key="brought-back")
    assert served.status_code == 200, served.text
    assert served.json()["usage"]["completion_tokens"] > 0
    # once: its Idempotency-Key stores the answer served
    again = _chat(gym, idempotency_key="brought-back")
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert again.json() == served.json()
    # with the first answer's own headers: the job it ran, what it charged
    for name in ("X-Gym-Job-Id", "X-Gym-Credits-Charged"):
        assert again.headers.get(name) == served.headers[name], name
    assert Job.objects.filter(status=JobStatus.SUCCEEDED).count() == 1


def test_a_streamed_answer_retried_under_its_key_is_a_409_naming_its_job(gym):
    # given a streamed chat completion sent with an Idempotency-Key, read to its end
    org = gym["org"]
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 4,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {gym['raw']}", "Idempotency-Key": "streamed-once"}
    first = requests.post(
        f"{gym['url']}/v1/chat/completions", json=body, headers=headers, timeout=30
    )
    assert first.status_code == 200, first.text
    job = Job.objects.get(organization=org)
    balance = organization_balance(organization=org)

    # when it is sent again with the same key
    again = requests.post(
        f"{gym['url']}/v1/chat/completions", json=body, headers=headers, timeout=30
    )

    # then a stream cannot be replayed (README, "The partner API"): the retry is a 409
    # that names the first request's job, and runs and charges nothing
    assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (409, "true")
    error = again.json()["error"]
    assert error["code"] == "idempotent_stream"
    assert job.public_id in error["message"]
    assert Job.objects.filter(organization=org).count() == 1
    assert organization_balance(organization=org) == balance


def test_an_answer_that_fails_after_its_job_was_queued_is_a_502_kept_under_its_key(
    gym, monkeypatch
):
    # given the relay failing under the API after the job was queued (Redis
    # going away): injected at the API's relay read, the one point a real
    # outage would have to fall on, between the submit and the read
    org = gym["org"]
    before = organization_balance(organization=org)

    def relay_down(job_id: str, **kwargs):
        raise redis.exceptions.ConnectionError("Redis went away")

    monkeypatch.setattr(apis, "relay_events", relay_down)

    # when a request is sent with an Idempotency-Key, and retried with it
    first = _chat(gym, idempotency_key="relay-down")
    again = _chat(gym, idempotency_key="relay-down")

    # then the answer is a 502 naming the job, and the retry is that answer
    # replayed: no second job, so no second charge
    job = Job.objects.get(organization=org)
    assert first.status_code == 502, first.text
    assert (first.json()["error"]["code"], first.json()["error"]["job_id"]) == (
        "engine_error",
        job.public_id,
    )
    assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (502, "true")
    assert again.content == first.content
    assert Job.objects.filter(organization=org).count() == 1

    # and the job, cancelled, ends settled once: the balance moved by its charge alone
    ended = wait_until(
        lambda: Job.objects.filter(pk=job.pk, status__in=TERMINAL).first(), what="the job to end"
    )
    assert Hold.objects.get(key=job.public_id).status != HoldStatus.PENDING
    after = organization_balance(organization=org)
    assert before.available - after.available == ended.credits_charged
    assert after.held == 0
