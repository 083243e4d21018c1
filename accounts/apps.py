from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts and tenancy"

    def ready(self) -> None:
        from accounts.cache import cache_invalidate_on_save
        from accounts.models import ApiKey, Organization
        from accounts.services.api_keys import KEYS

        cache_invalidate_on_save(KEYS, ApiKey, Organization)
