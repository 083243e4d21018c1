from django.db import connection
from django.http import JsonResponse
from django.views.generic import TemplateView, View


class HomeView(TemplateView):
    template_name = "home.html"


class HealthView(View):
    """Liveness and database reachability, for load balancers and `make demo`."""

    def get(self, request):
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return JsonResponse({"status": "ok"})
