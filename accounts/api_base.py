"""What every API view shares: who is calling, for which organization, how often,
and whether this POST already happened.

A view subclasses `OrgApiView`, names `required_scope` (for API keys) and
`allowed_roles` (for signed-in users), and has a body that is always:
validate, call a service or selector, serialize.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from typing import Any

from django.http import HttpResponse, QueryDict
from rest_framework import exceptions as drf_exceptions
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.pagination import CursorPagination
from rest_framework.parsers import JSONParser, get_encoding
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.utils import json as drf_json
from rest_framework.views import APIView

from accounts.authentication import ApiKeyAuthentication, KeyPrincipal
from accounts.errors import ApplicationError, error_body
from accounts.idempotency import (
    StoredResponse,
    idempotency_begin,
    idempotency_complete,
    idempotency_release,
    replayed_headers,
)
from accounts.models import Membership, Organization, Role, Scope
from accounts.ratelimits import Limit, RequestCount, rate_limit_consume, requests_limit
from accounts.selectors import user_membership_by_slug, user_memberships

logger = logging.getLogger(__name__)

ALL_ROLES = tuple(Role.values)
MANAGERS = (Role.OWNER, Role.ADMIN)


# Refusals of the request itself (its body, its content type, its fields): the
# endpoint never ran, so, as Stripe does, no idempotent result is stored and the
# corrected request may be retried with the same Idempotency-Key. Views validate
# their input before calling any service, and services raise ApplicationError,
# never these; a field check that raises an ApplicationError of its own code
# (a callback URL's) marks it `refuses_input`.
_REFUSED_BEFORE_WORK = (
    drf_exceptions.ParseError,
    drf_exceptions.UnsupportedMediaType,
    drf_exceptions.ValidationError,
)


def _rate_limited(exc: Exception) -> bool:
    """A 429: a limit refused the request and reserved nothing, so nothing is replayed either.

    Raised in initial() before an Idempotency-Key is claimed, or, for a view
    that counts its requests with its work (an inference job), by the
    service after it was: either way the retry with the same key must run.
    """
    return isinstance(exc, ApplicationError) and exc.status == 429


# No request body of this API nests deeper than a few levels (a chat body:
# object, messages, message); far deeper JSON is refused as it is parsed.
MAX_JSON_DEPTH = 32


def _json_depth_exceeds(data, limit: int) -> bool:
    """Whether `data` nests containers deeper than `limit`; iterative, so any depth is safe."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if type(value) is dict:
            children = value.values()
        elif type(value) is list:
            children = value
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return False


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    """A JSON object's members as a dict, refusing a key given twice (json's
    object_pairs_hook): `json` keeps the last silently, so
    `{"max_price_per_1k": 50, "max_price_per_1k": 5000}` bought at 5000 while the body
    read as 50 to anyone checking the first, as a repeated query parameter did."""
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        repeated = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise ValueError(f"key {repeated!r} given more than once")
    return data


class JsonParser(JSONParser):
    """DRF's JSON parser, refusing JSON nested deeper than MAX_JSON_DEPTH, and an
    object that gives a key twice, as bad JSON.

    Past about a thousand levels `json` raises RecursionError, not ValueError,
    which DRF's parser lets through as a 500; and a body just shallow enough
    to parse still overflowed the stack later, in a serializer's recursive
    validation or error message (a 500 too).
    """

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = self._load(stream, parser_context or {})
        except RecursionError:
            data = None
        else:
            if not _json_depth_exceeds(data, MAX_JSON_DEPTH):
                return data
        raise drf_exceptions.ParseError(
            f"JSON parse error - nested more than {MAX_JSON_DEPTH} levels deep."
        )

    def _load(self, stream, parser_context: dict):
        # DRF's JSONParser.parse, with the duplicate-key hook.
        decoded = codecs.getreader(get_encoding(parser_context))(stream)
        parse_constant = drf_json.strict_constant if self.strict else None
        try:
            return json.load(decoded, parse_constant=parse_constant, object_pairs_hook=_unique_keys)
        except ValueError as exc:
            raise drf_exceptions.ParseError(f"JSON parse error - {exc}") from None


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not know, so a typo is an error, not a silent default."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                raise serializers.ValidationError(
                    {unknown[0]: [f"Unknown field {unknown[0]!r}."]}, code="unknown_field"
                )
        return super().to_internal_value(data)


_WHOLE_NUMBER = re.compile(r"-?[0-9]+")


class StrictIntegerField(serializers.IntegerField):
    """A whole number as JSON writes one (`10`), or as a query string does (`"10"`): for
    every amount of money or credits the API takes.

    DRF's IntegerField reads `10.0`, `"10.00"` and full-width digits as 10.
    An integer amount sent as a float means the client computed it in floating point,
    where 10.0 is as likely 9.999999 a step earlier; and "12.00" was most likely meant
    as 12.00 of a currency, not 12 of its minor unit. Both are refused (400) rather
    than guessed at.
    """

    default_error_messages = {
        "invalid": "A whole number is required, such as 10: no decimal point or exponent.",
    }

    def to_internal_value(self, data):
        if type(data) is not int and not (type(data) is str and _WHOLE_NUMBER.fullmatch(data)):
            self.fail("invalid")  # bool (an int subclass) too: `true` is not 1
        return super().to_internal_value(data)


def query_data(request: Request) -> dict[str, str]:
    """The request's query parameters, each once, for a view's `Query` serializer to check.

    A parameter given twice is refused, naming it: read as the last of its values
    (`QueryDict.dict()`), `?status=queued&status=running` listed only the running
    jobs, and `?limit=1&limit=200` a page of 200, without a word. No parameter of
    this API takes a list.
    """
    require_single_query_params(request.query_params)
    return request.query_params.dict()


def require_single_query_params(params: QueryDict) -> None:
    """Refuse (400 invalid_request, naming it) a query parameter given more than once.

    For the API's lists and the dashboard's pages alike: none takes a list, and Django
    reads a repeated one as its last value, without a word.
    """
    for name, values in params.lists():
        if len(values) > 1:
            raise _given_twice(name)


def _single_query_param(request: Request, name: str) -> str | None:
    """The one value of the query parameter `name` (None: absent), or its refusal."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise _given_twice(name)
    return values[0] if values else None


def _given_twice(name: str) -> ApplicationError:
    return ApplicationError(
        code="invalid_request",
        message=f"The query parameter {name!r} is given more than once; give it once.",
        param=name,
    )


class _NoInput(StrictSerializer):
    """The body of a POST that takes none: no body, or an empty object."""


def require_no_input(request: Request) -> None:
    """Refuse a body a POST does not take, as its own serializer would refuse a field it does
    not know (400 naming it): ignored, a field the client believed used (a portal's return
    URL, a cancel's reason) changed nothing, and it was not told."""
    _NoInput(data=request.data).is_valid(raise_exception=True)


class IdCursorPagination(CursorPagination):
    """Opaque cursors over a stable order: pages never skip or repeat rows."""

    ordering = "-pk"
    page_size = 50
    page_size_query_param = "limit"
    max_page_size = 200

    def get_page_size(self, request):
        # DRF falls back to the default page size for a limit it cannot read
        # (`abc`, -5, 0) and caps a larger one silently: the client would not
        # learn that its page is not the size it asked for.
        raw = _single_query_param(request, self.page_size_query_param)
        if raw is None or raw == "":
            return self.page_size
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= self.max_page_size:
            raise ApplicationError(
                code="invalid_request",
                message=f"limit must be a whole number from 1 to {self.max_page_size}.",
                param="limit",
            )
        return int(raw)

    def decode_cursor(self, request):
        _single_query_param(request, self.cursor_query_param)
        try:
            cursor = super().decode_cursor(request)
        except drf_exceptions.NotFound:
            # DRF answers 404 for a bad cursor; it is bad input, not a missing page.
            raise _invalid_cursor() from None
        # DRF checks the cursor's encoding, not its position: a position that
        # is not a primary key would reach the query (a 500).
        if cursor is not None and cursor.position is not None:
            try:
                int(cursor.position)
            except ValueError:
                raise _invalid_cursor() from None
        return cursor


class PageQuery(StrictSerializer):
    """The query of a list view: its filters (a subclass's fields), and the pagination's own
    `cursor` and `limit`, checked by IdCursorPagination (blank: the first page, the default
    size). Any other parameter is a 400 naming it."""

    cursor = serializers.CharField(required=False, allow_blank=True)
    limit = serializers.CharField(required=False, allow_blank=True)

    def filters(self) -> dict[str, Any]:
        """The validated filters, without the pagination's own parameters."""
        return {
            name: value
            for name, value in self.validated_data.items()
            if name not in ("cursor", "limit")
        }


# For an OrgApiView whose GET lists the organization's own rows a page at a time: its
# `Query` names the filters the selector takes besides `cursor` and `limit`, and any other
# query parameter, or one given twice, is a 400 naming it. Ignored, a typo (`?limt=5`) or a
# filter the list does not have (`?status=`) answered the default page as if it were the one
# asked for. (A comment, not a docstring: drf-spectacular would publish a docstring as the
# description of every operation of the views that mix it in.)
class PagedListMixin:
    Query: type[PageQuery] = PageQuery

    def page(self, request: Request, selector, output_class) -> Response:
        query = self.Query(data=query_data(request))
        query.is_valid(raise_exception=True)
        rows = selector(organization=request.organization, **query.filters())
        paginator = self.pagination_class()
        page = paginator.paginate_queryset(rows, request, view=self)
        return paginator.get_paginated_response(output_class(page, many=True).data)


def _invalid_cursor() -> ApplicationError:
    return ApplicationError(
        code="invalid_cursor",
        message="The cursor is not one this API returned; start again without it.",
        param="cursor",
    )


def acting_user(request):
    """The signed-in person behind a request, or None when an API key acts."""
    return None if isinstance(request.user, KeyPrincipal) else request.user


def acting_key(request):
    """The API key behind a request, or None when a signed-in person acts."""
    return request.auth if isinstance(request.user, KeyPrincipal) else None


class _Replay(Exception):
    def __init__(self, stored: StoredResponse) -> None:
        self.stored = stored


class _NegotiationSettings:
    """What DRF's negotiation reads of its settings: no `?format=` override."""

    URL_FORMAT_OVERRIDE = None


class ApiContentNegotiation(DefaultContentNegotiation):
    """DRF's negotiation by `Accept`, without its `?format=` override.

    With it, `?format=xml` (a renderer these views do not have) was a 404
    `not_found`, read as "no such job"; without it, `format` is a query
    parameter like any other: refused by a view that takes query parameters
    (every list), ignored by one that takes none.
    """

    settings = _NegotiationSettings


def _require_key_creator_manages(key, organization: Organization) -> None:
    """An `admin` key's power is its creator's: it works only while the person who created
    it is an owner or admin of the organization, so demoting or removing an admin disarms
    the admin keys they made (inference and other scopes keep working); so does
    deactivating them (staff do that rather than delete a user). A key made with
    `manage.py apikey_create` has no creator: the operator's, its scope alone decides. One
    query, on admin endpoints only."""
    if key.created_by_id is None:
        return
    if not Membership.objects.filter(
        organization=organization,
        user_id=key.created_by_id,
        user__is_active=True,
        role__in=MANAGERS,
    ).exists():
        raise ApplicationError(
            code="permission_denied",
            message="This API key's admin scope acts for the person who created it, who is no "
            "longer an owner or admin of this organization.",
            status=403,
        )


class OrgApiView(APIView):
    authentication_classes = [ApiKeyAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]
    parser_classes = [JsonParser]
    content_negotiation_class = ApiContentNegotiation
    # List views page with it (PagedListMixin); drf-spectacular reads it
    # to document the {next, previous, results} envelope and the cursor and
    # limit parameters of every operation whose response is a list.
    pagination_class = IdCursorPagination
    # An API key needs this scope; None means any key of the organization.
    required_scope: str | None = None
    # A signed-in user needs one of these roles in the organization.
    allowed_roles: tuple[str, ...] = ALL_ROLES
    # The view's POST counts the request against its requests-per-minute
    # limits itself, with the other reservations its service takes in Redis
    # (one round trip less): `request.request_count` (accounts.ratelimits.
    # RequestCount) goes to the service. Should the view fail before the
    # count, it is taken on the way out (finalize_response). Its other
    # methods (a GET that lists) do no such work: they are counted, and
    # refused over the limit, before they run, as every other view's are.
    counts_requests_with_work = False

    # --- who and for which organization ----------------------------------------

    def resolve_organization(self, request: Request) -> Organization:
        """The organization a request acts for.

        API key: its organization. Signed-in user: the `X-Organization` header
        (a slug), else their personal organization, else their first one.
        """
        if isinstance(request.user, KeyPrincipal):
            return request.user.organization
        slug = request.headers.get("X-Organization")
        if slug:
            membership = user_membership_by_slug(user=request.user, slug=slug)
        else:
            membership = (
                user_memberships(user=request.user)
                .order_by("-organization__personal", "pk")
                .first()
            )
        if membership is None:
            raise ApplicationError(
                code="not_found",
                message="No such organization among yours.",
                status=404,
                param="X-Organization",
            )
        request.membership = membership
        return membership.organization

    def check_access(self, request: Request, organization: Organization) -> None:
        if isinstance(request.user, KeyPrincipal):
            scopes = request.auth.scopes
            if self.required_scope and self.required_scope not in scopes:
                raise ApplicationError(
                    code="permission_denied",
                    message=f"This API key lacks the {self.required_scope!r} scope.",
                    status=403,
                )
            if self.required_scope == Scope.ADMIN:
                _require_key_creator_manages(request.auth, organization)
            return
        role = getattr(request, "membership", None) and request.membership.role
        if role not in self.allowed_roles:
            raise ApplicationError(
                code="permission_denied",
                message=f"This needs one of the roles: {', '.join(self.allowed_roles)}.",
                status=403,
            )

    def membership_for(self, request: Request, organization: Organization) -> Membership | None:
        if isinstance(request.user, KeyPrincipal):
            return None
        return Membership.objects.filter(user=request.user, organization=organization).first()

    # --- the request pipeline --------------------------------------------------

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # authentication and IsAuthenticated
        request.organization = self.resolve_organization(request)
        # Counted before access is checked: a refused request (403) counts as any
        # other 4xx does (README), and a key that may not act here cannot send
        # requests, each costing a check, without a limit.
        self._rate_limit(request)
        self.check_access(request, request.organization)
        self._idempotency_record = None
        if request.method == "POST" and "Idempotency-Key" in request.headers:
            key = acting_key(request)
            outcome = idempotency_begin(
                organization=request.organization,
                caller=f"key:{key.pk}" if key is not None else f"user:{request.user.pk}",
                key=request.headers["Idempotency-Key"],
                method=request.method,
                path=request.get_full_path(),
                body=request.body,
            )
            if isinstance(outcome, StoredResponse):
                raise _Replay(outcome)
            self._idempotency_record = outcome

    def _rate_limit(self, request: Request) -> None:
        org = request.organization
        limits = [requests_limit(org)]
        if isinstance(request.user, KeyPrincipal):
            key = request.auth
            limits.insert(
                0,
                Limit(
                    scope=f"key:{key.pk}", limit=key.requests_per_minute or org.requests_per_minute
                ),
            )
            # A key made with a key also counts in the bucket of every key above it that
            # has a limit of its own, against that key's limit: else a key allowed 10 a
            # minute mints 100 keys of 10 each, wherever it stands in its line. Built with
            # the cached key (api_keys._key_load: no query), counted in the same script
            # as the rest (no round trip), all or none. An ancestor without a limit of its
            # own is bounded by the organization's, counted already.
            limits[1:1] = key.line_limits
        if self.counts_requests_with_work and request.method == "POST":
            request.request_count = RequestCount(limits)
            return
        request.ratelimit = rate_limit_consume(kind="requests", limits=limits)

    def _count_request_if_not_yet(self, request) -> None:
        """The request's count, for a view that failed before its service took it."""
        count = getattr(request, "request_count", None)
        if count is None or count.refused:
            return
        if count.usage is None:
            try:
                count.usage = rate_limit_consume(kind="requests", limits=count.limits)
            except ApplicationError:
                # Over the limit already: the answer stays the view's error
                # (a 4xx of its own), without the limit headers.
                return
            except Exception:
                # Redis failed: answer with the view's own error all the
                # same, uncounted, rather than turn it into a 500.
                logger.warning("could not count a request against its limits", exc_info=True)
                return
        request.ratelimit = count.usage

    def handle_exception(self, exc: Exception):
        if isinstance(exc, _Replay):
            response = HttpResponse(
                exc.stored.body, status=exc.stored.status_code, content_type=exc.stored.content_type
            )
            for name, value in exc.stored.headers.items():
                response[name] = value
            response["Idempotent-Replayed"] = "true"
            return response
        refused_input = isinstance(exc, ApplicationError) and exc.refuses_input
        self._answer_took_effect = isinstance(exc, ApplicationError) and exc.took_effect
        refused_by_limit = _rate_limited(exc) and not self._answer_took_effect
        if isinstance(exc, _REFUSED_BEFORE_WORK) or refused_input or refused_by_limit:
            record = getattr(self, "_idempotency_record", None)
            if record is not None:
                self._idempotency_record = None
                idempotency_release(record=record)
        try:
            return super().handle_exception(exc)
        except Exception:
            # A server error: free the Idempotency-Key so the client can retry.
            record = getattr(self, "_idempotency_record", None)
            if record is not None:
                self._idempotency_record = None
                idempotency_complete(record=record, status_code=500, content_type="", body=b"")
            raise

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        self._count_request_if_not_yet(request)
        usage = getattr(request, "ratelimit", None)
        if usage is not None:
            response["x-ratelimit-limit-requests"] = str(usage.limit)
            response["x-ratelimit-remaining-requests"] = str(usage.remaining)
            response["x-ratelimit-reset-requests"] = f"{usage.reset_seconds}s"
        record = getattr(self, "_idempotency_record", None)
        if record is not None:
            self._idempotency_record = None
            if getattr(response, "streaming", False):
                # A stream cannot be replayed byte for byte: a retry is told
                # where the first request's job is instead of running again.
                idempotency_complete(
                    record=record,
                    status_code=409,
                    content_type="application/json",
                    body=json.dumps(
                        error_body(
                            code="idempotent_stream",
                            message=(
                                "This request was already answered as a stream; "
                                f"its job is {response.get('X-Gym-Job-Id', 'unknown')}."
                            ),
                            status=409,
                        )
                    ).encode(),
                )
                return response
            if hasattr(response, "render") and not getattr(response, "is_rendered", True):
                response.render()
            idempotency_complete(
                record=record,
                status_code=response.status_code,
                content_type=response.get("Content-Type", ""),
                body=response.content,
                headers=replayed_headers(response),
                took_effect=getattr(self, "_answer_took_effect", False),
            )
        return response
