from django.apps import AppConfig


class GymbillingConfig(AppConfig):
    name = "gymbilling"
    verbose_name = "Billing and marketplace"
