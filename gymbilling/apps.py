from django.apps import AppConfig


class GymbillingConfig(AppConfig):
    name = "gymbilling"
    verbose_name = "Billing and marketplace"

    def ready(self) -> None:
        from gymbilling.reconcile import billing_ledger_checks

        billing_ledger_checks()
