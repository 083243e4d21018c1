"""The dashboard's billing and marketplace pages, under /dashboard/ (gymbilling/urls.py)."""

from django.urls import path

from gymbilling.pages.billing import BillingPage, InvoicesPage
from gymbilling.pages.market import MarketPage

urlpatterns = [
    path("billing", BillingPage.as_view(), name="dashboard-billing"),
    path("invoices", InvoicesPage.as_view(), name="dashboard-invoices"),
    path("market", MarketPage.as_view(), name="dashboard-market"),
]
