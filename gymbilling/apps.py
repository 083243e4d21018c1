from django.apps import AppConfig


class GymbillingConfig(AppConfig):
    name = "gymbilling"
    verbose_name = "Billing and marketplace"

    def ready(self) -> None:
        from gymbilling import checks  # noqa: F401  (registers the system checks)
        from gymbilling.market.reconcile import market_ledger_checks
        from gymbilling.market.services import (
            market_checkout_handle,
            market_reinstatement_handle,
            market_reversal_handle,
        )
        from gymbilling.models import CheckoutKind
        from gymbilling.reconcile import billing_ledger_checks
        from gymbilling.services import (
            checkout_handler_register,
            reinstatement_handler_register,
            reversal_handler_register,
        )

        billing_ledger_checks()
        market_ledger_checks()
        checkout_handler_register(CheckoutKind.MARKET_ORDER, market_checkout_handle)
        reversal_handler_register(market_reversal_handle)
        reinstatement_handler_register(market_reinstatement_handle)
        import gymbilling.market.tasks  # noqa: F401  (registers the beat tasks)
