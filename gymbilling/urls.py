from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from gymbilling.apis import StripeWebhookView
from gymbilling.views import HealthView, HomeView, PingView, api_not_found, server_error

urlpatterns = [
    path("", HomeView.as_view(), name="home"),
    path("healthz", HealthView.as_view(), name="health"),
    path("ping", PingView.as_view(), name="ping"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/v1/", include("accounts.urls")),
    path("api/v1/", include("metering.urls")),
    path("api/v1/", include("inference.api_urls")),
    path("api/v1/", include("gymbilling.billing_urls")),
    path("api/v1/", include("gymbilling.market_urls")),
    path("stripe/webhook/", StripeWebhookView.as_view(), name="stripe-webhook"),
    path("v1/", include("inference.urls")),
]

handler404 = api_not_found
handler500 = server_error
