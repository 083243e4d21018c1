from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and tenancy"

    def ready(self) -> None:
        from django.db.models.signals import post_migrate

        from accounts.cache import cache_invalidate_on_save, caches_reset
        from accounts.models import ApiKey, Organization
        from accounts.services.api_keys import KEYS

        cache_invalidate_on_save(KEYS, ApiKey, Organization)
        # Data migrations write through historical models, which send no save
        # signals: after `migrate`, every process reloads what it cached.
        post_migrate.connect(
            lambda **_kwargs: caches_reset(),
            sender=self,
            weak=False,
            dispatch_uid="accounts.caches_reset",
        )
