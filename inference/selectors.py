"""Reads of the catalog and jobs."""

from __future__ import annotations

from django.db.models import QuerySet
from django.utils import timezone

from accounts.cache import SharedCache
from accounts.errors import ApplicationError
from accounts.models import Organization
from inference.models import (
    NON_TERMINAL,
    CatalogModel,
    DedicatedCapacity,
    Job,
    JobStatus,
    ModelStatus,
    ServerPool,
)
from metering.selectors import organization_balance

# Until billing grants tiers, every organization may use the basic tier.
DEFAULT_TIERS = ("basic",)

# Catalog models (with their pools) and dedicated capacity, read by every
# request in the API process and again in the worker; dropped in every process
# when one of those rows changes (InferenceConfig.ready). The instances are
# shared between threads and requests: read them, never change them.
CATALOG = SharedCache("inference-catalog")


def organization_tiers(organization: Organization) -> tuple[str, ...]:
    return tuple(organization.model_tiers or DEFAULT_TIERS)


def catalog_models_for(*, organization: Organization) -> QuerySet[CatalogModel]:
    """The models an organization may call: listed, not retired (nor deprecated past their
    date: CatalogModel.retired_on), in its tiers."""
    return (
        CatalogModel.objects.exclude(status=ModelStatus.RETIRED)
        .exclude(status=ModelStatus.DEPRECATED, deprecation_date__lte=timezone.localdate())
        .filter(access_tier__in=organization_tiers(organization))
        .select_related("pool", "successor")
    )


def catalog_model_by_name(name: str) -> CatalogModel | None:
    return CATALOG.get(
        ("name", name),
        lambda: CatalogModel.objects.select_related("pool", "successor").filter(name=name).first(),
    )


def catalog_model_by_id(pk: int) -> CatalogModel:
    return CATALOG.get(("pk", pk), lambda: CatalogModel.objects.select_related("pool").get(pk=pk))


def catalog_model_resolve(*, name: str, organization: Organization) -> CatalogModel:
    model = catalog_model_by_name(name)
    if model is None:
        raise ApplicationError(
            code="model_not_found",
            message=f"The model {name!r} does not exist; GET /v1/models lists yours.",
            status=404,
            param="model",
        )
    if model.retired_on(timezone.localdate()):
        successor = f" Use {model.successor.name!r} instead." if model.successor else ""
        raise ApplicationError(
            code="model_not_found",
            message=f"The model {name!r} was retired.{successor}",
            status=404,
            param="model",
        )
    if model.access_tier not in organization_tiers(organization):
        raise ApplicationError(
            code="model_not_in_plan",
            message=f"Your plan does not include {name!r} (tier {model.access_tier!r}); upgrade to use it.",
            status=403,
            param="model",
        )
    return model


def _dedicated_pools() -> dict[tuple[int, int], ServerPool]:
    # The whole table: staff assign it by hand, so it stays small, and most
    # jobs are looked up in it for an organization that has none.
    return {
        (d.organization_id, d.model_id): d.pool
        for d in DedicatedCapacity.objects.select_related("pool")
    }


def pools_for_job(*, job: Job) -> list[ServerPool]:
    """Where the job may run, in order: the organization's dedicated pool for the model if
    it has one (its jobs go there first), then the model's shared pool."""
    dedicated = CATALOG.get("dedicated", _dedicated_pools).get((job.organization_id, job.model_id))
    shared = job.model.pool
    if dedicated is None or dedicated.pk == shared.pk:
        return [shared]
    return [dedicated, shared]


def organization_jobs(
    *, organization: Organization, status: str | None = None, model: str | None = None
) -> QuerySet[Job]:
    """The organization's jobs; of one status, and of one model (its public name), if given."""
    jobs = Job.objects.filter(organization=organization)
    if status is not None:
        jobs = jobs.filter(status=status)
    if model is not None:
        jobs = jobs.filter(model__name=model)
    return jobs.select_related("model")


def job_final_event(job: Job, *, text: str | None, finish_reason: str) -> dict:
    """The relay's last event for a settled job: what the waiting API process answers with.

    `text` None: not known (job_ended_final_event).
    """
    remaining = getattr(job, "wallet_balance_after", None)
    # The settlement did not say: the ORM path, settled earlier, or a lot of the
    # wallet due to expire (metering/0018: the selector leaves the sweep's out).
    if remaining is None:
        remaining = organization_balance(organization=job.organization).available
    return {
        # An expired job (its hold expired while it ran) gives nothing away.
        "type": "error" if job.status in (JobStatus.FAILED, JobStatus.EXPIRED) else "done",
        "status": job.status,
        "text": text,
        "finish_reason": finish_reason,
        "input_tokens": job.input_tokens,
        "cached_input_tokens": job.cached_input_tokens,
        "output_tokens": job.output_tokens,
        "input_tokens_source": job.input_tokens_source,
        "credits_charged": job.credits_charged,
        "credits_remaining": remaining,
        "error_code": job.error_code,
        "error_message": job.error_message,
    }


def job_ended_final_event(*, job_pk: int) -> dict | None:
    """The final event of a job that has ended, built from its row; None while it runs.

    For a waiting answer that never got the relay's: its worker died between
    the settlement's commit and publishing it, or Redis failed under it (or a
    cancel ended the job while queued, which publishes none). Its text is
    None where the row does not keep it: it keeps only an asynchronous job's
    that is not streamed (job_settle), and a stream's was relayed token by
    token already.
    """
    job = Job.objects.select_related("organization").filter(pk=job_pk).first()
    if job is None or job.status in NON_TERMINAL:
        return None
    text = job.output if job.kind == "async" and not job.stream else None
    return job_final_event(job, text=text, finish_reason=job.finish_reason)
