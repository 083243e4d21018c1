from django.db import connection
from django.http import HttpResponse, JsonResponse
from django.views.defaults import page_not_found
from django.views.defaults import server_error as html_server_error
from django.views.generic import TemplateView, View

from accounts.errors import json_error_response
from gymbilling.middleware import API_PREFIXES


class HomeView(TemplateView):
    template_name = "home.html"


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
