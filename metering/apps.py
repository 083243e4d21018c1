from django.apps import AppConfig


class MeteringConfig(AppConfig):
    name = "metering"
    verbose_name = "Metering and the credit ledger"

    def ready(self) -> None:
        from accounts.cache import cache_invalidate_on_save
        from metering.models import ModelPrice, PriceBook
        from metering.selectors import PRICES

        cache_invalidate_on_save(PRICES, PriceBook, ModelPrice)
