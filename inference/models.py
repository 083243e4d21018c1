"""Credits out: the model catalog, Triton server pools, and jobs."""

from __future__ import annotations

import re
from datetime import date

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q
from django.db.models.functions import Coalesce
from django.template import TemplateDoesNotExist, TemplateSyntaxError

from accounts.models import Priority
from inference.chat_templates import chat_template_render
from metering.models import unique_not_like_indexed

# host:port, the host a name (letters, digits, '.', '-', '_'), an IPv4
# address or a bracketed IPv6 one ([::1]:8001), the port 1-65535 in ASCII digits (`\d`
# takes any script's, which int() reads but no gRPC client does). fullmatch: `$` would let
# a trailing newline through.
_GRPC_ADDRESS = re.compile(r"(?:[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\]):([0-9]{1,5})")


def _grpc_address_ok(url) -> bool:
    match = isinstance(url, str) and _GRPC_ADDRESS.fullmatch(url)
    return bool(match) and 1 <= int(match[1]) <= 65535


class ServerPool(models.Model):
    """Triton servers that serve the same models; jobs go to the least busy ready one."""

    name = models.SlugField(max_length=64, unique=True)
    grpc_urls = models.JSONField(default=list, help_text='gRPC addresses, e.g. ["triton-0:8001"]')
    metrics_urls = models.JSONField(
        default=list,
        blank=True,
        help_text="Optional: each server's Prometheus metrics url, in the order of the gRPC "
        'addresses, e.g. ["http://triton-0:8002/metrics"]. With them, jobs go to the server '
        "holding the fewest requests from every client, not only from the worker sending "
        "the job.",
    )

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        errors = {}
        urls = self.grpc_urls
        if not isinstance(urls, list) or not urls:
            errors["grpc_urls"] = "A list of at least one gRPC address (host:port)."
        elif not all(_grpc_address_ok(url) for url in urls):
            errors["grpc_urls"] = (
                "Each gRPC address is host:port (port 1-65535, an IPv6 host in brackets), "
                "without a scheme."
            )
        if self.metrics_urls is None:  # the admin's empty field: none
            self.metrics_urls = []
        metrics = self.metrics_urls
        if not isinstance(metrics, list) or not all(
            isinstance(url, str) and url.startswith(("http://", "https://")) for url in metrics
        ):
            errors["metrics_urls"] = "A list of http(s) urls."
        elif metrics and isinstance(urls, list) and len(metrics) != len(urls):
            errors["metrics_urls"] = (
                f"One metrics url per gRPC address ({len(urls)}), in the same order, or none."
            )
        if errors:
            raise ValidationError(errors)


class Precision(models.TextChoices):
    FP16 = "fp16", "FP16"
    BF16 = "bf16", "BF16"
    FP8 = "fp8", "FP8"
    INT8_SQ = "int8_sq", "INT8 SmoothQuant"
    INT8_WO = "int8_wo", "INT8 weight-only"
    INT4_AWQ = "int4_awq", "INT4 AWQ"


class ModelStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    DEPRECATED = "deprecated", "Deprecated"
    RETIRED = "retired", "Retired"


# What the catalog's clean() renders a chat template with, as a chat request would.
_SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Hello"},
]


class CatalogModel(models.Model):
    """A public model name and the TensorRT-LLM engine behind it.

    Plans grant access tiers (the organization's `model_tiers` entitlement),
    so billing never needs to know model names. Prices live in metering's
    price book under the same public name.
    """

    name = models.CharField(max_length=128, unique=True)
    pool = models.ForeignKey(ServerPool, on_delete=models.PROTECT, related_name="models")
    triton_model = models.CharField(max_length=128, default="ensemble")
    # The engine, for operators and for the economics reports.
    precision = models.CharField(max_length=16, choices=Precision.choices, default=Precision.FP8)
    kv_cache_dtype = models.CharField(max_length=16, default="fp8")
    tensor_parallel = models.PositiveSmallIntegerField(default=1)
    gpu_type = models.CharField(max_length=32, default="H100")
    gpu_hour_cost = models.BigIntegerField(default=0, help_text="minor units per GPU-hour")
    currency = models.CharField(max_length=3, default="usd")
    context_limit = models.PositiveIntegerField(default=4096)
    max_output_tokens = models.PositiveIntegerField(default=1024)
    # A request's max_tokens is what its hold prices (with the prompt's bound):
    # a default above what an answer needs holds more credits than it will
    # spend, and refuses (402) an organization whose credits would have
    # covered the answer. Blank is OpenAI's default, an answer that runs to
    # its end (inference.services.jobs._max_tokens).
    default_max_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="max_tokens of a request that leaves it out, at most max_output_tokens; "
        "blank: max_output_tokens, cut to what the context leaves after the prompt (OpenAI's "
        "default). Each request holds credits for its max_tokens until it settles.",
    )
    size_class = models.CharField(max_length=16, default="small")
    chat_template = models.TextField(
        default="{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}\n{% endfor %}<|assistant|>\n",
        help_text="A Django template over `messages` (role, content).",
    )
    # The engine's own tokenizer, readable by the API processes and the
    # workers. The engine's counts are what is billed; this counts a prompt
    # when the engine took it and never answered (a request cancelled before
    # its first token), and one whose bytes alone do not show that it fits
    # context_limit (inference.services.jobs._within_context).
    tokenizer_file = models.CharField(
        max_length=500,
        blank=True,
        help_text="Path to the engine's tokenizer.json on the workers (relative to the "
        "project root), e.g. inference/engine/tokenizer.json; blank: none.",
    )
    # What the engine adds to and allows of a prompt, so that the gateway's
    # bound, count and context check agree with the engine's own: TensorRT-
    # LLM's preprocessing adds the tokenizer's special tokens (a BOS) unless
    # its `add_special_tokens` parameter is false, and refuses a prompt over
    # the engine's max_input_len. deploy/triton/fill_repository.sh prints both.
    prompt_special_tokens = models.PositiveSmallIntegerField(
        default=0,
        help_text="Tokens the engine's preprocessing adds to every prompt: what the "
        "tokenizer's post-processor adds (1 for a BOS token) when the preprocessing model's "
        "add_special_tokens is true, TensorRT-LLM's default; 0 when it is false, and for the "
        "development engine.",
    )
    max_input_tokens = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="The engine's own limit on a prompt's tokens (TensorRT-LLM's max_input_len; "
        "the development engine's is 2048), special tokens included; blank: context_limit only.",
    )
    access_tier = models.CharField(max_length=32, default="basic")
    status = models.CharField(
        max_length=16, choices=ModelStatus.choices, default=ModelStatus.ACTIVE
    )
    successor = models.ForeignKey(
        "self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    deprecation_date = models.DateField(
        null=True,
        blank=True,
        help_text="For a deprecated model: the day it stops being served (it is then "
        "refused as retired, pointing at its successor); until then its answers carry a "
        "Sunset header with this day.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=Q(gpu_hour_cost__gte=0) & Q(tensor_parallel__gte=1),
                name="catalog_model_sane_engine",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        # The API renders this template for every chat request: one that does not
        # compile (a Jinja-style `messages[0]`, an unclosed tag) or cannot render (an
        # include of a file that is not there) would answer each of them with a 500.
        if (
            self.default_max_tokens is not None
            and self.max_output_tokens is not None
            and self.default_max_tokens > self.max_output_tokens
        ):
            raise ValidationError(
                {"default_max_tokens": f"At most max_output_tokens ({self.max_output_tokens})."}
            )
        try:
            chat_template_render(self.chat_template, _SAMPLE_CONVERSATION)
        except (TemplateSyntaxError, TemplateDoesNotExist) as exc:
            raise ValidationError(
                {"chat_template": f"This Django template does not render: {exc}"}
            ) from None

    def retired_on(self, day: date) -> bool:
        """Retired, or deprecated and at or past its deprecation date."""
        if self.status == ModelStatus.RETIRED:
            return True
        return (
            self.status == ModelStatus.DEPRECATED
            and self.deprecation_date is not None
            and self.deprecation_date <= day
        )


class DedicatedCapacity(models.Model):
    """An organization's own server pool for a model: its jobs go there first."""

    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.CASCADE, related_name="dedicated_capacity"
    )
    model = models.ForeignKey(CatalogModel, on_delete=models.CASCADE, related_name="+")
    pool = models.ForeignKey(ServerPool, on_delete=models.PROTECT, related_name="+")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "model"], name="dedicated_one_per_model"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.organization_id}:{self.model_id}->{self.pool_id}"


class JobStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELED = "canceled", "Canceled"
    EXPIRED = "expired", "Expired"


class InputTokensSource(models.TextChoices):
    """Where a settled job's billed prompt count came from (see inference/tasks.py)."""

    ENGINE = "engine", "The engine's num_input_tokens"
    TOKENIZER = "tokenizer", "Counted with the model's tokenizer (the engine sent no count)"
    UNMETERED = "unmetered", "Not billed: the engine sent no count and there is no tokenizer"
    NONE = "none", "Not billed: the prompt never reached the engine, or the engine failed first"


TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.EXPIRED)
NON_TERMINAL = (JobStatus.QUEUED, JobStatus.RUNNING)
# The codes a failed or expired job's error_code holds, and what each means:
# one list for the API's schema (inference.apis.JobOutput) and the admin's filter.
JOB_ERROR_CODES = {
    "engine_unavailable": "no engine would take it",
    "engine_timeout": (
        "its engine went silent, or the gateway stopped waiting for it before its first token "
        "(nothing charged then)"
    ),
    "engine_error": "its engine refused or failed it",
    "job_deadline_exceeded": (
        "it ran longer than the run limit; billed for the prompt the engine took and the "
        "tokens delivered"
    ),
    "job_expired": "it did not settle before its hold expired; nothing charged",
    "worker_lost": (
        "its worker died after streaming part of the answer, which cannot be streamed again, "
        "or died and its message did not come back; billed for the text streamed, counted by "
        "the model's tokenizer (nothing if none was)"
    ),
    "worker_error": (
        "its worker failed as it started it, past its retries, or after (the database or Redis "
        "failing under it); billed only for what the engine delivered"
    ),
}


def job_run_start() -> Coalesce:
    """When a job's current run started: run_started_at, or started_at for a job a run of a
    release before it started (the orphaned jobs' sweep, and its index, read this)."""
    return Coalesce("run_started_at", "started_at")


class Job(models.Model):
    """One inference request. Its public id is also its hold's key in the ledger."""

    public_id = models.CharField(max_length=40)  # unique: see Meta
    organization = models.ForeignKey(
        "accounts.Organization",
        on_delete=models.PROTECT,
        related_name="jobs",
        db_index=False,  # the (organization, -id) index leads with it
    )
    api_key = models.ForeignKey(
        "accounts.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    # Who sent it when no key did: the member signed in to the dashboard (its
    # playground sends /v1/chat/completions with the session). Null for a key's
    # request. PROTECT, as ApiKey.created_by: people leave by deactivation, and
    # a job must keep naming who spent its credits. No index: nothing looks jobs
    # up by person across organizations, and every job's insert would pay for it.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="+",
        db_index=False,
    )
    model = models.ForeignKey(CatalogModel, on_delete=models.PROTECT, related_name="jobs")
    model_price = models.ForeignKey(
        "metering.ModelPrice", on_delete=models.PROTECT, related_name="+"
    )
    priority = models.CharField(max_length=16, choices=Priority.choices)
    kind = models.CharField(max_length=16, default="chat")  # chat | completion
    stream = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=JobStatus.choices, default=JobStatus.QUEUED)
    params = models.JSONField(default=dict)  # max_tokens, temperature, top_p, seed, stop
    # Kept only where the organization opted in (Organization.store_prompts).
    prompt = models.TextField(blank=True)
    # Kept for asynchronous jobs, which are read back later.
    output = models.TextField(blank=True)
    # Where a signed webhook goes when the job ends (inference.services.callbacks).
    callback_url = models.URLField(max_length=2048, blank=True)
    hold_amount = models.BigIntegerField()
    queued_at = models.DateTimeField(auto_now_add=True)
    # When its first run started (kept when the job runs again: reports read
    # a job's time from queued to done by it)...
    started_at = models.DateTimeField(null=True, blank=True)
    # ...and when its current run started: set by every start, a restart's too
    # (job_start). The orphaned jobs' sweep measures its grace from it: a job
    # run again after its worker died is as young as its new run, whose life
    # the grace must cover, not as old as its first. Null on jobs started by
    # a release before it (the sweep then reads started_at).
    run_started_at = models.DateTimeField(null=True, blank=True)
    first_token_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    cached_input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    # Blank until settled (and on jobs settled before it was recorded).
    input_tokens_source = models.CharField(
        max_length=16, choices=InputTokensSource.choices, blank=True
    )
    engine_ms = models.PositiveIntegerField(default=0)
    credits_charged = models.BigIntegerField(default=0)
    serving_cost = models.BigIntegerField(default=0)  # minor units of the model's currency
    finish_reason = models.CharField(max_length=16, blank=True)
    error_code = models.CharField(max_length=64, blank=True)
    error_message = models.CharField(max_length=500, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["organization", "-id"]),
            # Running jobs by their current run's start (job_run_start), for the
            # orphaned jobs' sweep (a minute's): partial, so it holds only the few
            # jobs running at any time. (0012's index on started_at, which the
            # sweep of releases before 0014 read, is dropped by 0015.)
            models.Index(
                job_run_start(),
                condition=models.Q(status="running"),
                name="job_running_run_started",
            ),
        ]
        constraints = [unique_not_like_indexed("public_id", "job_public_id_unique")]

    def __str__(self) -> str:
        return self.public_id


class CallbackStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    DELIVERED = "delivered", "Delivered"
    FAILED = "failed", "Failed"


class JobCallback(models.Model):
    """The outbox row of a job's webhook: written in the transaction that ends the job.

    So a callback is never lost between the job's end and its delivery: a
    lost Celery message, a worker that dies mid-delivery, a receiver that is
    down are all retried from this row (inference.services.callbacks). Its
    event id and body are fixed when written; every attempt sends the same.
    """

    job = models.OneToOneField(Job, on_delete=models.CASCADE, related_name="callback")
    organization = models.ForeignKey(
        "accounts.Organization", on_delete=models.CASCADE, related_name="+"
    )
    event_id = models.CharField(max_length=40, unique=True)
    event_type = models.CharField(max_length=32)
    url = models.URLField(max_length=2048)
    body = models.TextField(help_text="the exact JSON sent (and signed) on every attempt")
    status = models.CharField(
        max_length=16, choices=CallbackStatus.choices, default=CallbackStatus.PENDING
    )
    attempts = models.PositiveSmallIntegerField(default=0)
    # Due time of the next attempt while pending; during an attempt, the end of
    # its lease (a worker that died mid-attempt is retried after it). Null once final.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    last_error = models.CharField(max_length=500, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [
            # The sweep's query: pending callbacks that are due.
            models.Index(
                fields=["next_attempt_at"],
                condition=Q(status="pending"),
                name="job_callback_due",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.event_id} ({self.status})"
