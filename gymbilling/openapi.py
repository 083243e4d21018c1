"""drf-spectacular hooks: what every API operation can answer besides its success.

Every error leaves through one exception handler (accounts.errors) in one
shape, and most of them can come from any operation: the authentication,
organization, scope, rate-limit, body-size and Idempotency-Key checks run in
`OrgApiView.initial` before the view's own code. So the error responses are
documented here, once, for every operation under /api/v1/, rather than on
each view where one would be forgotten. A client generated from the schema
then knows every status it can get, and schemathesis holds us to it
(tests/reliability/test_schemathesis.py).
"""

from __future__ import annotations

from typing import Any

API_PREFIX = "/api/v1/"
ERROR_COMPONENT = "Error"

# Status -> when it happens. Keep in step with accounts.errors._TYPES and
# the ApplicationError statuses raised on the request path.
ERROR_RESPONSES: dict[int, str] = {
    400: "The request is malformed or a field is invalid; `error.param` names it.",
    401: "No credentials, or an API key that is malformed, invalid, revoked or expired.",
    402: (
        "Where the operation spends or reserves credits: not enough of them "
        "(`insufficient_credits`), or inference suspended until an overdue invoice is "
        "paid (`subscription_past_due`). Where it charges a card (a checkout): the card "
        "was declined (`card_declined`)."
    ),
    403: (
        "The API key lacks the scope, or the user the role, that this operation needs; "
        "or the organization's plan does not include it (`model_not_in_plan`, "
        "`priority_not_in_plan`)."
    ),
    404: (
        "No such object, or no such organization among the caller's. Another "
        "organization's ids answer 404 too, so ids reveal nothing."
    ),
    409: (
        "A conflict with the current state (a duplicate, the last owner, no seats "
        "left), or a request with the same Idempotency-Key is still running, or a "
        "previous plan change is still being confirmed (`change_pending`); where "
        "waiting helps, Retry-After says for how many seconds."
    ),
    413: "The request body is over the size limit.",
    415: "The request body is not application/json.",
    422: "This Idempotency-Key was already used with a different request.",
    429: "A rate limit was reached; retry after the number of seconds in Retry-After.",
}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every API error: OpenAI's and Stripe's shape.",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "type": {
                    "type": "string",
                    "description": "The class of error, e.g. rate_limit_error.",
                },
                "code": {"type": "string", "description": "Stable and machine-readable."},
                "message": {"type": "string", "description": "What was wrong and what to do."},
                "param": {
                    "type": "string",
                    "nullable": True,
                    "description": "The field or header at fault, when there is one.",
                },
            },
            # Some errors add details (a rate limit adds retry_after, limit and kind).
            "additionalProperties": True,
            "required": ["type", "code", "message", "param"],
        }
    },
    "required": ["error"],
}

_HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def add_error_responses(result: dict[str, Any], generator, request, public) -> dict[str, Any]:
    """Add the shared error schema and the error statuses to every /api/v1/ operation.

    A status an operation already documents is left as the view declared it.
    """
    result.setdefault("components", {}).setdefault("schemas", {})[ERROR_COMPONENT] = ERROR_SCHEMA
    ref = {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}
    for path, item in result.get("paths", {}).items():
        if not path.startswith(API_PREFIX):
            continue
        for method, operation in item.items():
            if method not in _HTTP_METHODS:
                continue
            responses = operation.setdefault("responses", {})
            for status, description in ERROR_RESPONSES.items():
                responses.setdefault(
                    str(status),
                    {"description": description, "content": {"application/json": {"schema": ref}}},
                )
    return result
