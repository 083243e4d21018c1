"""The one error type every service raises, and the one way the API renders it.

It lives in `accounts`, the lowest app, so that every other app may raise it
without breaking the import direction in DESIGN.md.

Every error reaches clients in OpenAI's and Stripe's shape:
    {"error": {"type": ..., "code": ..., "message": ..., "param": ...}}
`code` is stable and machine-readable; `message` says what was wrong and what
to do about it.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.http import Http404
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

# HTTP status -> OpenAI-style error type.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


class ApplicationError(Exception):
    """A failure the caller can act on: bad input, a conflict, no credits."""

    def __init__(
        self,
        *,
        code: str,
        message: str,
        status: int = 400,
        param: str | None = None,
        extra: dict[str, Any] | None = None,
        refuses_input: bool = False,
        took_effect: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.param = param
        self.extra = extra or {}
        # Raised by a field's own check while the view validates its input
        # (before any work): the Idempotency-Key stays free, as for DRF's
        # field errors (accounts.api_base._REFUSED_BEFORE_WORK).
        self.refuses_input = refuses_input
        # Raised after the request did something a retry must not do again
        # (a job that was, or may have been, charged): its answer, even a
        # 5xx, is stored under the Idempotency-Key and replayed, instead of
        # the key being freed for a retry that would run a second job.
        self.took_effect = took_effect
        # Sent with the error, as an answer's would be (what a charged job
        # cost: X-Gym-Credits-*); replayed with it under an Idempotency-Key.
        self.headers = headers or {}

    def __repr__(self) -> str:
        return (
            f"ApplicationError(code={self.code!r}, status={self.status}, message={self.message!r})"
        )

    def as_dict(self) -> dict[str, Any]:
        return error_body(
            code=self.code, message=self.message, status=self.status, param=self.param, **self.extra
        )


def _encodable(text: str | None) -> str | None:
    """`text` as UTF-8 can carry it: a lone surrogate written as its escape (`\\ud800`).

    JSON may escape a lone surrogate ("\\ud800"), and a message or param repeats what
    the client sent (a ChoiceField's "is not a valid choice", an unknown key), but
    DRF's JSON renderer writes it raw and then fails to encode it: every such
    error was a 500.
    """
    if not isinstance(text, str) or text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def error_body(*, code: str, message: str, status: int, param: str | None = None, **extra: Any):
    """The error shape; every error body is built here, so every one is encodable."""
    return {
        "error": {
            "type": _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
            "code": code,
            "message": _encodable(message),
            "param": _encodable(param),
            **extra,
        }
    }


# A field check's own codes that reach the client as `error.code` (a field raises
# ValidationError(..., code=...)); any other field error is `invalid_request`. Only
# codes README's table lists: DRF's own ("max_value", "invalid"...) are not a contract.
_FIELD_ERROR_CODES = frozenset({"unsupported_parameter"})


def _first_field_error(detail: Any, prefix: str = "") -> tuple[str | None, str, str]:
    """Flatten DRF's nested validation detail to (param, message, code) of the first problem."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            # A list's errors are keyed by index, and index 0 is falsy: keep it as text.
            if key == "non_field_errors":
                return _first_field_error(value, prefix)
            return _first_field_error(value, f"{prefix}.{key}" if prefix else str(key))
    if isinstance(detail, list) and detail:
        return _first_field_error(detail[0], prefix)
    code = getattr(detail, "code", None)
    return (prefix or None, str(detail), code if code in _FIELD_ERROR_CODES else "invalid_request")


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, ApplicationError):
        response = Response(exc.as_dict(), status=exc.status, headers=exc.headers)
        if "retry_after" in exc.extra:
            response["Retry-After"] = str(exc.extra["retry_after"])
        if exc.status == 401:
            # A 401 names the scheme to authenticate with (RFC 9110 11.6.1), as
            # DRF's own 401 (no Authorization header at all) does.
            response["WWW-Authenticate"] = "Bearer"
        return response
    if isinstance(exc, RequestDataTooBig):
        return Response(
            error_body(
                code="request_too_large",
                message=f"The request body is over the limit of {settings.API_MAX_BODY_BYTES} bytes.",
                status=413,
            ),
            status=413,
        )
    if isinstance(exc, Http404):
        exc = drf_exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = drf_exceptions.PermissionDenied()

    # Imported here: rest_framework.views imports the authentication classes,
    # which import this module.
    from rest_framework.views import exception_handler as drf_exception_handler

    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # a genuine server error: Django's 500 handling takes over

    if isinstance(exc, drf_exceptions.ValidationError):
        param, message, code = _first_field_error(exc.detail)
    else:
        param = None
        message = str(getattr(exc, "detail", exc))
        code = {
            drf_exceptions.NotAuthenticated: "authentication_failed",
            drf_exceptions.AuthenticationFailed: "authentication_failed",
            drf_exceptions.PermissionDenied: "permission_denied",
            drf_exceptions.NotFound: "not_found",
            drf_exceptions.MethodNotAllowed: "method_not_allowed",
            drf_exceptions.NotAcceptable: "not_acceptable",
            drf_exceptions.UnsupportedMediaType: "unsupported_media_type",
            drf_exceptions.ParseError: "invalid_json",
            drf_exceptions.Throttled: "rate_limited",
        }.get(type(exc), "invalid_request")
    response.data = error_body(code=code, message=message, status=response.status_code, param=param)
    return response


def json_error_response(*, code: str, message: str, status: int):
    """The error shape as a plain Django response, for errors outside DRF views."""
    from django.http import JsonResponse

    return JsonResponse(error_body(code=code, message=message, status=status), status=status)
