from django.urls import path

from gymbilling import apis

urlpatterns = [
    path("plans", apis.PlanListApi.as_view(), name="plans"),
    path("billing/checkout", apis.CheckoutApi.as_view(), name="billing-checkout"),
    path("billing/portal", apis.PortalApi.as_view(), name="billing-portal"),
    path("billing/subscription", apis.SubscriptionApi.as_view(), name="billing-subscription"),
    path("billing/invoices", apis.InvoiceListApi.as_view(), name="billing-invoices"),
]
