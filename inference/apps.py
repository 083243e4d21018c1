from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        from accounts.cache import cache_invalidate_on_save
        from inference import checks  # noqa: F401  (registers the system checks)
        from inference.models import CatalogModel, DedicatedCapacity, ServerPool
        from inference.selectors import CATALOG

        cache_invalidate_on_save(CATALOG, CatalogModel, ServerPool, DedicatedCapacity)

        from metering.signals import hold_expired

        hold_expired.connect(_end_the_job_of_an_expired_hold, dispatch_uid="inference-jobs")


def _end_the_job_of_an_expired_hold(sender, key: str, **kwargs) -> None:
    # Every job's hold is keyed by the job's public id (job_submit).
    if key.startswith("job_"):
        from inference.services.jobs import job_expire_for_hold

        job_expire_for_hold(key=key)
