"""The playground in a real browser: a member's message answered by the real engine.

Real parts only: the app under gunicorn (`app_server`), the session's Celery
worker process, the CPU Triton server, PostgreSQL and Redis. The page's script
sends /v1/chat/completions with the member's session and reads its stream; what
the page says was used and charged is compared with the rows billing wrote.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from accounts.models import Membership, Scope
from accounts.redis import get_redis
from accounts.services import apikey_create
from inference.models import TERMINAL, Job, JobStatus
from metering.models import AccountKind, Hold, HoldStatus, LedgerEntry, UsageRecord
from metering.selectors import organization_balance
from metering.services import Rates, Usage, credits_for_usage
from metering.services.postings import amount_display
from tests.e2e.test_dashboard import EMAIL, sign_up
from tests.helpers import credits, served_model, wait_until
from tests.inference import conftest as engine_fixtures

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

triton_server = engine_fixtures.triton_server
paced_triton_server = engine_fixtures.paced_triton_server

MODEL = "gym-tiny"


def member_on_the_playground(visit, url: str, grant, amount: int):
    """A member who signed up and was granted `amount`, on the playground (from the menu,
    as a member finds it); returns their organization and its balance then."""
    sign_up(visit, url)
    org = Membership.objects.get(user__email=EMAIL).organization
    if amount:
        grant(org, amount)
    visit.page.click("nav.side >> text=Playground")
    visit.page.wait_for_url(f"{url}/dashboard/playground")
    return org, organization_balance(organization=org)


def fill(page, *, message: str, max_tokens: str, temperature: str, seed: str, system: str = ""):
    page.select_option("#pg-model", MODEL)
    page.fill("#pg-system", system)
    page.fill("#pg-user", message)
    page.fill("#pg-max-tokens", max_tokens)
    page.fill("#pg-temperature", temperature)
    page.fill("#pg-seed", seed)


def shown_micro(page, figure: str) -> int:
    return int(page.get_attribute(f"[data-figure={figure}]", "data-micro"))


def shown_count(page, figure: str) -> int:
    return int(page.inner_text(f"[data-figure={figure}]"))


def relayed(job: Job) -> dict:
    """The job's last event as its worker relayed it (with the whole text it served)."""

    def final() -> dict | None:
        entries = get_redis().xrange(f"jobstream:{job.public_id}")
        events = [json.loads(fields[b"e"]) for _entry_id, fields in entries]
        return events[-1] if events and events[-1]["type"] in ("done", "error") else None

    return wait_until(final, timeout=10, what="the job's last relayed event")


def settled_in_ledger(job: Job) -> tuple[int, int]:
    """(the hold's capture, the consumption entry of its settlement) for the job."""
    hold = Hold.objects.get(key=job.public_id)
    assert hold.status == HoldStatus.CAPTURED
    consumed = LedgerEntry.objects.get(
        transaction=hold.settle_transaction, account__kind=AccountKind.CONSUMPTION
    )
    return hold.captured, consumed.amount


def run_snippet(args: list[str], key: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert key not in done.stdout
    return done.stdout


def test_a_member_sends_a_message_and_sees_the_answer_stream_and_its_exact_bill(
    app_server, visit, grant, triton_server, celery_worker_process
):
    # given a model on the real engine, and a member with credits on the playground
    served_model(MODEL, grpc_urls=[triton_server.grpc_url], access_tier="basic")
    org, before = member_on_the_playground(visit, app_server, grant, credits(100))
    page = visit.page

    # when they send a message
    fill(
        page,
        system="You are a terse coach.",
        message="How should a member plan a training week?",
        max_tokens="24",
        temperature="0",
        seed="7",
    )
    # (each time the answer grows: its length, and whether the bill is shown yet)
    page.evaluate(
        """() => {
          window.answerSeen = [];
          const answer = document.getElementById("pg-answer");
          const usage = document.getElementById("pg-usage");
          new MutationObserver(() => window.answerSeen.push([answer.textContent.length, usage.hidden]))
            .observe(answer, {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.click("#pg-send")
    page.wait_for_selector("#pg-usage:not([hidden])", timeout=60_000)

    # then the answer came in pieces, before its bill
    seen = page.evaluate("window.answerSeen")
    grew = [length for length, bill_hidden in seen if bill_hidden and length > 0]
    assert len(grew) > 1 and grew == sorted(grew)
    answer = page.text_content("#pg-answer")
    assert answer
    assert page.inner_text("#pg-status").startswith("Done (finish_reason:")

    # and it is the answer the engine served for the member's session, no key
    job = Job.objects.get(organization=org)
    assert (job.status, job.api_key_id, job.stream) == (JobStatus.SUCCEEDED, None, True)
    assert relayed(job)["text"] == answer

    # and the usage and credits shown are the usage record's and the ledger's, exactly
    record = UsageRecord.objects.get(job_id=job.public_id)
    captured, consumed = settled_in_ledger(job)
    assert shown_count(page, "prompt-tokens") == record.input_tokens == job.input_tokens > 0
    assert shown_count(page, "cached-tokens") == record.cached_input_tokens
    assert shown_count(page, "completion-tokens") == record.output_tokens == job.output_tokens > 0
    charged = shown_micro(page, "credits-charged")
    assert charged == record.credits == captured == consumed == job.credits_charged > 0
    assert page.inner_text("[data-figure=credits-charged]") == amount_display(charged)

    # and the balance dropped by exactly that, which is what the page says is left
    after = organization_balance(organization=org)
    assert before.available - after.available == charged
    assert after.held == 0
    assert shown_micro(page, "credits-remaining") == after.available
    assert shown_micro(page, "available") == after.available
    assert page.inner_text("[data-figure=credits-remaining]") == amount_display(after.available)
    assert visit.failures == []

    # and the curl and openai snippets under the form, with a real key in place of
    # the placeholder, send the same request: the engine answers them the same
    _key, raw = apikey_create(organization=org, name="copied", scopes=[Scope.INFERENCE])
    curl = page.text_content("#pg-curl").replace("YOUR_API_KEY", raw)
    python = page.text_content("#pg-python").replace("YOUR_API_KEY", raw)
    assert f"{app_server}/v1" in curl and f"{app_server}/v1" in python
    streamed = run_snippet(["bash", "-c", curl], raw)
    deltas = [
        json.loads(line[len("data: ") :])
        for line in streamed.splitlines()
        if line.startswith("data: {")
    ]
    assert (
        "".join(
            chunk["choices"][0]["delta"].get("content", "") for chunk in deltas if chunk["choices"]
        )
        == answer
    )
    assert deltas[-1]["usage"]["completion_tokens"] == record.output_tokens
    printed = run_snippet([sys.executable, "-c", python], raw)
    assert printed.startswith(answer + "\n")
    assert f"completion_tokens={record.output_tokens}" in printed

    # when they then send a request the API refuses as invalid
    page.fill("#pg-max-tokens", "100000")
    page.click("#pg-send")

    # then its refusal replaces the last answer and its figures, naming the field
    error = page.locator("#pg-error")
    error.wait_for(state="visible")
    assert error.get_attribute("data-error-code") == "invalid_request"
    assert error.inner_text() == (
        "invalid_request: max_tokens may be at most 1024 for 'gym-tiny'. (max_tokens)"
    )
    assert page.is_hidden("#pg-usage") and page.is_hidden("#pg-answer")
    assert Job.objects.filter(organization=org).count() == 3  # the page's and the snippets'
    assert visit.failures == [f"400 {app_server}/v1/chat/completions"]


def test_a_member_without_credits_is_told_so_and_the_apis_refusal_is_shown(
    app_server, visit, grant
):
    # given a model the member's plan includes, and no credits
    served_model(MODEL, access_tier="basic")

    # when they open the playground
    org, _before = member_on_the_playground(visit, app_server, grant, 0)
    page = visit.page

    # then it says why nothing can be sent, and offers no way to send
    notice = page.locator("p.refusal[data-error-code=insufficient_credits]")
    assert "no credits available" in notice.inner_text()
    assert page.is_disabled("#pg-send")

    # when a single micro-credit arrives (less than any request holds) and they send
    grant(org, 1)
    page.reload()
    fill(page, message="Plan my week.", max_tokens="16", temperature="1", seed="3")
    page.click("#pg-send")

    # then the API's refusal is on the page, its code and its message, and nothing was taken
    error = page.locator("#pg-error")
    error.wait_for(state="visible")
    assert error.get_attribute("data-error-code") == "insufficient_credits"
    text = error.inner_text()
    assert text.startswith("insufficient_credits: Not enough credits: this needs ")
    assert "0.000001 are available" in text
    assert page.inner_text("#pg-status") == "Refused (402)."
    assert page.is_enabled("#pg-send")
    assert not Job.objects.filter(organization=org).exists()
    assert organization_balance(organization=org).available == 1
    assert visit.failures == [f"402 {app_server}/v1/chat/completions"]


# With the development engine this conversation, at temperature 2 and seed 4792,
# generates 1815 tokens (tests/reliability/test_inference_cancel.py); on the paced
# engine, a token a millisecond, that lasts seconds: time to press Stop.
LONG_MESSAGE = "Write a very long training guide."


def test_stop_cancels_the_job_which_is_billed_for_what_it_produced(
    app_server, visit, grant, paced_triton_server, celery_worker_process
):
    # given a long generation on the paced engine, and a member with credits
    served_model(
        MODEL,
        grpc_urls=[paced_triton_server.grpc_url],
        access_tier="basic",
        max_output_tokens=4096,
        context_limit=4096,
        tokenizer_file="inference/engine/tokenizer.json",
    )
    org, before = member_on_the_playground(visit, app_server, grant, credits(100))
    page = visit.page
    fill(page, message=LONG_MESSAGE, max_tokens="3000", temperature="2", seed="4792")

    posts: list[str] = []
    page.on("request", lambda r: r.method == "POST" and posts.append(r.url))

    # when they send it, and press Stop once the answer has begun. The press is
    # made in the page, by an observer of the answer, the moment its first text
    # shows: pressed from here (a wait for the text, then a click, each a round
    # trip to the browser) it raced the generation's 1.8 s on a loaded 2-CPU host,
    # and a stream that ends first leaves nothing to stop.
    page.evaluate(
        """() => {
          const answer = document.getElementById("pg-answer");
          const stop = document.getElementById("pg-stop");
          const observer = new MutationObserver(() => {
            if (answer.textContent.length > 0) {
              observer.disconnect();
              window.stoppedAtLength = answer.textContent.length;
              stop.click();
            }
          });
          observer.observe(answer, {childList: true, characterData: true, subtree: true});
        }"""
    )
    page.click("#pg-send")
    page.wait_for_selector("#pg-usage:not([hidden])", timeout=60_000)
    assert page.evaluate("window.stoppedAtLength") > 0

    # then the job ended canceled, long before the engine's end
    job = Job.objects.get(organization=org)
    assert job.status in TERMINAL
    assert (job.status, job.finish_reason) == (JobStatus.CANCELED, "cancelled")
    assert 0 < job.output_tokens < 1815
    assert page.inner_text("#pg-status") == (
        "Stopped: the job ended canceled, charged for what it produced."
    )

    # and the page asked for the cancel itself, as well as closing the stream (a proxy
    # that buffers the stream could hide the close from the server)
    assert f"{app_server}/api/v1/jobs/{job.public_id}/cancel" in posts

    # and what the page read is the start of what the worker relayed, which was billed
    final = relayed(job)
    assert final["text"].startswith(page.text_content("#pg-answer"))
    assert final["output_tokens"] == job.output_tokens

    # and the page shows that bill, exactly as the usage record and the ledger have it
    record = UsageRecord.objects.get(job_id=job.public_id)
    captured, consumed = settled_in_ledger(job)
    expected = credits_for_usage(
        rates=Rates.of(job.model_price, job.priority),
        usage=Usage(
            input_tokens=job.input_tokens,
            output_tokens=job.output_tokens,
            cached_input_tokens=job.cached_input_tokens,
        ),
    )
    assert shown_count(page, "prompt-tokens") == record.input_tokens == job.input_tokens > 0
    assert shown_count(page, "completion-tokens") == record.output_tokens == job.output_tokens
    charged = shown_micro(page, "credits-charged")
    assert charged == expected == record.credits == captured == consumed == job.credits_charged
    after = organization_balance(organization=org)
    assert before.available - after.available == charged
    assert after.held == 0
    assert shown_micro(page, "credits-remaining") == after.available

    # and the only request that did not complete is the one Stop aborted
    assert visit.failures == [f"failed {app_server}/v1/chat/completions"]
