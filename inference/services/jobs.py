"""A job's life: submit (hold the worst case), start, settle exactly once, cancel.

Submit follows DESIGN.md's "One inference request, end to end": the key and
the organization's standing were checked by the API; here the model and the
entitlements are checked, the worst case is priced, the hold and the Job row
are written in one transaction (on PostgreSQL in one statement: it locks the
organization's wallet until it commits), and the Celery task is enqueued
after commit on its priority's queue. A refused hold (402) writes no Job row.
"""

from __future__ import annotations

import functools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from pathlib import Path
from typing import NamedTuple

from django.conf import settings
from django.db import DatabaseError, connection, transaction
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils import timezone
from redis.exceptions import RedisError

from accounts import sql
from accounts.errors import ApplicationError
from accounts.models import ApiKey, Organization, Priority, Standing, User
from accounts.ratelimits import (
    Limit,
    RequestCount,
    Slot,
    concurrency_release,
    concurrency_slots_taken,
    rate_limit_consume,
    rate_limit_refund,
)
from accounts.redis import get_redis
from gymbilling.broker import task_publish
from inference.models import NON_TERMINAL, CatalogModel, InputTokensSource, Job, JobStatus
from inference.relay import CancelOrigin
from inference.selectors import catalog_model_resolve, job_final_event, pools_for_job
from inference.services.callbacks import job_callback_record
from metering.models import Hold, HoldStatus
from metering.selectors import model_price
from metering.services import (
    Rates,
    Usage,
    credits_for_usage,
    credits_worst_case,
    fastpath,
    hold_capture,
    hold_place,
    hold_release,
)
from metering.services.holds import hold_settle_params
from metering.services.usage import UsageDraft

logger = logging.getLogger(__name__)

PRIORITY_RANK = {Priority.BATCH: 0, Priority.STANDARD: 1, Priority.PRIORITY: 2}


@dataclass(frozen=True)
class SubmitParams:
    max_tokens: int | None = None
    # The body field max_tokens came in (OpenAI's newer name is
    # max_completion_tokens): the one an error about it names.
    max_tokens_param: str = "max_tokens"
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: tuple[str, ...] = ()


def prompt_token_bound(prompt: str, *, model: CatalogModel | None = None) -> int:
    """An upper bound of the prompt's tokens as `model`'s engine counts them, without tokenizing.

    A byte-level BPE never yields more tokens than UTF-8 bytes. A
    SentencePiece-style tokenizer (Llama 2, Mistral) puts a "▁" in front of
    the text and falls back to one token a byte: one token more
    (_bound_slack, read once from the catalog's tokenizer). And the
    engine's preprocessing adds the catalog's prompt_special_tokens (a BOS)
    to every prompt. Holding for the sum can only over-reserve; the capture
    bills the engine's real count, and never more than the hold (a
    normalizer that expands characters, NFKC's, can exceed the bound).
    """
    extra = 0
    if model is not None:
        extra = model.prompt_special_tokens
        if model.tokenizer_file:
            extra += _bound_slack(model.tokenizer_file)
    return len(prompt.encode("utf-8")) + extra


@functools.cache
def _tokenizer(path: str):
    """The tokenizer at `path`, or None when it cannot be read (logged once per process)."""
    from tokenizers import Tokenizer

    resolved = Path(path)
    if not resolved.is_absolute():
        resolved = Path(settings.BASE_DIR) / resolved
    try:
        return Tokenizer.from_file(str(resolved))
    except Exception:
        # Cached as None like a success: the API asks on every long prompt,
        # and a traceback per request would bury the one that matters.
        logger.exception("tokenizer %r could not be loaded; counting without it", path)
        return None


@functools.cache
def _longest_token_bytes(path: str) -> int:
    """The most UTF-8 bytes any one token of the (readable) tokenizer at `path` stands for."""
    tokenizer = _tokenizer(path)
    return max(
        (len(tokenizer.decode([i]).encode("utf-8")) for i in range(tokenizer.get_vocab_size())),
        default=1,
    )


def prompt_tokens_count(*, model: CatalogModel, prompt: str) -> int | None:
    """The prompt's tokens as the engine counts them, by the model's own tokenizer;
    None when the catalog has none.

    For a prompt the engine took but never counted (its counts ride on its
    responses), and for one too long for its bytes to show that it fits the
    model's context (_within_context). The text's tokens plus the special
    tokens the engine's preprocessing adds (the catalog's
    prompt_special_tokens), which is what TensorRT-LLM's preprocessing counts
    with add_special_tokens on or off. A tokenizer file that cannot be read
    counts as none (logged): the job must still settle.
    """
    counted = output_tokens_count(model=model, text=prompt)
    return None if counted is None else counted + model.prompt_special_tokens


def output_tokens_count(*, model: CatalogModel, text: str) -> int | None:
    """`text`'s own tokens by the model's tokenizer, no special tokens; None when the catalog
    has none (or it cannot be read: logged, and the job must still settle).

    For generated text the engine's counts never reached us: a stream whose
    worker died after relaying it (inference.tasks._relayed_before). The
    development engine's output count is exactly this; a real engine's may
    differ by the merges decoding undoes, which is why it is a fallback.
    """
    tokenizer = _tokenizer(model.tokenizer_file) if model.tokenizer_file else None
    if tokenizer is None:
        return None
    return len(tokenizer.encode(text, add_special_tokens=False).ids)


# One-byte texts on which a token a tokenizer prepends shows (_bound_slack).
_PROBES = ("\x01", "a", " ", "\n")


@functools.cache
def _bound_slack(path: str) -> int:
    """Tokens the tokenizer at `path` makes beyond a text's bytes (0 if it cannot be read): 1
    for one that prepends a "▁" (Metaspace, Llama 2's Prepend normalizer), 0 for a byte-level
    BPE. Probed on texts of one byte each, where a prepended token shows."""
    tokenizer = _tokenizer(path)
    if tokenizer is None:
        return 0
    return max(
        0,
        *(len(tokenizer.encode(text, add_special_tokens=False).ids) - 1 for text in _PROBES),
    )


def tokenizer_special_tokens(path: str) -> int | None:
    """The special tokens the tokenizer at `path` adds to a prompt (its post-processor's BOS,
    say), as a preprocessing that adds them counts; None when it cannot be read."""
    tokenizer = _tokenizer(path)
    if tokenizer is None:
        return None
    return len(tokenizer.encode("", add_special_tokens=True).ids)


# A token covers at most its own decoded bytes of the prompt, unless the
# tokenizer's normalizer shrinks the text first (NFKC turns a 3-byte ligature
# into 2 letters): twice the longest token is a lower bound of the tokens any
# real tokenizer makes of a prompt, within which a prompt is counted exactly.
_NORMALIZER_SLACK = 2


# The default max_tokens before it became the model's output limit: without a tokenizer
# the default is never cut below it (_within_context), so no prompt gets less than it did;
# under a tokens-per-minute limit that would cut the default it is the default again
# (_within_rate_limit), so that a minute serves as many such requests as it did.
_OLD_DEFAULT_MAX_TOKENS = 256


class _Fit(NamedTuple):
    """What _within_context lets a request have."""

    max_tokens: int
    # The prompt's tokens by the model's tokenizer when the check had to count them (a
    # long prompt), else None: _within_rate_limit takes this count rather than tokenize
    # the prompt again, which holds the GIL about 1 ms per 4 KB.
    prompt_tokens: int | None = None


def _limits(organization: Organization) -> list[Limit]:
    return [Limit(scope=f"org:{organization.pk}", limit=organization.tokens_per_minute)]


def _within_rate_limit(
    organization: Organization,
    model: CatalogModel,
    prompt: str,
    bound: int,
    max_tokens: int,
    *,
    requested: int | None,
    param: str = "max_tokens",
    prompt_field: str | None = None,
    counted: int | None = None,
) -> tuple[int, int]:
    """(max_tokens, tokens to reserve): what a request counts against its tokens-per-minute
    limits is its prompt's bound and max_tokens; or, when that is more than the whole limit,
    the prompt as the model's tokenizer counts it (its bytes overstate it about fourfold in
    English); `counted`, when _within_context counted it already. A max_tokens the client
    left out (the model's default) that the limit would cut is the old default of 256 (the
    catalog's default when lower), cut further to what the limit leaves after the prompt
    (at least 1): at the whole output limit an organization allowed fewer tokens a minute
    would be refused every request that leaves it out, and cut to all the limit leaves
    each such request would reserve the whole minute's budget, so every second one would
    be rate_limited, and its hold priced on all of it. 256 serves as many as the old
    default did; an organization whose limit leaves room for the whole default keeps it.
    The reservation then counts exactly the max_tokens the engine is sent and the hold
    prices.

    A request that needs more than the limit even so (a max_tokens the client asked for,
    or a prompt that leaves none) can never be served: it is refused with 429
    `request_exceeds_rate_limit`, without a Retry-After, where a `rate_limited` one would
    invite retries that all fail; one that left max_tokens out names the prompt
    (`prompt_field`), the one thing to change. Tokenizing (about 1 ms per 4 KB) happens
    only for such long requests.
    """
    # Every limit the reservation is charged to (rate_limit_consume): the tightest binds.
    limit = min(each.limit for each in _limits(organization))
    if bound + max_tokens <= limit:
        return max_tokens, bound + max_tokens
    if counted is None:
        counted = prompt_tokens_count(model=model, prompt=prompt)
    prompt_tokens = bound if counted is None else counted
    if requested is None and prompt_tokens < limit < prompt_tokens + max_tokens:
        # The limit cuts the default: never to all it leaves, which one request would then
        # take alone, but to the old default, within what the limit leaves.
        max_tokens = min(max_tokens, _OLD_DEFAULT_MAX_TOKENS, limit - prompt_tokens)  # >= 1
    if prompt_tokens + max_tokens <= limit:
        return max_tokens, prompt_tokens + max_tokens
    counting = "" if counted is not None else ", at most"
    if requested is None:
        # The default is cut to what the limit leaves, and nothing is left: no max_tokens
        # can help. Said, since the client did not send the max_tokens it would look at.
        needed = prompt_tokens + 1
        message = (
            f"This request's prompt alone is {prompt_tokens} tokens{counting}, and this "
            f"organization's whole limit is {limit} tokens per minute: nothing is left for the "
            f"completion, so no retry can succeed. It left {param} out, which is then cut to "
            "what the limit leaves after the prompt: shorten the prompt."
        )
    else:
        needed = prompt_tokens + max_tokens
        message = (
            f"This request needs {needed} tokens ({prompt_tokens} in the "
            f"prompt{counting}, {max_tokens} for the completion), more than this "
            f"organization's whole limit of {limit} tokens per minute: no retry can succeed. "
            "Shorten the prompt or lower max_tokens."
        )
    raise ApplicationError(
        code="request_exceeds_rate_limit",
        message=message,
        status=429,
        param=prompt_field if requested is None else None,
        extra={"limit": limit, "kind": "tokens", "requested": needed},
    )


def job_quote(
    *,
    organization: Organization,
    model_name: str,
    prompt: str | Callable[[CatalogModel], str],
    max_tokens: int | None,
    priority: str,
    expected_output_tokens: int | None = None,
    prompt_field: str | None = None,
    max_tokens_param: str = "max_tokens",
) -> dict:
    """The worst case a request holds, and its cost at an expected length. Writes nothing.

    A request that job_submit would refuse is refused alike, in the same
    order (a suspended organization, then the model, then a priority outside
    the plan, the context, the whole tokens-per-minute limit): no price is
    quoted for it; a max_tokens left out is cut as job_submit cuts it.
    `prompt` is the text, or a function that renders it for the resolved
    model, as for job_submit.
    `prompt_field`: the body field the prompt came in, which a context error names.
    """
    model = _admitted_model(organization, model_name, priority)
    if callable(prompt):
        prompt = prompt(model)
    requested = max_tokens
    max_tokens = _max_tokens(model, max_tokens, param=max_tokens_param)
    bound = prompt_token_bound(prompt, model=model)
    fit = _within_context(model, prompt, bound, max_tokens, requested=requested, param=prompt_field)
    price = model_price(model_name=model.name)
    # The max_tokens job_submit would hold (and its refusal): nothing is reserved here.
    max_tokens, _ = _within_rate_limit(
        organization,
        model,
        prompt,
        bound,
        fit.max_tokens,
        requested=requested,
        param=max_tokens_param,
        prompt_field=prompt_field,
        counted=fit.prompt_tokens,
    )
    rates = Rates.of(price, priority)
    # About 4 UTF-8 bytes per token is typical of English under a BPE; the
    # real count is the engine's, at capture.
    expected_prompt = -(-len(prompt.encode("utf-8")) // 4) + model.prompt_special_tokens
    expected_output = min(
        max_tokens, expected_output_tokens if expected_output_tokens is not None else max_tokens
    )
    return {
        "model": model.name,
        "priority": priority,
        "unit": "micro_credit",
        "max_credits": credits_worst_case(
            rates=rates, prompt_tokens=bound, max_output_tokens=max_tokens
        ),
        "expected_credits": credits_for_usage(
            rates=rates, usage=Usage(input_tokens=expected_prompt, output_tokens=expected_output)
        ),
        "prompt_tokens_max": bound,
        "max_tokens": max_tokens,
    }


def _admitted_model(organization: Organization, model_name: str, priority: str) -> CatalogModel:
    """The request's model, once the organization may use it at that priority: the
    refusals job_submit and job_quote share, in this order (a suspended organization,
    the model, a priority outside the plan)."""
    if organization.standing == Standing.SUSPENDED:
        raise ApplicationError(
            code="subscription_past_due",
            message="Inference is suspended until the overdue invoice is paid.",
            status=402,
        )
    model = catalog_model_resolve(name=model_name, organization=organization)
    if priority not in PRIORITY_RANK:
        raise ApplicationError(
            code="invalid_request",
            message=f"priority must be one of {', '.join(PRIORITY_RANK)}.",
            param="priority",
        )
    if PRIORITY_RANK[priority] > PRIORITY_RANK.get(organization.max_priority, 1):
        raise ApplicationError(
            code="priority_not_in_plan",
            message=f"Your plan allows priority up to {organization.max_priority!r}.",
            status=403,
            param="priority",
        )
    return model


def _max_tokens(model, requested: int | None, *, param: str = "max_tokens") -> int:
    """The request's max_tokens, or the model's default (the catalog's default_max_tokens;
    blank: its max_output_tokens, which _within_context cuts to what the context leaves).

    Not a fixed 256 any more: that cut every answer left without max_tokens at 256
    tokens (finish_reason "length"), where OpenAI's runs to its end. The hold prices
    it, so a request without max_tokens holds up to max_output_tokens' worth."""
    default = min(model.default_max_tokens or model.max_output_tokens, model.max_output_tokens)
    max_tokens = requested or default
    if max_tokens > model.max_output_tokens:
        raise ApplicationError(
            code="invalid_request",
            message=f"{param} may be at most {model.max_output_tokens} for {model.name!r}.",
            param=param,
        )
    return max_tokens


def _within_context(
    model: CatalogModel,
    prompt: str,
    bound: int,
    max_tokens: int,
    *,
    requested: int | None,
    param: str | None = None,
) -> _Fit:
    """max_tokens, once the prompt and it fit the model's context (the catalog's context_limit)
    and the prompt fits the engine's own limit on prompts (max_input_tokens, when set); with
    the prompt's tokenizer count when it was taken (_Fit).

    Refused with 400 `context_length_exceeded` before anything is reserved,
    held or sent, as OpenAI refuses it: the catalog's limit holds even for
    an engine built for longer sequences. The prompt's byte count bounds its
    tokens (prompt_token_bound, with what the tokenizer and the engine add), so
    a prompt whose bound fits needs no tokenizer, which is every short
    request; a longer one is counted by the model's tokenizer (about a
    millisecond for 4 KB of English here). A max_tokens the client did not
    ask for (the default) is cut to what the context leaves, as OpenAI does.
    Without a tokenizer in the catalog the engine's own check decides, as
    before, and the default is max(limit - bound, 256), at most the default
    (256: the default before it was the output limit; the catalog's default
    when lower).
    """
    limit = model.context_limit
    prompt_limit = model.max_input_tokens
    if prompt_limit is not None and prompt_limit >= limit:
        prompt_limit = None  # the context is the tighter limit
    if bound + max_tokens <= limit and (prompt_limit is None or bound <= prompt_limit):
        return _Fit(max_tokens)
    if not model.tokenizer_file or _tokenizer(model.tokenizer_file) is None:
        if requested is None:
            # The default, cut to what the prompt's bound leaves, but never below the
            # old default (256, or the catalog's default below it): the bound counts
            # bytes, about four times an English prompt's tokens, so cutting by it alone
            # gave a 4,000-byte prompt (a quarter of a 4,096 context) 96 tokens, and one
            # past the context in bytes (the cut skipped) the whole output limit, which
            # then overflowed the context that 256 fitted. Non-increasing in the prompt:
            # a longer prompt never gets more.
            return _Fit(
                max(min(max_tokens, limit - bound), min(_OLD_DEFAULT_MAX_TOKENS, max_tokens))
            )
        return _Fit(max_tokens)  # nothing to count with: the engine decides
    # Tokenizing holds the GIL (about 1 ms per 4 KB, 0.5 s per MB here): a
    # prompt whose bytes alone prove it too long is refused uncounted, so no
    # request makes this process tokenize much more than its context.
    longest = _longest_token_bytes(model.tokenizer_file) * _NORMALIZER_SLACK
    at_least = -(-len(prompt.encode("utf-8")) // longest) + model.prompt_special_tokens
    if prompt_limit is not None and at_least > prompt_limit:
        raise _prompt_too_long(prompt_limit, param, at_least, exact=False)
    if at_least >= limit:
        raise _context_exceeded(limit, param, prompt_at_least=at_least)
    counted = prompt_tokens_count(model=model, prompt=prompt)  # the tokenizer is readable
    if prompt_limit is not None and counted > prompt_limit:
        raise _prompt_too_long(prompt_limit, param, counted, exact=True)
    if counted + max_tokens <= limit:
        return _Fit(max_tokens, counted)
    if requested is not None:
        raise _context_exceeded(limit, param, prompt=counted, completion=max_tokens)
    if counted < limit:
        return _Fit(limit - counted, counted)  # the default max_tokens, cut to what is left
    raise _context_exceeded(limit, param, prompt_at_least=counted)


def _prompt_too_long(prompt_limit: int, param: str | None, prompt: int, *, exact: bool):
    """The engine takes prompts of at most `prompt_limit` tokens; this one has more."""
    return ApplicationError(
        code="context_length_exceeded",
        message=(
            f"This model's maximum prompt length is {prompt_limit} tokens. However, your "
            f"prompt is {prompt} tokens{'' if exact else ' or more'}. Please shorten it."
        ),
        param=param,
    )


def _context_exceeded(
    limit: int,
    param: str | None,
    *,
    prompt: int | None = None,
    completion: int | None = None,
    prompt_at_least: int | None = None,
) -> ApplicationError:
    head = f"This model's maximum context length is {limit} tokens. However, "
    if prompt_at_least is not None:
        # A prompt that fills the context alone (max_tokens left out, or far
        # too long to be worth counting exactly).
        detail = f"your prompt is {prompt_at_least} tokens or more. Please shorten it."
    else:
        detail = (
            f"you requested {prompt + completion} tokens ({prompt} in the prompt, {completion} "
            "for the completion). Please reduce the length of the prompt or max_tokens."
        )
    return ApplicationError(code="context_length_exceeded", message=head + detail, param=param)


def job_submit(
    *,
    organization: Organization,
    api_key: ApiKey | None,
    model_name: str,
    prompt: str | Callable[[CatalogModel], str],
    params: SubmitParams,
    user: User | None = None,
    priority: str = Priority.STANDARD,
    kind: str = "chat",
    stream: bool = False,
    callback_url: str = "",
    request_count: RequestCount | None = None,
    hold_durable: bool = True,
    prompt_field: str | None = None,
) -> Job:
    """Hold the worst case, write the Job, enqueue it after commit.

    `prompt` is the text, or a function that renders it for the resolved
    model (a chat template), called once the model has passed every check.
    `api_key` or `user`: who sent it, recorded on the job (a key's request, or
    a member's through the dashboard's session; see Job.user).
    `request_count`: the API request's own count against its requests-per-
    minute limits, taken in the same Redis script as the job's tokens and
    slot (accounts.ratelimits).
    `prompt_field`: the body field the prompt came in ("messages",
    "prompt"), which a context error names.
    `hold_durable=False`: the caller answers only after the job settles, so
    the hold's commit need not wait for the disk (metering's hold_place:
    the settlement's durable commit makes it durable before any answer).
    """
    model = _admitted_model(organization, model_name, priority)
    if callable(prompt):
        prompt = prompt(model)
    max_tokens = _max_tokens(model, params.max_tokens, param=params.max_tokens_param)
    bound = prompt_token_bound(prompt, model=model)
    fit = _within_context(
        model,
        prompt,
        bound,
        max_tokens,
        requested=params.max_tokens,
        param=prompt_field,
    )
    price = model_price(model_name=model.name)
    # Cut before the hold is priced: the reservation, the hold and the engine all take
    # this one max_tokens.
    max_tokens, reserved_tokens = _within_rate_limit(
        organization,
        model,
        prompt,
        bound,
        fit.max_tokens,
        requested=params.max_tokens,
        param=params.max_tokens_param,
        prompt_field=prompt_field,
        counted=fit.prompt_tokens,
    )
    hold_amount = credits_worst_case(
        rates=Rates.of(price, priority), prompt_tokens=bound, max_output_tokens=max_tokens
    )
    public_id = f"job_{secrets.token_urlsafe(18)}"

    # Redis reservations first (reserved_tokens, above): cheap to refuse, and undone if
    # the hold fails.
    # The minute they count in, which the unused ones go back to (_release_reservations).
    reserved_at = time.time()
    # The tokens and a concurrency slot (and the request's own count) in one
    # script: all or nothing.
    rate_limit_consume(
        kind="tokens",
        limits=_limits(organization),
        cost=reserved_tokens,
        slot=Slot(
            scope=f"org:{organization.pk}", limit=organization.concurrent_jobs, job_id=public_id
        ),
        request=request_count,
        now=reserved_at,
    )
    job = Job(
        public_id=public_id,
        organization=organization,
        api_key=api_key,
        user=user,
        model=model,
        model_price=price,
        priority=priority,
        kind=kind,
        stream=stream,
        params={
            "max_tokens": max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            # A seed drawn per job when the client gave none: the engine's default
            # is a constant (TensorRT-LLM's, the development engine's 0), so the same
            # prompt sampled at a temperature above 0 would answer the same text every
            # time, which OpenAI's does not. Kept on the job, so a run can be replayed;
            # in the API's own range, so a client could send it back as its seed.
            "seed": params.seed if params.seed is not None else secrets.randbits(63),
            "presence_penalty": params.presence_penalty,
            "frequency_penalty": params.frequency_penalty,
            "stop": list(params.stop),
            "reserved_tokens": reserved_tokens,
            "reserved_at": reserved_at,
        },
        prompt=prompt if organization.store_prompts else "",
        callback_url=callback_url,
        hold_amount=hold_amount,
    )
    try:
        # What the engine call needs, read now (the server pool from the
        # catalog's cache): nothing that can fail may run between the hold's
        # commit and the task's dispatch, or the job would stay queued with
        # its hold (a dispatch that fails cancels it: _job_publish).
        spec = job_engine_spec(job)
        # The Job row is written by the hold's own statement, and only if the
        # hold is placed (hold_place's `row`): with no transaction open that
        # one statement commits both, so the organization's wallet is locked
        # for it alone, not across BEGIN, an INSERT and a COMMIT round trip
        # (every other request of the organization waits for that lock).
        hold_place(
            organization=organization,
            amount=hold_amount,
            key=public_id,
            new_key=True,
            row=job,
            durable=hold_durable,
        )
    except Exception as exc:
        concurrency_release(scope=f"org:{organization.pk}", job_id=public_id)
        rate_limit_refund(
            kind="tokens",
            limits=_limits(organization),
            amount=reserved_tokens,
            counted_at=reserved_at,
        )
        if (
            isinstance(exc, ApplicationError)
            and exc.code == "insufficient_credits"
            and params.max_tokens is None
        ):
            # The hold priced the default max_tokens, which the client may not know
            # of: a lower max_tokens may fit what is available.
            raise ApplicationError(
                code=exc.code,
                message=f"{exc.message} This request left {params.max_tokens_param} out, "
                f"so it holds credits for {max_tokens} output tokens, the default it was given; "
                f"a lower {params.max_tokens_param} holds less.",
                status=exc.status,
                param=params.max_tokens_param,
                extra=exc.extra,
            ) from exc
        raise
    # After commit: at once when no transaction is open, else when the
    # caller's commits.
    transaction.on_commit(lambda: _job_publish(job, prompt, spec))
    return job


def _job_publish(job: Job, prompt: str, spec: dict) -> None:
    """Send the job's task message; a job whose message could not be sent is cancelled.

    The prompt travels in the task message, not the database, unless the
    organization opted in to storing it. Not in the message's description
    either: Celery would put a repr of the arguments in its headers
    (argsrepr), which monitoring and task events show. With it, what the
    engine call needs (job_engine_spec), so a worker can send it to the
    engine before it marks the job running: in a header of its own, not an
    argument, so that a worker of a release whose task takes two arguments
    still runs the message (it ignores the header and starts the job first):
    the API and the workers may be deployed in either order. Sent as
    apply_async would send it, for less CPU (gymbilling.broker).

    Should the broker not take it, the job is settled as cancelled while
    queued (its hold and its reservations released, nothing billed) instead
    of waiting, queued and holding, for its hold to expire, and the caller
    gets engine_unavailable (503). A message that reached the broker all the
    same (its answer lost) then finds the job ended and is never run.
    """
    from inference.tasks import job_run

    try:
        task_publish(
            job_run,
            args=[job.pk, prompt],
            queue=f"inference.{job.priority}",
            # The worker reads the message's age from `sent_at` (tasks.py).
            headers={ENGINE_SPEC_HEADER: spec | {"sent_at": time.time()}},
            argsrepr=f"({job.pk}, <prompt: {len(prompt)} characters>)",
            kwargsrepr="{}",
        )
    except Exception:
        logger.exception("job %s: its task message could not be sent; cancelling it", job)
        cancelled = None
        try:
            # The cancel key too: a message the broker took although its
            # answer was lost may have reached a worker that started the job.
            cancelled = job_cancel(job=job)
        except Exception:
            # The hold then expires, and the job with it (job expiry).
            logger.exception("job %s: could not cancel the job whose message was not sent", job)
        unqueued = (
            cancelled is not None
            and cancelled.status == JobStatus.CANCELED
            and cancelled.credits_charged == 0
        )
        if unqueued:
            message = "The job could not be queued; nothing was charged. Retry shortly."
        elif cancelled is not None and (
            cancelled.status == JobStatus.CANCELED
            or (cancelled.status in NON_TERMINAL and cancelled.stop_requested)
        ):
            message = (
                f"The job could not be confirmed as queued, and was cancelled; if a worker had "
                f"started it, it is charged only for what it served: see GET /api/v1/jobs/"
                f"{job.public_id} before you retry."
            )
        else:
            # Neither ended cancelled nor its worker told to stop: saying
            # "cancelled" would be untrue of a job that may still run and bill.
            message = (
                f"The job could not be confirmed as queued, and could not be cancelled: a worker "
                f"may run it and charge for what it serves: see GET /api/v1/jobs/"
                f"{job.public_id} before you retry."
            )
        raise ApplicationError(
            code="engine_unavailable",
            message=message,
            status=503,
            extra={"job_id": job.public_id},
            # A job a worker may have started keeps the Idempotency-Key: a
            # retry under it must not run (and charge) a second one.
            took_effect=not unqueued,
        ) from None


# The task message header that carries job_engine_spec.
ENGINE_SPEC_HEADER = "gym_engine_spec"


def job_engine_spec(job: Job) -> dict:
    """What a worker needs to send a job to the engine, without reading its row or the catalog.

    Travels in the job's task message (JSON, in its ENGINE_SPEC_HEADER
    header), with the `sent_at` time the sender stamps on it;
    `job_from_engine_spec` reads it back. `pools`: the servers of each pool
    the catalog names as the job is queued, in order (pools_for_job), and
    `metrics` each pool's metrics urls (for routing by load; a message
    without them routes by the worker's own counts); inference.tasks uses
    them only for a message delivered within ENGINE_FIRST_WITHIN_S.
    `reader`: the sender's SSE response renews the job's reader marker
    (inference.relay), so its worker may cancel the job once it lapses; a
    message from a web process of a release before it says nothing, and its
    stream is never cancelled for want of a marker that process never writes.
    """
    pools = pools_for_job(job=job)
    return {
        "pools": [list(pool.grpc_urls) for pool in pools],
        "metrics": [list(pool.metrics_urls) for pool in pools],
        "triton_model": job.model.triton_model,
        "id": job.public_id,
        "kind": job.kind,
        "stream": job.stream,
        "reader": job.stream,
        "params": job.params,
    }


@dataclass(frozen=True)
class EngineJob:
    """The part of a job the engine call reads (a Job has the same attributes)."""

    pk: int
    public_id: str
    kind: str
    stream: bool
    params: dict


def job_from_engine_spec(job_pk: int, spec: dict) -> EngineJob:
    """What `job_engine_spec` carried, for the engine call before the job's row is read.

    Not a Job instance: building a model instance (about 30 µs here) would sit
    between the message's arrival and the engine's first byte.
    """
    return EngineJob(
        pk=job_pk,
        public_id=spec["id"],
        kind=spec["kind"],
        stream=spec["stream"],
        params=spec["params"],
    )


# A job is started only while its hold (keyed by its public id) is pending and
# will outlive the longest run and its settlement (the start margin: at least
# JOB_START_MARGIN, and at least two runs, since a run lasts at most half of
# it: job_run_limit): a job started as its hold expired would be expired under
# its running worker (job_expire_for_hold), and its settlement, finding it
# ended, would bill nothing for what it served. Such a job, a backlog's or one
# whose message came back late (a dead worker's, after the broker's
# visibility timeout), is left to its hold's expiry instead: it ends expired,
# nothing charged.
JOB_START_MARGIN = timedelta(minutes=10)


def job_run_limit() -> float:
    """Seconds a job may run before the worker ends it (failed, `job_deadline_exceeded`,
    billed as a cancelled job: tasks._past_deadline): INFERENCE_JOB_DEADLINE_SECONDS, at
    most a quarter of the hold's life (METERING_HOLD_TTL).

    A job starts with at least two runs left on its hold (job_start_margin);
    running at most one, it leaves the other for its settlement (tried again
    while the database fails: tasks.SETTLE_RETRY_PAUSES_S) before the hold can
    expire under it. Without a limit a job's worker waited as long as its
    engine kept talking: Triton's timeouts count silence, and max_tokens bounds
    tokens, not time. The limit ends the request as a cancellation does: the
    worker is free and the job settled, though through an ensemble the engine
    runs on.
    """
    return min(
        settings.INFERENCE_JOB_DEADLINE_SECONDS, settings.METERING_HOLD_TTL.total_seconds() / 4
    )


def job_start_margin() -> timedelta:
    """The least life a job's hold must have left for the job to start: JOB_START_MARGIN or
    two runs (job_run_limit), whichever is longer, and at most half the hold's life, so that
    a fresh job always starts (a short hold TTL is a deployment of short jobs)."""
    runs = timedelta(seconds=2 * job_run_limit())
    return min(max(JOB_START_MARGIN, runs), settings.METERING_HOLD_TTL / 2)


# Loads the job and marks it running in one round trip, if its hold allows
# (above). A job already running is a redelivery of a task whose worker died:
# it runs again (its first start time is kept, for reports; its run's start
# is this one, which the orphaned jobs' sweep measures its grace from), and
# the settlement still happens once (job_settle).
_START = """
UPDATE inference_job
   SET status = %(running)s,
       started_at = CASE WHEN status = %(queued)s THEN %(now)s ELSE started_at END,
       run_started_at = %(now)s
 WHERE id = %(pk)s AND status IN (%(queued)s, %(running)s)
   AND (%(public_id)s IS NULL OR public_id = %(public_id)s)
   AND EXISTS (SELECT 1 FROM metering_hold h
                WHERE h.key = inference_job.public_id AND h.status = %(pending)s
                  AND h.expires_at > %(start_by)s)
RETURNING *
"""


# The same, prepared (accounts.sql) on PostgreSQL: the ORM's raw() machinery
# around it was about 10% of the worker's CPU per job.
@functools.cache
def _start_prepared() -> str:
    return f"""
UPDATE inference_job
   SET status = %(running)s::varchar,
       started_at = CASE WHEN status = %(queued)s::varchar THEN %(now)s::timestamptz
                         ELSE started_at END,
       run_started_at = %(now)s::timestamptz
 WHERE id = %(pk)s::bigint AND status IN (%(queued)s::varchar, %(running)s::varchar)
   AND (%(public_id)s::text IS NULL OR public_id = %(public_id)s::text)
   AND EXISTS (SELECT 1 FROM metering_hold h
                WHERE h.key = inference_job.public_id AND h.status = %(pending)s::varchar
                  AND h.expires_at > %(start_by)s::timestamptz)
RETURNING {sql.columns(Job)}
"""


def job_start(*, job_pk: int, public_id: str | None = None) -> Job | None:
    """Mark a queued (or redelivered running) job running and return it; None if it ended,
    or if its hold expires too soon for it to run and settle (job_start_margin).

    The job returned says whether it was running already (`restarted`).

    `public_id` (the task message's engine spec carries it): only the job of
    that id. A primary key alone may not name the job the message was sent
    for: a hold placed without waiting for the WAL flush (hold_place's
    durable=False) is lost with its job's row in a database crash, and the
    row's primary key with it, which the sequence may then give to another
    organization's job while the lost job's message is still queued.
    """
    now = timezone.now()
    params = {
        "pk": job_pk,
        "public_id": public_id,
        "now": now,
        "queued": JobStatus.QUEUED,
        "running": JobStatus.RUNNING,
        "pending": HoldStatus.PENDING,
        "start_by": now + job_start_margin(),
    }
    if not sql.available():
        job = next(iter(Job.objects.raw(_START, params)), None)
    else:
        row = sql.execute(_start_prepared(), params)
        job = sql.from_row(Job, row) if row is not None else None
    if job is not None:
        # Started before (it keeps its first start time): a task run again
        # after its worker died, which may have been cancelled meanwhile.
        job.restarted = job.started_at != params["now"]
    return job


def job_start_refusal(*, public_id: str) -> tuple[int, str]:
    """Why job_start refused an open job, for its worker's log: (logging level, message).

    A late message (a backlog, a dead worker's handed back) is worth a
    warning. A hold placed for not much more than this process's start margin
    (under a minute more) is a deployment whose web app and workers read
    different settings: hardly any job can start, so it is an error that says
    what to fix. Read only on that path, never on a job that starts.
    """
    hold = Hold.objects.filter(key=public_id).values("status", "created_at", "expires_at").first()
    if hold is None or hold["status"] != HoldStatus.PENDING:
        status = hold["status"] if hold is not None else "missing"
        return logging.WARNING, f"its hold is {status}"
    margin = job_start_margin().total_seconds()
    life = (hold["expires_at"] - hold["created_at"]).total_seconds()
    if life < margin + 60:
        return logging.ERROR, (
            f"its hold was placed for {life:.0f} s, and this worker starts a job only with "
            f"{margin:.0f} s of its hold left: jobs cannot start. The web app that placed it "
            "and this worker read different METERING_HOLD_TTL_SECONDS or "
            "INFERENCE_JOB_DEADLINE_SECONDS; give every process the same"
        )
    left = (hold["expires_at"] - timezone.now()).total_seconds()
    return logging.WARNING, (
        f"its hold expires in {left:.0f} s, within the start margin ({margin:.0f} s) a run "
        "and its settlement may take"
    )


def serving_cost(*, engine_ms: int, gpu_hour_cost: int, tensor_parallel: int) -> int:
    """What the engine time cost, in minor units, rounded up (a cost is never understated)."""
    exact = Decimal(engine_ms) * gpu_hour_cost * tensor_parallel / Decimal(3_600_000)
    return int(exact.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True)
class Outcome:
    """What the engine really served, whatever happened."""

    text: str = ""
    input_tokens: int = 0
    cached_input_tokens: int = 0
    output_tokens: int = 0
    engine_ms: int = 0
    finish_reason: str = ""
    error_code: str = ""
    error_message: str = ""
    first_token_at: datetime | None = None  # when the first streamed token arrived
    input_tokens_source: str = InputTokensSource.NONE


def job_settle(
    *,
    job: Job,
    outcome: Outcome,
    status: str,
    only_from: tuple[str, ...] | None = None,
    pipe=None,
    retried: bool = False,
) -> Job:
    """Capture the credits for the tokens really served, once; release the rest.

    Runs in one transaction: the capture, the usage record and the job row
    commit together or not at all, so a worker that dies here is simply run
    again, and the hold (keyed by the job id) still settles exactly once.
    From a worker (no transaction open) on the ledger's fast path, that
    transaction is one statement (migrations 0004 and 0010, `inference_job_settle`).
    With `only_from`, a job whose status (under the lock) is not one of those
    is left alone and returned as it is. The token and concurrency
    reservations are released after the commit, on `pipe` (a Redis pipeline
    the caller sends) when given. The job returned carries
    `wallet_balance_after` when the settlement learnt it (else None), and
    `settled_here`: whether this call's conditional UPDATE ended it (False:
    another settlement did, or it was not in `only_from`), for what must follow
    the one settlement only once.

    `retried`: an earlier call for this job raised (the database failed under
    it), so it may have committed and lost only its answer, with nothing
    released. A call that then finds the job ended releases its reservations
    all the same, for the tokens its row says were used: else its slot stayed
    taken until concurrency_slots_sweep (5 minutes) and its refund was lost.
    Twice is harmless: a slot is freed by its job id, and a job's refund is
    given once (_release_reservations).
    """
    served = outcome.input_tokens or outcome.output_tokens
    rates = Rates.of(job.model_price, job.priority)
    charge = 0
    if served:
        charge = credits_for_usage(
            rates=rates,
            usage=Usage(
                input_tokens=outcome.input_tokens,
                output_tokens=outcome.output_tokens,
                cached_input_tokens=min(outcome.cached_input_tokens, outcome.input_tokens),
            ),
        )
        # The hold is the worst case by construction; never take more.
        charge = min(charge, job.hold_amount)
    cost = serving_cost(
        engine_ms=outcome.engine_ms,
        gpu_hour_cost=job.model.gpu_hour_cost,
        tensor_parallel=job.model.tensor_parallel,
    )
    written = {
        "status": status,
        "finished_at": timezone.now(),
        "input_tokens": outcome.input_tokens,
        "cached_input_tokens": outcome.cached_input_tokens,
        "output_tokens": outcome.output_tokens,
        "input_tokens_source": outcome.input_tokens_source,
        "engine_ms": outcome.engine_ms,
        "credits_charged": charge,
        "serving_cost": cost,
        "finish_reason": outcome.finish_reason,
        "error_code": outcome.error_code,
        "error_message": _storable(outcome.error_message[:500]),
        "output": _storable(outcome.text) if not job.stream and job.kind == "async" else "",
    }
    claimable = NON_TERMINAL if only_from is None else [s for s in only_from if s in NON_TERMINAL]
    # The usage record is written with the settlement (on the fast path in
    # the same statement): one round trip less under the wallet's lock.
    record = UsageDraft(
        organization_id=job.organization_id,
        job_id=job.public_id,
        model_name=job.model.name,
        priority=job.priority,
        usage=Usage(
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            cached_input_tokens=min(outcome.cached_input_tokens, outcome.input_tokens),
        ),
        credits=charge,
        api_key_id=job.api_key_id,
        user_id=job.user_id,
        model_price=job.model_price,
        engine_busy_ms=outcome.engine_ms,
        serving_cost=cost,
        currency=job.model.currency,
    )
    claim = _Claim(
        job=job,
        written=written,
        first_token_at=outcome.first_token_at,
        only=claimable,
        captured=charge if served else None,
        record=record,
    )
    settled = _settle_in_one_call(claim) if _settles_in_one_call(job) else None
    if settled is None:
        settled = _settle_in_transaction(claim, status=status)
    claimed, hold = settled
    if not claimed:
        current = Job.objects.get(pk=job.pk)
        current.settled_here = False
        if retried and current.status not in NON_TERMINAL:
            _release_reservations(
                job=current,
                used_tokens=current.input_tokens + current.output_tokens,
                pipe=pipe,
            )
        return current
    _release_reservations(
        job=job, used_tokens=outcome.input_tokens + outcome.output_tokens, pipe=pipe
    )
    job.wallet_balance_after = getattr(hold, "wallet_balance_after", None)
    job.settled_here = True
    # The row now holds exactly what was written: set it on the object rather
    # than read it back, which would also drop the related rows loaded with it.
    for name, value in written.items():
        setattr(job, name, value)
    if outcome.first_token_at is not None and job.first_token_at is None:
        job.first_token_at = outcome.first_token_at
    return job


def _storable(text: str) -> str:
    """`text` as PostgreSQL's text stores it: a NUL, or a lone surrogate, made U+FFFD.

    The engine's text comes without NULs (triton.engine_text, which the web
    processes do not import: it brings gRPC), but an error's message may
    quote anything; one PostgreSQL refused (DataError, which the worker does
    not try again) would leave its job unsettled, its hold locked, its
    tokens unbilled until the hold expired.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)
    return text


def _settles_in_one_call(job: Job) -> bool:
    # From a worker (no transaction open), on the ledger's fast path. A job
    # with a webhook writes its outbox row in the settlement's transaction.
    return fastpath.enabled() and not connection.in_atomic_block and not job.callback_url


@dataclass(frozen=True)
class _Claim:
    """One settlement of a job: its claim (the row's end) and its hold's."""

    job: Job
    written: dict  # the job's columns the claim writes
    first_token_at: datetime | None
    only: list[str]  # the states it may end from
    captured: int | None  # None: the hold is released
    record: UsageDraft


def _settle_in_one_call(claim: _Claim):
    """The claim and the hold's settlement in one statement (migration 0004), its own transaction.

    (claimed, hold) as `_settle_in_transaction` returns them, or None when the
    settlement is not the fast path's: nothing was written, and the caller
    runs the transaction instead.
    """
    params = {f"j_{name}": value for name, value in claim.written.items()}
    params |= {
        "j_first_token_at": claim.first_token_at,
        "pk": claim.job.pk,
        "only": list(claim.only),
    }
    params |= hold_settle_params(
        key=claim.job.public_id, captured=claim.captured, usage=claim.record
    )
    try:
        with fastpath.lots_short_raised():
            row = sql.execute(_SETTLE_IN_ONE_CALL, params)
    except DatabaseError as exc:
        if getattr(exc.__cause__, "sqlstate", None) == _NEEDS_TRANSACTION:
            return None
        raise
    claimed, *result = row
    return (True, fastpath.hold_from_result(result)) if claimed else (False, None)


# SQLSTATE of inference_job_settle when the settlement is not the fast path's.
_NEEDS_TRANSACTION = "GYM03"

_JOB_ARGS = (
    ("status", "text"),
    ("finished_at", "timestamptz"),
    ("input_tokens", "integer"),
    ("cached_input_tokens", "integer"),
    ("output_tokens", "integer"),
    ("input_tokens_source", "text"),
    ("engine_ms", "integer"),
    ("credits_charged", "bigint"),
    ("serving_cost", "bigint"),
    ("finish_reason", "text"),
    ("error_code", "text"),
    ("error_message", "text"),
    ("output", "text"),
    ("first_token_at", "timestamptz"),
)
_SETTLE_IN_ONE_CALL = f"""
SELECT s.o_claimed, {fastpath.HOLD_RESULT}
  FROM inference_job_settle(
           %(pk)s::bigint, %(only)s::text[],
           {", ".join(f"%(j_{name})s::{cast}" for name, cast in _JOB_ARGS)},
           {fastpath.SETTLE_ARGS}
       ) s
"""


def _settle_in_transaction(claim: _Claim, *, status: str):
    """The claim, the webhook's outbox row and the hold's settlement in one transaction.

    (True, the settled hold), or (False, None) when the job was not claimed.
    """
    job, first_token_at = claim.job, claim.first_token_at
    with transaction.atomic():
        # The claim: one UPDATE takes the job's row lock and writes its end,
        # only if it has not ended (an earlier delivery of the task settled
        # it) and, with `only_from`, only from those states. Whoever claims it
        # is the one settlement; the hold is locked after it, as before.
        if sql.available():
            claimed = _claim(
                pk=job.pk, written=claim.written, first_token_at=first_token_at, only=claim.only
            )
        else:
            update = dict(claim.written)
            if first_token_at is not None:
                update["first_token_at"] = Coalesce(F("first_token_at"), Value(first_token_at))
            claimed = Job.objects.filter(pk=job.pk, status__in=claim.only).update(**update)
        if not claimed:
            return False, None
        # Its webhook, if asked for, in the same transaction (an outbox row),
        # before the hold: its queries need not wait under the wallet's lock.
        job_callback_record(job=job, status=status)
        if claim.captured is not None:
            return True, hold_capture(key=job.public_id, amount=claim.captured, usage=claim.record)
        return True, hold_release(key=job.public_id, usage=claim.record)


@functools.cache
def _claim_sql(names: tuple[str, ...]) -> str:
    fields = [Job._meta.get_field(name) for name in names]
    sets = ",\n       ".join(f"{f.column} = %({f.name})s::{sql.cast_type(f)}" for f in fields)
    return f"""
UPDATE inference_job
   SET {sets},
       first_token_at = COALESCE(first_token_at, %(first_token_at)s::timestamptz)
 WHERE id = %(pk)s::bigint AND status = ANY(%(only)s::varchar[])
"""


def _claim(*, pk: int, written: dict, first_token_at: datetime | None, only: list[str]) -> int:
    """job_settle's claim as a prepared statement (accounts.sql): 1 if claimed, else 0.

    The ORM's UPDATE cost the worker about 11% of its CPU per job to build.
    """
    params = {**written, "first_token_at": first_token_at, "pk": pk, "only": list(only)}
    return sql.execute(_claim_sql(tuple(written)), params, fetch="count")


def _release_reservations(*, job: Job, used_tokens: int, pipe=None) -> None:
    """Free the settled job's concurrency slot and refund its unused token reservation.

    Queued on `pipe` when given (a worker sends them with the final event).
    Without it (a queued job's cancel) they are sent now, each best effort:
    the settlement has committed, and a Redis failure raised from here would
    make a cancel that took effect look failed (POST /api/v1/jobs/{id}/cancel
    a 500; a job whose message was not sent, a 503 that says a worker may
    still run it). A slot left taken is freed by concurrency_slots_sweep (its
    job is no longer open); a refund lost leaves the tokens counted until
    their minute ends.
    """
    scope = f"org:{job.organization_id}"
    reserved = int(job.params.get("reserved_tokens", 0))
    releases = (
        functools.partial(concurrency_release, scope=scope, job_id=job.public_id),
        # A refund reads only the scope of a limit, not its size; it goes back
        # to the minute the tokens were reserved in (a job queued before
        # reserved_at was recorded: the current one, as before), once for the
        # job however often its reservations are released (job_settle's `retried`).
        functools.partial(
            rate_limit_refund,
            kind="tokens",
            limits=[Limit(scope=scope, limit=0)],
            amount=max(0, reserved - used_tokens),
            counted_at=job.params.get("reserved_at"),
            once_for=job.public_id,
        ),
    )
    for release in releases:
        if pipe is not None:
            release(pipe=pipe)
            continue
        try:
            release()
        except RedisError as exc:
            logger.warning(
                "job %s: settled, but its reservations could not be released (%r); "
                "concurrency_slots_sweep frees its slot",
                job.public_id,
                exc,
            )


# A slot whose job has no open row this long after it was taken lost its job:
# the request died between its reservation and its hold's commit, a database
# crash took an unflushed hold with its row, or the release after a
# settlement went down with its worker. Nothing bounds how long a live
# request may take between the two (a wallet lock held, the database
# stalled), so the grace is long enough that one that slow is an outage; the
# cost of being wrong is one job run beyond the organization's concurrency,
# never money. It also covers clock skew between the API hosts (the slot's
# time) and the one running the sweep.
SLOT_SWEEP_GRACE_SECONDS = 300


def concurrency_slots_sweep(*, now: float | None = None) -> int:
    """Frees the concurrency slots whose job is not open (queued or running); returns how many.

    Without it such a slot counts against its organization's concurrent jobs
    until its lease ends (accounts.ratelimits.slot_lease_seconds: a hold's life).
    Run every minute by Celery beat. A slot younger than
    SLOT_SWEEP_GRACE_SECONDS (5 minutes) is left alone: its job's row may not
    be committed yet.
    """
    now = time.time() if now is None else now
    taken = list(concurrency_slots_taken(before=now - SLOT_SWEEP_GRACE_SECONDS))
    # One query for every scope's jobs, one round trip for every release.
    open_ids = set(
        Job.objects.filter(
            public_id__in=[job_id for _scope, job_ids in taken for job_id in job_ids],
            status__in=NON_TERMINAL,
        ).values_list("public_id", flat=True)
    )
    lost = [
        (scope, job_id) for scope, job_ids in taken for job_id in job_ids if job_id not in open_ids
    ]
    if lost:
        with get_redis().pipeline(transaction=False) as pipe:
            for scope, job_id in lost:
                concurrency_release(scope=scope, job_id=job_id, pipe=pipe)
            pipe.execute()
        logger.warning(
            "freed %d concurrency slot(s) whose job is over or lost: %s",
            len(lost),
            ", ".join(f"{scope}/{job_id}" for scope, job_id in lost),
        )
    return len(lost)


def job_expire_for_hold(*, key: str) -> Job | None:
    """End the job whose hold expired: `expired`, nothing charged. None if no open job had it.

    The ledger released the hold (metering's `holds_expire`, sent on by the
    `hold_expired` signal) because it stayed pending past its expiry: the
    job's worker vanished, or its message was lost, so nothing was billed and
    nothing can be any more. The job ends with the state GET shows and, if
    it asked for one, a `job.expired` webhook; its final event is relayed as
    every other ending's is, so a stream or answer waiting on it ends now, not
    at its own timeout. A worker that still finishes it later finds it ended
    and writes nothing (job_settle's claim).
    """
    now = timezone.now()
    with transaction.atomic():
        job = Job.objects.select_for_update().filter(public_id=key, status__in=NON_TERMINAL).first()
        if job is None:
            return None
        job.status = JobStatus.EXPIRED
        job.finished_at = now
        job.error_code = "job_expired"
        job.error_message = (
            "The job did not finish before its credit hold expired (its worker was lost); "
            "nothing was charged."
        )
        job.save(update_fields=["status", "finished_at", "error_code", "error_message"])
        job_callback_record(job=job, status=JobStatus.EXPIRED)
    # Once it committed (the hold's sweep runs this inside the release's
    # transaction), and best effort: a slot Redis did not free is freed by
    # concurrency_slots_sweep, and a Redis outage must not hold the release up.
    transaction.on_commit(
        functools.partial(
            concurrency_release, scope=f"org:{job.organization_id}", job_id=job.public_id
        ),
        robust=True,
    )
    # Its text not known here (what a stream relayed is already in it), as the
    # row's own final event says it (selectors.job_ended_final_event).
    transaction.on_commit(
        functools.partial(_final_event_send, job, text=None, finish_reason=job.finish_reason),
        robust=True,
    )
    return job


def job_cancel(*, job: Job, origin: str = CancelOrigin.CLIENT) -> Job:
    """Release a job not started yet at once; ask the worker of a started one to stop.

    `origin` (a CancelOrigin: the client's unless the gateway timed out) tells the
    worker who asked, which decides what a job stopped before its first token
    bills: the gateway's own timeout, nothing (inference.tasks). A queued job
    is released unbilled either way.

    A running job is stopped by its worker (it polls for the cancellation, see
    inference.relay) within a fraction of a second, and settles for what the
    engine delivered until then; the job returned here may still be running,
    and says whether its worker was asked (`stop_requested`: False when Redis
    failed). A job that already ended is returned as it ended: a cancel that
    lost the race with its end changes nothing, and leaves no cancellation
    behind.

    The database first: a queued job is settled there whatever Redis does
    (Redis failing, the job would stay queued, holding its credits and its
    concurrency slot until its hold expired, and a worker could still run it
    for nobody and bill it). Then the cancel key, for a worker that started
    it meanwhile (or that the job's message reached though the broker's
    answer was lost); a Redis failure there is logged, not raised, so that
    the release stands.
    """
    if job.status not in NON_TERMINAL:
        return job
    try:
        if job.status == JobStatus.QUEUED:
            job = _cancel_if_queued(job)
    finally:
        # Even when the database failed: a worker may have started the job.
        job.stop_requested = _stop_request(job, origin)
    return job


def _stop_request(job: Job, origin: str) -> bool:
    """Ask the job's worker to stop (relay_cancel); whether it could be asked."""
    from inference.relay import relay_cancel

    try:
        relay_cancel(job.public_id, origin=origin)
    except RedisError:
        logger.exception("job %s: its worker could not be asked to stop", job.public_id)
        return False
    return True


def _cancel_if_queued(job: Job) -> Job:
    """Settle the job as cancelled, nothing billed, if it is still queued under the lock: a
    worker that started it meanwhile owns the settlement, and bills what the engine took.

    Its final event is then sent as its worker would have sent it: a request
    waiting for the job's answer (POST /v1/chat/completions) answers at once,
    where it waited for its whole timeout and then said the model did not
    answer in time. Only by the cancel whose claim ended the job: two cancels
    that both read it queued each get here, and the one that found it
    cancelled already sends nothing, so the stream holds one final event.
    """
    outcome = Outcome(finish_reason="cancelled")
    job = job_settle(
        job=job, outcome=outcome, status=JobStatus.CANCELED, only_from=(JobStatus.QUEUED,)
    )
    if job.settled_here:
        _final_event_send(job, text=outcome.text, finish_reason=outcome.finish_reason)
    return job


def _final_event_send(job: Job, *, text: str | None, finish_reason: str) -> None:
    """Relay the settled job's final event, best effort: the settlement has committed, and a
    failure raised from here would make a cancel that took effect look failed. A waiting
    request that misses it reads the job's end from its row once its wait ends."""
    from inference.relay import relay_publish

    try:
        relay_publish(job.public_id, job_final_event(job, text=text, finish_reason=finish_reason))
    except (RedisError, DatabaseError) as exc:
        logger.warning("job %s: ended, but its final event could not be sent (%r)", job, exc)
