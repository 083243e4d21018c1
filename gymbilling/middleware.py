"""Requests too large to read, and API requests no DRF view answers, get the one error shape.

A body over `API_MAX_BODY_BYTES` is refused before it is read, on every path:
an API request with the API's error, a page with a page's refusal (its code in
`data-error-code`). Pages take no files, and Django's own limit on a form
(DATA_UPLOAD_MAX_MEMORY_SIZE) leaves file parts out: it spools them to a
temporary file whatever their size, so without this any anonymous form (signing
in, signing up) could be sent gigabytes to write to disk. A URL under the API
that matches no route answers a JSON 404 (Django's own page is HTML, and in
DEBUG a list of every route). A charset that is not a text encoding (base64,
zlib, or one Python does not know) is refused with a 415 before anything decodes
the body or the query string with it (see gymbilling.handlers). A NUL in an admin
request's path, query or form is refused with a 400 (`_holds_nul`).
"""

import functools

from django.conf import settings
from django.http import HttpResponse
from django.urls import get_script_prefix, reverse

from accounts.errors import json_error_response
from gymbilling.handlers import is_text_charset

API_PREFIXES = ("/api/", "/v1/", "/stripe/")


def _refusal(request, *, code: str, message: str, status: int) -> HttpResponse:
    if request.path.startswith(API_PREFIXES):
        return json_error_response(code=code, message=message, status=status)
    # No template: the request is refused before sessions or anything else a page uses.
    return HttpResponse(
        f'<!doctype html>\n<title>{message}</title>\n<p class="refusal" role="alert" '
        f'data-error-code="{code}">{message}</p>\n',
        status=status,
        content_type="text/html; charset=utf-8",
    )


@functools.cache
def _admin_path() -> str:
    """Where the admin is, as `request.path_info` names it (under the script prefix)."""
    return reverse("admin:index").removeprefix(get_script_prefix().rstrip("/"))


def _holds_nul(request) -> bool:
    """Whether an admin request carries a NUL in its path, a query or form field's name or
    value. PostgreSQL refuses text holding one (a DataError), and the admin sends what it is
    given to it: a search (?q=), a filter's value, an object's id. A list counts its rows
    outside Django's handling of a malformed filter, so each list with a search or a filter
    of free values was a 500. Refused here, once, for every admin page, those to come
    included: no stored text holds a NUL to be found with one.

    A form's JSON field (a plan's model tiers, a pool's addresses) decodes the escape
    `\\u0000` into one, which PostgreSQL's jsonb refuses just the same: refused too."""
    if "\x00" in request.path:
        return True
    fields = [request.GET]
    if request.method == "POST" and request.content_type in (
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    ):
        fields.append(request.POST)
    return any(
        "\x00" in name or any("\x00" in value or "\\u0000" in value for value in values)
        for query in fields
        for name, values in query.lists()
    )


class ApiErrorMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return _refusal(
                request,
                code="invalid_request",
                message="Content-Length is not a number.",
                status=400,
            )
        if length > settings.API_MAX_BODY_BYTES:
            return _refusal(
                request,
                code="request_too_large",
                message=f"The request body is over the limit of {settings.API_MAX_BODY_BYTES} bytes.",
                status=413,
            )
        charset = request.content_params.get("charset")
        if charset is not None and not is_text_charset(charset):
            return _refusal(
                request,
                code="unsupported_media_type",
                # Not echoed: the page's refusal is HTML, and the charset is the sender's.
                message="The Content-Type's charset is not a text encoding; send UTF-8.",
                status=415,
            )
        if request.path_info.startswith(_admin_path()) and _holds_nul(request):
            return _refusal(
                request,
                code="invalid_request",
                message="The request holds a NUL character (\\x00): no text here has one. "
                "Remove it from the search, filter or form.",
                status=400,
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
