from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        from accounts.cache import cache_invalidate_on_save
        from inference.models import CatalogModel, DedicatedCapacity, ServerPool
        from inference.selectors import CATALOG

        cache_invalidate_on_save(CATALOG, CatalogModel, ServerPool, DedicatedCapacity)
