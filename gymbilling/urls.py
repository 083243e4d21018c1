from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from accounts.dashboard import OrganizationSwitchView
from accounts.views import (
    EmailVerificationSendView,
    EmailVerifyView,
    PasswordResetRequestView,
    PasswordResetSetView,
    SignInView,
    SignupDoneView,
    SignupView,
)
from accounts.views.members import InvitationAcceptPage
from gymbilling.apis import StripeWebhookView
from gymbilling.views import (
    HealthView,
    HomeView,
    OverviewPage,
    PingView,
    api_not_found,
    server_error,
)

urlpatterns = [
    path("", HomeView.as_view(), name="home"),
    path("healthz", HealthView.as_view(), name="health"),
    path("ping", PingView.as_view(), name="ping"),
    path("admin/", admin.site.urls),
    # The customer dashboard: each app's pages (its views.py) under /dashboard/.
    path("login/", SignInView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    # A forgotten password: Django's views, with our form, emails and pages.
    path("password-reset/", PasswordResetRequestView.as_view(), name="password_reset"),
    path(
        "password-reset/sent/",
        auth_views.PasswordResetDoneView.as_view(extra_context={"title": "Check your email"}),
        name="password_reset_done",
    ),
    path(
        "password-reset/<uidb64>/<token>/",
        PasswordResetSetView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "password-reset/done/",
        auth_views.PasswordResetCompleteView.as_view(extra_context={"title": "Password set"}),
        name="password_reset_complete",
    ),
    path("signup/", SignupView.as_view(), name="signup"),
    path("signup/done", SignupDoneView.as_view(), name="signup-done"),
    path("verify-email", EmailVerifyView.as_view(), name="verify-email"),
    path("verify-email/send", EmailVerificationSendView.as_view(), name="verify-email-send"),
    # The link in the invitation email (accounts.services.invitation_create).
    path("invitations/accept", InvitationAcceptPage.as_view(), name="invitation-page"),
    path("dashboard/", OverviewPage.as_view(), name="dashboard"),
    path("dashboard/organization", OrganizationSwitchView.as_view(), name="organization-switch"),
    path("dashboard/", include("accounts.page_urls")),
    path("dashboard/", include("metering.page_urls")),
    path("dashboard/", include("gymbilling.page_urls")),
    path("dashboard/", include("inference.page_urls")),
    # Where Stripe sends a customer back to after Checkout or the billing portal
    # (gymbilling.services.checkout, gymbilling.market.services): the pages above.
    path("billing/", RedirectView.as_view(pattern_name="dashboard-billing", query_string=True)),
    path("market/", RedirectView.as_view(pattern_name="dashboard-market", query_string=True)),
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
