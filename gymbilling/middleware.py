"""API requests get the one error shape even where no DRF view answers.

Oversized bodies are refused before they are read; a URL that matches no
route answers a JSON 404 (Django's own page is HTML, and in DEBUG a list of
every route).
"""

from django.conf import settings

from accounts.errors import json_error_response

API_PREFIXES = ("/api/", "/v1/", "/stripe/")


class ApiErrorMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path.startswith(API_PREFIXES):
            try:
                length = int(request.META.get("CONTENT_LENGTH") or 0)
            except ValueError:
                return json_error_response(
                    code="invalid_request", message="Content-Length is not a number.", status=400
                )
            if length > settings.API_MAX_BODY_BYTES:
                return json_error_response(
                    code="request_too_large",
                    message=f"The request body is over the limit of {settings.API_MAX_BODY_BYTES} bytes.",
                    status=413,
                )
        response = self.get_response(request)
        if (
            response.status_code == 404
            and request.path.startswith(API_PREFIXES)
            and not response.get("Content-Type", "").startswith("application/json")
        ):
            return json_error_response(
                code="not_found", message=f"No endpoint at {request.path}.", status=404
            )
        return response
