from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.utils import timezone
from django.views.defaults import page_not_found
from django.views.defaults import server_error as html_server_error
from django.views.generic import TemplateView, View

from accounts.dashboard import MemberPage
from accounts.errors import json_error_response
from gymbilling.middleware import API_PREFIXES
from metering.selectors import (
    organization_balance,
    organization_lots,
    overage_allowance_available,
)


class HomeView(TemplateView):
    template_name = "home.html"


class OverviewPage(MemberPage):
    """The dashboard's first page: the organization's credits, and the lots they are in."""

    template_name = "dashboard/overview.html"
    title = "Overview"
    nav = "overview"

    def get_context_data(self, **kwargs):
        context = super().get_context_data(**kwargs)
        organization = self.request.organization
        # One moment for the figures and the lots: both leave out what the expiry sweep
        # is about to move, and must agree on which lots that is.
        now = timezone.now()
        balance = organization_balance(organization=organization, now=now)
        context.update(
            balance=balance,
            lots=organization_lots(organization=organization, now=now, limit=50),
            # Counted in `available` (work may spend it) but not prepaid: shown apart
            # so that a customer does not read it as credits already bought.
            overage=overage_allowance_available(
                organization=organization, available=balance.available, now=now
            ),
        )
        return context


class HealthView(View):
    """Liveness and database reachability, for load balancers and `make demo`."""

    def get(self, request):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return JsonResponse({"status": "ok"})


class PingView(View):
    """A constant answer: the floor that API latency benchmarks compare against."""

    def get(self, request):
        return HttpResponse(b"pong", content_type="text/plain")


def api_not_found(request, exception=None):
    if request.path.startswith(API_PREFIXES):
        return json_error_response(
            code="not_found", message=f"No endpoint at {request.path}.", status=404
        )
    return page_not_found(request, exception)


def server_error(request):
    if request.path.startswith(API_PREFIXES):
        return json_error_response(
            code="internal_error",
            message="Something went wrong on our side; nothing was charged. Try again.",
            status=500,
        )
    return html_server_error(request)
